//! [`ServeConfig::validate`]: every value in its range, and the rules that relate
//! settings to each other. Reads no file ([`crate::server::Security::load`] does).
//!
//! The checks run in a fixed order and the first failure is the error: the ranges and
//! file names of [`SETTINGS`] in the order of the fields, then the rules written out
//! below (addresses, data directory, OTLP, decision log, TLS pairs, tokens).

use std::path::PathBuf;

use super::secret::check_token;
use super::{ConfigError, DecisionLogKind, ServeConfig, SETTINGS};
use crate::log::etcd_log::cluster_name_problem;

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
        self.validate_decision_log()?;
        self.validate_security()
    }

    /// `--etcd-endpoints` is given exactly when `--decision-log etcd` is, as http://
    /// URLs with a host; `--etcd-cluster` is a usable key prefix.
    fn validate_decision_log(&self) -> Result<(), ConfigError> {
        let shown = || self.etcd_endpoints.clone().unwrap_or_default();
        match (self.decision_log, &self.etcd_endpoints) {
            (DecisionLogKind::Etcd, None) => {
                return Err(ConfigError {
                    field: "etcd-endpoints",
                    value: "(not set)".into(),
                    allowed: "required with --decision-log etcd: the etcd client URLs, \
                              comma-separated, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379"
                        .into(),
                })
            }
            (DecisionLogKind::Sled, Some(_)) => {
                return Err(ConfigError {
                    field: "etcd-endpoints",
                    value: shown(),
                    allowed: "only used with --decision-log etcd (the decision log is \
                              sled); give both or neither"
                        .into(),
                })
            }
            _ => {}
        }
        if self.etcd_endpoints.is_some() {
            let list = self.etcd_endpoint_list();
            if list.is_empty() {
                return Err(ConfigError {
                    field: "etcd-endpoints",
                    value: shown(),
                    allowed: "must name at least one URL, e.g. http://127.0.0.1:2379".into(),
                });
            }
            for endpoint in &list {
                let ok = endpoint.parse::<http::Uri>().is_ok_and(|uri| {
                    uri.scheme_str() == Some("http")
                        && uri.host().is_some_and(|h| !h.is_empty())
                        && uri.path_and_query().is_none_or(|p| p.as_str() == "/")
                });
                if !ok {
                    return Err(ConfigError {
                        field: "etcd-endpoints",
                        value: shown(),
                        allowed: format!(
                            "{endpoint:?} is not an http:// URL of a host and port, e.g. \
                             http://127.0.0.1:2379 (TLS to etcd is not supported yet)"
                        ),
                    });
                }
            }
        }
        if let Some(problem) = cluster_name_problem(&self.etcd_cluster) {
            return Err(ConfigError {
                field: "etcd-cluster",
                value: self.etcd_cluster.clone(),
                allowed: problem,
            });
        }
        Ok(())
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
