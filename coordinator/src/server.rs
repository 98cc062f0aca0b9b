//! Configuration and start-up of the coordinator server.
//!
//! [`ServeConfig`] is the one configuration struct (clap flags with environment variables;
//! defaults shared with `Default`; [`ServeConfig::validate`] names the bad field and the
//! allowed range). [`run`] takes its listener and shutdown signal from outside, so tests
//! bind `127.0.0.1:0` and stop the server by completing a future.
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
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};
use twopc_proto::v1::admin_server::AdminServer;
use twopc_proto::v1::coordinator_server::CoordinatorServer;

use crate::admin::AdminService;
use crate::auth::{
    check_token, read_token_file, Api, AuthInterceptor, Secret, TokenFileError, Tokens,
};
use crate::engine::EngineConfig;
use crate::log::{DecisionLog, LogError, SledLog, SledLogOptions, DEFAULT_GROUP_COMMIT_DELAY_US};
use crate::runtime::{Runtime, RuntimeOptions};
use crate::service::CoordinatorService;
use crate::tls::{TlsFileError, TlsSettings};
use crate::transport::{GrpcTransport, GrpcTransportOptions};

/// The gRPC service name health reports on (besides the overall "" entry).
pub const SERVICE_NAME: &str = "twopc.v1.Coordinator";

/// Everything `twopc serve` can be told.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct ServeConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "TWOPC_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Directory of the decision log (created if missing; locked while running).
    #[arg(long, env = "TWOPC_DATA_DIR", default_value = "twopc-data")]
    pub data_dir: PathBuf,
    /// How long votes may take before the transaction aborts (ms).
    #[arg(long, env = "TWOPC_PREPARE_TIMEOUT_MS", default_value_t = 10_000)]
    pub prepare_timeout_ms: u64,
    /// How long a transaction may stay active without Commit before it is aborted (ms).
    #[arg(long, env = "TWOPC_TX_TIMEOUT_MS", default_value_t = 60_000)]
    pub tx_timeout_ms: u64,
    /// How long Commit waits for phase two before answering, by default (ms).
    #[arg(long, env = "TWOPC_COMMIT_WAIT_MS", default_value_t = 5_000)]
    pub commit_wait_ms: u64,
    /// Bound on one RPC to a participant (ms).
    #[arg(long, env = "TWOPC_RPC_TIMEOUT_MS", default_value_t = 5_000)]
    pub rpc_timeout_ms: u64,
    /// Bound on connecting to a participant (ms).
    #[arg(long, env = "TWOPC_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
    pub connect_timeout_ms: u64,
    /// First phase-two retry delay (ms); doubles per attempt, with jitter.
    #[arg(long, env = "TWOPC_RETRY_INITIAL_MS", default_value_t = 50)]
    pub retry_initial_ms: u64,
    /// Cap of the phase-two retry delay (ms). Retries never stop.
    #[arg(long, env = "TWOPC_RETRY_MAX_MS", default_value_t = 5_000)]
    pub retry_max_ms: u64,
    /// Most branches one transaction may have.
    #[arg(long, env = "TWOPC_MAX_BRANCHES", default_value_t = 64)]
    pub max_branches: usize,
    /// Commit single-branch transactions in one phase (no prepare; the intent and the outcome
    /// are synced, so the outcome survives a crash).
    #[arg(long, env = "TWOPC_ONE_PHASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub one_phase: bool,
    /// Address of the Prometheus `GET /metrics` endpoint (HTTP); not served unless given.
    #[arg(long, env = "TWOPC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM) of the gRPC port. With --tls-key, every service on
    /// --listen (Coordinator, Admin, health, reflection) is served over TLS only.
    #[arg(long, env = "TWOPC_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "TWOPC_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM): clients must present a certificate signed by it (mutual
    /// TLS on --listen). Needs --tls-cert.
    #[arg(long, env = "TWOPC_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA certificate(s) (PEM) participants' server certificates must be signed by. When
    /// set, participants are dialed over TLS (`http://` endpoints as `https://`).
    #[arg(long, env = "TWOPC_PARTICIPANT_CA", value_name = "FILE")]
    pub participant_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to participants that require one (mutual TLS).
    /// Needs --participant-key and --participant-ca.
    #[arg(long, env = "TWOPC_PARTICIPANT_CERT", value_name = "FILE")]
    pub participant_cert: Option<PathBuf>,
    /// Private key (PEM) of --participant-cert.
    #[arg(long, env = "TWOPC_PARTICIPANT_KEY", value_name = "FILE")]
    pub participant_key: Option<PathBuf>,
    /// Bearer token the Coordinator API requires (the admin token is accepted too). Not
    /// set: that API is open. Prefer --client-token-file or the environment to argv.
    #[arg(
        long,
        env = "TWOPC_CLIENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub client_token: Option<Secret>,
    /// File holding the client token (surrounding whitespace ignored).
    #[arg(long, env = "TWOPC_CLIENT_TOKEN_FILE", value_name = "FILE")]
    pub client_token_file: Option<PathBuf>,
    /// Bearer token the Admin API (`twopc tx`) requires. Not set: that API is open.
    #[arg(
        long,
        env = "TWOPC_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<Secret>,
    /// File holding the admin token (surrounding whitespace ignored).
    #[arg(long, env = "TWOPC_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// OpenTelemetry collector (OTLP over gRPC, an `http://` or `https://` URL such as
    /// http://127.0.0.1:4317) the coordinator's tracing spans are exported to. Not set:
    /// nothing is exported. An unreachable collector only costs dropped spans.
    #[arg(long, env = "TWOPC_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (with --otlp-endpoint).
    #[arg(
        long,
        env = "TWOPC_OTLP_SERVICE_NAME",
        value_name = "NAME",
        default_value = DEFAULT_OTLP_SERVICE_NAME
    )]
    pub otlp_service_name: String,
    /// Group-commit delay of the decision log (µs): while many commits arrive together
    /// (the last sync covered at least four), the log writer waits this long for more
    /// before one sync covers them all: fewer syncs, more CPU for everything else, at the
    /// price of that wait. Try 300 on a busy coordinator. 0: off.
    #[arg(
        long,
        env = "TWOPC_GROUP_COMMIT_DELAY_US",
        default_value_t = DEFAULT_GROUP_COMMIT_DELAY_US
    )]
    pub group_commit_delay_us: u64,
}

/// The `service.name` exported spans carry unless `--otlp-service-name` says otherwise.
pub const DEFAULT_OTLP_SERVICE_NAME: &str = "twopc-coordinator";

impl Default for ServeConfig {
    fn default() -> Self {
        let e = EngineConfig::default();
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            data_dir: PathBuf::from("twopc-data"),
            prepare_timeout_ms: e.prepare_timeout_ms,
            tx_timeout_ms: e.tx_timeout_ms,
            commit_wait_ms: 5_000,
            rpc_timeout_ms: 5_000,
            connect_timeout_ms: 2_000,
            retry_initial_ms: e.retry_initial_ms,
            retry_max_ms: e.retry_max_ms,
            max_branches: e.max_branches,
            one_phase: e.one_phase,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            participant_ca: None,
            participant_cert: None,
            participant_key: None,
            client_token: None,
            client_token_file: None,
            admin_token: None,
            admin_token_file: None,
            otlp_endpoint: None,
            otlp_service_name: DEFAULT_OTLP_SERVICE_NAME.to_string(),
            group_commit_delay_us: DEFAULT_GROUP_COMMIT_DELAY_US,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field} = {value}: {allowed}")]
pub struct ConfigError {
    /// The flag's name (as on the command line, without dashes).
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

const DAY_MS: u64 = 24 * 3600 * 1000;

/// Inclusive bounds of every numeric field, by its name on the command line
/// (`retry-max-ms` must in addition be at least `retry-initial-ms`).
pub const LIMITS: &[(&str, u64, u64)] = &[
    ("prepare-timeout-ms", 10, 3_600_000),
    ("tx-timeout-ms", 10, DAY_MS),
    ("commit-wait-ms", 0, 600_000),
    ("rpc-timeout-ms", 10, 600_000),
    ("connect-timeout-ms", 10, 600_000),
    ("retry-initial-ms", 1, 60_000),
    ("retry-max-ms", 1, 3_600_000),
    ("max-branches", 1, 1024),
    ("group-commit-delay-us", 0, 100_000),
];

/// The bounds of a numeric field in [`LIMITS`] (`None` for a field that is not numeric).
pub fn limits(field: &str) -> Option<(u64, u64)> {
    LIMITS
        .iter()
        .find(|(f, _, _)| *f == field)
        .map(|&(_, min, max)| (min, max))
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError {
            field,
            value: value.to_string(),
            allowed: format!("must be between {min} and {max}"),
        });
    }
    Ok(())
}

fn limited(field: &'static str, value: u64) -> Result<(), ConfigError> {
    let (min, max) = limits(field).expect("every numeric field is in LIMITS");
    range(field, value, min, max)
}

impl ServeConfig {
    /// The decision log's options this configuration asks for.
    pub fn log_options(&self) -> SledLogOptions {
        SledLogOptions {
            group_commit_delay_us: self.group_commit_delay_us,
            ..SledLogOptions::default()
        }
    }

    /// Checks every field; the error names the first bad one and its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        limited("prepare-timeout-ms", self.prepare_timeout_ms)?;
        limited("tx-timeout-ms", self.tx_timeout_ms)?;
        limited("commit-wait-ms", self.commit_wait_ms)?;
        limited("rpc-timeout-ms", self.rpc_timeout_ms)?;
        limited("connect-timeout-ms", self.connect_timeout_ms)?;
        limited("retry-initial-ms", self.retry_initial_ms)?;
        let (min, max) = limits("retry-max-ms").expect("retry-max-ms is in LIMITS");
        range(
            "retry-max-ms",
            self.retry_max_ms,
            self.retry_initial_ms.max(min),
            max,
        )?;
        limited("max-branches", self.max_branches as u64)?;
        limited("group-commit-delay-us", self.group_commit_delay_us)?;
        if let Some(m) = self.metrics_listen {
            if m == self.listen && m.port() != 0 {
                return Err(ConfigError {
                    field: "metrics-listen",
                    value: m.to_string(),
                    allowed: "must differ from --listen".into(),
                });
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError {
                field: "data-dir",
                value: String::new(),
                allowed: "must not be empty".into(),
            });
        }
        self.validate_otlp()?;
        self.validate_security()
    }

    /// `--otlp-endpoint` is an `http://` or `https://` URL with a host;
    /// `--otlp-service-name` is not empty.
    fn validate_otlp(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let ok = endpoint.parse::<http::Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return Err(ConfigError {
                    field: "otlp-endpoint",
                    value: endpoint.clone(),
                    allowed: "must be an http:// or https:// URL, e.g. http://127.0.0.1:4317"
                        .into(),
                });
            }
        }
        if self.otlp_service_name.trim().is_empty() {
            return Err(ConfigError {
                field: "otlp-service-name",
                value: self.otlp_service_name.clone(),
                allowed: "must not be empty".into(),
            });
        }
        Ok(())
    }

    /// The TLS and token fields: pairs given together, what needs what, token forms.
    /// Reads no file ([`Security::load`] does).
    fn validate_security(&self) -> Result<(), ConfigError> {
        fn shown(p: &Option<PathBuf>) -> String {
            p.as_ref()
                .map_or_else(|| "(not set)".into(), |p| p.display().to_string())
        }
        fn empty(field: &'static str, p: &Option<PathBuf>) -> Result<(), ConfigError> {
            match p {
                Some(p) if p.as_os_str().is_empty() => Err(ConfigError {
                    field,
                    value: String::new(),
                    allowed: "must be a file name, not empty".into(),
                }),
                _ => Ok(()),
            }
        }
        empty("tls-cert", &self.tls_cert)?;
        empty("tls-key", &self.tls_key)?;
        empty("tls-client-ca", &self.tls_client_ca)?;
        empty("participant-ca", &self.participant_ca)?;
        empty("participant-cert", &self.participant_cert)?;
        empty("participant-key", &self.participant_key)?;
        empty("client-token-file", &self.client_token_file)?;
        empty("admin-token-file", &self.admin_token_file)?;
        let pair = |a: &'static str,
                    pa: &Option<PathBuf>,
                    b: &'static str,
                    pb: &Option<PathBuf>|
         -> Result<(), ConfigError> {
            match (pa, pb) {
                (Some(_), None) => Err(ConfigError {
                    field: b,
                    value: shown(pb),
                    allowed: format!("must be given with --{a} (both or neither)"),
                }),
                (None, Some(_)) => Err(ConfigError {
                    field: a,
                    value: shown(pa),
                    allowed: format!("must be given with --{b} (both or neither)"),
                }),
                _ => Ok(()),
            }
        };
        pair("tls-cert", &self.tls_cert, "tls-key", &self.tls_key)?;
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError {
                field: "tls-client-ca",
                value: shown(&self.tls_client_ca),
                allowed: "needs --tls-cert and --tls-key (client certificates are a TLS \
                          feature)"
                    .into(),
            });
        }
        pair(
            "participant-cert",
            &self.participant_cert,
            "participant-key",
            &self.participant_key,
        )?;
        if self.participant_cert.is_some() && self.participant_ca.is_none() {
            return Err(ConfigError {
                field: "participant-cert",
                value: shown(&self.participant_cert),
                allowed: "needs --participant-ca (the CA that signed the participants' \
                          certificates)"
                    .into(),
            });
        }
        for (field, token, file_field, file) in [
            (
                "client-token",
                &self.client_token,
                "client-token-file",
                &self.client_token_file,
            ),
            (
                "admin-token",
                &self.admin_token,
                "admin-token-file",
                &self.admin_token_file,
            ),
        ] {
            if token.is_some() && file.is_some() {
                return Err(ConfigError {
                    field: file_field,
                    value: shown(file),
                    allowed: format!("give --{field} or --{file_field}, not both"),
                });
            }
            if let Some(t) = token {
                check_token(field, t)?;
            }
        }
        if let (Some(c), Some(a)) = (&self.client_token, &self.admin_token) {
            if c == a {
                return Err(ConfigError {
                    field: "admin-token",
                    value: "<redacted>".into(),
                    allowed: "must differ from --client-token".into(),
                });
            }
        }
        Ok(())
    }

    /// The engine's part.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            prepare_timeout_ms: self.prepare_timeout_ms,
            tx_timeout_ms: self.tx_timeout_ms,
            max_tx_timeout_ms: 24 * 3600 * 1000,
            max_branches: self.max_branches,
            retry_initial_ms: self.retry_initial_ms,
            retry_max_ms: self.retry_max_ms,
            one_phase: self.one_phase,
        }
    }
}

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
    let log = Arc::new(SledLog::open(&cfg.data_dir, cfg.log_options())?);
    info!(
        data_dir = %cfg.data_dir.display(),
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
    let mut transport = GrpcTransport::new(GrpcTransportOptions {
        connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
        rpc_timeout: Duration::from_millis(cfg.rpc_timeout_ms),
    });
    if let Some(tls) = security.tls.participants.clone() {
        transport = transport.with_tls(tls);
    }
    let opts = RuntimeOptions {
        engine: cfg.engine(),
        commit_wait: Duration::from_millis(cfg.commit_wait_ms),
    };
    let rt = Runtime::new(opts, log, transport);
    // Served until this function returns (the handle stops it when dropped).
    let _metrics = metrics.map(|l| {
        info!(addr = ?l.local_addr().ok(), "metrics endpoint on /metrics");
        let rt = rt.clone();
        crate::metrics::spawn(l, Arc::new(move || rt.render_metrics()))
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    {
        let reporter = reporter.clone();
        rt.on_halt(move |_| {
            let reporter = reporter.clone();
            tokio::spawn(async move {
                reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                reporter
                    .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                    .await;
            });
        });
    }
    let (commits, undecided) = rt.recover()?;
    info!(commits, undecided, "recovery scheduled");
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;

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
