//! The configuration in effect: the command line (flags and environment variables, as
//! clap parsed them) merged with the config file, where each value came from, its
//! validation against the file, and `--print-config`.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;

use super::file::load_file;
use super::{Allowed, ConfigFileError, FileConfig, ServeConfig, Setting, SETTINGS};

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

/// The configuration in effect and where each value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    /// The merged configuration.
    pub config: ServeConfig,
    /// The source of each setting, in the order of [`SETTINGS`].
    pub sources: [Source; SETTINGS.len()],
    /// The config file, if one was given.
    pub file: Option<PathBuf>,
}

impl Effective {
    /// Where the value of `key` came from (`None` for an unknown key).
    pub fn source(&self, key: &str) -> Option<Source> {
        SETTINGS
            .iter()
            .position(|s| s.key == key)
            .map(|i| self.sources[i])
    }

    /// Validates the merged configuration. An out-of-range value that came from the
    /// file is reported against the file and its key; others as
    /// [`ConfigError`](super::ConfigError).
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        let Err(e) = self.config.validate() else {
            return Ok(());
        };
        let from_file = Setting::by_flag(e.field)
            .filter(|s| self.source(s.key) == Some(Source::File))
            .zip(self.file.as_ref());
        match from_file {
            Some((setting, path)) => Err(ConfigFileError::BadValue {
                path: path.clone(),
                key: setting.key,
                value: e.value.clone(),
                message: if matches!(setting.spec.allowed, Allowed::Range { .. }) {
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
            None => Err(e.into()),
        }
    }

    /// The configuration as a TOML config file, with a comment line per key saying
    /// where its value came from (`# key: flag|env|file|default`). Loading the output
    /// with `--config` gives the same configuration, except for secrets (the tokens):
    /// those are shown as `<redacted>` in a comment, never printed.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# Effective configuration of `twopc serve`.\n\
             # Precedence: flag > env (TWOPC_*) > config file > default.\n\
             # Load it with `twopc serve --config FILE`.\n",
        );
        if let Some(path) = &self.file {
            out.push_str(&format!("# Config file: {}\n", path.display()));
        }
        for (setting, source) in SETTINGS.iter().zip(self.sources) {
            let key = setting.key;
            out.push_str(&format!("\n# {key}: {source}\n"));
            match (setting.show(&self.config), setting.spec.unset) {
                (Some(_), _) if setting.secret => out.push_str(&format!(
                    "# {key} = <redacted> (set; never printed: give it again with the flag, \
                     the environment or {key}_file)\n"
                )),
                (Some(v), _) => out.push_str(&format!("{key} = {v}\n")),
                (None, Some(note)) => out.push_str(&format!("# {key} is not set ({note})\n")),
                (None, None) => out.push_str(&format!("# {key} is not set\n")),
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
    let mut sources = [Source::Default; SETTINGS.len()];
    for (setting, source) in SETTINGS.iter().zip(&mut sources) {
        if let Some(s) = explicit(setting.key) {
            *source = s;
        } else if let Some((_, f)) = file.filter(|(_, f)| f.sets(setting.key)) {
            setting.copy(&mut config, f.values());
            *source = Source::File;
        }
    }
    Effective {
        config,
        sources,
        file: file.map(|(p, _)| p.to_path_buf()),
    }
}

/// Whether clap took the value of `id` from the command line or the environment.
pub(super) fn explicit_source(matches: &ArgMatches, id: &str) -> Option<Source> {
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
