//! Start-up of the coordinator server.
//!
//! [`run`] takes its configuration ([`ServeConfig`], see [`crate::config`]), its listener
//! and its shutdown signal from outside, so tests bind `127.0.0.1:0` and stop the server
//! by completing a future.
//!
//! Start-up order: lock and open the decision log (bumping the epoch), report
//! NOT_SERVING, schedule recovery of every unfinished transaction, report SERVING, serve.
//! With `--metrics-listen`, Prometheus metrics ([`crate::metrics`]) are served on a port
//! of their own from the moment the runtime exists (before recovery).
//!
//! Security (`docs/security.md`): `--tls-cert`/`--tls-key` serve the gRPC port over TLS
//! ([`crate::tls`]), `--tls-client-ca` requires client certificates, `--participant-ca`
//! (with `--participant-cert`/`--participant-key`) dials participants over (mutual) TLS,
//! and `--client-token`/`--admin-token` guard the Coordinator and Admin services
//! ([`crate::auth`]). Every certificate, key and token file is read and checked by
//! [`Security::load`] before the server starts.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};
use twopc_proto::v1::admin_server::AdminServer;
use twopc_proto::v1::coordinator_server::CoordinatorServer;

use crate::admin::AdminService;
use crate::auth::{read_token_file, Api, AuthInterceptor, TokenFileError, Tokens};
use crate::config::{ConfigError, Secret, ServeConfig};
use crate::log::{DecisionLog, LogError};
use crate::runtime::Runtime;
use crate::service::CoordinatorService;
use crate::tls::{TlsFileError, TlsSettings};
use crate::transport::GrpcTransport;

/// The gRPC service name health reports on (besides the overall "" entry).
pub const SERVICE_NAME: &str = "twopc.v1.Coordinator";

/// The security settings of a [`ServeConfig`], every file read and checked: TLS of the
/// port and towards participants, and the tokens in force.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Certificates and keys.
    pub tls: TlsSettings,
    /// Tokens (from the flags, the environment, the config file or token files).
    pub tokens: Tokens,
}

impl Security {
    /// Validates `cfg`, then reads its certificate, key and token files. Errors name the
    /// flag and the file.
    pub fn load(cfg: &ServeConfig) -> Result<Security, ServeError> {
        cfg.validate()?;
        let tls = TlsSettings::load(cfg)?;
        let token = |t: &Option<Secret>, flag, file: &Option<PathBuf>| match (t, file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(path)) => read_token_file(flag, path).map(Some),
            (None, None) => Ok(None),
        };
        let tokens = Tokens {
            client: token(
                &cfg.client_token,
                "--client-token-file",
                &cfg.client_token_file,
            )?,
            admin: token(
                &cfg.admin_token,
                "--admin-token-file",
                &cfg.admin_token_file,
            )?,
        };
        if tokens.client.is_some() && tokens.client == tokens.admin {
            return Err(ConfigError {
                field: "admin-token",
                value: "<redacted>".into(),
                allowed: "must differ from the client token".into(),
            }
            .into());
        }
        Ok(Security { tls, tokens })
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate or key file cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    /// A token file cannot be used.
    #[error(transparent)]
    Token(#[from] TokenFileError),
    /// The decision log could not be opened or read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be set up.
    #[error("gRPC reflection set-up failed: {0}")]
    Reflection(String),
    /// The metrics listener could not be bound.
    #[error("cannot listen on {addr} (--metrics-listen): {source}")]
    MetricsListen {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Binds the metrics listener of `--metrics-listen`, if one is configured.
pub async fn bind_metrics(cfg: &ServeConfig) -> Result<Option<TcpListener>, ServeError> {
    let Some(addr) = cfg.metrics_listen else {
        return Ok(None);
    };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| ServeError::MetricsListen { addr, source })
}

/// Runs the coordinator on `listener` until `shutdown` completes.
pub async fn run(
    cfg: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    cfg.validate()?;
    let log = Arc::new(cfg.open_log()?);
    info!(
        log = %log.place(),
        epoch = log.epoch(),
        node = format_args!("{:08x}", log.node_id()),
        "decision log open"
    );
    run_with_log(cfg, log, listener, shutdown).await
}

/// [`run`] over an already opened log (tests inject a log with fault switches). Binds
/// `--metrics-listen` itself when it is set.
pub async fn run_with_log<L: DecisionLog>(
    cfg: ServeConfig,
    log: Arc<L>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    cfg.validate()?;
    let metrics = bind_metrics(&cfg).await?;
    run_with_listeners(cfg, log, listener, metrics, shutdown).await
}

/// [`run_with_log`] with the metrics listener bound by the caller (`None`: no metrics
/// endpoint; `cfg.metrics_listen` is not read), so it can report the bound address.
pub async fn run_with_listeners<L: DecisionLog>(
    cfg: ServeConfig,
    log: Arc<L>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let security = Security::load(&cfg)?;
    let mut transport = GrpcTransport::new(cfg.transport_options());
    if let Some(tls) = security.tls.participants.clone() {
        transport = transport.with_tls(tls);
    }
    let rt = Runtime::new(cfg.runtime_options(), log, transport);
    // Served until this function returns (the handle stops it when dropped).
    let _metrics = metrics.map(|l| {
        info!(addr = ?l.local_addr().ok(), "metrics endpoint on /metrics");
        let rt = rt.clone();
        crate::metrics::spawn(l, Arc::new(move || rt.render_metrics()))
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    {
        let reporter = reporter.clone();
        rt.on_halt(move |_| {
            let reporter = reporter.clone();
            tokio::spawn(async move { set_health(&reporter, ServingStatus::NotServing).await });
        });
    }
    let (commits, undecided) = rt.recover()?;
    info!(commits, undecided, "recovery scheduled");
    set_health(&reporter, ServingStatus::Serving).await;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(twopc_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let tokens = Arc::new(security.tokens);
    if tokens.client.is_some() && tokens.admin.is_none() {
        warn!(
            "--client-token is set but --admin-token is not: the Admin API (list, show, \
             resolve) is open to anyone who can reach the port"
        );
    }
    let (stop_streams, stopping) = tokio::sync::watch::channel(false);
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = security.tls.server {
        builder = builder.tls_config(tls)?;
    }
    let addr = listener.local_addr().ok();
    info!(
        ?addr,
        tls = cfg.tls_cert.is_some(),
        client_certificates = cfg.tls_client_ca.is_some(),
        participant_tls = cfg.participant_ca.is_some(),
        client_token = tokens.client.is_some(),
        admin_token = tokens.admin.is_some(),
        "serving"
    );
    // Health and reflection stay open (load balancers probe them); the two APIs check
    // their tokens before any handler runs.
    builder
        .add_service(health)
        .add_service(reflection)
        .add_service(AdminServer::with_interceptor(
            AdminService::new(rt.clone()),
            AuthInterceptor::new(tokens.clone(), Api::Admin),
        ))
        .add_service(CoordinatorServer::with_interceptor(
            CoordinatorService::new(rt).with_shutdown(stopping),
            AuthInterceptor::new(tokens, Api::Client),
        ))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                shutdown.await;
                // Long-lived Pipeline streams end now; the server then waits only for
                // the calls already running.
                let _ = stop_streams.send(true);
            },
        )
        .await?;
    info!("server stopped");
    Ok(())
}

/// Reports `status` for the server as a whole (`""`, what load balancers probe) and for
/// the coordinator service by name.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}
