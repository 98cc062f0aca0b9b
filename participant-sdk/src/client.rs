//! The client API a service embeds: [`TwoPc`] (one per process) and [`Transaction`].
//!
//! [`TwoPc::builder`] connects to the coordinator, starts the embedded participant gRPC
//! server (the endpoint every branch of this service is enlisted with) and the recovery
//! loop. Resources are registered once ([`TwoPc::register`]); a [`Transaction`] enlists a
//! resource the first time it is used in it, under the branch id `<service>:<resource>`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use crate::error::{Error, Result};
use crate::resource::{BranchKind, Resource};

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

/// Settings of a [`TwoPc`] handle.
#[derive(Clone, Debug)]
pub struct TwoPcBuilder {
    coordinator: String,
    service: String,
    listen: SocketAddr,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    recovery_interval: Duration,
    commit_wait: Option<Duration>,
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

    /// How long [`Transaction::commit`] lets the coordinator wait for phase two
    /// (default: the coordinator's own default).
    pub fn commit_wait(mut self, wait: Duration) -> Self {
        self.commit_wait = Some(wait);
        self
    }

    /// Connects to the coordinator, starts the participant server and recovery.
    pub async fn start(self) -> Result<TwoPc> {
        validate_service(&self.service)?;
        let endpoint = Endpoint::from_shared(self.coordinator.clone())
            .map_err(|e| {
                Error::Usage(format!(
                    "coordinator URL {:?} is malformed: {e}",
                    self.coordinator
                ))
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
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
        let advertised = self
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"));
        let registry: Registry = Arc::new(RwLock::new(HashMap::new()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(crate::server::serve(
            listener,
            registry.clone(),
            stop_rx.clone(),
        ));
        let inner = Arc::new(Inner {
            coordinator: CoordinatorClient::new(channel),
            service: self.service,
            endpoint: advertised,
            registry,
            data_dir: self.data_dir,
            commit_wait: self.commit_wait,
            stop: stop_tx,
            tasks: Mutex::new(vec![server]),
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

fn validate_service(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "service name {name:?} must be 1-32 characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// The SDK handle of one service process. Cheap to clone.
#[derive(Clone)]
pub struct TwoPc {
    inner: Arc<Inner>,
}

struct Inner {
    /// Client of the coordinator's API.
    coordinator: CoordinatorClient<Channel>,
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
    /// Stops the server and recovery loop.
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
        }
    }

    /// Registers a resource so the participant server can route its branches. Returns it
    /// back for convenience. Registering two resources with one name is an error.
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
        let resp = self
            .inner
            .coordinator
            .clone()
            .begin(pb::BeginRequest::default())
            .await?;
        Ok(self.transaction(resp.into_inner().tx_id, true))
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

    /// The participant-side data directory, if configured.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.inner.data_dir.as_deref()
    }

    /// A client of the coordinator API (for GetTransaction and friends).
    pub fn coordinator(&self) -> CoordinatorClient<Channel> {
        self.inner.coordinator.clone()
    }

    /// Runs one recovery pass now: every in-doubt branch asks the coordinator for its
    /// outcome and finishes accordingly. Returns how many branches were finished.
    pub async fn recover_now(&self) -> usize {
        crate::recovery::pass(&self.inner.coordinator, &self.inner.registry).await
    }

    /// Stops the participant server and the recovery loop, and waits for them.
    pub async fn shutdown(&self) {
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
        let registered = self
            .sdk
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
        let commit_order = commit_order(kind);
        let branch = pb::Branch {
            branch_id: branch_id.clone(),
            participant_endpoint: self.sdk.inner.endpoint.clone(),
            commit_order,
            kind: kind as i32,
        };
        self.sdk
            .inner
            .coordinator
            .clone()
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
    /// committed (durably decided; `pending_branches` are still being delivered).
    /// [`Error::Aborted`] means nothing of it is committed anywhere.
    pub async fn commit(self) -> Result<Committed> {
        if !self.owner {
            return Err(Error::Usage(format!(
                "transaction {} was joined, not begun, here: its owner commits it",
                self.id
            )));
        }
        let req = pb::CommitRequest {
            tx_id: self.id.clone(),
            phase_two_wait_ms: self
                .sdk
                .inner
                .commit_wait
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            no_wait: false,
        };
        match self.sdk.inner.coordinator.clone().commit(req).await {
            Ok(resp) => Ok(Committed {
                pending_branches: resp.into_inner().pending_branches,
            }),
            Err(s) if s.code() == tonic::Code::Aborted => {
                Err(Error::Aborted(s.message().to_string()))
            }
            Err(s) => Err(Error::Coordinator(s)),
        }
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
        };
        self.sdk.inner.coordinator.clone().abort(req).await?;
        Ok(())
    }
}
