//! TLS of the coordinator (rustls, through tonic): the server side of its gRPC port and
//! the client side of its calls to participants.
//!
//! * `--tls-cert` + `--tls-key`: every service on `--listen` (Coordinator, Admin, health,
//!   reflection) is served over TLS only; `--tls-client-ca` in addition requires every
//!   client to present a certificate signed by that CA (mutual TLS).
//! * `--participant-ca`: participants are dialed over TLS and must present a certificate
//!   signed by that CA; `http://` endpoints are dialed as `https://` (a participant cannot
//!   downgrade the connection by enlisting a plaintext URL). `--participant-cert` +
//!   `--participant-key`: the certificate the coordinator presents to participants that
//!   require one (mutual TLS).
//!
//! Files are PEM and read once, at start ([`TlsSettings::load`]); a bad file stops the
//! start with an error naming its flag. Certificates are not reloaded while running:
//! rotating one means restarting (see `docs/security.md`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::ServeConfig;

/// A certificate or key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use {} ({flag}): {message}", path.display())]
pub struct TlsFileError {
    /// The flag (or flags) that named the file.
    pub flag: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// What a PEM file must hold.
#[derive(Clone, Copy, Debug)]
enum PemKind {
    /// One or more `CERTIFICATE` blocks.
    Certificates,
    /// A private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reads a PEM file and checks it holds what it should. (rustls silently skips a root
/// certificate it cannot parse, which would leave a CA file that trusts nothing; the
/// check turns that into an error at start.)
fn read_pem(flag: &'static str, path: &Path, kind: PemKind) -> Result<Vec<u8>, TlsFileError> {
    let err = |message: String| TlsFileError {
        flag,
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let ok = match kind {
        PemKind::Certificates => text.contains("-----BEGIN CERTIFICATE-----"),
        PemKind::PrivateKey => text.contains("-----BEGIN") && text.contains("PRIVATE KEY-----"),
    };
    if !ok {
        return Err(err(match kind {
            PemKind::Certificates => {
                "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into()
            }
            PemKind::PrivateKey => {
                "no PEM private key in it (expected -----BEGIN PRIVATE KEY----- or similar)".into()
            }
        }));
    }
    Ok(bytes)
}

/// A PEM certificate chain file as a tonic [`Certificate`].
pub fn certificate(flag: &'static str, path: &Path) -> Result<Certificate, TlsFileError> {
    read_pem(flag, path, PemKind::Certificates).map(Certificate::from_pem)
}

/// A PEM certificate chain and private key as a tonic [`Identity`].
pub fn identity(
    cert_flag: &'static str,
    cert: &Path,
    key_flag: &'static str,
    key: &Path,
) -> Result<Identity, TlsFileError> {
    let cert = read_pem(cert_flag, cert, PemKind::Certificates)?;
    let key = read_pem(key_flag, key, PemKind::PrivateKey)?;
    Ok(Identity::from_pem(cert, key))
}

/// An error and its causes on one line (tonic's own `Display` says only "transport error").
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// Checks that a server TLS configuration can be built (certificate and key parse and
/// match, client CA parses).
pub fn check_server(tls: &ServerTlsConfig) -> Result<(), String> {
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map(|_| ())
        .map_err(|e| chain(&e))
}

/// Checks that a client TLS configuration can be built (CA parses, client identity
/// parses and matches).
pub fn check_client(tls: &ClientTlsConfig) -> Result<(), String> {
    Endpoint::from_static("https://localhost")
        .tls_config(tls.clone())
        .map(|_| ())
        .map_err(|e| chain(&e))
}

/// The TLS side of a [`ServeConfig`], loaded and checked.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// TLS of the gRPC port (`None`: plaintext).
    pub server: Option<ServerTlsConfig>,
    /// TLS towards participants (`None`: plaintext, as the endpoints say).
    pub participants: Option<ClientTlsConfig>,
}

impl TlsSettings {
    /// Reads and checks every certificate and key file `cfg` names. Assumes
    /// [`ServeConfig::validate`] passed (both halves of each pair are given).
    pub fn load(cfg: &ServeConfig) -> Result<TlsSettings, TlsFileError> {
        let server = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => {
                let mut tls = ServerTlsConfig::new().identity(identity(
                    "--tls-cert",
                    cert,
                    "--tls-key",
                    key,
                )?);
                if let Some(ca) = &cfg.tls_client_ca {
                    tls = tls.client_ca_root(certificate("--tls-client-ca", ca)?);
                }
                check_server(&tls).map_err(|message| TlsFileError {
                    flag: "--tls-cert/--tls-key/--tls-client-ca",
                    path: cert.clone(),
                    message,
                })?;
                Some(tls)
            }
            _ => None,
        };
        let participants = match &cfg.participant_ca {
            Some(ca) => {
                let mut tls =
                    ClientTlsConfig::new().ca_certificate(certificate("--participant-ca", ca)?);
                if let (Some(cert), Some(key)) = (&cfg.participant_cert, &cfg.participant_key) {
                    tls = tls.identity(identity(
                        "--participant-cert",
                        cert,
                        "--participant-key",
                        key,
                    )?);
                }
                check_client(&tls).map_err(|message| TlsFileError {
                    flag: "--participant-ca/--participant-cert/--participant-key",
                    path: ca.clone(),
                    message,
                })?;
                Some(tls)
            }
            None => None,
        };
        Ok(TlsSettings {
            server,
            participants,
        })
    }
}
