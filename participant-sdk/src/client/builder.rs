//! [`TwoPcBuilder`]: how a service configures its handle (coordinator URL, TLS and token,
//! participant endpoint, timeouts, data directory) and what `start` sets running: the
//! channel and the call pipeline to the coordinator, the embedded participant server,
//! the recovery loop and the local-commit driver (ids begun ahead, reports, the
//! forgetter). Settings that cannot work are refused here with
//! [`Error::Usage`] naming the setting.

use crate::error::Result;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use super::calls::Calls;
use super::{local, validate_name, Inner, TwoPc};
use crate::ahead;
use crate::channel::BearerToken;
use crate::error::Error;
use crate::resource::Registry;

/// A PEM certificate/key pair, kept out of `Debug` output.
#[derive(Clone)]
pub(super) struct KeyPairPem {
    pub(super) cert: Vec<u8>,
    pub(super) key: Vec<u8>,
}

/// Settings of a [`TwoPc`] handle.
#[derive(Clone)]
pub struct TwoPcBuilder {
    pub(super) coordinator: String,
    pub(super) service: String,
    pub(super) listen: SocketAddr,
    pub(super) advertise: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) recovery_interval: Duration,
    pub(super) commit_wait: Option<Duration>,
    pub(super) begin_ahead: u32,
    /// The longest a client call waits for the coordinator (see `call_timeout`).
    pub(super) call_timeout: Duration,
    /// CA (PEM) of the coordinator's certificate: dial it over TLS.
    pub(super) coordinator_ca: Option<Vec<u8>>,
    /// Client certificate for a coordinator that requires one (mutual TLS).
    pub(super) coordinator_identity: Option<KeyPairPem>,
    /// Name to verify the coordinator's certificate against, instead of the URL's host.
    pub(super) coordinator_domain: Option<String>,
    /// Bearer token of every call to the coordinator.
    pub(super) token: Option<String>,
    /// Certificate of the embedded participant server: serve TLS.
    pub(super) participant_tls: Option<KeyPairPem>,
    /// CA (PEM) the coordinator's client certificate must be signed by (mutual TLS).
    pub(super) participant_client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for TwoPcBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoPcBuilder")
            .field("coordinator", &self.coordinator)
            .field("service", &self.service)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("data_dir", &self.data_dir)
            .field("recovery_interval", &self.recovery_interval)
            .field("commit_wait", &self.commit_wait)
            .field("begin_ahead", &self.begin_ahead)
            .field("call_timeout", &self.call_timeout)
            .field("coordinator_tls", &self.coordinator_ca.is_some())
            .field("coordinator_identity", &self.coordinator_identity.is_some())
            .field("coordinator_domain", &self.coordinator_domain)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("participant_tls", &self.participant_tls.is_some())
            .field(
                "participant_client_ca",
                &self.participant_client_ca.is_some(),
            )
            .finish()
    }
}

impl TwoPcBuilder {
    /// Name of this service; prefixes every branch id (`<service>:<resource>`). Defaults
    /// to "svc". 1-32 characters of `[A-Za-z0-9._-]`.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = name.into();
        self
    }

    /// Where the embedded participant server listens (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The endpoint the coordinator should call (default `http://<bound address>`). Set it
    /// when the service is reached through another address (containers, NAT). Must stay
    /// the same across restarts for the coordinator to reach branches after a crash.
    pub fn advertise(mut self, endpoint: impl Into<String>) -> Self {
        self.advertise = Some(endpoint.into());
        self
    }

    /// Directory for participant-side state (broker staging store). Resources that need
    /// it take it from [`TwoPc::data_dir`].
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// How often recovery asks the coordinator about in-doubt branches (default 5 s).
    pub fn recovery_interval(mut self, every: Duration) -> Self {
        self.recovery_interval = every;
        self
    }

    /// At most how many local transactions one BeginLocal takes ahead for a resource
    /// (default [`crate::DEFAULT_BEGIN_AHEAD`], at most [`crate::MAX_BEGIN_AHEAD`]; 0 or 1
    /// takes none ahead). The pool follows the demand: under light load each
    /// [`TwoPc::begin_local`] makes its own BeginLocal (see `ahead` in the crate docs).
    pub fn begin_ahead(mut self, max: u32) -> Self {
        self.begin_ahead = max;
        self
    }

    /// How long [`Transaction::commit`](crate::Transaction::commit) lets the coordinator wait for phase two
    /// (default: the coordinator's own default; zero: answer as soon as the decision is
    /// durable).
    pub fn commit_wait(mut self, wait: Duration) -> Self {
        self.commit_wait = Some(wait);
        self
    }

    /// The longest a client call (Begin, Enlist, Commit, Abort) waits for the
    /// coordinator's answer; a Commit waits its `commit_wait` on top (without one, the
    /// coordinator's own phase-two wait must fit in this). A coordinator that
    /// is paused, overloaded or cut off makes the call fail with `DEADLINE_EXCEEDED`
    /// (naming the coordinator and this setting) instead of holding the caller. The
    /// outcome of a Commit that timed out is unknown to the caller (the coordinator may
    /// still decide it; recovery finishes the branches either way). Between 1 ms and
    /// 1 hour; default 30 s, which covers the coordinator's prepare round at its default
    /// timeouts.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Dials the coordinator over TLS, trusting the CA certificate(s) in `ca_pem` (PEM).
    /// An `http://` coordinator URL is then dialed as `https://`.
    pub fn coordinator_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.coordinator_ca = Some(ca_pem.into());
        self
    }

    /// The client certificate and key (PEM) presented to a coordinator that requires one
    /// (`twopc serve --tls-client-ca`). Needs [`coordinator_ca`](Self::coordinator_ca).
    pub fn coordinator_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.coordinator_identity = Some(KeyPairPem {
            cert: cert_pem.into(),
            key: key_pem.into(),
        });
        self
    }

    /// The name the coordinator's certificate must carry, when it differs from the host
    /// of the coordinator URL (e.g. dialing an IP address, a certificate for a DNS name).
    pub fn coordinator_domain(mut self, name: impl Into<String>) -> Self {
        self.coordinator_domain = Some(name.into());
        self
    }

    /// The bearer token sent on every call to the coordinator (`twopc serve
    /// --client-token`), recovery's `GetTransaction` included.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Serves the embedded participant server over TLS with this certificate and key
    /// (PEM). The default advertised endpoint becomes `https://<bound address>`; the
    /// coordinator needs `--participant-ca` to reach it.
    pub fn participant_tls(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.participant_tls = Some(KeyPairPem {
            cert: cert_pem.into(),
            key: key_pem.into(),
        });
        self
    }

    /// Requires callers of the participant server (the coordinator) to present a client
    /// certificate signed by the CA in `ca_pem` (mutual TLS; the coordinator's
    /// `--participant-cert`). Needs [`participant_tls`](Self::participant_tls).
    pub fn participant_client_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.participant_client_ca = Some(ca_pem.into());
        self
    }

    /// The coordinator endpoint, with TLS when configured.
    pub(super) fn coordinator_endpoint(&self) -> Result<Endpoint> {
        let url = match (
            &self.coordinator_ca,
            self.coordinator.strip_prefix("http://"),
        ) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => self.coordinator.clone(),
        };
        let mut endpoint = Endpoint::from_shared(url).map_err(|e| {
            Error::Usage(format!(
                "coordinator URL {:?} is malformed: {e}",
                self.coordinator
            ))
        })?;
        match &self.coordinator_ca {
            Some(ca) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some(id) = &self.coordinator_identity {
                    tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
                }
                if let Some(name) = &self.coordinator_domain {
                    tls = tls.domain_name(name.clone());
                }
                endpoint = endpoint.tls_config(tls).map_err(|e| {
                    Error::Usage(format!(
                        "coordinator TLS settings (coordinator_ca / coordinator_identity): {}",
                        error_chain(&e)
                    ))
                })?;
            }
            None if self.coordinator_identity.is_some() || self.coordinator_domain.is_some() => {
                return Err(Error::Usage(
                    "coordinator_identity and coordinator_domain need coordinator_ca".into(),
                ))
            }
            None if self.coordinator.starts_with("https://") => {
                return Err(Error::Usage(format!(
                    "coordinator URL {:?} is https:// but no CA is given: call coordinator_ca",
                    self.coordinator
                )))
            }
            None => {}
        }
        Ok(endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true))
    }

    /// The participant server, with TLS when configured.
    pub(super) fn participant_server(&self) -> Result<Server> {
        let server = Server::builder().tcp_nodelay(true);
        let Some(id) = &self.participant_tls else {
            if self.participant_client_ca.is_some() {
                return Err(Error::Usage(
                    "participant_client_ca needs participant_tls".into(),
                ));
            }
            return Ok(server);
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&id.cert, &id.key));
        if let Some(ca) = &self.participant_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(ca));
        }
        server.tls_config(tls).map_err(|e| {
            Error::Usage(format!(
                "participant server TLS settings (participant_tls / participant_client_ca): {}",
                error_chain(&e)
            ))
        })
    }

    /// Connects to the coordinator, starts the participant server and recovery.
    pub async fn start(self) -> Result<TwoPc> {
        validate_name("service", &self.service, 32)?;
        if !(Duration::from_millis(1)..=MAX_CALL_TIMEOUT).contains(&self.call_timeout) {
            return Err(Error::Usage(format!(
                "call_timeout is {:?}; it must be between 1 ms and {MAX_CALL_TIMEOUT:?}",
                self.call_timeout
            )));
        }
        if self.begin_ahead > ahead::MAX_BEGIN_AHEAD {
            return Err(Error::Usage(format!(
                "begin_ahead is {}; at most {} local transactions can be begun at once",
                self.begin_ahead,
                ahead::MAX_BEGIN_AHEAD
            )));
        }
        for (what, pem) in [
            ("coordinator_ca", self.coordinator_ca.as_deref()),
            (
                "participant_client_ca",
                self.participant_client_ca.as_deref(),
            ),
        ] {
            // rustls skips roots it cannot parse: a CA that is no certificate would
            // trust nothing, silently.
            if pem.is_some_and(|p| {
                !String::from_utf8_lossy(p).contains("-----BEGIN CERTIFICATE-----")
            }) {
                return Err(Error::Usage(format!(
                    "{what}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"
                )));
            }
        }
        let endpoint = self.coordinator_endpoint()?;
        let auth =
            BearerToken::new(self.token.as_deref()).map_err(|e| Error::Usage(e.to_string()))?;
        let server = self.participant_server()?;
        let channel = endpoint.connect_lazy();
        let listener = TcpListener::bind(self.listen).await.map_err(|e| {
            Error::Transport(format!(
                "cannot listen on {} for the participant server: {e}",
                self.listen
            ))
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Transport(e.to_string()))?;
        let scheme = if self.participant_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let advertised = self
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{bound}"));
        let registry: Registry = Arc::new(RwLock::new(HashMap::new()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(crate::server::serve(
            server,
            listener,
            registry.clone(),
            stop_rx.clone(),
        ));
        let coordinator = CoordinatorClient::with_interceptor(channel, auth);
        let piped = coordinator.clone();
        let open: mux::Opener<pb::PipelineRequest, pb::PipelineResponse> =
            Arc::new(move |outbound| {
                let mut c = piped.clone();
                Box::pin(async move { c.pipeline(outbound).await })
            });
        let recovery = tokio::spawn(crate::recovery::run_loop(
            coordinator.clone(),
            registry.clone(),
            self.recovery_interval,
            stop_rx,
        ));
        let calls = Arc::new(Calls {
            // A backstop only: `Calls::call` bounds every call by `call_timeout` first.
            pipeline: mux::Pipeline::new(open, self.call_timeout + PIPELINE_BACKSTOP),
            coordinator,
            coordinator_url: self.coordinator,
            call_timeout: self.call_timeout,
        });
        let local = local::start(calls.clone(), registry.clone(), self.begin_ahead);
        Ok(TwoPc {
            inner: Arc::new(Inner {
                calls,
                service: self.service,
                endpoint: advertised,
                registry,
                data_dir: self.data_dir,
                commit_wait: self.commit_wait,
                local,
                stop: stop_tx,
                tasks: Mutex::new(vec![server, recovery]),
            }),
        })
    }
}

/// An error and its causes on one line (tonic's own `Display` says only "transport error").
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Largest accepted [`TwoPcBuilder::call_timeout`].
pub(super) const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// The `Pipeline` stream's own bound on a call is `call_timeout` plus this, so the
/// caller's deadline (which names the setting) always comes first.
pub(super) const PIPELINE_BACKSTOP: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(r: Result<TwoPc>) -> String {
        match r {
            Err(Error::Usage(m)) => m,
            Err(e) => panic!("expected a usage error, got {e:?}"),
            Ok(_) => panic!("expected a usage error, got a started SDK"),
        }
    }

    #[tokio::test]
    async fn security_settings_that_cannot_work_are_refused_at_start() {
        let b = || TwoPc::builder("http://127.0.0.1:1");
        assert!(
            usage(b().coordinator_identity("c", "k").start().await).contains("need coordinator_ca")
        );
        assert!(
            usage(TwoPc::builder("https://127.0.0.1:1").start().await).contains("coordinator_ca")
        );
        assert!(usage(
            b().participant_client_ca("-----BEGIN CERTIFICATE-----")
                .start()
                .await
        )
        .contains("needs participant_tls"));
        assert!(usage(b().coordinator_ca("not pem").start().await).contains("coordinator_ca"));
        assert!(usage(b().token("has space").start().await).contains("bearer token"));
    }
}
