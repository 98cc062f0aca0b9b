//! Secret setting values (bearer tokens): a type that never prints what it holds, and the
//! form a token must have.
//!
//! It lives with the configuration, not with [`crate::auth`], because a token is first a
//! setting: [`ServeConfig`](super::ServeConfig) holds it, [`ServeConfig::validate`](super::ServeConfig::validate)
//! checks its form and `--print-config` must not show it. `auth` uses both to check
//! calls, so the dependency runs one way: `auth` → `config`.

use std::fmt;

use super::ConfigError;

/// Shortest token accepted: anything shorter is guessable.
pub const TOKEN_MIN_LEN: usize = 16;
/// Longest token accepted (it travels in every call's metadata).
pub const TOKEN_MAX_LEN: usize = 4096;

/// A secret value (a bearer token). `Debug` and `Display` print `<redacted>`, so a secret
/// never reaches a log line, an error message or `--print-config` by accident.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself: only for the places that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Never fails, so clap never echoes a bad token in its own error; [`check_token`] says
/// what is wrong without showing the value.
impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Checks the form of a token: [`TOKEN_MIN_LEN`]..=[`TOKEN_MAX_LEN`] visible ASCII
/// characters (no spaces), so it fits a header as is. `field` is the flag's name for the
/// error, whose value is shown as `<redacted>`.
pub fn check_token(field: &'static str, token: &Secret) -> Result<(), ConfigError> {
    let t = token.expose();
    let bad = |allowed: String| ConfigError {
        field,
        value: "<redacted>".into(),
        allowed,
    };
    if t.len() < TOKEN_MIN_LEN || t.len() > TOKEN_MAX_LEN {
        return Err(bad(format!(
            "must be {TOKEN_MIN_LEN} to {TOKEN_MAX_LEN} characters long (this one has {})",
            t.len()
        )));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "must be visible ASCII characters only (no spaces or control characters)".into(),
        ));
    }
    Ok(())
}
