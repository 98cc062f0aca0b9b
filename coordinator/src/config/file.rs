//! The `--config` file: TOML with one optional key per setting (the field's name), read
//! through [`SETTINGS`] so that every key the struct has is a key of the file and no
//! other is. Errors name the file and the key, and say what the key allows.

use std::path::{Path, PathBuf};

use super::{ConfigError, ServeConfig, Setting, SETTINGS};

/// A config file as read: the values it sets, over the built-in defaults, and which
/// keys it set (the others fall through to the defaults when merged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// The file's values; the keys it does not set keep their default.
    values: ServeConfig,
    /// The keys the file sets.
    keys: Vec<&'static str>,
}

impl FileConfig {
    /// Whether the file sets `key`.
    pub fn sets(&self, key: &str) -> bool {
        self.keys.contains(&key)
    }

    /// The keys the file sets.
    pub fn keys(&self) -> &[&'static str] {
        &self.keys
    }

    /// The file's values (a key the file does not set holds its default).
    pub fn values(&self) -> &ServeConfig {
        &self.values
    }
}

/// Every key of the config file, as a list for messages.
fn known_keys() -> String {
    SETTINGS
        .iter()
        .map(|s| s.key)
        .collect::<Vec<_>>()
        .join(", ")
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
    /// The file has a key that is no setting.
    #[error(
        "config file {}: unknown key `{key}`; known keys: {}",
        path.display(),
        known_keys()
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

/// Reads and checks a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigFileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse_file(path, &text)
}

/// Parses and checks the text of a config file (`path` is only for messages). Each
/// value is checked against its type here, key by key (in the file's key order), so that
/// every error names its key; ranges and the rules between settings are checked once the
/// configuration is merged ([`Effective::validate`](super::Effective::validate)).
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigFileError> {
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string().trim_end().to_string(),
            })?;
    let mut file = FileConfig::default();
    for (key, value) in table {
        let Some(setting) = Setting::find(&key) else {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_path_buf(),
                key,
            });
        };
        let written = value.to_string();
        setting
            .read(&mut file.values, value)
            .map_err(|message| ConfigFileError::BadValue {
                path: path.to_path_buf(),
                key: setting.key,
                value: written,
                message,
                allowed: setting.spec.allowed_text(),
            })?;
        file.keys.push(setting.key);
    }
    Ok(file)
}
