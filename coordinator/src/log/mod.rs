//! The decision log: where the coordinator makes its COMMIT decisions durable.
//!
//! # Contract (every implementation; checked by [`conformance`])
//!
//! * **Presumed abort.** Only COMMIT decisions are forced. A transaction without a COMMIT
//!   record is aborted, so abort needs no forced write.
//! * **Durable means synced.** [`DecisionLog::force_commit`] resolves `Ok` only after the
//!   bytes of the record *and everything needed to read it back* have reached stable
//!   storage (`fdatasync`/`fsync` returned, for a file-backed log). No caller may send a
//!   commit to any branch before that; the runtime checks it against
//!   [`DecisionLog::durable_lsn`].
//! * **Group commit.** Concurrent `force_commit` calls share one sync: an implementation
//!   drains every decision queued while the previous sync ran, writes them, syncs once, and
//!   resolves them all. [`LogStats`] counts syncs and batches so this can be verified.
//! * **Write-once decisions.** A second `force_commit` for a transaction that already has a
//!   COMMIT record with the *same* branches is an idempotent success (same LSN or a newer
//!   one); any other second decision is [`LogError::Conflict`].
//! * **Fencing.** Every write carries the epoch the caller believes it owns; a write with
//!   another epoch is refused with [`LogError::Fenced`]. (For the sled log the epoch is the
//!   one it assigned at open. The etcd log also fences every write it sends against the
//!   shard's owner key: a write that finds the shard owned by another epoch is
//!   [`LogError::Fenced`] too, and poisons the log.)
//! * **Fail-stop.** After any failed write or sync, the log is *poisoned*: that call and
//!   every later write return [`LogError::Failed`]. A failed sync is never retried as if it
//!   had worked, and a decision whose sync failed is never reported durable.
//! * **Lazy records** ([`DecisionLog::record_lazy`]) are written without a sync: they help
//!   recovery (which transactions were preparing, which decisions are done) but losing
//!   them is safe. They must never overwrite or delete a COMMIT record's decision; `Done`
//!   only marks it finished.
//! * **Sync on demand.** [`DecisionLog::sync`] resolves `Ok` once every record written
//!   before the call, lazy ones included, is durable; it shares group-commit syncs with
//!   forced records. The engine uses it for one-phase commits, which have no COMMIT
//!   decision of their own: the [`LazyRecord::OnePhase`] intent is synced before the
//!   commit goes to the branch, and the [`LazyRecord::OnePhaseCommitted`] outcome before
//!   the client hears "committed".
//! * **Reads come from the log**, not from a cache of what the caller wrote:
//!   [`DecisionLog::decision`] answers what a restart would see for synced records. The
//!   one exception is a [`LazyRecord::OnePhaseCommitted`] outcome, visible as soon as it is
//!   written; the engine holds the transaction (and answers from memory) until the
//!   outcome's sync returns, so no reader can act on it before it is durable.
//! * **Recovery** ([`DecisionLog::recover`]) returns every COMMIT not marked done, every
//!   `Preparing` record without a decision, and every [`LazyRecord::OnePhase`] intent
//!   without an outcome, oldest first.
//! * **Collection.** [`DecisionLog::collect`] deletes finished records (COMMIT records
//!   marked done, one-phase outcomes) of ids below a given one, and raises the
//!   low-water mark of each epoch it collected from over them, atomically with the
//!   deletion: a crash keeps both or neither. It never deletes an unfinished record, an
//!   audit record or anything [`DecisionLog::recover`] returns. An id at or below its
//!   epoch's mark whose record [`DecisionLog::decision`] no longer finds is *forgotten*
//!   ([`DecisionLog::collected`]): finished, outcome no longer kept, never to be taken
//!   for a presumed abort.
//! * **Exclusive.** Opening a file-backed log takes an exclusive lock on its directory; a
//!   second opener fails at once with [`LogError::Locked`] naming the directory (the etcd
//!   log: the shard's owner key, naming its owner). Every open increments the epoch
//!   durably before returning.
//! * **Audit records are forced and write-once.** [`DecisionLog::force_audit`] stores one
//!   [`AuditRecord`] (an operator's resolution of a stuck transaction) and resolves `Ok`
//!   only once it is durable, exactly like a COMMIT decision: it takes the next LSN (so
//!   `durable_lsn` covers it), shares group-commit syncs with decisions, and is fenced and
//!   poisoned like any write. Every call appends a new record: nothing (no later audit,
//!   decision or lazy record) ever changes or removes one. [`DecisionLog::audits`] returns
//!   a transaction's durable records in the order they were forced. Audit records are not
//!   decisions: they never make [`DecisionLog::decision`] answer, never appear in
//!   [`DecisionLog::recover`], and are not counted in [`LogStats::decisions`] or
//!   [`LogStats::batches`] (their syncs are counted in [`LogStats::syncs`]).

pub mod configured;
pub mod conformance;
pub mod etcd_log;
pub mod memory;
pub mod sled_log;

use std::future::Future;

use crate::types::{BranchSpec, HeuristicDecision, TxId};

pub use configured::ConfiguredLog;
pub use etcd_log::{EtcdLog, EtcdLogOptions};
pub use memory::MemoryLog;
pub use sled_log::{SledLog, SledLogOptions, DEFAULT_GROUP_COMMIT_DELAY_US};

/// Log sequence number: increases by one for every forced record (a decision or an audit
/// record), starting at 1.
pub type Lsn = u64;

/// A COMMIT decision and what phase two needs after a crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    /// The transaction decided.
    pub tx: TxId,
    /// Every branch that voted yes (read-only branches excluded), in enlistment order.
    pub branches: Vec<BranchSpec>,
    /// Wall-clock time of the decision, ms since the Unix epoch (for operators).
    pub decided_at_ms: u64,
}

/// Writes that need no sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LazyRecord {
    /// Prepares are about to go out to these branches. Lets a restarted coordinator abort
    /// them instead of waiting for each participant to ask.
    Preparing {
        /// The transaction.
        tx: TxId,
        /// All its branches.
        branches: Vec<BranchSpec>,
    },
    /// The transaction aborted; its `Preparing` record can go.
    Aborted {
        /// The transaction.
        tx: TxId,
    },
    /// Phase two of a committed transaction finished: every branch acknowledged.
    Done {
        /// The transaction.
        tx: TxId,
    },
    /// A one-phase commit is about to go to the only branch of `tx`. The engine syncs it
    /// ([`DecisionLog::sync`]) before sending, so a restarted coordinator that finds it
    /// (in [`Recovered::one_phase`]) asks the branch again instead of presuming abort for
    /// a transaction its branch may have committed. `OnePhaseCommitted` and `Aborted`
    /// remove it.
    OnePhase {
        /// The transaction.
        tx: TxId,
        /// Its one branch.
        branch: BranchSpec,
    },
    /// A single-branch transaction committed in one phase: its only branch decided and
    /// committed on its own. Stored like a COMMIT record already marked done (so
    /// [`DecisionLog::decision`] answers COMMITTED for it), without an LSN of its own: the
    /// engine syncs it ([`DecisionLog::sync`]) before answering the client. Must not
    /// overwrite an existing record.
    OnePhaseCommitted {
        /// The transaction.
        tx: TxId,
        /// Its one branch.
        branches: Vec<BranchSpec>,
    },
}

/// One use of the Admin `Resolve` RPC: an operator's heuristic decision for a transaction,
/// accepted or refused. Forced by [`DecisionLog::force_audit`]; never changed afterwards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuditRecord {
    /// The transaction resolved.
    pub tx: TxId,
    /// What the operator asked for.
    pub decision: HeuristicDecision,
    /// Who asked: accountability is the point of the record.
    pub operator: String,
    /// Why, in the operator's words.
    pub reason: String,
    /// The operator asked to override a contradiction with the known outcome.
    pub force: bool,
    /// Wall-clock time of the record, ms since the Unix epoch (filled in by the runtime).
    pub at_ms: u64,
    /// The transaction's state when the request was judged (e.g. `COMMITTING`, or
    /// `COMMITTED` for a finished one), so the record reads on its own.
    pub prior_state: String,
    /// Carried out (`true`) or refused (`false`, see `detail`).
    pub accepted: bool,
    /// Accepted although it contradicts the known outcome (only with `force`): the
    /// heuristic hazard an auditor looks for first.
    pub contradicts: bool,
    /// Branches declared committed/aborted: those still owing an answer when accepted.
    pub branches: Vec<String>,
    /// What was done, or why it was refused.
    pub detail: String,
}

/// What one [`DecisionLog::collect`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Finished records deleted.
    pub records: u64,
    /// Whether it stopped at its limit (more may be ready: call again).
    pub more: bool,
}

/// How much the log keeps: decision records (open and finished; audit records not
/// counted) and when the oldest of them was decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Decision records stored (COMMIT records, open or finished, and one-phase
    /// outcomes).
    pub records: u64,
    /// Decision time of the oldest of them (wall clock, ms since the Unix epoch).
    pub oldest_decided_at_ms: Option<u64>,
}

/// What the log knows about one transaction's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDecision {
    /// The COMMIT record.
    pub record: CommitRecord,
    /// Whether phase two has finished.
    pub done: bool,
}

/// Everything a restarted coordinator must finish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// COMMIT decisions not marked done: re-drive phase two.
    pub commits: Vec<CommitRecord>,
    /// Transactions that were preparing and never decided: abort their branches.
    pub undecided: Vec<(TxId, Vec<BranchSpec>)>,
    /// One-phase commits sent (or about to be sent) whose outcome was not recorded: ask
    /// the branch again (a repeated one-phase commit, answered from the branch's state).
    /// In [`TxId`] order.
    pub one_phase: Vec<(TxId, BranchSpec)>,
}

/// Counters for tests, metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Completed syncs (fdatasync/fsync calls that returned success).
    pub syncs: u64,
    /// COMMIT decisions made durable.
    pub decisions: u64,
    /// Group-commit batches written that hold at least one decision (one sync each).
    pub batches: u64,
    /// Largest number of decisions in one batch.
    pub max_batch: u64,
}

/// Failures of the decision log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The directory is held by another process.
    #[error("data directory {dir} is locked by another coordinator process: {detail}")]
    Locked {
        /// The directory.
        dir: String,
        /// What the OS said.
        detail: String,
    },
    /// A different decision already exists for this transaction.
    #[error("transaction {tx} already has a different decision recorded")]
    Conflict {
        /// The transaction.
        tx: TxId,
    },
    /// The caller's epoch is not the log's.
    #[error("write fenced: caller epoch {caller} but the log belongs to epoch {current}")]
    Fenced {
        /// The epoch the caller claimed.
        caller: u64,
        /// The log's epoch.
        current: u64,
    },
    /// A write or sync failed; the log accepts nothing more (fail-stop).
    #[error("decision log failed and stopped accepting writes: {0}")]
    Failed(String),
    /// The log could not be opened (nothing was written; the data is as it was).
    #[error("cannot open the decision log in {dir}: {detail}")]
    Open {
        /// The data directory.
        dir: String,
        /// What failed, and where the data is corrupt, which file and what to do.
        detail: String,
    },
}

/// A durable, write-once store of COMMIT decisions. See the module docs for the contract.
pub trait DecisionLog: Send + Sync + 'static {
    /// The epoch assigned to this open of the log (strictly greater than any before it).
    fn epoch(&self) -> u64;

    /// The node id of this log's data (random, fixed at creation).
    fn node_id(&self) -> u32;

    /// Writes a COMMIT decision and resolves once it is durable, with its LSN.
    fn force_commit(
        &self,
        epoch: u64,
        record: CommitRecord,
    ) -> impl Future<Output = Result<Lsn, LogError>> + Send;

    /// Writes a record without waiting for a sync.
    fn record_lazy(&self, epoch: u64, record: LazyRecord) -> Result<(), LogError>;

    /// Resolves once every record written before the call (lazy ones included) is
    /// durable, sharing a group-commit sync with concurrent forced writes, with an LSN
    /// `<=` [`DecisionLog::durable_lsn`] that covers them: what waits for the sync is
    /// stamped with it. Fenced and poisoned like a write.
    fn sync(&self, epoch: u64) -> impl Future<Output = Result<Lsn, LogError>> + Send;

    /// The COMMIT decision for `tx`, if one was made durable.
    fn decision(&self, tx: &TxId) -> Result<Option<StoredDecision>, LogError>;

    /// What a restarted coordinator must finish (see [`Recovered`]).
    fn recover(&self) -> Result<Recovered, LogError>;

    /// The highest LSN known durable. Every LSN returned by `force_commit` is `<=` this.
    fn durable_lsn(&self) -> Lsn;

    /// Counters.
    fn stats(&self) -> LogStats;

    /// Whether the log is poisoned (a write or sync failed).
    fn is_failed(&self) -> bool;

    /// Appends an audit record and resolves once it is durable, with its LSN.
    fn force_audit(
        &self,
        epoch: u64,
        record: AuditRecord,
    ) -> impl Future<Output = Result<Lsn, LogError>> + Send;

    /// The durable audit records of `tx`, oldest first (empty if none).
    fn audits(&self, tx: &TxId) -> Result<Vec<AuditRecord>, LogError>;

    /// Deletes at most `limit` finished records of ids below `below`, lowest ids first,
    /// and raises the low-water marks over them in the same atomic write (see the module
    /// docs). The caller picks `below` so that every id under it finished long enough
    /// ago to be forgotten (the runtime's collector: the lowest id it held in memory a
    /// retention ago). Not forced: a crash may undo a collection, never half of one.
    /// Refused on a poisoned log.
    fn collect(&self, below: &TxId, limit: usize) -> Result<Collected, LogError>;

    /// Whether `tx` is at or below the low-water mark of its epoch: if
    /// [`DecisionLog::decision`] finds no record for it, its record (if it had one) was
    /// collected, and its outcome is no longer known. Ask `decision` first.
    fn collected(&self, tx: &TxId) -> Result<bool, LogError>;

    /// What the log keeps now (see [`Kept`]). Reads every decision record: for gauges,
    /// called now and then off every decision's path, never per transaction.
    fn kept(&self) -> Result<Kept, LogError>;
}
