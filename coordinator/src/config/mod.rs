//! The configuration of `twopc serve`: its settings, each declared once, and where their
//! values come from (flags, environment variables, a TOML file, defaults).
//!
//! # Layout
//! - `settings`: [`ServeConfig`], the one declaration of every setting (flag,
//!   environment variable, default, help, file key, range, how it prints), and the one
//!   place it becomes the engine's, runtime's, transport's and decision log's options.
//! - `table`: what that declaration is made into: [`SETTINGS`], a [`Setting`] per field
//!   that the validation, the file parser, the merge and `--print-config` walk.
//! - `validate`: [`ServeConfig::validate`], the ranges and the rules between settings.
//! - `secret`: [`Secret`] values (tokens) and the form a token must have.
//! - `file`: the `--config` file ([`parse_file`]).
//! - `effective`: the merge with its precedence ([`merge`], [`resolve`]) and
//!   `--print-config` ([`Effective::to_toml`]).
//!
//! This module depends on the parts it configures (engine, runtime, transport, log) for
//! their option types, and on nothing that serves: [`crate::auth`] and [`crate::tls`]
//! read their settings from here, and [`crate::server`] uses all three.
//!
//! **Precedence** (highest first): command-line flag > environment variable (`TWOPC_*`) >
//! config file (`--config FILE` / `TWOPC_CONFIG`) > built-in default
//! ([`ServeConfig::default`]). clap resolves the first two and the default; [`resolve`]
//! then asks clap, setting by setting, whether the value came from the command line or
//! the environment ([`clap::ArgMatches::value_source`]) and, if it did not, takes the
//! file's value when the file has one. The merge itself ([`merge`]) is a pure function,
//! so the precedence is unit-tested without processes.
//!
//! **The file** has one key per setting, the field's name (the flag in snake_case):
//! `listen = "127.0.0.1:7400"`, `prepare_timeout_ms = 10000`, `one_phase = true`, ...
//! Every key is optional. A relative `data_dir` is relative to the working directory of
//! the process, not to the file. Errors name the file and the key: an unknown key lists
//! the known ones; a value of the wrong type or out of range says what is allowed (the
//! ranges are [`ServeConfig::validate`]'s).
//!
//! **`--print-config`** prints the effective configuration ([`Effective::to_toml`]) with
//! a comment per key saying where the value came from; the output is itself a valid
//! config file that yields the same configuration, secrets aside: `client_token` and
//! `admin_token` are shown as `<redacted>` in a comment, never printed (the token *file*
//! keys are paths and are printed).

mod effective;
mod file;
mod secret;
mod settings;
mod table;
mod validate;

#[cfg(test)]
mod tests;

pub use effective::{merge, resolve, Effective, ServeArgs, Source};
pub use file::{load_file, parse_file, ConfigFileError, FileConfig};
pub use secret::{check_token, Secret, TOKEN_MAX_LEN, TOKEN_MIN_LEN};
pub use settings::{DecisionLogKind, ServeConfig, DEFAULT_OTLP_SERVICE_NAME, SETTINGS};
pub use table::{Allowed, Setting, Spec, Value};

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
