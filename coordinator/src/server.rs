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

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::info;
use twopc_proto::v1::admin_server::AdminServer;
use twopc_proto::v1::coordinator_server::CoordinatorServer;

use crate::admin::AdminService;
use crate::engine::EngineConfig;
use crate::log::{DecisionLog, LogError, SledLog, SledLogOptions};
use crate::runtime::{Runtime, RuntimeOptions};
use crate::service::CoordinatorService;
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
    /// Commit single-branch transactions in one phase (no prepare, no log write).
    #[arg(long, env = "TWOPC_ONE_PHASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub one_phase: bool,
    /// Address of the Prometheus `GET /metrics` endpoint (HTTP); not served unless given.
    #[arg(long, env = "TWOPC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

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

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    let log = Arc::new(SledLog::open(&cfg.data_dir, SledLogOptions::default())?);
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
    cfg.validate()?;
    let transport = GrpcTransport::new(GrpcTransportOptions {
        connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
        rpc_timeout: Duration::from_millis(cfg.rpc_timeout_ms),
    });
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

    let addr = listener.local_addr().ok();
    info!(?addr, "serving");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflection)
        .add_service(AdminServer::new(AdminService::new(rt.clone())))
        .add_service(CoordinatorServer::new(CoordinatorService::new(rt)))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    info!("server stopped");
    Ok(())
}
