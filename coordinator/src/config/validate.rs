//! [`ServeConfig::validate`]: every value in its range, and the rules that relate
//! settings to each other. Reads no file ([`crate::server::Security::load`] does).
//!
//! The checks run in a fixed order and the first failure is the error: the ranges and
//! file names of [`SETTINGS`] in the order of the fields, then the rules written out
//! below (addresses, data directory, OTLP, TLS pairs, tokens).

use std::path::PathBuf;

use super::secret::check_token;
use super::{ConfigError, ServeConfig, SETTINGS};

impl ServeConfig {
    /// Checks every field; the error names the first bad one and its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for setting in SETTINGS {
            setting.check_range(self)?;
        }
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

    /// The TLS and token fields: no empty file names, pairs given together, what needs
    /// what, token forms.
    fn validate_security(&self) -> Result<(), ConfigError> {
        fn shown(p: &Option<PathBuf>) -> String {
            p.as_ref()
                .map_or_else(|| "(not set)".into(), |p| p.display().to_string())
        }
        for setting in SETTINGS {
            setting.check_file(self)?;
        }
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
}
