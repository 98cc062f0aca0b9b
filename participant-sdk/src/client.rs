//! The client API a service embeds: [`TwoPc`] (one per process) and [`Transaction`].
//!
//! [`TwoPc::builder`] connects to the coordinator, starts the embedded participant gRPC
//! server (the endpoint every branch of this service is enlisted with), the recovery
//! loop and the forgetter (below). Resources are registered once ([`TwoPc::register`]); a
//! [`Transaction`] enlists a resource the first time it is used in it, under the branch id
//! `<service>:<resource>`.
//!
//! # Forgetting one-phase commits
//!
//! [`Transaction::commit`] asks the coordinator to answer a one-phase commit before its
//! record of the outcome is durable (`answer_before_durable`). Until that record is
//! durable, a restarted coordinator would learn the outcome from the participant (with an
//! abort answered "already committed"), so the participant must keep what answers for the
//! commit (the PostgreSQL adapter's marker row). After an OK answer the branches of this
//! process are therefore not forgotten at once ([`Resource::outcome_known`]) but queued,
//! with the coordinator epoch of the answer, for the handle's **forgetter** task: it takes
//! everything queued, calls the coordinator's `Barrier` once for the lot (at most one in
//! flight, bounded by 5 s) and forgets the branches whose answer came from the epoch the
//! Barrier reports — their outcome is durable now. Entries of another epoch (the
//! coordinator restarted in between) are dropped: recovery reports their markers once
//! they are a minute old (see below). A failed Barrier is tried again (backoff 100 ms to
//! 2 s). The queue holds at most 100 000 transactions (beyond, the oldest are dropped the
//! same way). A coordinator that predates the epoch (answers epoch 0) answers only once the
//! outcome is durable: the branches are then forgotten at once, as before. The forgetter
//! stops with [`TwoPc::shutdown`], after one last Barrier (at most 2 s) for what is queued;
//! the markers a process leaves behind (it died, or the coordinator restarted between the
//! answer and the Barrier) are reported by the recovery loop — after the next start (its
//! first pass over the resource once registered), or on a later pass once a minute old —
//! and dropped then; `marker_retention` is the backstop.
//!
//! # Local one-phase commits
//!
//! [`TwoPc::begin_local`] begins a transaction whose only branch is this process's own
//! (e.g. the order row with its event staged in the same database transaction). The
//! coordinator answers the Begin at once, having written its intent (which branch
//! decides) and started syncing it; the handle then asks for a `Barrier` (one call in
//! flight, shared by every transaction waiting) while the application runs its
//! statements. Under load the ids come from a pool of local transactions begun ahead, many
//! per Begin and one Barrier for them all, so most `begin_local` calls make no coordinator
//! call at all (module `ahead`; [`TwoPcBuilder::begin_ahead`] caps the batch). [`Transaction::commit`] waits for that Barrier — an answer of the Begin's
//! epoch means the intent is durable, so a restarted coordinator asks the branch instead
//! of presuming abort — and commits the branch right here
//! ([`Resource::commit_one_phase`]): no coordinator call on the commit path. A background
//! reporter tells the coordinator (`CommitRequest.committed_locally`): everything queued
//! while its previous call ran goes in one call (`more_tx_ids`, up to 1,025 commits; a
//! batch that fails is reported one commit at a time, up to 20 attempts each), and the
//! forgetter drops the marker after a Barrier of the report's epoch, as above. Until
//! the report arrives, an Abort or the transaction timeout makes the coordinator ask the
//! branch, whose answer (aborted, or already committed) is the outcome. When the Barrier
//! fails or reports another epoch (the coordinator restarted), or the resource cannot
//! tell whether its COMMIT went through, the commit is handed to the coordinator as an
//! ordinary Commit.
//!
//! # Security
//!
//! Against a coordinator started with TLS and tokens (`docs/security.md`), the builder
//! takes the coordinator's CA ([`TwoPcBuilder::coordinator_ca`]; the URL is then dialed
//! as `https://`), an optional client certificate for mutual TLS
//! ([`TwoPcBuilder::coordinator_identity`]) and the bearer token sent on every call,
//! recovery's included ([`TwoPcBuilder::token`]). The embedded participant server can
//! serve TLS ([`TwoPcBuilder::participant_tls`]) and require the coordinator's client
//! certificate ([`TwoPcBuilder::participant_client_ca`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Notify};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tracing::{debug, warn};
use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use crate::ahead::{self, Ahead, Durable, Take};
use crate::error::{Error, Result};
use crate::resource::{BranchKind, OnePhase, Resource};

/// Resources by name, shared with the participant server and recovery.
pub(crate) type Registry = Arc<RwLock<HashMap<String, Arc<dyn Resource>>>>;

/// The commit tier of a branch kind: databases (0) before other resources (5) before
/// brokers (10), so a consumer that receives an event finds its row.
pub(crate) fn commit_order(kind: BranchKind) -> u32 {
    match kind {
        BranchKind::Database => 0,
        BranchKind::Broker => 10,
        _ => 5,
    }
}

/// Adds `authorization: Bearer <token>` to every call it intercepts (nothing without a
/// token). The coordinator checks it before the call reaches any handler.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// An interceptor sending `token` (`None`: sends nothing). Fails when the token is
    /// empty or is not visible ASCII (it travels as a header).
    pub fn new(token: Option<&str>) -> Result<BearerToken> {
        let Some(token) = token else {
            return Ok(BearerToken(None));
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Usage(
                "the bearer token must be visible ASCII characters, without spaces".into(),
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Usage("the bearer token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The channel of [`TwoPc::coordinator`]: a tonic [`Channel`] that stamps the bearer
/// token (if any) on every call.
pub type CoordinatorChannel = InterceptedService<Channel, BearerToken>;

/// A PEM certificate/key pair, kept out of `Debug` output.
#[derive(Clone)]
struct KeyPairPem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Settings of a [`TwoPc`] handle.
#[derive(Clone)]
pub struct TwoPcBuilder {
    coordinator: String,
    service: String,
    listen: SocketAddr,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    recovery_interval: Duration,
    commit_wait: Option<Duration>,
    begin_ahead: u32,
    /// The longest a client call waits for the coordinator (see `call_timeout`).
    call_timeout: Duration,
    /// CA (PEM) of the coordinator's certificate: dial it over TLS.
    coordinator_ca: Option<Vec<u8>>,
    /// Client certificate for a coordinator that requires one (mutual TLS).
    coordinator_identity: Option<KeyPairPem>,
    /// Name to verify the coordinator's certificate against, instead of the URL's host.
    coordinator_domain: Option<String>,
    /// Bearer token of every call to the coordinator.
    token: Option<String>,
    /// Certificate of the embedded participant server: serve TLS.
    participant_tls: Option<KeyPairPem>,
    /// CA (PEM) the coordinator's client certificate must be signed by (mutual TLS).
    participant_client_ca: Option<Vec<u8>>,
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

    /// At most how many local transactions one Begin takes ahead for a resource
    /// (default [`crate::DEFAULT_BEGIN_AHEAD`], at most [`crate::MAX_BEGIN_AHEAD`]; 0 or 1
    /// takes none ahead). The pool follows the demand: under light load each
    /// [`TwoPc::begin_local`] makes its own Begin (see `ahead` in the crate docs).
    pub fn begin_ahead(mut self, max: u32) -> Self {
        self.begin_ahead = max;
        self
    }

    /// How long [`Transaction::commit`] lets the coordinator wait for phase two
    /// (default: the coordinator's own default).
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
    fn coordinator_endpoint(&self) -> Result<Endpoint> {
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
    fn participant_server(&self) -> Result<Server> {
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
        let auth = BearerToken::new(self.token.as_deref())?;
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
        let forget = Arc::new(ForgetQueue::default());
        let forgetter = tokio::spawn(run_forgetter(
            coordinator.clone(),
            registry.clone(),
            forget.clone(),
            stop_rx.clone(),
        ));
        let inner = Arc::new(Inner {
            // A backstop only: `Inner::call` bounds every call by `call_timeout` first.
            pipeline: mux::Pipeline::new(open, self.call_timeout + PIPELINE_BACKSTOP),
            coordinator,
            coordinator_url: self.coordinator,
            call_timeout: self.call_timeout,
            service: self.service,
            endpoint: advertised,
            registry,
            data_dir: self.data_dir,
            commit_wait: self.commit_wait,
            forget,
            barriers: Mutex::new(SharedBarrier::default()),
            reports: Mutex::new(Reports::default()),
            ahead: ahead::Pools::default(),
            begin_ahead: self.begin_ahead,
            stop: stop_tx,
            tasks: Mutex::new(vec![server, forgetter]),
        });
        let recovery = tokio::spawn(crate::recovery::run_loop(
            inner.coordinator.clone(),
            inner.registry.clone(),
            self.recovery_interval,
            stop_rx,
        ));
        if let Ok(mut tasks) = inner.tasks.lock() {
            tasks.push(recovery);
        }
        Ok(TwoPc { inner })
    }
}

/// An error and its causes on one line (tonic's own `Display` says only "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Checks a service or resource name (they become parts of branch ids and PostgreSQL
/// gids): 1 to `max` characters of letters, digits and `._-`; the error says `what`.
pub(crate) fn validate_name(what: &str, name: &str, max: usize) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "{what} name {name:?} must be 1-{max} characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Default of [`TwoPcBuilder::call_timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest accepted [`TwoPcBuilder::call_timeout`].
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// The `Pipeline` stream's own bound on a call is `call_timeout` plus this, so the
/// caller's deadline (which names the setting) always comes first.
const PIPELINE_BACKSTOP: Duration = Duration::from_secs(1);

/// The client API calls: over the pipeline, or unary when the coordinator does not serve
/// it.
impl Inner {
    /// One call: over the pipeline, or as the unary call when the coordinator does not
    /// serve it; at most `call_timeout` plus `wait` (the phase-two wait a Commit asks
    /// for), then `DEADLINE_EXCEEDED`.
    async fn call<'a, Req, Resp, PF, UF>(
        &'a self,
        req: Req,
        wait: Duration,
        piped: impl FnOnce(&'a mux::Pipeline, Req) -> PF,
        unary: impl FnOnce(CoordinatorClient<CoordinatorChannel>, Req) -> UF,
    ) -> std::result::Result<Resp, tonic::Status>
    where
        Req: Clone,
        PF: std::future::Future<Output = std::result::Result<Resp, mux::PipelineError>>,
        UF: std::future::Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let within = self.call_timeout + wait;
        let call = async {
            match piped(&self.pipeline, req.clone()).await {
                Err(mux::PipelineError::Unsupported) => {
                    Ok(unary(self.coordinator.clone(), req).await?.into_inner())
                }
                other => Ok(other?),
            }
        };
        match tokio::time::timeout(within, call).await {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from the coordinator at {} within {} ms (call_timeout {} ms{})",
                self.coordinator_url,
                within.as_millis(),
                self.call_timeout.as_millis(),
                if wait.is_zero() {
                    String::new()
                } else {
                    format!(" + commit wait {} ms", wait.as_millis())
                }
            ))),
        }
    }

    async fn begin(
        &self,
        req: pb::BeginRequest,
    ) -> std::result::Result<pb::BeginResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.begin(r),
            |mut c, r| async move { c.begin(r).await },
        )
        .await
    }

    async fn enlist(
        &self,
        req: pb::EnlistRequest,
    ) -> std::result::Result<pb::EnlistResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.enlist(r),
            |mut c, r| async move { c.enlist(r).await },
        )
        .await
    }

    async fn commit(
        &self,
        req: pb::CommitRequest,
    ) -> std::result::Result<pb::CommitResponse, tonic::Status> {
        let wait = Duration::from_millis(req.phase_two_wait_ms);
        self.call(
            req,
            wait,
            |p, r| p.commit(r),
            |mut c, r| async move { c.commit(r).await },
        )
        .await
    }

    async fn abort(
        &self,
        req: pb::AbortRequest,
    ) -> std::result::Result<pb::AbortResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.abort(r),
            |mut c, r| async move { c.abort(r).await },
        )
        .await
    }
}

/// How long [`TwoPc::shutdown`] waits for the ids begun ahead and not used to go back.
const SHUTDOWN_RELEASE: Duration = Duration::from_secs(2);

/// The SDK handle of one service process. Cheap to clone.
#[derive(Clone)]
pub struct TwoPc {
    inner: Arc<Inner>,
}

struct Inner {
    /// Client of the coordinator's API (stamps the bearer token, if any).
    coordinator: CoordinatorClient<CoordinatorChannel>,
    /// The coordinator's URL as given to the builder, for messages that name it.
    coordinator_url: String,
    /// The longest a client call waits (the builder's `call_timeout`).
    call_timeout: Duration,
    /// Begin / Enlist / Commit / Abort of every transaction of this handle over one
    /// `Pipeline` stream (unary calls against a coordinator that does not serve it).
    pipeline: mux::Pipeline,
    /// Prefix of this service's branch ids.
    service: String,
    /// The participant endpoint branches are enlisted with.
    endpoint: String,
    /// Registered resources.
    registry: Registry,
    /// Participant-side state directory.
    data_dir: Option<PathBuf>,
    /// Phase-two wait passed with Commit.
    commit_wait: Option<Duration>,
    /// Committed transactions whose branches are forgotten once a `Barrier` confirms
    /// their outcome durable (see the module docs).
    forget: Arc<ForgetQueue>,
    /// Local transactions waiting for a `Barrier` (one call in flight for all of them).
    barriers: Mutex<SharedBarrier>,
    /// Local commits waiting to be reported (one call in flight for all of them).
    reports: Mutex<Reports>,
    /// Local transactions begun ahead, per resource.
    ahead: ahead::Pools,
    /// At most this many per Begin (the builder's `begin_ahead`).
    begin_ahead: u32,
    /// Stops the server, the recovery loop and the forgetter.
    stop: watch::Sender<bool>,
    /// Background tasks, awaited by `shutdown`.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl TwoPc {
    /// Starts configuring a handle for the coordinator at `coordinator_url`
    /// (e.g. `http://127.0.0.1:7400`).
    pub fn builder(coordinator_url: impl Into<String>) -> TwoPcBuilder {
        TwoPcBuilder {
            coordinator: coordinator_url.into(),
            service: "svc".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            data_dir: None,
            recovery_interval: Duration::from_secs(5),
            commit_wait: None,
            begin_ahead: ahead::DEFAULT_BEGIN_AHEAD,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            coordinator_ca: None,
            coordinator_identity: None,
            coordinator_domain: None,
            token: None,
            participant_tls: None,
            participant_client_ca: None,
        }
    }

    /// Registers a resource so the participant server can route its branches. Returns it
    /// back for convenience. Registering two resources with one name is an error. The
    /// first periodic recovery pass over it also reports every one-phase commit it
    /// remembers from before this handle started (one a previous process made but could
    /// not report).
    pub fn register<R: Resource>(&self, resource: Arc<R>) -> Result<Arc<R>> {
        let mut reg = self
            .inner
            .registry
            .write()
            .map_err(|_| Error::Usage("registry lock poisoned".into()))?;
        let name = resource.name().to_string();
        if reg.contains_key(&name) {
            return Err(Error::Usage(format!(
                "a resource named {name:?} is already registered"
            )));
        }
        reg.insert(name, resource.clone() as Arc<dyn Resource>);
        Ok(resource)
    }

    /// Begins a transaction this service owns (it will commit or abort it).
    pub async fn begin(&self) -> Result<Transaction> {
        let resp = self.inner.begin(pb::BeginRequest::default()).await?;
        Ok(self.transaction(resp.tx_id, true))
    }

    /// Begins a transaction this service owns with `resources` enlisted by the Begin call
    /// itself: one coordinator round trip instead of one more per resource, and for a
    /// single resource the coordinator starts making its one-phase intent durable at once.
    /// Opening a branch of one of them later (e.g. [`Transaction::postgres`]) makes no
    /// further coordinator call. Every resource must be registered here.
    pub async fn begin_with(&self, resources: &[&dyn Resource]) -> Result<Transaction> {
        let branches = resources
            .iter()
            .map(|r| self.branch_of(*r))
            .collect::<Result<Vec<_>>>()?;
        let ids: HashSet<String> = branches.iter().map(|b| b.branch_id.clone()).collect();
        let resp = self
            .inner
            .begin(pb::BeginRequest {
                timeout_ms: 0,
                branches,
                commit_locally: false,
                count: 0,
            })
            .await?;
        let tx = self.transaction(resp.tx_id, true);
        if let Ok(mut s) = tx.enlisted.lock() {
            s.extend(ids);
        }
        Ok(tx)
    }

    /// Begins a transaction whose only branch is `resource`'s, committed by this process
    /// itself: [`Transaction::commit`] commits the branch in one phase right here (no
    /// coordinator round trip on the caller's path) and reports it to the coordinator in
    /// the background. The coordinator answers the Begin at once, having written its
    /// record that this branch decides (the one-phase intent); the commit waits for a
    /// `Barrier` that shows that record durable (asked for here, so it runs while the
    /// application works), so a restarted coordinator asks the branch what became of it
    /// instead of presuming an abort. No other branch can join the transaction (Enlist is
    /// refused); use [`TwoPc::begin_with`] for that.
    ///
    /// The resource must remember a one-phase commit until told the outcome is known (the
    /// PostgreSQL adapter does with its outbox marker), as for any one-phase commit. A
    /// coordinator that predates local commits, or runs with one-phase commits off, begins
    /// an ordinary transaction with the resource enlisted, and the commit then goes
    /// through it.
    pub async fn begin_local(&self, resource: &dyn Resource) -> Result<Transaction> {
        let branch = self.branch_of(resource)?;
        let name = resource.name();
        let taken = self
            .inner
            .ahead
            .take(name, self.inner.begin_ahead, Instant::now());
        release_unused(&self.inner, taken.stale);
        if let Some(count) = taken.refill {
            refill(&self.inner, branch.clone(), name, count);
        }
        let ahead = match taken.take {
            Take::Ready(a) => a,
            Take::Begin(count) => {
                // This call is the pool's refill when it begins more than one.
                let _refill = (count > 1).then(|| self.inner.ahead.refill(name));
                let mut begun = begin_ahead(&self.inner, branch.clone(), count).await;
                if let Ok(Begun::Local(_, rest)) = &mut begun {
                    self.inner.ahead.put(name, std::mem::take(rest));
                }
                match begun? {
                    Begun::Local(mine, _) => mine,
                    Begun::Plain(tx_id) => {
                        self.inner.ahead.turn_off(name);
                        // An ordinary transaction with the resource enlisted: its commit
                        // goes through the coordinator.
                        let tx = self.transaction(tx_id, true);
                        if let Ok(mut s) = tx.enlisted.lock() {
                            s.insert(branch.branch_id);
                        }
                        return Ok(tx);
                    }
                }
            }
        };
        let mut tx = self.transaction(ahead.tx_id, true);
        tx.local = Some(Local {
            resource: name.to_string(),
            epoch: ahead.epoch,
            durable: ahead.durable,
        });
        if let Ok(mut s) = tx.enlisted.lock() {
            s.insert(branch.branch_id);
        }
        Ok(tx)
    }

    /// Local transactions begun ahead and waiting in this handle's pools (see
    /// [`TwoPcBuilder::begin_ahead`]): for monitoring and tests.
    pub fn begun_ahead(&self) -> usize {
        self.inner.ahead.len()
    }

    /// The branch this service enlists for `resource` (registered here, or a usage error).
    fn branch_of(&self, resource: &dyn Resource) -> Result<pb::Branch> {
        let registered = self
            .inner
            .registry
            .read()
            .map(|r| r.contains_key(resource.name()))
            .unwrap_or(false);
        if !registered {
            return Err(Error::Usage(format!(
                "resource {:?} is not registered with this TwoPc handle (call TwoPc::register first)",
                resource.name()
            )));
        }
        let kind = resource.kind();
        Ok(pb::Branch {
            branch_id: format!("{}:{}", self.inner.service, resource.name()),
            participant_endpoint: self.inner.endpoint.clone(),
            commit_order: commit_order(kind),
            kind: kind as i32,
        })
    }

    /// Joins a transaction another service began (its id arrived with a request, see
    /// [`crate::propagation`]). A joined transaction can enlist branches; only its owner
    /// commits or aborts it.
    pub fn join(&self, tx_id: impl Into<String>) -> Transaction {
        self.transaction(tx_id.into(), false)
    }

    fn transaction(&self, id: String, owner: bool) -> Transaction {
        Transaction {
            id,
            owner,
            sdk: self.clone(),
            enlisted: Mutex::new(HashSet::new()),
            local: None,
        }
    }

    /// The participant endpoint this service's branches are enlisted with.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// This service's name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The coordinator's URL, as given to [`TwoPc::builder`] (for messages that name it).
    pub fn coordinator_url(&self) -> &str {
        &self.inner.coordinator_url
    }

    /// The participant-side data directory, if configured.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.inner.data_dir.as_deref()
    }

    /// A client of the coordinator API (for GetTransaction and friends), with the
    /// builder's TLS settings and token.
    pub fn coordinator(&self) -> CoordinatorClient<CoordinatorChannel> {
        self.inner.coordinator.clone()
    }

    /// Runs one recovery pass now: every in-doubt branch asks the coordinator for its
    /// outcome and finishes accordingly, and every one-phase commit a resource still
    /// remembers is reported. Returns how many branches were finished or reported.
    pub async fn recover_now(&self) -> usize {
        crate::recovery::pass(
            &self.inner.coordinator,
            &self.inner.registry,
            crate::recovery::Markers::All,
        )
        .await
    }

    /// Stops the participant server, the recovery loop and the forgetter, and waits for
    /// them. Branches still waiting for a `Barrier` are not forgotten (their markers go
    /// after `OutboxOptions::marker_retention`).
    pub async fn shutdown(&self) {
        // Ids begun ahead go back while the participant server can still answer the
        // coordinator's question about them.
        let unused = self.inner.ahead.drain();
        if !unused.is_empty() {
            let _ = tokio::time::timeout(SHUTDOWN_RELEASE, release_now(&self.inner, unused)).await;
        }
        let _ = self.inner.stop.send(true);
        let tasks = match self.inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => Vec::new(),
        };
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One distributed transaction, seen from this service.
pub struct Transaction {
    id: String,
    /// Began here (may commit/abort) or joined.
    owner: bool,
    sdk: TwoPc,
    /// Resources already enlisted in this transaction by this handle.
    enlisted: Mutex<HashSet<String>>,
    /// Begun with [`TwoPc::begin_local`] (and the coordinator agreed).
    local: Option<Local>,
}

/// What a transaction begun with [`TwoPc::begin_local`] commits by itself.
struct Local {
    /// The resource whose branch it is.
    resource: String,
    /// The coordinator epoch of the Begin answer.
    epoch: u64,
    /// The epoch of a `Barrier` called after the Begin answer (or why it failed): the
    /// intent is durable when it is `epoch`.
    durable: Durable,
}

/// What [`Transaction::commit`] learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Branches phase two has not reached yet (the coordinator keeps trying).
    pub pending_branches: Vec<String>,
}

impl Transaction {
    /// The transaction id (propagate it to other services with [`crate::propagation`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Begun with [`TwoPc::begin_local`] and not committed yet: its one branch will commit
    /// in one phase.
    pub(crate) fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// The SDK handle this transaction belongs to.
    pub fn sdk(&self) -> &TwoPc {
        &self.sdk
    }

    /// The branch id `resource` gets in this transaction.
    pub fn branch_id(&self, resource: &dyn Resource) -> String {
        format!("{}:{}", self.sdk.inner.service, resource.name())
    }

    /// Enlists `resource` (once per transaction; later calls are free) and returns the
    /// branch id. Resources call this when they open a branch.
    pub async fn enlist(&self, resource: &dyn Resource) -> Result<String> {
        let branch_id = self.branch_id(resource);
        if self
            .enlisted
            .lock()
            .map(|s| s.contains(&branch_id))
            .unwrap_or(false)
        {
            return Ok(branch_id);
        }
        if self.local.is_some() {
            return Err(Error::Usage(format!(
                "transaction {} was begun with begin_local: its one resource is its only \
                 branch, so {:?} cannot join it (use begin_with for a transaction of several)",
                self.id,
                resource.name()
            )));
        }
        let branch = self.sdk.branch_of(resource)?;
        self.sdk
            .inner
            .enlist(pb::EnlistRequest {
                tx_id: self.id.clone(),
                branch: Some(branch),
            })
            .await?;
        if let Ok(mut s) = self.enlisted.lock() {
            s.insert(branch_id.clone());
        }
        Ok(branch_id)
    }

    /// Commits: every branch of every service in the transaction, or none. `Ok` means
    /// committed (decided; `pending_branches` are still being delivered).
    /// [`Error::Aborted`] means nothing of it is committed anywhere.
    ///
    /// A one-phase commit (the transaction has a single branch) may be answered before
    /// the coordinator's record of it is durable (the request sets
    /// `answer_before_durable`): the commit itself is done in the branch's resource, and
    /// until the coordinator's record is durable the resource keeps what tells a
    /// restarted coordinator that it committed. This process's branches are forgotten
    /// ([`Resource::outcome_known`]) by the handle's forgetter once a coordinator
    /// `Barrier` of the same epoch as the answer returned (see the module docs), or at
    /// once when the coordinator reports no epoch (it answered once durable).
    ///
    /// A transaction begun with [`TwoPc::begin_local`] is committed here, by its resource
    /// ([`Resource::commit_one_phase`]), once a `Barrier` of the Begin's epoch showed the
    /// coordinator's intent durable, and reported to the coordinator in the background
    /// (see [`TwoPc::begin_local`]). Without that Barrier (the coordinator restarted or is
    /// unreachable), or when the resource cannot tell whether it committed (its connection
    /// broke during COMMIT), the commit is handed to the coordinator, which asks the
    /// resource until it can tell.
    pub async fn commit(mut self) -> Result<Committed> {
        if !self.owner {
            return Err(Error::Usage(format!(
                "transaction {} was joined, not begun, here: its owner commits it",
                self.id
            )));
        }
        if let Some(local) = self.local.take() {
            if let Some(done) = self.commit_locally(local).await {
                return done;
            }
        }
        self.commit_via_coordinator().await
    }

    /// The local one-phase commit; `None` when it must go through the coordinator.
    async fn commit_locally(&self, local: Local) -> Option<Result<Committed>> {
        match local.durable.await {
            Ok(Ok(epoch)) if epoch == local.epoch => {}
            Ok(Ok(epoch)) => {
                warn!(tx_id = %self.id, begun = local.epoch, now = epoch,
                    "the coordinator restarted since Begin; committing through it");
                return None;
            }
            Ok(Err(e)) => {
                warn!(tx_id = %self.id, error = %e,
                    "Barrier failed; committing through the coordinator");
                return None;
            }
            Err(_) => return None,
        }
        let resource = self
            .sdk
            .inner
            .registry
            .read()
            .ok()
            .and_then(|r| r.get(&local.resource).cloned());
        let Some(resource) = resource else {
            return Some(Err(Error::Usage(format!(
                "resource {:?} is no longer registered with this TwoPc handle",
                local.resource
            ))));
        };
        let branch_id = self.branch_id(&*resource);
        match resource.commit_one_phase(&self.id, &branch_id).await {
            Ok(OnePhase::Committed) => {
                report_local_commit(self.sdk.inner.clone(), self.id.clone(), branch_id);
                Some(Ok(Committed {
                    pending_branches: Vec::new(),
                }))
            }
            Ok(OnePhase::Refused(why)) => {
                let why = format!("branch {branch_id} refused to commit: {why}");
                report_local_abort(self.sdk.inner.clone(), self.id.clone(), why.clone());
                Some(Err(Error::Aborted(why)))
            }
            Err(e) => {
                warn!(tx_id = %self.id, error = %e,
                    "local one-phase commit outcome unknown; asking the coordinator to finish it");
                None
            }
        }
    }

    /// The Commit call: the coordinator runs the protocol.
    async fn commit_via_coordinator(self) -> Result<Committed> {
        let req = pb::CommitRequest {
            tx_id: self.id.clone(),
            phase_two_wait_ms: self
                .sdk
                .inner
                .commit_wait
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            no_wait: false,
            branches: Vec::new(),
            answer_before_durable: true,
            committed_locally: false,
            more_tx_ids: Vec::new(),
        };
        match self.sdk.inner.commit(req).await {
            Ok(resp) => {
                if resp.epoch == 0 {
                    // A coordinator that predates the epoch answers once durable.
                    self.outcome_known();
                } else {
                    self.forget_after_barrier(resp.epoch);
                }
                Ok(Committed {
                    pending_branches: resp.pending_branches,
                })
            }
            Err(s) if s.code() == tonic::Code::Aborted => {
                Err(Error::Aborted(s.message().to_string()))
            }
            Err(s) => Err(Error::Coordinator(s)),
        }
    }

    /// The branch ids this handle enlisted in this transaction.
    fn enlisted_branches(&self) -> Vec<String> {
        self.enlisted
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Tells this process's resources that the coordinator holds the outcome of their
    /// branches of this transaction.
    fn outcome_known(&self) {
        tell_outcome_known(
            &self.sdk.inner.registry,
            &self.id,
            &self.enlisted_branches(),
        );
    }

    /// Queues this transaction's branches for the forgetter: they are forgotten once a
    /// `Barrier` returns `epoch`.
    fn forget_after_barrier(&self, epoch: u64) {
        let branch_ids = self.enlisted_branches();
        if branch_ids.is_empty() {
            return;
        }
        self.sdk.inner.forget.push(Unforgotten {
            tx_id: self.id.clone(),
            branch_ids,
            epoch,
        });
    }

    /// Aborts: nothing of the transaction is committed anywhere.
    pub async fn abort(self, reason: impl Into<String>) -> Result<()> {
        if !self.owner {
            return Err(Error::Usage(format!(
                "transaction {} was joined, not begun, here: its owner aborts it",
                self.id
            )));
        }
        let req = pb::AbortRequest {
            tx_id: self.id.clone(),
            reason: reason.into(),
            unused: false,
        };
        self.sdk.inner.abort(req).await?;
        Ok(())
    }
}

/// Tells the registered resources of `branch_ids` that the coordinator holds the outcome
/// of transaction `tx_id`.
fn tell_outcome_known(registry: &Registry, tx_id: &str, branch_ids: &[String]) {
    let Ok(registry) = registry.read() else {
        return;
    };
    for branch_id in branch_ids {
        let name = branch_id.split_once(':').map_or("", |(_, r)| r);
        if let Some(resource) = registry.get(name) {
            resource.outcome_known(tx_id, branch_id);
        }
    }
}

/// What a Begin with `commit_locally` gave.
enum Begun {
    /// Local transactions (the first and the rest of as many as the coordinator began),
    /// each usable once the Barrier asked after the answer reports its epoch.
    Local(Ahead, Vec<Ahead>),
    /// An ordinary transaction with the branch enlisted (the coordinator runs without
    /// one-phase commits, or predates local ones).
    Plain(String),
}

/// Begins `count` local transactions of `branch` in one call, and asks for the Barrier
/// that shows their intents durable.
async fn begin_ahead(inner: &Arc<Inner>, branch: pb::Branch, count: u32) -> Result<Begun> {
    let resp = inner
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: vec![branch],
            commit_locally: true,
            count,
        })
        .await?;
    if !resp.commit_locally || resp.epoch == 0 {
        return Ok(Begun::Plain(resp.tx_id));
    }
    // The intents were written before the answer; a Barrier called from now on returns
    // once they are durable. It runs while the application does its work.
    let durable = barrier_after_now(inner).shared();
    let begun = Instant::now();
    let max_age = ahead::max_age(resp.timeout_ms);
    let ahead = |tx_id| Ahead {
        tx_id,
        epoch: resp.epoch,
        durable: durable.clone(),
        begun,
        max_age,
    };
    let rest = resp.more_tx_ids.iter().cloned().map(ahead).collect();
    Ok(Begun::Local(ahead(resp.tx_id.clone()), rest))
}

/// Refills the pool of resource `name` with `count` local transactions of `branch`, in
/// the background.
fn refill(inner: &Arc<Inner>, branch: pb::Branch, name: &str, count: u32) {
    let (inner, name) = (inner.clone(), name.to_string());
    tokio::spawn(async move {
        let _refill = inner.ahead.refill(&name);
        match begin_ahead(&inner, branch, count).await {
            Ok(Begun::Local(first, mut rest)) => {
                rest.insert(0, first);
                inner.ahead.put(&name, rest);
            }
            Ok(Begun::Plain(tx_id)) => {
                inner.ahead.turn_off(&name);
                release_plain(&inner, tx_id);
            }
            Err(e) => debug!(error = %e, "could not begin local transactions ahead"),
        }
    });
}

/// Gives local transactions begun ahead back unused (Abort with `unused`), in the
/// background.
fn release_unused(inner: &Arc<Inner>, ids: Vec<Ahead>) {
    if ids.is_empty() {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move { release_now(&inner, ids).await });
}

/// Gives local transactions begun ahead back unused, and waits for the answers.
async fn release_now(inner: &Inner, ids: Vec<Ahead>) {
    let calls = ids.into_iter().map(|a| async move {
        let req = pb::AbortRequest {
            tx_id: a.tx_id.clone(),
            reason: String::new(),
            unused: true,
        };
        if let Err(s) = inner.abort(req).await {
            debug!(tx_id = %a.tx_id, error = %s,
                "could not give back an unused transaction id; the coordinator settles it at its timeout");
        }
    });
    futures::future::join_all(calls).await;
}

/// Aborts an ordinary transaction a background refill began (the coordinator did not
/// begin local ones), in the background.
fn release_plain(inner: &Arc<Inner>, tx_id: String) {
    let inner = inner.clone();
    tokio::spawn(async move {
        let req = pb::AbortRequest {
            tx_id,
            reason: "begun ahead, not used".into(),
            unused: false,
        };
        let _ = inner.abort(req).await;
    });
}

/// Callers waiting for a `Barrier` that starts after they asked, and whether one is
/// running. One call serves everyone who asked before it started.
#[derive(Default)]
struct SharedBarrier {
    running: bool,
    waiting: Vec<oneshot::Sender<std::result::Result<u64, String>>>,
}

/// The answer of a `Barrier` call that starts after this call (its epoch, or why it
/// failed). Calls are shared: one runs at a time, for everyone who asked before it.
fn barrier_after_now(inner: &Arc<Inner>) -> oneshot::Receiver<std::result::Result<u64, String>> {
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut b = crate::lock(&inner.barriers);
        b.waiting.push(tx);
        !std::mem::replace(&mut b.running, true)
    };
    if start {
        let inner = inner.clone();
        tokio::spawn(async move {
            loop {
                let batch = {
                    let mut b = crate::lock(&inner.barriers);
                    if b.waiting.is_empty() {
                        b.running = false;
                        return;
                    }
                    std::mem::take(&mut b.waiting)
                };
                let answer = barrier(&inner.coordinator, BARRIER_TIMEOUT).await;
                for w in batch {
                    let _ = w.send(answer.clone());
                }
            }
        });
    }
    rx
}

/// Attempts of the background report of a local commit (backoff
/// [`BARRIER_RETRY_MIN`]..[`BARRIER_RETRY_MAX`] in between). A report that never gets
/// through changes no outcome: at the transaction timeout the coordinator asks the
/// branch, which answers that it committed.
const REPORT_ATTEMPTS: u32 = 20;

/// Most local commits one report carries (the coordinator takes 1 + 1024).
const REPORT_BATCH: usize = 1025;

/// Local commits waiting to be reported, and whether a reporter runs.
#[derive(Default)]
struct Reports {
    running: bool,
    /// A coordinator that recorded only the first of a batch (it predates batched
    /// reports): every report goes alone from then on.
    alone: bool,
    /// `(tx_id, branch_id)`.
    queued: Vec<(String, String)>,
}

/// Reports the local commit of `tx_id` to the coordinator in the background: queued for
/// the reporter, which sends everything queued in one call (`committed_locally` with
/// `more_tx_ids`, answered early) and queues the branches for the forgetter with the
/// answer's epoch. A batch that fails, or that a coordinator predating batches answered
/// for its first transaction only, is reported one by one ([`report_alone`]).
fn report_local_commit(inner: Arc<Inner>, tx_id: String, branch_id: String) {
    let start = {
        let mut r = crate::lock(&inner.reports);
        r.queued.push((tx_id, branch_id));
        !std::mem::replace(&mut r.running, true)
    };
    if !start {
        return;
    }
    tokio::spawn(async move {
        loop {
            let (batch, alone) = {
                let mut r = crate::lock(&inner.reports);
                if r.queued.is_empty() {
                    r.running = false;
                    return;
                }
                let n = r.queued.len().min(REPORT_BATCH);
                (r.queued.drain(..n).collect::<Vec<_>>(), r.alone)
            };
            crate::crash_point("participant::after_local_commit_before_report");
            if alone || batch.len() == 1 {
                for (tx_id, branch_id) in batch {
                    tokio::spawn(report_alone(inner.clone(), tx_id, branch_id));
                }
                continue;
            }
            let req = pb::CommitRequest {
                tx_id: batch[0].0.clone(),
                more_tx_ids: batch[1..].iter().map(|(t, _)| t.clone()).collect(),
                answer_before_durable: true,
                committed_locally: true,
                ..Default::default()
            };
            let rest = match inner.commit(req).await {
                Ok(resp) if resp.recorded as usize == batch.len() => {
                    recorded_locally(&inner, batch, resp.epoch);
                    Vec::new()
                }
                Ok(resp) => {
                    // Only the first was recorded: the coordinator predates batches.
                    crate::lock(&inner.reports).alone = true;
                    let mut first = batch;
                    let rest = first.split_off(1);
                    recorded_locally(&inner, first, resp.epoch);
                    rest
                }
                Err(s) => {
                    debug!(error = %s, count = batch.len(),
                        "a batch of local commit reports failed; reporting them one by one");
                    batch
                }
            };
            for (tx_id, branch_id) in rest {
                tokio::spawn(report_alone(inner.clone(), tx_id, branch_id));
            }
        }
    });
}

/// Reports the local commit of `tx_id` alone (`committed_locally`, answered early, up to
/// [`REPORT_ATTEMPTS`] attempts), then queues the branch for the forgetter with the
/// answer's epoch.
async fn report_alone(inner: Arc<Inner>, tx_id: String, branch_id: String) {
    let req = pb::CommitRequest {
        tx_id: tx_id.clone(),
        answer_before_durable: true,
        committed_locally: true,
        ..Default::default()
    };
    let mut retry = BARRIER_RETRY_MIN;
    for attempt in 1..=REPORT_ATTEMPTS {
        match inner.commit(req.clone()).await {
            Ok(resp) => {
                recorded_locally(&inner, vec![(tx_id, branch_id)], resp.epoch);
                return;
            }
            Err(s) if !retryable(&s) => {
                warn!(tx_id = %tx_id, code = ?s.code(), error = s.message(),
                    "the coordinator refused the report of a local commit; the branch keeps its marker");
                return;
            }
            Err(s) if attempt < REPORT_ATTEMPTS => {
                debug!(tx_id = %tx_id, error = %s, retry_in = ?retry, "report of a local commit failed");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(BARRIER_RETRY_MAX);
            }
            Err(s) => warn!(tx_id = %tx_id, error = %s,
                "could not report a local commit; the coordinator learns it from the branch at the transaction timeout"),
        }
    }
}

/// Local commits the coordinator recorded, answered with `epoch`: their branches are
/// queued for the forgetter (or, from a coordinator that predates the epoch and answered
/// once the outcome was durable, forgotten at once).
fn recorded_locally(inner: &Inner, commits: Vec<(String, String)>, epoch: u64) {
    for (tx_id, branch_id) in commits {
        if epoch == 0 {
            tell_outcome_known(&inner.registry, &tx_id, &[branch_id]);
        } else {
            inner.forget.push(Unforgotten {
                tx_id,
                branch_ids: vec![branch_id],
                epoch,
            });
        }
    }
}

/// Tells the coordinator in the background that the local commit of `tx_id` was refused
/// (the branch rolled back), so it finishes the transaction now rather than at its
/// timeout.
fn report_local_abort(inner: Arc<Inner>, tx_id: String, reason: String) {
    tokio::spawn(async move {
        let req = pb::AbortRequest {
            tx_id: tx_id.clone(),
            reason,
            unused: false,
        };
        if let Err(s) = inner.abort(req).await {
            debug!(tx_id = %tx_id, error = %s,
                "abort after a refused local commit failed; the coordinator settles it at the transaction timeout");
        }
    });
}

/// Whether a failed call may succeed if tried again.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
    )
}

/// Most transactions waiting for the forgetter; beyond, the oldest are dropped (their
/// markers go after `OutboxOptions::marker_retention`).
const MAX_UNFORGOTTEN: usize = 100_000;

/// Bound on one `Barrier` call of the forgetter.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// A committed transaction whose branches of this process wait for a `Barrier`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Unforgotten {
    tx_id: String,
    branch_ids: Vec<String>,
    /// The coordinator epoch of the Commit answer.
    epoch: u64,
}

/// What the forgetter has to do: a bounded queue and the signal that it is not empty.
#[derive(Default)]
struct ForgetQueue {
    queue: Mutex<VecDeque<Unforgotten>>,
    ready: Notify,
}

impl ForgetQueue {
    /// Queues `entry`, dropping the oldest beyond [`MAX_UNFORGOTTEN`].
    fn push(&self, entry: Unforgotten) {
        let dropped = {
            let mut q = crate::lock(&self.queue);
            q.push_back(entry);
            let excess = q.len().saturating_sub(MAX_UNFORGOTTEN);
            q.drain(..excess).count()
        };
        if dropped > 0 {
            debug!(
                dropped,
                "forgetter queue full: the oldest committed transactions keep their markers"
            );
        }
        self.ready.notify_one();
    }

    /// Everything queued so far.
    fn take(&self) -> Vec<Unforgotten> {
        crate::lock(&self.queue).drain(..).collect()
    }

    /// Puts a batch whose `Barrier` failed back in front of what was queued since, within
    /// [`MAX_UNFORGOTTEN`] (the oldest are dropped beyond).
    fn put_back(&self, batch: Vec<Unforgotten>) {
        let mut q = crate::lock(&self.queue);
        for entry in batch.into_iter().rev() {
            q.push_front(entry);
        }
        let excess = q.len().saturating_sub(MAX_UNFORGOTTEN);
        q.drain(..excess);
    }
}

/// The entries of `batch` that may be forgotten after a `Barrier` returned
/// `barrier_epoch`: those answered by the same coordinator epoch (their outcome records
/// were written before the Barrier arrived, so they are durable now). An entry of another
/// epoch was answered by a coordinator that has restarted since (its record may be lost):
/// it is not returned.
fn forgettable(batch: Vec<Unforgotten>, barrier_epoch: u64) -> Vec<Unforgotten> {
    batch
        .into_iter()
        .filter(|u| u.epoch == barrier_epoch)
        .collect()
}

/// First wait before a failed `Barrier` is tried again; doubles up to [`BARRIER_RETRY_MAX`].
const BARRIER_RETRY_MIN: Duration = Duration::from_millis(100);
const BARRIER_RETRY_MAX: Duration = Duration::from_secs(2);

/// Bound on the last `Barrier` at shutdown.
const BARRIER_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// One `Barrier` call bounded by `within`: the coordinator's epoch, or why not.
async fn barrier(
    coordinator: &CoordinatorClient<CoordinatorChannel>,
    within: Duration,
) -> std::result::Result<u64, String> {
    match tokio::time::timeout(within, coordinator.clone().barrier(pb::BarrierRequest {})).await {
        Ok(Ok(resp)) => Ok(resp.into_inner().epoch),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Forgets the entries of `batch` that a `Barrier` answered with `epoch` covers.
fn forget_batch(registry: &Registry, batch: Vec<Unforgotten>, epoch: u64) {
    let total = batch.len();
    let forget = forgettable(batch, epoch);
    if forget.len() < total {
        debug!(
            barrier_epoch = epoch,
            dropped = total - forget.len(),
            "commits answered by another coordinator epoch keep their markers until marker_retention"
        );
    }
    for u in &forget {
        tell_outcome_known(registry, &u.tx_id, &u.branch_ids);
    }
}

/// The forgetter: waits for queued entries, takes all of them, calls `Barrier` once
/// (bounded by [`BARRIER_TIMEOUT`]) and forgets the entries [`forgettable`] keeps; the
/// others are dropped. A failed `Barrier` puts the batch back and is tried again after a
/// backoff (a coordinator that restarted meanwhile answers another epoch, and the batch is
/// dropped then). When `stop` turns true, what is queued gets one last `Barrier` (bounded
/// by [`BARRIER_AT_SHUTDOWN`]), so a graceful shutdown leaves no marker behind.
async fn run_forgetter(
    coordinator: CoordinatorClient<CoordinatorChannel>,
    registry: Registry,
    queue: Arc<ForgetQueue>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = BARRIER_RETRY_MIN;
    loop {
        let stopping = tokio::select! {
            _ = queue.ready.notified() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let batch = queue.take();
        if stopping {
            if !batch.is_empty() {
                match barrier(&coordinator, BARRIER_AT_SHUTDOWN).await {
                    Ok(epoch) => forget_batch(&registry, batch, epoch),
                    Err(e) => warn!(error = %e, transactions = batch.len(),
                        "Barrier failed at shutdown: these one-phase commits keep their markers until marker_retention"),
                }
            }
            return;
        }
        if batch.is_empty() {
            continue;
        }
        let answer = tokio::select! {
            a = barrier(&coordinator, BARRIER_TIMEOUT) => a,
            _ = stop.wait_for(|s| *s) => {
                queue.put_back(batch);
                continue;
            }
        };
        match answer {
            Ok(epoch) => {
                retry = BARRIER_RETRY_MIN;
                forget_batch(&registry, batch, epoch);
            }
            Err(e) => {
                warn!(error = %e, transactions = batch.len(), retry_in = ?retry,
                    "Barrier failed: these one-phase commits keep their markers until it succeeds");
                queue.put_back(batch);
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                retry = (retry * 2).min(BARRIER_RETRY_MAX);
                queue.ready.notify_one();
            }
        }
    }
}

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

    fn entry(tx_id: &str, epoch: u64) -> Unforgotten {
        Unforgotten {
            tx_id: tx_id.into(),
            branch_ids: vec!["svc:db".into()],
            epoch,
        }
    }

    #[test]
    fn only_commits_of_the_barriers_epoch_are_forgotten() {
        let batch = vec![entry("a", 3), entry("b", 2), entry("c", 3), entry("d", 4)];
        assert_eq!(
            forgettable(batch.clone(), 3),
            vec![entry("a", 3), entry("c", 3)]
        );
        // The coordinator restarted (a newer epoch) or the answer came from elsewhere:
        // nothing of another epoch is forgotten.
        assert_eq!(forgettable(batch.clone(), 5), Vec::new());
        assert_eq!(forgettable(batch, 0), Vec::new());
    }

    #[test]
    fn the_forget_queue_is_bounded_and_drops_the_oldest() {
        let q = ForgetQueue::default();
        for i in 0..MAX_UNFORGOTTEN + 3 {
            q.push(entry(&i.to_string(), 1));
        }
        let taken = q.take();
        assert_eq!(taken.len(), MAX_UNFORGOTTEN);
        assert_eq!(taken.first().map(|u| u.tx_id.as_str()), Some("3"));
        assert!(q.take().is_empty());
    }

    #[test]
    fn bearer_tokens_are_sent_but_never_printed() {
        let mut t = BearerToken::new(Some("secret-token-0123456789")).expect("valid");
        assert!(!format!("{t:?}").contains("secret"));
        let req = t.call(tonic::Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer secret-token-0123456789")
        );
        let mut none = BearerToken::new(None).expect("no token");
        let req = none.call(tonic::Request::new(())).expect("intercepted");
        assert!(req.metadata().get("authorization").is_none());
        let b = TwoPc::builder("http://x").token("secret-token-0123456789");
        assert!(!format!("{b:?}").contains("secret"));
    }
}
