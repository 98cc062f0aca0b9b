//! What the settings table is made of: a [`Setting`] per field of
//! [`ServeConfig`] (its key, its [`Spec`], and how its field is read
//! from a file, printed and checked), the [`Value`] trait that gives each field type its
//! file and printed form, and the `settings!` macro that writes the struct and the table
//! from one declaration.
//!
//! Why a macro: with clap derive the struct already declares each setting's flag,
//! environment variable, default and help. The rest (its file key, its range, whether it
//! is secret, how it prints) has to come from the same declaration or it drifts: the
//! macro takes the struct with each field's [`Spec`] after `=>` and writes both the
//! struct and [`SETTINGS`], so there is no second list to keep in the
//! struct's order. The key is the field's name (also clap's id), the flag that name with
//! `-` for `_`; whether a value is secret follows from its type ([`Secret`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use super::secret::{Secret, TOKEN_MAX_LEN, TOKEN_MIN_LEN};
use super::{ConfigError, ServeConfig, SETTINGS};

/// What a setting allows beyond its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// An integer in `min..=max`, checked by [`ServeConfig::validate`].
    Range {
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
        /// The key of another setting this one may not be below (`retry_max_ms` is at
        /// least `retry_initial_ms`).
        at_least: Option<&'static str>,
    },
    /// A path naming a file (certificate, key, token file); an empty one is refused.
    File,
    /// A bearer token ([`check_token`](super::check_token)).
    Token,
    /// Any value of the type, described for messages; rules that relate it to other
    /// settings are [`ServeConfig::validate`]'s own.
    Described(&'static str),
}

/// The facts of one setting that clap's attributes do not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// What the value may be.
    pub allowed: Allowed,
    /// What an optional setting left unset means, noted by `--print-config` (e.g. "not
    /// served" for `metrics_listen`).
    pub unset: Option<&'static str>,
}

impl Spec {
    /// An integer in `min..=max`.
    pub const fn range(min: u64, max: u64) -> Spec {
        Spec {
            allowed: Allowed::Range {
                min,
                max,
                at_least: None,
            },
            unset: None,
        }
    }

    /// A range that in addition may not be below the setting `key`. Only for ranges: a
    /// misuse stops the build (the table is a constant).
    pub const fn at_least(self, key: &'static str) -> Spec {
        match self.allowed {
            Allowed::Range { min, max, .. } => Spec {
                allowed: Allowed::Range {
                    min,
                    max,
                    at_least: Some(key),
                },
                ..self
            },
            _ => panic!("at_least applies to a range"),
        }
    }

    /// A path naming a file.
    pub const fn file() -> Spec {
        Spec {
            allowed: Allowed::File,
            unset: None,
        }
    }

    /// A bearer token.
    pub const fn token() -> Spec {
        Spec {
            allowed: Allowed::Token,
            unset: None,
        }
    }

    /// Any value of the type, as `text` describes it.
    pub const fn described(text: &'static str) -> Spec {
        Spec {
            allowed: Allowed::Described(text),
            unset: None,
        }
    }

    /// What leaving this optional setting unset means.
    pub const fn unset_means(self, note: &'static str) -> Spec {
        Spec {
            unset: Some(note),
            ..self
        }
    }

    /// What a value of this setting in the config file may be, for error messages.
    pub fn allowed_text(&self) -> String {
        match self.allowed {
            Allowed::Range {
                max,
                at_least: Some(key),
                ..
            } => format!("an integer between {key} and {max}"),
            Allowed::Range { min, max, .. } => format!("an integer between {min} and {max}"),
            Allowed::File => "a path string naming a file".into(),
            Allowed::Token => {
                format!("a string of {TOKEN_MIN_LEN} to {TOKEN_MAX_LEN} visible ASCII characters")
            }
            Allowed::Described(text) => text.into(),
        }
    }
}

/// One setting of [`ServeConfig`]: a row of [`SETTINGS`], written by the `settings!`
/// macro from the field's declaration.
#[derive(Clone, Copy)]
pub struct Setting {
    /// The field's name: its key in the config file and its clap id.
    pub key: &'static str,
    /// What it allows, and what leaving it unset means.
    pub spec: Spec,
    /// A secret (a token): `--print-config` says whether it is set, never what it is.
    /// From the field's type ([`Value::SECRET`]).
    pub secret: bool,
    /// The field itself, through its type's [`Value`] impl.
    pub(super) access: Access,
}

/// How a [`Setting`] reaches its field: one function per use, each a non-capturing
/// closure over the field written by the `settings!` macro.
#[derive(Clone, Copy)]
pub(super) struct Access {
    /// The value as TOML ([`Value::show`]).
    pub(super) show: fn(&ServeConfig) -> Option<String>,
    /// Sets the field from a TOML value ([`Value::read`]).
    pub(super) read: fn(&mut ServeConfig, toml::Value) -> Result<(), String>,
    /// Copies the field from the second configuration into the first.
    pub(super) copy: fn(&mut ServeConfig, &ServeConfig),
    /// The value as a number ([`Value::number`]).
    pub(super) number: fn(&ServeConfig) -> Option<u64>,
    /// The value as a path ([`Value::path`]).
    pub(super) path: fn(&ServeConfig) -> Option<&Path>,
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setting")
            .field("key", &self.key)
            .field("spec", &self.spec)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// The flag of every setting, by key: the key with `-` for `_`, as clap derives `long`
/// from the field's name (a test holds the two together).
static FLAGS: LazyLock<BTreeMap<&'static str, String>> = LazyLock::new(|| {
    SETTINGS
        .iter()
        .map(|s| (s.key, s.key.replace('_', "-")))
        .collect()
});

impl Setting {
    /// The setting whose key (file key, clap id) is `key`.
    pub fn find(key: &str) -> Option<&'static Setting> {
        SETTINGS.iter().find(|s| s.key == key)
    }

    /// The setting whose flag (without dashes) is `flag`.
    pub fn by_flag(flag: &str) -> Option<&'static Setting> {
        SETTINGS.iter().find(|s| s.flag() == flag)
    }

    /// The command-line flag, without the leading dashes (`prepare-timeout-ms`).
    pub fn flag(&self) -> &'static str {
        FLAGS.get(self.key).map_or(self.key, String::as_str)
    }

    /// The value in `config` as a TOML value (`None`: an optional setting left unset).
    /// For a secret, a placeholder, never the secret.
    pub fn show(&self, config: &ServeConfig) -> Option<String> {
        (self.access.show)(config)
    }

    /// Sets the setting in `config` from a config file's `value`; the error is the
    /// parser's word on a value of the wrong type.
    pub fn read(&self, config: &mut ServeConfig, value: toml::Value) -> Result<(), String> {
        (self.access.read)(config, value)
    }

    /// Sets the setting in `config` to its value in `from`.
    pub fn copy(&self, config: &mut ServeConfig, from: &ServeConfig) {
        (self.access.copy)(config, from)
    }

    /// The value as a number (`None` for a setting that is not one).
    pub fn number(&self, config: &ServeConfig) -> Option<u64> {
        (self.access.number)(config)
    }

    /// The value as a path (`None` for a setting that is not one, or is unset).
    pub fn path<'a>(&self, config: &'a ServeConfig) -> Option<&'a Path> {
        (self.access.path)(config)
    }

    /// Checks the [`Allowed::Range`] of a numeric setting (nothing for others); the
    /// error names the flag and the range.
    pub fn check_range(&self, config: &ServeConfig) -> Result<(), ConfigError> {
        let Allowed::Range { min, max, at_least } = self.spec.allowed else {
            return Ok(());
        };
        let Some(value) = self.number(config) else {
            return Ok(());
        };
        let min = at_least
            .and_then(Setting::find)
            .and_then(|floor| floor.number(config))
            .map_or(min, |floor| floor.max(min));
        if value < min || value > max {
            return Err(ConfigError {
                field: self.flag(),
                value: value.to_string(),
                allowed: format!("must be between {min} and {max}"),
            });
        }
        Ok(())
    }

    /// Checks that an [`Allowed::File`] setting, if set, names something (nothing for
    /// others); the error names the flag.
    pub fn check_file(&self, config: &ServeConfig) -> Result<(), ConfigError> {
        if self.spec.allowed != Allowed::File {
            return Ok(());
        }
        match self.path(config) {
            Some(p) if p.as_os_str().is_empty() => Err(ConfigError {
                field: self.flag(),
                value: String::new(),
                allowed: "must be a file name, not empty".into(),
            }),
            _ => Ok(()),
        }
    }
}

/// The type of a setting: how it is read from a config file, printed by
/// `--print-config` and seen by the checks of the table.
pub trait Value: Clone {
    /// Whether the value is a secret, never printed.
    const SECRET: bool = false;

    /// The value of a TOML `value`; the error is the parser's message.
    fn read(value: toml::Value) -> Result<Self, String>;

    /// The value as TOML (`None`: unset). A secret shows a placeholder.
    fn show(&self) -> Option<String>;

    /// The value as a number, for [`Allowed::Range`].
    fn number(&self) -> Option<u64> {
        None
    }

    /// The value as a path, for [`Allowed::File`].
    fn path(&self) -> Option<&Path> {
        None
    }
}

/// `value` as a `T`, with serde's message on a value of the wrong type.
fn deserialize<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T, String> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| e.message().trim_end().to_string())
}

/// `s` as a TOML string (quoted, escaped).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Value for u64 {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
    fn number(&self) -> Option<u64> {
        Some(*self)
    }
}

impl Value for usize {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
    fn number(&self) -> Option<u64> {
        u64::try_from(*self).ok()
    }
}

impl Value for bool {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl Value for String {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(quoted(self))
    }
}

impl Value for PathBuf {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(quoted(&self.to_string_lossy()))
    }
    fn path(&self) -> Option<&Path> {
        Some(self)
    }
}

impl Value for SocketAddr {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(quoted(&self.to_string()))
    }
}

impl Value for Secret {
    const SECRET: bool = true;
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(quoted("<redacted>"))
    }
}

impl Value for super::DecisionLogKind {
    fn read(value: toml::Value) -> Result<Self, String> {
        deserialize(value)
    }
    fn show(&self) -> Option<String> {
        Some(quoted(self.name()))
    }
}

/// An optional setting: read as its inner type, unset when `None`.
impl<T: Value> Value for Option<T> {
    const SECRET: bool = T::SECRET;
    fn read(value: toml::Value) -> Result<Self, String> {
        T::read(value).map(Some)
    }
    fn show(&self) -> Option<String> {
        self.as_ref().and_then(T::show)
    }
    fn number(&self) -> Option<u64> {
        self.as_ref().and_then(T::number)
    }
    fn path(&self) -> Option<&Path> {
        self.as_ref().and_then(T::path)
    }
}

/// Writes the settings struct and [`SETTINGS`] from one declaration: a struct whose
/// every field is `pub name: Type => spec,` (doc comments and clap attributes above it
/// as usual). See the module docs.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty => $spec:expr,
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        /// Every setting of [`ServeConfig`], in the order of its fields (the order of
        /// `--help` and `--print-config`).
        pub const SETTINGS: &[$crate::config::Setting] = &[
            $(
                $crate::config::Setting {
                    key: stringify!($field),
                    spec: $spec,
                    secret: <$ty as $crate::config::Value>::SECRET,
                    access: $crate::config::table::Access {
                        show: |c| $crate::config::Value::show(&c.$field),
                        read: |c, v| {
                            c.$field = $crate::config::Value::read(v)?;
                            Ok(())
                        },
                        copy: |c, from| c.$field = from.$field.clone(),
                        number: |c| $crate::config::Value::number(&c.$field),
                        path: |c| $crate::config::Value::path(&c.$field),
                    },
                },
            )*
        ];
    };
}
pub(super) use settings;
