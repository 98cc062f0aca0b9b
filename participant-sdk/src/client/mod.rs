//! The client API a service embeds: [`TwoPc`] (one per process) and [`Transaction`].
//!
//! [`TwoPc::builder`] connects to the coordinator, starts the embedded participant gRPC
//! server (the endpoint every branch of this service is enlisted with), the recovery loop
//! and the local-commit driver (the forgetter and the local one-phase commits, below:
//! module `local`, a state machine without I/O and the one task that performs its calls).
//! Resources are registered once ([`TwoPc::register`]); a [`Transaction`] enlists a
//! resource the first time it is used in it, under the branch id `<service>:<resource>`.
//!
//! # Forgetting one-phase commits
//!
//! [`Transaction::commit`] asks the coordinator to answer a one-phase commit before its
//! record of the outcome is durable (`answer_before_durable`). Until that record is
//! durable, a restarted coordinator would learn the outcome from the participant (with an
//! abort answered "already committed"), so the participant must keep what answers for the
//! commit (the PostgreSQL adapter's marker row). After an OK answer the branches of this
//! process are therefore not forgotten at once ([`Resource::outcome_known`]) but queued,
//! with the coordinator epoch of the answer, for the handle's **forgetter** (the forget
//! lane of the local-commit driver): it takes everything queued, calls the coordinator's
//! `Barrier` once for the lot (at most one in flight, bounded by 5 s) and forgets the
//! branches whose answer came from the epoch the Barrier reports — their outcome is durable
//! now. Entries of another epoch (the coordinator restarted in between) are dropped:
//! recovery reports their markers once they are a minute old (see below). A failed Barrier
//! is tried again (backoff 100 ms to 2 s). The queue holds at most 100 000 transactions
//! (beyond, the oldest are dropped the same way). The forgetter stops with
//! [`TwoPc::shutdown`], after one last Barrier (at most 2 s) for what is queued (and the
//! ids begun ahead and not used have gone back, at most 2 s, both before the participant
//! server stops); the markers a process leaves behind (it died, or the coordinator
//! restarted between the answer and the Barrier) are reported by the recovery loop — after
//! the next start (its first pass over the resource once registered), or on a later pass
//! once a minute old — and dropped then; `marker_retention` is the backstop.
//!
//! # Local one-phase commits
//!
//! [`TwoPc::begin_local`] begins a transaction whose only branch is this process's own
//! (e.g. the order row with its event staged in the same database transaction). The
//! coordinator answers its `BeginLocal` at once, having written its intent (which branch
//! decides) and started syncing it; the handle then asks for a `Barrier` (one call in
//! flight, shared by every transaction waiting) while the application runs its statements.
//! Under load the ids come from a pool of local transactions begun ahead, many per
//! `BeginLocal` and one Barrier for them all, so most `begin_local` calls make no
//! coordinator call at all (module `ahead`; [`TwoPcBuilder::begin_ahead`] caps the batch).
//! [`Transaction::commit`] waits for that Barrier — an answer of the `BeginLocal`'s epoch
//! means the intent is durable, so a restarted coordinator asks the branch instead of
//! presuming abort — and commits the branch right here ([`Resource::commit_one_phase`]): no
//! coordinator call on the commit path. The driver reports it to the coordinator in the
//! background (`ReportLocalCommits`): everything queued while its previous call ran goes in
//! one call (up to 1,024 commits; a batch that fails is reported one commit at a time, up
//! to 20 attempts each, backoff 100 ms to 2 s), and the forgetter drops the marker after a
//! Barrier of the report's epoch, as above. Until the report arrives, an Abort or the
//! transaction timeout makes the coordinator ask the branch, whose answer (aborted, or
//! already committed) is the outcome. When the Barrier fails or reports another epoch (the
//! coordinator restarted), or the resource cannot tell whether its COMMIT went through, the
//! commit is handed to the coordinator as an ordinary Commit.
//!
//! # Security
//!
//! Against a coordinator started with TLS and tokens (`docs/security.md`), the builder
//! takes the coordinator's CA ([`TwoPcBuilder::coordinator_ca`]; the URL is then dialed as
//! `https://`), an optional client certificate for mutual TLS
//! ([`TwoPcBuilder::coordinator_identity`]) and the bearer token sent on every call,
//! recovery's included ([`TwoPcBuilder::token`]). The embedded participant server can serve
//! TLS ([`TwoPcBuilder::participant_tls`]) and require the coordinator's client certificate
//! ([`TwoPcBuilder::participant_client_ca`]).

mod builder;
mod calls;
mod local;
mod transaction;

pub use builder::TwoPcBuilder;
pub use transaction::{BranchCommit, Committed, Enlisted, Transaction};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use crate::ahead;
use crate::channel::CoordinatorChannel;
use crate::error::{Error, Result};
use crate::resource::{commit_order, Registry, Resource};

use calls::Calls;
use local::{Began, LocalHandle};
use transaction::Local;

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

/// The SDK handle of one service process. Cheap to clone.
#[derive(Clone)]
pub struct TwoPc {
    inner: Arc<Inner>,
}

/// What the handle needs; the background tasks (participant server, recovery, the
/// local-commit driver) each hold only their own parts of it.
struct Inner {
    /// The coordinator calls of the transactions (shared with the local-commit driver).
    calls: Arc<Calls>,
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
    /// The local-commit driver: ids begun ahead, the shared Barrier, reports of local
    /// commits and the forget queue (see the module docs).
    local: LocalHandle,
    /// Stops the server and the recovery loop.
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
        let resp = self.inner.calls.begin(pb::BeginRequest::default()).await?;
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
            .calls
            .begin(pb::BeginRequest {
                timeout_ms: 0,
                branches,
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
    /// the background. The coordinator answers the BeginLocal at once, having written its
    /// record that this branch decides (the one-phase intent); the commit waits for a
    /// `Barrier` that shows that record durable (asked for here, so it runs while the
    /// application works), so a restarted coordinator asks the branch what became of it
    /// instead of presuming an abort. No other branch can join the transaction (Enlist is
    /// refused); use [`TwoPc::begin_with`] for that.
    ///
    /// The resource must remember a one-phase commit until told the outcome is known (the
    /// PostgreSQL adapter does with its outbox marker), as for any one-phase commit. Against
    /// a coordinator that runs with one-phase commits off (it refuses BeginLocal), this
    /// begins an ordinary transaction with the resource enlisted ([`TwoPc::begin_with`]),
    /// and the commit then goes through the coordinator.
    pub async fn begin_local(&self, resource: &dyn Resource) -> Result<Transaction> {
        let branch = self.branch_of(resource)?;
        let branch_id = branch.branch_id.clone();
        let name = resource.name();
        let (tx_id, durable) = match self.inner.local.begin_local(name, branch).await? {
            Began::Local { tx_id, durable } => (tx_id, durable),
            // An ordinary transaction with the resource enlisted: its commit goes through
            // the coordinator.
            Began::Off => return self.begin_with(&[resource]).await,
        };
        let mut tx = self.transaction(tx_id, true);
        tx.local = Some(Local {
            resource: name.to_string(),
            durable,
        });
        if let Ok(mut s) = tx.enlisted.lock() {
            s.insert(branch_id);
        }
        Ok(tx)
    }

    /// Local transactions begun ahead and waiting in this handle's pools (see
    /// [`TwoPcBuilder::begin_ahead`]): for monitoring and tests.
    pub fn begun_ahead(&self) -> usize {
        self.inner.local.pooled()
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
        &self.inner.calls.coordinator_url
    }

    /// The participant-side data directory, if configured.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.inner.data_dir.as_deref()
    }

    /// A client of the coordinator API (for GetTransaction and friends), with the
    /// builder's TLS settings and token.
    pub fn coordinator(&self) -> CoordinatorClient<CoordinatorChannel> {
        self.inner.calls.coordinator.clone()
    }

    /// Runs one recovery pass now: every in-doubt branch asks the coordinator for its
    /// outcome and finishes accordingly, and every one-phase commit a resource still
    /// remembers is reported. Returns how many branches were finished or reported.
    pub async fn recover_now(&self) -> usize {
        crate::recovery::pass(
            &self.inner.calls.coordinator,
            &self.inner.registry,
            crate::recovery::Markers::All,
        )
        .await
    }

    /// Gives back the ids begun ahead and not used (at most 2 s), forgets what a last
    /// `Barrier` (at most 2 s) shows durable, then stops the participant server and the
    /// recovery loop and waits for them. Branches that `Barrier` does not cover are not
    /// forgotten (their markers go after `OutboxOptions::marker_retention`).
    pub async fn shutdown(&self) {
        // Ids begun ahead go back while the participant server can still answer the
        // coordinator's question about them; what waits to be forgotten gets its last
        // Barrier.
        self.inner.local.shutdown().await;
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
