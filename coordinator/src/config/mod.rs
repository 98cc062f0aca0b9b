//! The configuration of `twopc serve`: [`ServeConfig`] (in `settings`), secret values
//! (`secret`), and where the values come from: flags, environment variables and a TOML
//! file, merged with a fixed precedence.
//!
//! This module depends on nothing that serves: [`crate::auth`] and [`crate::tls`] read
//! their settings from here, and [`crate::server`] uses all three.
//!
//! **Precedence** (highest first): command-line flag > environment variable (`TWOPC_*`) >
//! config file (`--config FILE` / `TWOPC_CONFIG`) > built-in default
//! ([`ServeConfig::default`]). clap resolves the first two and the default; [`resolve`]
//! then asks clap, field by field, whether the value came from the command line or the
//! environment ([`clap::ArgMatches::value_source`]) and, if it did not, takes the file's
//! value when the file has one. The merge itself ([`merge`]) is a pure function, so the
//! precedence is unit-tested without processes.
//!
//! **The file** has one key per [`ServeConfig`] field, named like the flag in snake_case
//! ([`KEYS`]): `listen = "127.0.0.1:7400"`, `prepare_timeout_ms = 10000`,
//! `one_phase = true`, ... Every key is optional. A relative `data_dir` is relative to the
//! working directory of the process, not to the file. Errors name the file and the key:
//! an unknown key lists the known ones; a value of the wrong type or out of range says
//! what is allowed (the ranges are [`ServeConfig::validate`]'s).
//!
//! **`--print-config`** prints the effective configuration ([`Effective::to_toml`]) with
//! a comment per key saying where the value came from; the output is itself a valid
//! config file that yields the same configuration, token values aside: `client_token`
//! and `admin_token` are shown as `<redacted>` in a comment, never printed (the token
//! *file* keys are paths and are printed).

use std::convert::identity;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;

mod secret;
mod settings;

pub use secret::{check_token, Secret, TOKEN_MAX_LEN, TOKEN_MIN_LEN};
pub use settings::{limits, ServeConfig, DEFAULT_OTLP_SERVICE_NAME, LIMITS};

/// A configuration value out of range, or at odds with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field} = {value}: {allowed}")]
pub struct ConfigError {
    /// The flag's name (as on the command line, without dashes).
    pub field: &'static str,
    /// The value given (`<redacted>` for a secret).
    pub value: String,
    /// What is allowed.
    pub allowed: String,
}

/// The keys of the config file, in the order of [`ServeConfig`]'s fields (each is the
/// flag's name with `_` for `-`, and the clap id of the field).
pub const KEYS: [&str; 25] = [
    "listen",
    "data_dir",
    "prepare_timeout_ms",
    "tx_timeout_ms",
    "commit_wait_ms",
    "rpc_timeout_ms",
    "connect_timeout_ms",
    "retry_initial_ms",
    "retry_max_ms",
    "max_branches",
    "one_phase",
    "metrics_listen",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "participant_ca",
    "participant_cert",
    "participant_key",
    "client_token",
    "client_token_file",
    "admin_token",
    "admin_token_file",
    "otlp_endpoint",
    "otlp_service_name",
    "group_commit_delay_us",
];

/// The keys whose values are secrets: `--print-config` says whether they are set, never
/// what they are.
pub const SECRET_KEYS: [&str; 2] = ["client_token", "admin_token"];

/// The arguments of `twopc serve`: the configuration itself plus where else to read it
/// from and whether to only print it.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration (flags and environment variables).
    #[command(flatten)]
    pub config: ServeConfig,
    /// TOML config file; keys are the flag names in snake_case. Flags and environment
    /// variables override it; it overrides the built-in defaults.
    #[arg(long = "config", env = "TWOPC_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Print the effective configuration as TOML (with where each value came from) and
    /// exit, without opening the data directory or binding ports.
    #[arg(long)]
    pub print_config: bool,
}

/// The config file as written: every key optional, unknown keys refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--prepare-timeout-ms`.
    pub prepare_timeout_ms: Option<u64>,
    /// `--tx-timeout-ms`.
    pub tx_timeout_ms: Option<u64>,
    /// `--commit-wait-ms`.
    pub commit_wait_ms: Option<u64>,
    /// `--rpc-timeout-ms`.
    pub rpc_timeout_ms: Option<u64>,
    /// `--connect-timeout-ms`.
    pub connect_timeout_ms: Option<u64>,
    /// `--retry-initial-ms`.
    pub retry_initial_ms: Option<u64>,
    /// `--retry-max-ms`.
    pub retry_max_ms: Option<u64>,
    /// `--max-branches`.
    pub max_branches: Option<usize>,
    /// `--one-phase`.
    pub one_phase: Option<bool>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--participant-ca`.
    pub participant_ca: Option<PathBuf>,
    /// `--participant-cert`.
    pub participant_cert: Option<PathBuf>,
    /// `--participant-key`.
    pub participant_key: Option<PathBuf>,
    /// `--client-token` (never written back out).
    #[serde(skip_serializing)]
    pub client_token: Option<Secret>,
    /// `--client-token-file`.
    pub client_token_file: Option<PathBuf>,
    /// `--admin-token` (never written back out).
    #[serde(skip_serializing)]
    pub admin_token: Option<Secret>,
    /// `--admin-token-file`.
    pub admin_token_file: Option<PathBuf>,
    /// `--otlp-endpoint`.
    pub otlp_endpoint: Option<String>,
    /// `--otlp-service-name`.
    pub otlp_service_name: Option<String>,
    /// `--group-commit-delay-us`.
    pub group_commit_delay_us: Option<u64>,
}

/// Where one effective value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The command line.
    Flag,
    /// The field's `TWOPC_*` environment variable.
    Env,
    /// The config file.
    File,
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::File => "file",
            Source::Default => "default",
        })
    }
}

/// Why the configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read (missing, unreadable).
    #[error("cannot read config file {} (--config / TWOPC_CONFIG): {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {}: not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The file has a key that is no configuration field.
    #[error(
        "config file {}: unknown key `{key}`; known keys: {}",
        path.display(),
        KEYS.join(", ")
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A value in the file has the wrong type or is out of range.
    #[error("config file {}: {key} = {value}: {message}; allowed: {allowed}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        message: String,
        /// What is allowed.
        allowed: String,
    },
    /// A value from a flag, an environment variable or the defaults is out of range.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// What a key allows, for error messages.
pub fn allowed(key: &str) -> String {
    match key {
        "listen" | "metrics_listen" => "a socket address string, e.g. \"127.0.0.1:7400\"".into(),
        "data_dir" => "a non-empty path string".into(),
        "tls_cert" | "tls_key" | "tls_client_ca" | "participant_ca" | "participant_cert"
        | "participant_key" | "client_token_file" | "admin_token_file" => {
            "a path string naming a file".into()
        }
        "client_token" | "admin_token" => format!(
            "a string of {} to {} visible ASCII characters",
            TOKEN_MIN_LEN, TOKEN_MAX_LEN
        ),
        "one_phase" => "true or false".into(),
        "otlp_endpoint" => {
            "an http:// or https:// URL string, e.g. \"http://127.0.0.1:4317\"".into()
        }
        "otlp_service_name" => "a non-empty string".into(),
        "retry_max_ms" => {
            let (_, max) = limits("retry-max-ms").unwrap_or((0, u64::MAX));
            format!("an integer between retry_initial_ms and {max}")
        }
        _ => match limits(&key.replace('_', "-")) {
            Some((min, max)) => format!("an integer between {min} and {max}"),
            None => format!("one of the keys {}", KEYS.join(", ")),
        },
    }
}

/// Reads and checks a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigFileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse_file(path, &text)
}

/// Parses and checks the text of a config file (`path` is only for messages).
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigFileError> {
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string().trim_end().to_string(),
            })?;
    // Key by key, so that every error names its key.
    for (key, value) in &table {
        let Some(known) = KEYS.iter().find(|k| **k == key.as_str()) else {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            });
        };
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        if let Err(e) = toml::Value::Table(one).try_into::<FileConfig>() {
            return Err(ConfigFileError::BadValue {
                path: path.to_path_buf(),
                key: known,
                value: value.to_string(),
                message: e.message().trim_end().to_string(),
                allowed: allowed(known),
            });
        }
    }
    toml::Value::Table(table)
        .try_into::<FileConfig>()
        .map_err(|e| ConfigFileError::Syntax {
            path: path.to_path_buf(),
            message: e.message().trim_end().to_string(),
        })
}

/// The configuration in effect and where each value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    /// The merged configuration.
    pub config: ServeConfig,
    /// The source of each field, in the order of [`KEYS`].
    pub sources: [Source; KEYS.len()],
    /// The config file, if one was given.
    pub file: Option<PathBuf>,
}

impl Effective {
    /// Where the value of `key` came from (`None` for an unknown key).
    pub fn source(&self, key: &str) -> Option<Source> {
        KEYS.iter().position(|k| *k == key).map(|i| self.sources[i])
    }

    /// Validates the merged configuration. An out-of-range value that came from the
    /// file is reported against the file and its key; others as [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        let Err(e) = self.config.validate() else {
            return Ok(());
        };
        let key = e.field.replace('-', "_");
        match (&self.file, self.source(&key)) {
            (Some(path), Some(Source::File)) => Err(ConfigFileError::BadValue {
                path: path.clone(),
                key: KEYS.iter().find(|k| **k == key).copied().unwrap_or(e.field),
                value: e.value.clone(),
                message: if limits(e.field).is_some() {
                    "out of range".into()
                } else {
                    "invalid".into()
                },
                allowed: e
                    .allowed
                    .strip_prefix("must be ")
                    .unwrap_or(&e.allowed)
                    .to_string(),
            }),
            _ => Err(e.into()),
        }
    }

    /// The configuration as a TOML config file, with a comment line per key saying
    /// where its value came from (`# key: flag|env|file|default`). Loading the output
    /// with `--config` gives the same configuration, except for token values
    /// ([`SECRET_KEYS`]): those are shown as `<redacted>` in a comment, never printed.
    pub fn to_toml(&self) -> String {
        let c = &self.config;
        let s = |v: &str| toml::Value::String(v.to_string()).to_string();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| s(&p.to_string_lossy()));
        let values: [Option<String>; KEYS.len()] = [
            Some(s(&c.listen.to_string())),
            Some(s(&c.data_dir.to_string_lossy())),
            Some(c.prepare_timeout_ms.to_string()),
            Some(c.tx_timeout_ms.to_string()),
            Some(c.commit_wait_ms.to_string()),
            Some(c.rpc_timeout_ms.to_string()),
            Some(c.connect_timeout_ms.to_string()),
            Some(c.retry_initial_ms.to_string()),
            Some(c.retry_max_ms.to_string()),
            Some(c.max_branches.to_string()),
            Some(c.one_phase.to_string()),
            c.metrics_listen.map(|m| s(&m.to_string())),
            path(&c.tls_cert),
            path(&c.tls_key),
            path(&c.tls_client_ca),
            path(&c.participant_ca),
            path(&c.participant_cert),
            path(&c.participant_key),
            // Secrets are never printed; see below.
            c.client_token.as_ref().map(|_| String::new()),
            path(&c.client_token_file),
            c.admin_token.as_ref().map(|_| String::new()),
            path(&c.admin_token_file),
            c.otlp_endpoint.as_deref().map(s),
            Some(s(&c.otlp_service_name)),
            Some(c.group_commit_delay_us.to_string()),
        ];
        let mut out = String::from(
            "# Effective configuration of `twopc serve`.\n\
             # Precedence: flag > env (TWOPC_*) > config file > default.\n\
             # Load it with `twopc serve --config FILE`.\n",
        );
        if let Some(path) = &self.file {
            out.push_str(&format!("# Config file: {}\n", path.display()));
        }
        for ((key, source), value) in KEYS.iter().zip(self.sources).zip(values) {
            out.push_str(&format!("\n# {key}: {source}\n"));
            match value {
                Some(_) if SECRET_KEYS.contains(key) => out.push_str(&format!(
                    "# {key} = <redacted> (set; never printed: give it again with the flag, \
                     the environment or {key}_file)\n"
                )),
                Some(v) => out.push_str(&format!("{key} = {v}\n")),
                None if *key == "metrics_listen" => {
                    out.push_str(&format!("# {key} is not set (not served)\n"))
                }
                None if *key == "otlp_endpoint" => {
                    out.push_str(&format!("# {key} is not set (no trace export)\n"))
                }
                None => out.push_str(&format!("# {key} is not set\n")),
            }
        }
        out
    }
}

/// Merges the parsed command line with the file. `explicit(key)` says whether the
/// command line or the environment set `key` (`Some(Flag | Env)`) or not (`None`: `cli`
/// holds the built-in default). Pure; the precedence lives here.
pub fn merge(
    cli: &ServeConfig,
    explicit: impl Fn(&str) -> Option<Source>,
    file: Option<(&Path, &FileConfig)>,
) -> Effective {
    let mut config = cli.clone();
    let mut sources = [Source::Default; KEYS.len()];
    let from_file = file.map(|(_, f)| f);
    macro_rules! take {
        ($i:expr, $field:ident, $wrap:expr) => {{
            debug_assert_eq!(KEYS[$i], stringify!($field));
            if let Some(s) = explicit(KEYS[$i]) {
                sources[$i] = s;
            } else if let Some(v) = from_file.and_then(|f| f.$field.clone()) {
                config.$field = $wrap(v);
                sources[$i] = Source::File;
            }
        }};
    }
    take!(0, listen, identity);
    take!(1, data_dir, identity);
    take!(2, prepare_timeout_ms, identity);
    take!(3, tx_timeout_ms, identity);
    take!(4, commit_wait_ms, identity);
    take!(5, rpc_timeout_ms, identity);
    take!(6, connect_timeout_ms, identity);
    take!(7, retry_initial_ms, identity);
    take!(8, retry_max_ms, identity);
    take!(9, max_branches, identity);
    take!(10, one_phase, identity);
    take!(11, metrics_listen, Some);
    take!(12, tls_cert, Some);
    take!(13, tls_key, Some);
    take!(14, tls_client_ca, Some);
    take!(15, participant_ca, Some);
    take!(16, participant_cert, Some);
    take!(17, participant_key, Some);
    take!(18, client_token, Some);
    take!(19, client_token_file, Some);
    take!(20, admin_token, Some);
    take!(21, admin_token_file, Some);
    take!(22, otlp_endpoint, Some);
    take!(23, otlp_service_name, identity);
    take!(24, group_commit_delay_us, identity);
    Effective {
        config,
        sources,
        file: file.map(|(p, _)| p.to_path_buf()),
    }
}

/// Whether clap took the value of `id` from the command line or the environment.
fn explicit_source(matches: &ArgMatches, id: &str) -> Option<Source> {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => Some(Source::Flag),
        Some(ValueSource::EnvVariable) => Some(Source::Env),
        _ => None,
    }
}

/// The effective configuration of `twopc serve`: `args` and `matches` as clap parsed
/// them (the `serve` subcommand's matches), merged with `--config`'s file, validated.
pub fn resolve(args: &ServeArgs, matches: &ArgMatches) -> Result<Effective, ConfigFileError> {
    let file = match &args.config_file {
        Some(path) => Some((path.as_path(), load_file(path)?)),
        None => None,
    };
    let effective = merge(
        &args.config,
        |key| explicit_source(matches, key),
        file.as_ref().map(|(p, f)| (*p, f)),
    );
    effective.validate()?;
    Ok(effective)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn path() -> &'static Path {
        Path::new("twopc.toml")
    }

    /// Parses `argv` with clap. The real `TWOPC_*` variables are ignored (tests run in
    /// parallel, and the environment of the test run is not ours); each `(id, value)` of
    /// `env` is put in a variable of its own that only this test's parse reads.
    fn parse_env(argv: &[&str], env: &[(&str, &str)]) -> (ServeArgs, ArgMatches) {
        let cmd = Cli::command().mut_args(|a| {
            let id = a.get_id().as_str().to_string();
            match env.iter().find(|(k, _)| *k == id) {
                Some((_, value)) => {
                    let var: &'static str = Box::leak(
                        format!("TWOPC_CONFIG_UNIT_TEST_{}", id.to_uppercase()).into_boxed_str(),
                    );
                    std::env::set_var(var, value);
                    a.env(var)
                }
                None => a.env(None::<&'static str>),
            }
        });
        let matches = cmd
            .try_get_matches_from(std::iter::once("serve").chain(argv.iter().copied()))
            .expect("valid arguments");
        let cli = Cli::from_arg_matches(&matches).expect("matches");
        (cli.args, matches)
    }

    fn parse(argv: &[&str]) -> (ServeArgs, ArgMatches) {
        parse_env(argv, &[])
    }

    #[test]
    fn config_defaults_of_clap_and_default_agree() {
        let (args, matches) = parse(&[]);
        assert_eq!(args.config, ServeConfig::default());
        let eff = resolve(&args, &matches).expect("valid");
        assert!(eff.sources.iter().all(|s| *s == Source::Default));
    }

    #[test]
    fn config_every_key_is_a_clap_id() {
        let (args, matches) = parse(&[
            "--listen=127.0.0.1:1",
            "--data-dir=d",
            "--prepare-timeout-ms=11",
            "--tx-timeout-ms=12",
            "--commit-wait-ms=13",
            "--rpc-timeout-ms=14",
            "--connect-timeout-ms=15",
            "--retry-initial-ms=16",
            "--retry-max-ms=17",
            "--max-branches=18",
            "--one-phase=false",
            "--metrics-listen=127.0.0.1:2",
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
            "--tls-client-ca=ca.pem",
            "--participant-ca=pca.pem",
            "--participant-cert=pc.pem",
            "--participant-key=pk.pem",
            "--client-token=client-token-0123456789",
            "--client-token-file=ct",
            "--admin-token=admin-token-0123456789",
            "--admin-token-file=at",
            "--otlp-endpoint=http://127.0.0.1:4317",
            "--otlp-service-name=svc",
            "--group-commit-delay-us=19",
        ]);
        // A token and its file together are refused; every key still came from a flag.
        let eff = merge(&args.config, |key| explicit_source(&matches, key), None);
        assert_eq!(eff.sources, [Source::Flag; KEYS.len()]);
    }

    #[test]
    fn config_precedence_flag_over_env_over_file_over_default() {
        let file = parse_file(
            path(),
            "prepare_timeout_ms = 111\ntx_timeout_ms = 222\ncommit_wait_ms = 333\n",
        )
        .expect("valid file");
        let cli = ServeConfig {
            prepare_timeout_ms: 1,
            tx_timeout_ms: 2,
            ..ServeConfig::default()
        };
        let explicit = |key: &str| match key {
            "prepare_timeout_ms" => Some(Source::Flag),
            "tx_timeout_ms" => Some(Source::Env),
            _ => None,
        };
        let eff = merge(&cli, explicit, Some((path(), &file)));
        assert_eq!(eff.config.prepare_timeout_ms, 1);
        assert_eq!(eff.source("prepare_timeout_ms"), Some(Source::Flag));
        assert_eq!(eff.config.tx_timeout_ms, 2);
        assert_eq!(eff.source("tx_timeout_ms"), Some(Source::Env));
        assert_eq!(eff.config.commit_wait_ms, 333);
        assert_eq!(eff.source("commit_wait_ms"), Some(Source::File));
        assert_eq!(
            eff.config.rpc_timeout_ms,
            ServeConfig::default().rpc_timeout_ms
        );
        assert_eq!(eff.source("rpc_timeout_ms"), Some(Source::Default));
    }

    #[test]
    fn config_clap_flag_and_env_beat_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "rpc_timeout_ms = 100\nconnect_timeout_ms = 200\nretry_initial_ms = 7\n\
             metrics_listen = \"127.0.0.1:9999\"\n",
        )
        .expect("write");
        let file_arg = format!("--config={}", file.display());
        let (args, matches) = parse_env(
            &["--rpc-timeout-ms=50", &file_arg],
            &[("connect_timeout_ms", "444"), ("rpc_timeout_ms", "60")],
        );
        let eff = resolve(&args, &matches).expect("valid");
        assert_eq!(
            (eff.config.rpc_timeout_ms, eff.source("rpc_timeout_ms")),
            (50, Some(Source::Flag))
        );
        assert_eq!(
            (
                eff.config.connect_timeout_ms,
                eff.source("connect_timeout_ms")
            ),
            (444, Some(Source::Env))
        );
        assert_eq!(
            (eff.config.retry_initial_ms, eff.source("retry_initial_ms")),
            (7, Some(Source::File))
        );
        assert_eq!(
            eff.config.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9999)))
        );
        assert_eq!(eff.source("max_branches"), Some(Source::Default));
        assert_eq!(eff.file.as_deref(), Some(file.as_path()));
    }

    /// Resolves `argv` (with `env`), expecting an error that mentions every needle.
    fn refused(argv: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
        let (args, matches) = parse_env(argv, env);
        let msg = resolve(&args, &matches)
            .expect_err(&format!("{argv:?} must be refused"))
            .to_string();
        for n in needles {
            assert!(msg.contains(n), "{argv:?}: {msg:?} lacks {n:?}");
        }
        msg
    }

    #[test]
    fn config_tls_files_come_in_pairs_and_need_what_they_extend() {
        refused(&["--tls-cert=c.pem"], &[], &["tls-key", "both or neither"]);
        refused(&["--tls-key=k.pem"], &[], &["tls-cert", "both or neither"]);
        refused(
            &["--tls-client-ca=ca.pem"],
            &[],
            &["tls-client-ca", "--tls-cert"],
        );
        refused(
            &["--participant-cert=c.pem", "--participant-ca=ca.pem"],
            &[],
            &["participant-key", "both or neither"],
        );
        refused(
            &["--participant-cert=c.pem", "--participant-key=k.pem"],
            &[],
            &["participant-cert", "--participant-ca"],
        );
        let file = parse_file(path(), "tls_cert = \"\"\ntls_key = \"k.pem\"\n").expect("parses");
        let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
        let msg = eff.validate().expect_err("empty path").to_string();
        assert!(msg.contains("tls_cert") && msg.contains("empty"), "{msg}");
        let (args, matches) = parse(&[
            "--tls-cert=c.pem",
            "--tls-key=k.pem",
            "--tls-client-ca=ca.pem",
            "--participant-ca=pca.pem",
        ]);
        let eff = resolve(&args, &matches).expect("a consistent TLS set-up");
        assert_eq!(eff.config.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(eff.config.participant_cert, None);
    }

    #[test]
    fn config_tokens_are_checked_and_never_shown() {
        let weak = refused(&["--client-token=short"], &[], &["client-token", "16"]);
        assert!(!weak.contains("short"), "{weak}");
        refused(
            &["--admin-token=has a space 0123456789"],
            &[],
            &["admin-token", "visible ASCII"],
        );
        refused(
            &[
                "--client-token=client-token-0123456789",
                "--client-token-file=t",
            ],
            &[],
            &["client-token-file", "not both"],
        );
        let same = refused(
            &[
                "--client-token=same-token-0123456789",
                "--admin-token=same-token-0123456789",
            ],
            &[],
            &["admin-token", "differ"],
        );
        assert!(!same.contains("same-token"), "{same}");
        // From the environment, and not printed by --print-config or Debug.
        let (args, matches) = parse_env(
            &[],
            &[
                ("client_token", "client-token-from-env-0123"),
                ("admin_token_file", "/run/secrets/admin"),
            ],
        );
        let eff = resolve(&args, &matches).expect("valid");
        assert_eq!(eff.source("client_token"), Some(Source::Env));
        assert_eq!(
            eff.config.client_token.as_ref().map(Secret::expose),
            Some("client-token-from-env-0123")
        );
        let text = eff.to_toml();
        assert!(!text.contains("client-token-from-env"), "{text}");
        assert!(text.contains("# client_token = <redacted>"), "{text}");
        assert!(
            text.contains("admin_token_file = \"/run/secrets/admin\""),
            "{text}"
        );
        assert!(text.contains("# admin_token is not set"), "{text}");
        assert!(!format!("{:?}", eff.config).contains("client-token-from-env"));
    }

    #[test]
    fn config_security_keys_from_the_file_lose_to_flags_and_env() {
        let file = parse_file(
            path(),
            "tls_cert = \"file-cert.pem\"\ntls_key = \"file-key.pem\"\n\
             participant_ca = \"file-ca.pem\"\nadmin_token = \"admin-token-from-file-01\"\n\
             client_token_file = \"/etc/twopc/client-token\"\n",
        )
        .expect("valid file");
        let cli = ServeConfig {
            tls_cert: Some(PathBuf::from("flag-cert.pem")),
            participant_ca: Some(PathBuf::from("env-ca.pem")),
            ..ServeConfig::default()
        };
        let explicit = |key: &str| match key {
            "tls_cert" => Some(Source::Flag),
            "participant_ca" => Some(Source::Env),
            _ => None,
        };
        let eff = merge(&cli, explicit, Some((path(), &file)));
        assert_eq!(eff.config.tls_cert, Some(PathBuf::from("flag-cert.pem")));
        assert_eq!(eff.config.tls_key, Some(PathBuf::from("file-key.pem")));
        assert_eq!(eff.source("tls_key"), Some(Source::File));
        assert_eq!(eff.config.participant_ca, Some(PathBuf::from("env-ca.pem")));
        assert_eq!(
            eff.config.admin_token,
            Some(Secret::new("admin-token-from-file-01"))
        );
        assert_eq!(
            eff.config.client_token_file,
            Some(PathBuf::from("/etc/twopc/client-token"))
        );
        eff.validate().expect("valid");
        // A bad token from the file is reported against the file and key, redacted.
        let file = parse_file(path(), "admin_token = \"weak\"\n").expect("valid type");
        let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
        let msg = eff.validate().expect_err("weak token").to_string();
        assert!(
            msg.contains("twopc.toml") && msg.contains("admin_token"),
            "{msg}"
        );
        assert!(!msg.contains("weak"), "{msg}");
        // Wrong type: names the key and what is allowed.
        let err = parse_file(path(), "tls_cert = 5\n").expect_err("wrong type");
        assert!(err.to_string().contains("a path string"), "{err}");
    }

    #[test]
    fn config_unknown_key_is_named_with_the_known_ones() {
        let err = parse_file(path(), "listen = \"127.0.0.1:1\"\nprepare_timeout = 5\n")
            .expect_err("unknown key");
        let msg = err.to_string();
        assert!(
            matches!(err, ConfigFileError::UnknownKey { ref key, .. } if key == "prepare_timeout")
        );
        assert!(msg.contains("twopc.toml"), "{msg}");
        assert!(msg.contains("`prepare_timeout`"), "{msg}");
        for key in KEYS {
            assert!(msg.contains(key), "{msg} lacks {key}");
        }
    }

    #[test]
    fn config_wrong_type_names_key_file_and_allowed() {
        for (text, key, allowed_part) in [
            (
                "prepare_timeout_ms = \"10s\"",
                "prepare_timeout_ms",
                "between 10 and 3600000",
            ),
            ("max_branches = -1", "max_branches", "between 1 and 1024"),
            ("listen = 7400", "listen", "socket address"),
            ("listen = \"nowhere\"", "listen", "socket address"),
            ("one_phase = \"yes\"", "one_phase", "true or false"),
        ] {
            let err = parse_file(path(), text).expect_err(text);
            let msg = err.to_string();
            assert!(
                matches!(err, ConfigFileError::BadValue { key: k, .. } if k == key),
                "{text}: {msg}"
            );
            assert!(msg.contains("twopc.toml"), "{msg}");
            assert!(msg.contains(allowed_part), "{msg}");
        }
    }

    #[test]
    fn config_out_of_range_from_file_names_key_file_and_range() {
        let file = parse_file(path(), "prepare_timeout_ms = 5\n").expect("valid type");
        let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
        let err = eff.validate().expect_err("out of range");
        let msg = err.to_string();
        assert!(msg.contains("twopc.toml"), "{msg}");
        assert!(msg.contains("prepare_timeout_ms = 5"), "{msg}");
        assert!(msg.contains("between 10 and 3600000"), "{msg}");
        // The same value from a flag is reported against the flag.
        let cli = ServeConfig {
            prepare_timeout_ms: 5,
            ..ServeConfig::default()
        };
        let eff = merge(&cli, |_| Some(Source::Flag), Some((path(), &file)));
        let err = eff.validate().expect_err("out of range");
        assert!(matches!(
            err,
            ConfigFileError::Invalid(ConfigError {
                field: "prepare-timeout-ms",
                ..
            })
        ));
    }

    #[test]
    fn config_missing_file_names_path_and_flag() {
        let err = load_file(Path::new("/nonexistent/twopc.toml")).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/twopc.toml"), "{msg}");
        assert!(msg.contains("--config"), "{msg}");
    }

    #[test]
    fn config_syntax_error_names_the_file() {
        let err = parse_file(path(), "listen = \n").expect_err("bad toml");
        assert!(matches!(err, ConfigFileError::Syntax { .. }));
        assert!(err.to_string().contains("twopc.toml"));
    }

    #[test]
    fn config_otlp_endpoint_must_be_an_http_url() {
        for bad in [
            "127.0.0.1:4317",
            "grpc://collector:4317",
            "http://",
            "not a url",
        ] {
            refused(
                &[&format!("--otlp-endpoint={bad}")],
                &[],
                &["otlp-endpoint", "http:// or https://"],
            );
        }
        refused(&["--otlp-service-name= "], &[], &["otlp-service-name"]);
        let (args, matches) = parse_env(
            &["--otlp-endpoint=https://otel.example:4317"],
            &[("otlp_service_name", "billing-tx")],
        );
        let eff = resolve(&args, &matches).expect("valid");
        assert_eq!(
            eff.config.otlp_endpoint.as_deref(),
            Some("https://otel.example:4317")
        );
        assert_eq!(eff.source("otlp_endpoint"), Some(Source::Flag));
        assert_eq!(eff.config.otlp_service_name, "billing-tx");
        assert_eq!(eff.source("otlp_service_name"), Some(Source::Env));
        // Off by default, with the default service name.
        let (args, matches) = parse(&[]);
        let eff = resolve(&args, &matches).expect("valid");
        assert_eq!(eff.config.otlp_endpoint, None);
        assert_eq!(eff.config.otlp_service_name, "twopc-coordinator");
        assert!(eff.to_toml().contains("# otlp_endpoint is not set"));
        // From the file: reported against the file and the key.
        let file = parse_file(path(), "otlp_endpoint = \"localhost:4317\"\n").expect("a string");
        let eff = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
        let msg = eff.validate().expect_err("no scheme").to_string();
        assert!(
            msg.contains("twopc.toml") && msg.contains("otlp_endpoint") && msg.contains("http://"),
            "{msg}"
        );
        let err = parse_file(path(), "otlp_endpoint = 4317\n").expect_err("wrong type");
        assert!(err.to_string().contains("URL string"), "{err}");
    }

    #[test]
    fn config_printed_toml_loads_back_to_the_same_config() {
        for (metrics_listen, otlp_endpoint) in [
            (None, None),
            (
                Some(SocketAddr::from(([127, 0, 0, 1], 9400))),
                Some("http://127.0.0.1:4317".to_string()),
            ),
        ] {
            let cli = ServeConfig {
                data_dir: PathBuf::from("/var/lib/twopc \"data\""),
                prepare_timeout_ms: 1234,
                one_phase: false,
                metrics_listen,
                otlp_endpoint,
                otlp_service_name: "twopc \"east\"".into(),
                ..ServeConfig::default()
            };
            let eff = merge(&cli, |_| Some(Source::Flag), None);
            let text = eff.to_toml();
            assert!(text.contains("# prepare_timeout_ms: flag\n"), "{text}");
            let file = parse_file(path(), &text).expect("printed config parses");
            let again = merge(&ServeConfig::default(), |_| None, Some((path(), &file)));
            assert_eq!(again.config, cli, "{text}");
        }
    }

    #[test]
    fn token_form_is_checked_without_showing_it() {
        assert!(check_token("client-token", &Secret::new("client-token-0123456789")).is_ok());
        for bad in ["short", "has a space in it 12345", "tab\there-0123456789"] {
            let e = check_token("client-token", &Secret::new(bad)).expect_err(bad);
            assert_eq!(e.field, "client-token");
            assert_eq!(e.value, "<redacted>");
            assert!(!e.to_string().contains(bad), "{e}");
        }
        assert_eq!(
            format!("{:?}", Secret::new("client-token-0123")),
            "<redacted>"
        );
    }
}
