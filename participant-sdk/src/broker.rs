//! Message brokers as transaction branches: the [`Broker`] trait and [`BrokerCore`], the
//! implementation every broker adapter shares, plus [`Transaction::publish`].
//!
//! Brokers have no prepare step (RabbitMQ's `tx` class batches but is not atomic across
//! a crash; NATS JetStream atomic batches need a newer server; Kafka's 2PC participation
//! has not shipped), so a broker branch works like this:
//!
//! * **Publish** ([`Transaction::publish`]): enlists the broker in the transaction on
//!   first use (branch id `<service>:<resource>`) and buffers the message in memory. Each
//!   message gets a deterministic id `<tx_id>:<branch_id>:<index>` (index from 0 in
//!   publish order), which is returned.
//! * **Prepare**: checks the broker is reachable and the destinations exist (the adapter's
//!   [`Broker::ensure_ready`]; a failure votes `No("broker unreachable: ...")`), then
//!   stages the buffered batch durably in the [`StagingStore`] (written and fdatasynced)
//!   and votes `Yes`. An empty buffer votes `ReadOnly`.
//! * **Commit**: publishes every staged message with its id as the broker's message id,
//!   waits for the broker's confirmation of each ([`Broker::publish_confirmed`]), then
//!   removes the staged copy. If the broker is down it answers `Err(Retry)` and the
//!   coordinator retries until it works: the commit is late, not lost. Messages confirmed
//!   by an earlier attempt are not published again by a retry of this process. A commit
//!   of a branch with nothing staged (already published and removed) is `Ok`. A branch
//!   this process committed is remembered (among the last `remembered_outcomes`): a late
//!   prepare votes `Yes` again and a late abort answers `AlreadyCommitted`.
//! * **Abort**: drops the buffer and the staged copy, and answers `Aborted`. A branch
//!   committed (in one phase or two, remembered among the last `remembered_outcomes`)
//!   answers `AlreadyCommitted` instead, and so does a one-phase commit still in progress: the
//!   abort (how a restarted coordinator settles it) first finishes it as a repeated
//!   one-phase commit would — publishing what is left, or refusing if nothing can have
//!   been published — and answers from that (`Err(Retry)` while it cannot finish).
//! * **One-phase commit** (the transaction's only branch): publishes straight from the
//!   buffer, with confirms, and answers `Committed`; if the broker is unreachable before
//!   anything could have reached it, `Refused` (nothing was published). Once something
//!   may have been published it never refuses: it answers `Err(Retry)` and publishes
//!   the rest on the retry.
//! * **In doubt** ([`Resource::in_doubt`]): the staged batches of this resource, so
//!   recovery publishes (or drops) them after a restart.
//!
//! Every prepare / commit / abort of one branch is serialized inside the process, so a
//! coordinator retry racing recovery never publishes a batch twice from here.
//!
//! # Duplicates
//!
//! A message can still be published twice: when a confirmation is lost (the broker stored
//! the message but the connection died before it said so) the retry publishes it again,
//! and a lazy removal lost in a crash makes recovery publish the batch again. Both
//! repeats carry the **same message id**: NATS JetStream drops them within the stream's
//! duplicate window; RabbitMQ does not deduplicate, so consumers must (by message id).
//!
//! # Known limits
//!
//! * Enlist a broker through [`Transaction::publish`], not [`Transaction::enlist`] alone:
//!   a branch this process holds no buffer for votes no at prepare (it cannot tell it
//!   from a branch whose buffer was lost in a restart).
//! * Buffers are in memory until prepare: if the process dies before prepare, the branch
//!   votes no (its messages are gone), and the transaction aborts. Correct, but the
//!   caller must retry the whole transaction.
//! * A one-phase commit whose process dies while publishing cannot know, after the
//!   restart, what it had published; the coordinator's retry is then refused although
//!   some messages may be out. (Two-phase commits have no such window: the batch is
//!   staged.) This is the usual one-phase-commit hazard; switch one-phase off in the
//!   coordinator (`--one-phase false`) if it matters.

/// Implements [`Resource`] for a broker adapter by handing every call to its
/// [`BrokerCore`]: the adapter's `name` and `core` fields, kind BROKER. Every adapter
/// behaves the same as a branch; only [`Broker`] (reachability and publishing) differs.
macro_rules! broker_resource {
    ($adapter:ty) => {
        #[tonic::async_trait]
        impl $crate::resource::Resource for $adapter {
            fn name(&self) -> &str {
                &self.name
            }

            fn kind(&self) -> $crate::resource::BranchKind {
                $crate::resource::BranchKind::Broker
            }

            async fn prepare(&self, tx_id: &str, branch_id: &str) -> $crate::resource::Vote {
                self.core.prepare(self, tx_id, branch_id).await
            }

            async fn commit(
                &self,
                tx_id: &str,
                branch_id: &str,
            ) -> std::result::Result<(), $crate::resource::Retry> {
                self.core.commit(self, tx_id, branch_id).await
            }

            async fn commit_one_phase(
                &self,
                tx_id: &str,
                branch_id: &str,
            ) -> std::result::Result<$crate::resource::OnePhase, $crate::resource::Retry> {
                self.core.commit_one_phase(self, tx_id, branch_id).await
            }

            async fn abort(
                &self,
                tx_id: &str,
                branch_id: &str,
            ) -> std::result::Result<$crate::resource::AbortOutcome, $crate::resource::Retry> {
                self.core.abort(self, tx_id, branch_id).await
            }

            async fn in_doubt(
                &self,
            ) -> std::result::Result<Vec<(String, String)>, $crate::resource::Retry> {
                self.core.in_doubt()
            }
        }
    };
}
pub(crate) use broker_resource;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tracing::{debug, info, warn};

use crate::client::Transaction;
use crate::error::{Error, Result};
use crate::lock;
use crate::resource::{AbortOutcome, OnePhase, Resource, Retry, Vote};
use crate::staging::{StagedMessage, StagingStore};

/// Timeouts of a broker resource.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Bound on the reachability check at prepare (and before a one-phase commit). Keep
    /// it below the coordinator's RPC timeout (default 5 s). Default 3 s.
    pub check_timeout: Duration,
    /// Bound on publishing one batch and collecting its confirmations. When it runs out,
    /// the unconfirmed messages count as failed and the commit is retried. Default 4 s.
    pub publish_timeout: Duration,
    /// How many finished one-phase answers, and separately how many two-phase commits,
    /// are remembered, so that a repeated or late call (its first answer was lost) gets
    /// the same answer. Default 4096.
    pub remembered_outcomes: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            check_timeout: Duration::from_secs(3),
            publish_timeout: Duration::from_secs(4),
            remembered_outcomes: 4096,
        }
    }
}

/// Optional parts of a published message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Application headers.
    pub headers: Vec<(String, String)>,
    /// MIME content type.
    pub content_type: Option<String>,
}

/// What happened to one message handed to [`Broker::publish_confirmed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The broker confirmed it (stored it durably, or recognised it as a duplicate).
    Confirmed,
    /// It certainly did not reach the broker (e.g. no connection when it was due, or
    /// the broker returned it as unroutable). Retrying it cannot duplicate it.
    NotSent(String),
    /// It may or may not have reached the broker (sent, but no confirmation came, or a
    /// negative one). A retry may duplicate it, with the same message id.
    Unconfirmed(String),
}

impl PublishOutcome {
    /// What handing one message to the broker at `url` (bounded by a deadline) came to:
    /// the handle to await its confirmation with, or, where the send failed or the
    /// deadline passed first, an outcome that may or may not have reached the broker.
    pub(crate) fn handed_over<H, E: std::fmt::Display>(
        url: &str,
        sent: std::result::Result<std::result::Result<H, E>, tokio::time::error::Elapsed>,
    ) -> std::result::Result<H, PublishOutcome> {
        match sent {
            Ok(Ok(handle)) => Ok(handle),
            Ok(Err(e)) => Err(PublishOutcome::Unconfirmed(format!(
                "publish to {url}: {e}"
            ))),
            Err(_) => Err(PublishOutcome::Unconfirmed(format!(
                "publish to {url}: timed out"
            ))),
        }
    }
}

/// A message broker resource: a [`Resource`] whose branches are message batches. Adapters
/// implement the three broker-specific operations and forward their [`Resource`] methods
/// to the [`BrokerCore`] they own, which holds all the transaction logic.
#[tonic::async_trait]
pub trait Broker: Resource {
    /// The shared implementation (buffers, staging, per-branch serialization).
    fn core(&self) -> &BrokerCore;

    /// Local check of a destination when a message is published into the buffer (name
    /// syntax, subject covered by the stream). Default: anything non-empty.
    fn check_destination(&self, destination: &str) -> std::result::Result<(), String> {
        if destination.is_empty() {
            Err("destination must not be empty".into())
        } else {
            Ok(())
        }
    }

    /// Checks that the broker is reachable and every destination in `destinations`
    /// exists (creating it if this broker creates destinations on demand). The error
    /// names the broker and says what failed.
    async fn ensure_ready(&self, destinations: &[String]) -> std::result::Result<(), String>;

    /// Publishes `messages` in order, each with its `message_id` as the broker's message
    /// id, and waits (at most `timeout` in all) for the broker's confirmation of each.
    /// Returns one outcome per message, in the same order.
    async fn publish_confirmed(
        &self,
        messages: &[StagedMessage],
        timeout: Duration,
    ) -> Vec<PublishOutcome>;
}

type Key = (String, String);

/// Finished branches remembered so a repeated or late call gets the same answer: at most
/// `cap` of them, the oldest forgotten first.
#[derive(Debug)]
struct Remembered<V> {
    map: HashMap<Key, V>,
    order: VecDeque<Key>,
    cap: usize,
}

impl<V> Remembered<V> {
    fn new(cap: usize) -> Self {
        Remembered {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn insert(&mut self, k: &Key, v: V) {
        if self.cap == 0 {
            return;
        }
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k.clone());
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn get(&self, k: &Key) -> Option<&V> {
        self.map.get(k)
    }
}

/// In-memory state of one branch.
#[derive(Debug)]
enum BranchState {
    /// Buffering messages (before prepare).
    Open(Vec<StagedMessage>),
    /// A prepare took the buffer and has not finished (or was interrupted).
    Preparing,
    /// Prepare answered this vote.
    Voted(Vote),
    /// A one-phase commit is publishing these (kept for its retries).
    OnePhase {
        messages: Vec<StagedMessage>,
        maybe_published: bool,
    },
}

/// Why publishing a batch did not complete.
struct PublishFailure {
    /// Something of the batch may have reached the broker (now or in an earlier attempt).
    maybe_published: bool,
    message: String,
}

/// The implementation shared by every broker adapter. See the module docs for the
/// protocol; adapters call these methods from their [`Resource`] implementation, passing
/// themselves as `broker`.
pub struct BrokerCore {
    name: String,
    staging: Arc<StagingStore>,
    options: BrokerOptions,
    state: Mutex<HashMap<Key, BranchState>>,
    /// Message ids confirmed by the broker, per branch not yet finished.
    confirmed: Mutex<HashMap<Key, HashSet<String>>>,
    /// Per-branch async locks serializing prepare / commit / abort.
    locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// Recently finished one-phase commits and their answers (bounded). Kept apart from
    /// `committed`, so ordinary commits never push out an outcome a restarted
    /// coordinator may still ask for with an abort.
    one_phase: Mutex<Remembered<OnePhase>>,
    /// Branches recently committed in two phases by this process (bounded).
    committed: Mutex<Remembered<()>>,
}

impl std::fmt::Debug for BrokerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCore")
            .field("name", &self.name)
            .field("open_branches", &self.open_branches())
            .finish()
    }
}

/// Holds a branch's async lock; removes the lock from the map when nobody else wants it.
struct BranchGuard<'a> {
    core: &'a BrokerCore,
    key: Key,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for BranchGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = lock(&self.core.locks);
        if locks
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

fn key(tx_id: &str, branch_id: &str) -> Key {
    (tx_id.to_string(), branch_id.to_string())
}

impl BrokerCore {
    /// A core for the resource `name`, staging in `staging`.
    pub fn new(
        name: impl Into<String>,
        staging: Arc<StagingStore>,
        options: BrokerOptions,
    ) -> BrokerCore {
        let remembered = options.remembered_outcomes;
        BrokerCore {
            name: name.into(),
            staging,
            options,
            state: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            one_phase: Mutex::new(Remembered::new(remembered)),
            committed: Mutex::new(Remembered::new(remembered)),
        }
    }

    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The staging store.
    pub fn staging(&self) -> &Arc<StagingStore> {
        &self.staging
    }

    /// The timeouts.
    pub fn options(&self) -> &BrokerOptions {
        &self.options
    }

    /// Replaces the timeouts.
    pub fn set_options(&mut self, options: BrokerOptions) {
        lock(&self.one_phase).cap = options.remembered_outcomes;
        lock(&self.committed).cap = options.remembered_outcomes;
        self.options = options;
    }

    /// Branches with in-memory state (buffering, preparing, voted, or committing in one
    /// phase). Zero once every transaction that touched this resource is finished.
    pub fn open_branches(&self) -> usize {
        lock(&self.state).len()
    }

    /// Messages buffered (not yet prepared) in `(tx_id, branch_id)`.
    pub fn buffered(&self, tx_id: &str, branch_id: &str) -> usize {
        match lock(&self.state).get(&key(tx_id, branch_id)) {
            Some(BranchState::Open(m)) => m.len(),
            _ => 0,
        }
    }

    async fn lock_branch(&self, k: &Key) -> BranchGuard<'_> {
        let m = lock(&self.locks).entry(k.clone()).or_default().clone();
        let guard = m.lock_owned().await;
        BranchGuard {
            core: self,
            key: k.clone(),
            guard: Some(guard),
        }
    }

    /// Forgets everything in memory about a finished branch.
    fn forget(&self, k: &Key) {
        lock(&self.state).remove(k);
        lock(&self.confirmed).remove(k);
    }

    /// Buffers a message in `(tx_id, branch_id)` and returns its message id. The branch
    /// must already be enlisted ([`Transaction::publish`] does both).
    pub fn buffer(
        &self,
        tx_id: &str,
        branch_id: &str,
        destination: &str,
        payload: Vec<u8>,
        options: PublishOptions,
    ) -> Result<String> {
        let mut state = lock(&self.state);
        let entry = state
            .entry(key(tx_id, branch_id))
            .or_insert_with(|| BranchState::Open(Vec::new()));
        match entry {
            BranchState::Open(messages) => {
                let message_id = format!("{tx_id}:{branch_id}:{}", messages.len());
                messages.push(StagedMessage {
                    message_id: message_id.clone(),
                    destination: destination.to_string(),
                    payload,
                    headers: options.headers,
                    content_type: options.content_type,
                });
                Ok(message_id)
            }
            _ => Err(Error::Usage(format!(
                "transaction {tx_id}: branch {branch_id} is already being committed or aborted; \
                 publish every message before Commit"
            ))),
        }
    }

    /// Phase one: see the module docs.
    pub async fn prepare<B: Broker + ?Sized>(
        &self,
        broker: &B,
        tx_id: &str,
        branch_id: &str,
    ) -> Vote {
        let k = key(tx_id, branch_id);
        let _guard = self.lock_branch(&k).await;
        if lock(&self.committed).get(&k).is_some() {
            // Committed in two phases by this process: it had voted yes. Anything
            // buffered since can never be part of the transaction (as at commit).
            if let Some(BranchState::Open(late)) = lock(&self.state).remove(&k) {
                warn!(
                    resource = %self.name, tx_id, branch_id, dropped = late.len(),
                    "prepare: dropping messages published into the branch after it committed"
                );
            }
            return Vote::Yes;
        }
        let taken = {
            let mut state = lock(&self.state);
            match state.get_mut(&k) {
                Some(BranchState::Open(messages)) => {
                    let messages = std::mem::take(messages);
                    state.insert(k.clone(), BranchState::Preparing);
                    Some(messages)
                }
                Some(BranchState::Voted(vote)) => return vote.clone(),
                Some(BranchState::OnePhase { .. }) => {
                    return Vote::No("the branch is being committed in one phase".into());
                }
                // Preparing (an earlier prepare was interrupted) or unknown here: only
                // the staging store can tell whether it was prepared.
                Some(BranchState::Preparing) | None => None,
            }
        };
        let Some(messages) = taken else {
            return match self.staging.get(tx_id, branch_id) {
                Ok(Some(_)) => Vote::Yes,
                Ok(None) => Vote::No(format!(
                    "{}: nothing is buffered for this branch here (the participant restarted \
                     before prepare, or the branch was aborted); its messages are lost",
                    self.name
                )),
                Err(e) => Vote::No(format!("{}: {e}", self.name)),
            };
        };
        let vote = self.prepare_batch(broker, tx_id, branch_id, messages).await;
        let mut state = lock(&self.state);
        if vote == Vote::ReadOnly {
            // No phase two follows a read-only vote: nothing to keep.
            state.remove(&k);
        } else {
            state.insert(k, BranchState::Voted(vote.clone()));
        }
        vote
    }

    async fn prepare_batch<B: Broker + ?Sized>(
        &self,
        broker: &B,
        tx_id: &str,
        branch_id: &str,
        messages: Vec<StagedMessage>,
    ) -> Vote {
        if messages.is_empty() {
            return Vote::ReadOnly;
        }
        if let Err(e) = self.check(broker, &messages).await {
            warn!(resource = %self.name, tx_id, branch_id, error = %e, "prepare: broker unreachable; voting no");
            return Vote::No(format!("broker unreachable: {e}"));
        }
        let n = messages.len();
        match self.staging.stage(tx_id, branch_id, messages).await {
            Ok(()) => {
                debug!(resource = %self.name, tx_id, branch_id, messages = n, "prepare: staged");
                Vote::Yes
            }
            Err(e) => {
                warn!(resource = %self.name, tx_id, branch_id, error = %e, "prepare: staging failed; voting no");
                Vote::No(format!(
                    "{}: cannot stage the messages durably: {e}",
                    self.name
                ))
            }
        }
    }

    /// The reachability check, bounded by `check_timeout`.
    async fn check<B: Broker + ?Sized>(
        &self,
        broker: &B,
        messages: &[StagedMessage],
    ) -> std::result::Result<(), String> {
        let mut destinations: Vec<String> =
            messages.iter().map(|m| m.destination.clone()).collect();
        destinations.sort();
        destinations.dedup();
        match tokio::time::timeout(
            self.options.check_timeout,
            broker.ensure_ready(&destinations),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(format!(
                "{}: no answer within {:?}",
                self.name, self.options.check_timeout
            )),
        }
    }

    /// Publishes the messages of `messages` not yet confirmed for `k`, recording the
    /// confirmations. `Ok` once all of them are confirmed.
    async fn publish_all<B: Broker + ?Sized>(
        &self,
        broker: &B,
        k: &Key,
        messages: &[StagedMessage],
    ) -> std::result::Result<(), PublishFailure> {
        let done = lock(&self.confirmed).get(k).cloned().unwrap_or_default();
        let todo: Vec<StagedMessage> = messages
            .iter()
            .filter(|m| !done.contains(&m.message_id))
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let timeout = self.options.publish_timeout;
        // The adapter honours `timeout`; this outer bound only guards against one that
        // does not.
        let outcomes: Vec<PublishOutcome> = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            broker.publish_confirmed(&todo, timeout),
        )
        .await
        .unwrap_or_default();
        let mut failed = 0usize;
        let mut first_error = None;
        let mut maybe_published = !done.is_empty();
        {
            let mut confirmed = lock(&self.confirmed);
            for (i, m) in todo.iter().enumerate() {
                let outcome = outcomes.get(i).cloned().unwrap_or_else(|| {
                    PublishOutcome::Unconfirmed(format!("no confirmation within {timeout:?}"))
                });
                match outcome {
                    PublishOutcome::Confirmed => {
                        maybe_published = true;
                        confirmed
                            .entry(k.clone())
                            .or_default()
                            .insert(m.message_id.clone());
                    }
                    PublishOutcome::NotSent(e) => {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                    PublishOutcome::Unconfirmed(e) => {
                        failed += 1;
                        maybe_published = true;
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        if failed == 0 {
            return Ok(());
        }
        Err(PublishFailure {
            maybe_published,
            message: format!(
                "{}: {failed} of {} message(s) not confirmed: {}",
                self.name,
                todo.len(),
                first_error.unwrap_or_default()
            ),
        })
    }

    /// Phase two after a yes vote: see the module docs.
    pub async fn commit<B: Broker + ?Sized>(
        &self,
        broker: &B,
        tx_id: &str,
        branch_id: &str,
    ) -> std::result::Result<(), Retry> {
        let k = key(tx_id, branch_id);
        let _guard = self.lock_branch(&k).await;
        let messages = match self.staging.get(tx_id, branch_id) {
            Ok(Some(messages)) => messages,
            Ok(None) => {
                if let Some(BranchState::Open(late)) = lock(&self.state).get(&k) {
                    // The branch voted yes (or the coordinator would not commit it) and
                    // was published before; these were buffered after that and can
                    // never be part of the transaction.
                    warn!(
                        resource = %self.name, tx_id, branch_id, dropped = late.len(),
                        "commit: dropping messages published into the branch after it committed"
                    );
                }
                // Published and removed before (or never staged: a read-only branch).
                self.forget(&k);
                return Ok(());
            }
            Err(e) => return Err(Retry(format!("{}: {e}", self.name))),
        };
        match self.publish_all(broker, &k, &messages).await {
            Ok(()) => {
                if let Err(e) = self.staging.remove(tx_id, branch_id) {
                    // Recovery will find it and publish it again (same message ids).
                    warn!(resource = %self.name, tx_id, branch_id, error = %e, "commit: published, but removing the staged copy failed");
                }
                self.forget(&k);
                lock(&self.committed).insert(&k, ());
                info!(resource = %self.name, tx_id, branch_id, messages = messages.len(), "commit: published");
                Ok(())
            }
            Err(f) => {
                warn!(resource = %self.name, tx_id, branch_id, error = %f.message, "commit: publish failed; will be retried");
                Err(Retry(f.message))
            }
        }
    }

    /// The only phase of a single-branch transaction: see the module docs.
    pub async fn commit_one_phase<B: Broker + ?Sized>(
        &self,
        broker: &B,
        tx_id: &str,
        branch_id: &str,
    ) -> std::result::Result<OnePhase, Retry> {
        let k = key(tx_id, branch_id);
        let _guard = self.lock_branch(&k).await;
        self.one_phase_locked(broker, &k, tx_id, branch_id).await
    }

    /// [`BrokerCore::commit_one_phase`] with the branch's lock held by the caller.
    async fn one_phase_locked<B: Broker + ?Sized>(
        &self,
        broker: &B,
        k: &Key,
        tx_id: &str,
        branch_id: &str,
    ) -> std::result::Result<OnePhase, Retry> {
        let k = k.clone();
        if lock(&self.committed).get(&k).is_some() {
            // Committed in two phases by this process: its messages are published.
            return Ok(OnePhase::Committed);
        }
        if let Some(outcome) = lock(&self.one_phase).get(&k) {
            return Ok(outcome.clone());
        }
        let taken = {
            let mut state = lock(&self.state);
            match state.get_mut(&k) {
                Some(BranchState::Open(messages)) => {
                    let messages = std::mem::take(messages);
                    state.insert(
                        k.clone(),
                        BranchState::OnePhase {
                            messages: messages.clone(),
                            maybe_published: false,
                        },
                    );
                    Ok((messages, false))
                }
                Some(BranchState::OnePhase {
                    messages,
                    maybe_published,
                }) => Ok((messages.clone(), *maybe_published)),
                Some(BranchState::Preparing | BranchState::Voted(_)) => Err(format!(
                    "{}: the branch was prepared; a one-phase commit is refused",
                    self.name
                )),
                None => Err(format!(
                    "{}: nothing is buffered for this branch here (the participant restarted \
                     before commit); its messages are lost",
                    self.name
                )),
            }
        };
        let (messages, maybe_before) = match taken {
            Ok(t) => t,
            // Nothing was published for this branch by this process.
            Err(reason) => return Ok(OnePhase::Refused(reason)),
        };
        let finish = |outcome: OnePhase| {
            self.forget(&k);
            lock(&self.one_phase).insert(&k, outcome.clone());
            Ok(outcome)
        };
        if messages.is_empty() {
            return finish(OnePhase::Committed);
        }
        if !maybe_before {
            if let Err(e) = self.check(broker, &messages).await {
                warn!(resource = %self.name, tx_id, branch_id, error = %e, "one-phase commit: broker unreachable; refusing");
                return finish(OnePhase::Refused(format!("broker unreachable: {e}")));
            }
        }
        match self.publish_all(broker, &k, &messages).await {
            Ok(()) => {
                info!(resource = %self.name, tx_id, branch_id, messages = messages.len(), "one-phase commit: published");
                finish(OnePhase::Committed)
            }
            Err(f) if !f.maybe_published && !maybe_before => {
                warn!(resource = %self.name, tx_id, branch_id, error = %f.message, "one-phase commit: nothing published; refusing");
                finish(OnePhase::Refused(format!(
                    "broker unreachable: {}",
                    f.message
                )))
            }
            Err(f) => {
                if let Some(BranchState::OnePhase {
                    maybe_published, ..
                }) = lock(&self.state).get_mut(&k)
                {
                    *maybe_published = true;
                }
                warn!(resource = %self.name, tx_id, branch_id, error = %f.message, "one-phase commit: partly published; will be retried");
                Err(Retry(f.message))
            }
        }
    }

    /// Abort: drops the buffer and the staged copy; see the module docs for what it
    /// answers (a branch committed, in two phases or in one, or a one-phase commit in
    /// progress, is `AlreadyCommitted`).
    pub async fn abort<B: Broker + ?Sized>(
        &self,
        broker: &B,
        tx_id: &str,
        branch_id: &str,
    ) -> std::result::Result<AbortOutcome, Retry> {
        let k = key(tx_id, branch_id);
        let _guard = self.lock_branch(&k).await;
        let committed_here = lock(&self.committed).get(&k).is_some();
        let one_phase = match lock(&self.one_phase).get(&k) {
            Some(OnePhase::Committed) => Some(true),
            Some(OnePhase::Refused(_)) => Some(false),
            None => None,
        };
        if committed_here || one_phase == Some(true) {
            warn!(resource = %self.name, tx_id, branch_id, "abort of a branch already committed: nothing to undo");
            return Ok(AbortOutcome::AlreadyCommitted);
        }
        let in_progress = matches!(
            lock(&self.state).get(&k),
            Some(BranchState::OnePhase { .. })
        );
        if one_phase.is_none() && in_progress {
            // A one-phase commit began here and did not finish (its answer was an error,
            // or it was interrupted): something may be published. Finish it as its repeat
            // would, and answer from that.
            warn!(resource = %self.name, tx_id, branch_id, "abort of an unfinished one-phase commit: finishing it first");
            return match self.one_phase_locked(broker, &k, tx_id, branch_id).await? {
                OnePhase::Committed => Ok(AbortOutcome::AlreadyCommitted),
                OnePhase::Refused(_) => Ok(AbortOutcome::Aborted),
            };
        }
        self.staging
            .remove(tx_id, branch_id)
            .map_err(|e| Retry(format!("{}: {e}", self.name)))?;
        self.forget(&k);
        debug!(resource = %self.name, tx_id, branch_id, "aborted");
        Ok(AbortOutcome::Aborted)
    }

    /// The staged branches of this resource (branch id `<service>:<name>`).
    pub fn in_doubt(&self) -> std::result::Result<Vec<(String, String)>, Retry> {
        let all = self
            .staging
            .list()
            .map_err(|e| Retry(format!("{}: {e}", self.name)))?;
        Ok(all
            .into_iter()
            .filter(|(_, branch)| branch.split_once(':').is_some_and(|(_, r)| r == self.name))
            .collect())
    }
}

impl Transaction {
    /// Publishes a message through `broker` as part of this transaction: enlists the
    /// broker on first use and buffers the message until the transaction commits (see
    /// [`crate::broker`]). Returns its message id, `<tx_id>:<branch_id>:<index>`.
    ///
    /// The destination's meaning is the adapter's (a RabbitMQ queue, a NATS subject).
    pub async fn publish<B: Broker>(
        &self,
        broker: &B,
        destination: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<String> {
        self.publish_with(broker, destination, payload, PublishOptions::default())
            .await
    }

    /// [`Transaction::publish`] with headers and a content type.
    pub async fn publish_with<B: Broker>(
        &self,
        broker: &B,
        destination: &str,
        payload: impl Into<Vec<u8>>,
        options: PublishOptions,
    ) -> Result<String> {
        broker.check_destination(destination).map_err(|e| {
            Error::resource(broker.name(), format!("destination {destination:?}: {e}"))
        })?;
        let branch_id = self.enlist(broker).await?.branch_id;
        broker
            .core()
            .buffer(self.id(), &branch_id, destination, payload.into(), options)
    }
}
