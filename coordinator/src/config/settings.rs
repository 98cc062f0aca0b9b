//! The settings of `twopc serve`, each declared once, and what the parts of the
//! coordinator get from them.
//!
//! One field of [`ServeConfig`] is one setting. Its doc comment is the help text; its
//! `#[arg]` gives the flag (the field's name in kebab-case), the environment variable and
//! the default; after `=>` its [`Spec`] says what it allows and how an unset value is
//! printed. From that one declaration come the flag and `--help`, the config-file key
//! (the field's name), [`ServeConfig::default`], the checks of [`ServeConfig::validate`],
//! the file's parser and `--print-config` (through [`SETTINGS`]). Adding a setting is
//! adding a field here; the tests in `config/tests.rs` fail if a field's flag,
//! environment variable, key, default or range drift apart.
//!
//! Defaults the engine also has are the engine's ([`EngineConfig::DEFAULT`]), so they are
//! written once; [`ServeConfig::engine_config`], [`ServeConfig::runtime_options`],
//! [`ServeConfig::transport_options`] and [`ServeConfig::log_options`] are the one place
//! the settings become the options of the engine, runtime, transport and decision log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{Args, FromArgMatches};

use super::secret::Secret;
use super::table::{settings, Spec};
use crate::engine::EngineConfig;
use crate::log::etcd_log::DEFAULT_ETCD_CLUSTER;
use crate::log::{
    ConfiguredLog, EtcdLog, EtcdLogOptions, LogError, SledLog, SledLogOptions,
    DEFAULT_GROUP_COMMIT_DELAY_US,
};
use crate::runtime::RuntimeOptions;
use crate::transport::GrpcTransportOptions;

/// The engine's defaults, which are those of its settings.
const ENGINE: EngineConfig = EngineConfig::DEFAULT;

/// The `service.name` exported spans carry unless `--otlp-service-name` says otherwise.
pub const DEFAULT_OTLP_SERVICE_NAME: &str = "twopc-coordinator";

/// What a socket address setting may be, for messages.
const SOCKET_ADDRESS: &str = "a socket address string, e.g. \"127.0.0.1:7400\"";

settings! {
    /// Everything `twopc serve` can be told: flags, each with an environment variable,
    /// and the same keys in the `--config` file (see the module docs).
    #[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
    pub struct ServeConfig {
        /// Address the gRPC server listens on.
        #[arg(long, env = "TWOPC_LISTEN", default_value = "127.0.0.1:7400")]
        pub listen: SocketAddr => Spec::described(SOCKET_ADDRESS),
        /// Directory of the decision log (created if missing; locked while running).
        #[arg(long, env = "TWOPC_DATA_DIR", default_value = "twopc-data")]
        pub data_dir: PathBuf => Spec::described("a non-empty path string"),
        /// How long votes may take before the transaction aborts (ms).
        #[arg(
            long,
            env = "TWOPC_PREPARE_TIMEOUT_MS",
            default_value_t = ENGINE.prepare_timeout_ms
        )]
        pub prepare_timeout_ms: u64 => Spec::range(10, 3_600_000),
        /// How long a transaction may stay active without Commit before it is aborted (ms).
        #[arg(long, env = "TWOPC_TX_TIMEOUT_MS", default_value_t = ENGINE.tx_timeout_ms)]
        // The range ends at the longest timeout a Begin may ask for.
        pub tx_timeout_ms: u64 => Spec::range(10, ENGINE.max_tx_timeout_ms),
        /// How long Commit waits for phase two before answering, by default (ms).
        #[arg(long, env = "TWOPC_COMMIT_WAIT_MS", default_value_t = 5_000)]
        pub commit_wait_ms: u64 => Spec::range(0, 600_000),
        /// Bound on one RPC to a participant (ms).
        #[arg(long, env = "TWOPC_RPC_TIMEOUT_MS", default_value_t = 5_000)]
        pub rpc_timeout_ms: u64 => Spec::range(10, 600_000),
        /// Bound on connecting to a participant (ms).
        #[arg(long, env = "TWOPC_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
        pub connect_timeout_ms: u64 => Spec::range(10, 600_000),
        /// First phase-two retry delay (ms); doubles per attempt, with jitter.
        #[arg(
            long,
            env = "TWOPC_RETRY_INITIAL_MS",
            default_value_t = ENGINE.retry_initial_ms
        )]
        pub retry_initial_ms: u64 => Spec::range(1, 60_000),
        /// Cap of the phase-two retry delay (ms). Retries never stop.
        #[arg(long, env = "TWOPC_RETRY_MAX_MS", default_value_t = ENGINE.retry_max_ms)]
        pub retry_max_ms: u64 => Spec::range(1, 3_600_000).at_least("retry_initial_ms"),
        /// Most branches one transaction may have.
        #[arg(long, env = "TWOPC_MAX_BRANCHES", default_value_t = ENGINE.max_branches)]
        pub max_branches: usize => Spec::range(1, 1024),
        /// Commit single-branch transactions in one phase (no prepare; the intent and the outcome
        /// are synced, so the outcome survives a crash).
        #[arg(
            long,
            env = "TWOPC_ONE_PHASE",
            default_value_t = ENGINE.one_phase,
            action = clap::ArgAction::Set
        )]
        pub one_phase: bool => Spec::described("true or false"),
        /// Address of the Prometheus `GET /metrics` endpoint (HTTP); not served unless given.
        #[arg(long, env = "TWOPC_METRICS_LISTEN")]
        pub metrics_listen: Option<SocketAddr> =>
            Spec::described(SOCKET_ADDRESS).unset_means("not served"),
        /// TLS certificate chain (PEM) of the gRPC port. With --tls-key, every service on
        /// --listen (Coordinator, Admin, health, reflection) is served over TLS only.
        #[arg(long, env = "TWOPC_TLS_CERT", value_name = "FILE")]
        pub tls_cert: Option<PathBuf> => Spec::file(),
        /// Private key (PEM) of --tls-cert.
        #[arg(long, env = "TWOPC_TLS_KEY", value_name = "FILE")]
        pub tls_key: Option<PathBuf> => Spec::file(),
        /// CA certificate(s) (PEM): clients must present a certificate signed by it (mutual
        /// TLS on --listen). Needs --tls-cert.
        #[arg(long, env = "TWOPC_TLS_CLIENT_CA", value_name = "FILE")]
        pub tls_client_ca: Option<PathBuf> => Spec::file(),
        /// CA certificate(s) (PEM) participants' server certificates must be signed by. When
        /// set, participants are dialed over TLS (`http://` endpoints as `https://`).
        #[arg(long, env = "TWOPC_PARTICIPANT_CA", value_name = "FILE")]
        pub participant_ca: Option<PathBuf> => Spec::file(),
        /// Client certificate (PEM) presented to participants that require one (mutual TLS).
        /// Needs --participant-key and --participant-ca.
        #[arg(long, env = "TWOPC_PARTICIPANT_CERT", value_name = "FILE")]
        pub participant_cert: Option<PathBuf> => Spec::file(),
        /// Private key (PEM) of --participant-cert.
        #[arg(long, env = "TWOPC_PARTICIPANT_KEY", value_name = "FILE")]
        pub participant_key: Option<PathBuf> => Spec::file(),
        /// Bearer token the Coordinator API requires (the admin token is accepted too). Not
        /// set: that API is open. Prefer --client-token-file or the environment to argv.
        #[arg(
            long,
            env = "TWOPC_CLIENT_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        pub client_token: Option<Secret> => Spec::token(),
        /// File holding the client token (surrounding whitespace ignored).
        #[arg(long, env = "TWOPC_CLIENT_TOKEN_FILE", value_name = "FILE")]
        pub client_token_file: Option<PathBuf> => Spec::file(),
        /// Bearer token the Admin API (`twopc tx`) requires. Not set: that API is open.
        #[arg(
            long,
            env = "TWOPC_ADMIN_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        pub admin_token: Option<Secret> => Spec::token(),
        /// File holding the admin token (surrounding whitespace ignored).
        #[arg(long, env = "TWOPC_ADMIN_TOKEN_FILE", value_name = "FILE")]
        pub admin_token_file: Option<PathBuf> => Spec::file(),
        /// OpenTelemetry collector (OTLP over gRPC, an `http://` or `https://` URL such as
        /// http://127.0.0.1:4317) the coordinator's tracing spans are exported to. Not set:
        /// nothing is exported. An unreachable collector only costs dropped spans.
        #[arg(long, env = "TWOPC_OTLP_ENDPOINT", value_name = "URL")]
        pub otlp_endpoint: Option<String> => Spec::described(
            "an http:// or https:// URL string, e.g. \"http://127.0.0.1:4317\""
        )
        .unset_means("no trace export"),
        /// `service.name` of the exported spans (with --otlp-endpoint).
        #[arg(
            long,
            env = "TWOPC_OTLP_SERVICE_NAME",
            value_name = "NAME",
            default_value = DEFAULT_OTLP_SERVICE_NAME
        )]
        pub otlp_service_name: String => Spec::described("a non-empty string"),
        /// Group-commit delay of the decision log (µs): while many commits arrive together
        /// (the last sync covered at least four), the log writer waits this long for more
        /// before one sync covers them all: fewer syncs, more CPU for everything else, at the
        /// price of that wait. Try 300 on a busy coordinator. 0: off.
        #[arg(
            long,
            env = "TWOPC_GROUP_COMMIT_DELAY_US",
            default_value_t = DEFAULT_GROUP_COMMIT_DELAY_US
        )]
        pub group_commit_delay_us: u64 => Spec::range(0, 100_000),
        /// How long a finished transaction's decision record is kept (ms) before it is
        /// collected; after that its id answers FORGOTTEN (finished, outcome no longer
        /// kept) rather than its outcome. Longer than the longest a participant may be down
        /// and still expect its in-doubt branches settled by themselves. 0: keep forever.
        #[arg(
            long,
            env = "TWOPC_DECISION_RETENTION_MS",
            default_value_t = DEFAULT_DECISION_RETENTION_MS
        )]
        pub decision_retention_ms: u64 => Spec::range(0, 30 * 24 * 3_600_000),
        /// Where COMMIT decisions are kept: `sled` (an embedded database in --data-dir) or
        /// `etcd` (replicated by the etcd cluster of --etcd-endpoints; see "Decision log on
        /// etcd" in docs/operations.md).
        #[arg(
            long,
            env = "TWOPC_DECISION_LOG",
            value_name = "KIND",
            value_enum,
            default_value_t = DecisionLogKind::Sled
        )]
        pub decision_log: DecisionLogKind => Spec::described("\"sled\" or \"etcd\""),
        /// etcd client URLs, comma-separated (e.g.
        /// http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379). Required with
        /// --decision-log etcd, refused without it.
        #[arg(long, env = "TWOPC_ETCD_ENDPOINTS", value_name = "URL,URL,...")]
        pub etcd_endpoints: Option<String> => Spec::described(
            "a string of comma-separated http:// URLs, e.g. \"http://127.0.0.1:2379\""
        )
        .unset_means("none (required with --decision-log etcd)"),
        /// Name of this coordinator cluster in etcd: its keys live under
        /// /twopc/v1/<name>/, so several clusters can share one etcd. ASCII letters,
        /// digits, '-', '_' and '.'.
        #[arg(
            long,
            env = "TWOPC_ETCD_CLUSTER",
            value_name = "NAME",
            default_value = DEFAULT_ETCD_CLUSTER
        )]
        pub etcd_cluster: String => Spec::described(
            "a string of 1 to 64 ASCII letters, digits, '-', '_' or '.'"
        ),
    }
}

/// Which [`DecisionLog`](crate::log::DecisionLog) `twopc serve` opens (`--decision-log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionLogKind {
    /// [`SledLog`](crate::log::SledLog) in `--data-dir`.
    #[default]
    Sled,
    /// [`EtcdLog`](crate::log::EtcdLog) on `--etcd-endpoints`.
    Etcd,
}

impl DecisionLogKind {
    /// The name, as on the command line and in the file.
    pub fn name(self) -> &'static str {
        match self {
            DecisionLogKind::Sled => "sled",
            DecisionLogKind::Etcd => "etcd",
        }
    }
}

/// Default of `--decision-retention-ms`: ten minutes.
pub const DEFAULT_DECISION_RETENTION_MS: u64 = 600_000;

/// The built-in defaults, parsed once ([`built_in_defaults`]).
static DEFAULTS: LazyLock<ServeConfig> = LazyLock::new(built_in_defaults);

/// The built-in defaults: an empty command line parsed with every environment variable
/// ignored. clap's `default_value*` of each field is then the only place a default is
/// written, and the environment cannot change what [`ServeConfig::default`] is
/// (openraft's `Config::default` parses an empty command line the same way).
pub(super) fn built_in_defaults() -> ServeConfig {
    let command = ServeConfig::augment_args(clap::Command::new("serve"))
        .mut_args(|arg| arg.env(None::<&'static str>));
    // Fails on no input (there is none): only a default that does not parse as its own
    // type would, which the tests of every setting rule out.
    let matches = command
        .try_get_matches_from(["serve"])
        .expect("every setting's default parses");
    ServeConfig::from_arg_matches(&matches).expect("every setting's default parses")
}

impl Default for ServeConfig {
    fn default() -> Self {
        DEFAULTS.clone()
    }
}

impl ServeConfig {
    /// The engine's part. Every field is named, so a knob the engine gains must be
    /// decided here.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            prepare_timeout_ms: self.prepare_timeout_ms,
            tx_timeout_ms: self.tx_timeout_ms,
            // Not a setting: the engine's own bound (`tx_timeout_ms`'s range ends there).
            max_tx_timeout_ms: ENGINE.max_tx_timeout_ms,
            max_branches: self.max_branches,
            retry_initial_ms: self.retry_initial_ms,
            retry_max_ms: self.retry_max_ms,
            one_phase: self.one_phase,
        }
    }

    /// The runtime's part: the engine's, how long Commit waits for phase two and how
    /// long finished records are kept.
    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            engine: self.engine_config(),
            commit_wait: Duration::from_millis(self.commit_wait_ms),
            retention: match self.decision_retention_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
        }
    }

    /// The participant transport's timeouts.
    pub fn transport_options(&self) -> GrpcTransportOptions {
        GrpcTransportOptions {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            rpc_timeout: Duration::from_millis(self.rpc_timeout_ms),
        }
    }

    /// The decision log's options this configuration asks for.
    pub fn log_options(&self) -> SledLogOptions {
        SledLogOptions {
            group_commit_delay_us: self.group_commit_delay_us,
            ..SledLogOptions::default()
        }
    }

    /// The endpoints of `--etcd-endpoints`, split at commas, blanks dropped.
    pub fn etcd_endpoint_list(&self) -> Vec<String> {
        self.etcd_endpoints
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The etcd decision log's options this configuration asks for (the owner key
    /// advertises `--listen`).
    pub fn etcd_log_options(&self) -> EtcdLogOptions {
        EtcdLogOptions {
            advertise: self.listen.to_string(),
            ..EtcdLogOptions::new(self.etcd_endpoint_list(), self.etcd_cluster.clone())
        }
    }

    /// Opens the decision log `--decision-log` names: the one place `twopc serve`
    /// chooses it.
    pub fn open_log(&self) -> Result<ConfiguredLog, LogError> {
        Ok(match self.decision_log {
            DecisionLogKind::Sled => {
                ConfiguredLog::Sled(SledLog::open(&self.data_dir, self.log_options())?)
            }
            DecisionLogKind::Etcd => ConfiguredLog::Etcd(EtcdLog::open(self.etcd_log_options())?),
        })
    }
}
