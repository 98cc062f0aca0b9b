//! [`ServeConfig`], the settings of `twopc serve` (clap flags with environment variables;
//! defaults shared with `Default`; [`ServeConfig::validate`] names the bad field and the
//! allowed range), and the engine's part of them.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::secret::{check_token, Secret};
use super::ConfigError;
use crate::engine::EngineConfig;
use crate::log::{SledLogOptions, DEFAULT_GROUP_COMMIT_DELAY_US};

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
    /// Reads no file ([`crate::server::Security::load`] does).
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
