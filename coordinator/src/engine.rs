//! The protocol engine: two-phase commit with presumed abort, as a pure state machine.
//!
//! [`Engine::handle`] takes one [`Event`] (an RPC arrived, a participant answered, a timer
//! fired, the log made a decision durable, recovery found records) and returns the
//! [`Command`]s the runtime must carry out (write to the log, send to a participant, reply
//! to a caller, arm a timer, notify waiters). It never awaits, never reads a clock (time
//! comes in with the event) and never draws random numbers, so it can be unit-tested
//! command by command, simulated, and model-checked.
//!
//! # Ordering is data
//! A commit may only be sent once the COMMIT decision is durable. The engine emits
//! [`Command::Send`] with [`Message::Commit`] only after [`Event::LogDurable`], and stamps it
//! with the LSN it depends on ([`Command::Send::requires_durable`]); the runtime checks that
//! LSN against the log's durable LSN and stops the process if it is not, rather than guess.
//!
//! # Life of a transaction
//! `Active` (branches enlist) → `Preparing` (prepares fan out in parallel) → all yes →
//! `Deciding` (COMMIT forced to the log) → `Committing` (phase two, tier by tier in
//! `commit_order`, each branch retried with capped backoff until it acknowledges) →
//! forgotten (the log answers from then on). Any no vote, prepare timeout, transaction
//! timeout or Abort request → `Aborting` (aborts to every branch that may hold prepared
//! state, retried until acknowledged) → forgotten (presumed abort answers from then on).
//! A single branch commits in one phase; read-only branches leave after voting.
//!
//! # One-phase commit
//! A transaction with one branch skips the prepare: its participant decides. A restarted
//! coordinator must still never answer "aborted" for a transaction its branch committed,
//! so the engine writes the [`LazyRecord::OnePhase`] intent (which branch decides) when the
//! first branch enlists and syncs it in the background ([`Command::Sync`]) while the client
//! works; the one-phase commit goes out only once it is durable (a second branch makes the
//! transaction a two-phase commit, whose PREPARING record replaces the intent). A restart
//! that finds an intent without an outcome cannot tell whether the client ever asked to
//! commit, so it sends the branch an abort, whose answer ([`AbortAck`]) says whether the
//! branch had already committed. The [`LazyRecord::OnePhaseCommitted`] outcome is synced
//! before a caller hears "committed", unless every caller asked for an early answer
//! ([`Event::Commit::early`]): such a caller promises that its participant keeps what
//! answers for the commit until a Barrier made the outcome durable. All syncs are shared
//! with every other write of the moment (group commit).
//!
//! # Operator resolutions (heuristic decisions)
//! [`Event::Resolve`] is the Admin `Resolve` RPC: an operator declares the branches a stuck
//! transaction still owes an answer committed or aborted. The engine judges it against
//! what it knows (the live state, or for a transaction it no longer holds the outcome the
//! runtime read from the log) and always answers with [`Command::ForceAudit`]: the
//! record, accepted or refused, is forced before anything else happens, and the caller's
//! reply waits for [`Event::AuditDurable`]. Only then are the pending branches marked
//! heuristically committed/aborted (no more retries) and the transaction finished. The
//! one exception is ABORT of an undecided transaction: the abort is decided at once (as
//! Abort would), so no COMMIT can be decided while the record is being written.
//!
//! A resolution never changes an outcome: a durable COMMIT stays COMMITTED, a transaction
//! without one stays ABORTED, and [`Engine::outcome_of`] keeps answering participants that.
//! A resolution that contradicts the known outcome (ABORT of a COMMITTING/COMMITTED
//! transaction, COMMIT of an ABORTING/ABORTED one) is refused with
//! [`TxError::FailedPrecondition`] unless forced, and recorded as contradicting when
//! forced. COMMIT of an undecided transaction is refused even when forced: only the votes
//! can make a transaction commit. A single-branch transaction in a one-phase commit is
//! decided by its participant, so either resolution is taken as the operator's report of
//! what that participant did. The full table is in `proto/twopc/v1/admin.proto`.

use std::collections::{BTreeMap, HashMap};

use crate::log::{AuditRecord, CommitRecord, LazyRecord, Lsn, Recovered};
use crate::types::{BranchSpec, HeuristicDecision, TxId};

/// Identifies one pending request of the runtime, so a [`Command::Reply`] finds its caller.
pub type ReqId = u64;

/// Knobs of the protocol. Times are in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EngineConfig {
    /// How long votes may take before the transaction aborts.
    pub prepare_timeout_ms: u64,
    /// How long a transaction may stay active (no Commit) before it is aborted.
    pub tx_timeout_ms: u64,
    /// Upper bound for a per-transaction timeout asked for in Begin.
    pub max_tx_timeout_ms: u64,
    /// Most branches one transaction may have.
    pub max_branches: usize,
    /// First phase-two retry delay; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Cap of the phase-two retry delay.
    pub retry_max_ms: u64,
    /// Commit a single-branch transaction in one phase (no prepare; the participant
    /// decides, and the coordinator syncs its intent and the outcome).
    pub one_phase: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            prepare_timeout_ms: 10_000,
            tx_timeout_ms: 60_000,
            max_tx_timeout_ms: 24 * 3600 * 1000,
            max_branches: 64,
            retry_initial_ms: 50,
            retry_max_ms: 5_000,
            one_phase: true,
        }
    }
}

/// A participant's answer to a prepare.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Vote {
    /// Prepared.
    Yes,
    /// Cannot prepare, with the participant's reason.
    No(String),
    /// Nothing to commit; leaves the transaction.
    ReadOnly,
}

/// A message the coordinator sends to a participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    /// Phase one.
    Prepare,
    /// Phase two (or the only phase, with `one_phase`).
    Commit {
        /// Commit without a prepare: the participant decides.
        one_phase: bool,
    },
    /// Phase two: abort.
    Abort,
}

/// How a participant answered a phase-two commit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CommitAck {
    /// The branch is committed.
    Committed,
    /// A one-phase commit the participant refused (the branch is rolled back).
    Refused(String),
}

/// How a participant answered an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortAck {
    /// Nothing of the branch is committed.
    Aborted,
    /// The branch had already committed (in one phase): nothing was undone.
    AlreadyCommitted,
    /// The participant did not say (it predates the answer). Enough for an ordinary
    /// abort; not for settling a one-phase commit after a restart.
    Unreported,
}

/// The result of one RPC to a participant: `Err` carries a transport error or timeout.
pub type RpcResult<T> = Result<T, String>;

/// An operator's resolution request (Admin `Resolve`), validated by the engine too.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResolveRequest {
    /// COMMIT or ABORT.
    pub decision: HeuristicDecision,
    /// Who: kept in the audit record.
    pub operator: String,
    /// Why: kept in the audit record.
    pub reason: String,
    /// Carry it out even though it contradicts the known outcome.
    pub force: bool,
}

/// What a resolution did, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveReport {
    /// The record as forced (with its time).
    pub record: AuditRecord,
    /// The transaction's state afterwards; `None` once finished (the usual case).
    pub state: Option<TxState>,
    /// Its outcome, when the engine knows it (`None` for a transaction that finished on
    /// its own meanwhile: the runtime reads it from the log).
    pub outcome: Option<Outcome>,
    /// Branches marked heuristically committed/aborted when the resolution took effect.
    pub heuristic_branches: Vec<String>,
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Begin RPC.
    Begin {
        /// The caller.
        req: ReqId,
        /// Requested transaction timeout (0 = default).
        timeout_ms: u64,
        /// Branches to enlist right away.
        branches: Vec<BranchSpec>,
    },
    /// Begin RPC with `commit_locally`: a transaction with this single branch whose
    /// participant (the caller's own process) commits it in one phase by itself and then
    /// reports it ([`Event::CommittedLocally`]). Answered at once; the one-phase intent is
    /// synced in the background, and the participant commits only after a Barrier (which
    /// covers the intent) returned the epoch of this answer.
    BeginLocal {
        /// The caller.
        req: ReqId,
        /// Requested transaction timeout (0 = default).
        timeout_ms: u64,
        /// The only branch the transaction will ever have.
        branch: BranchSpec,
        /// How many such transactions to begin at once (0 counts as 1; at most
        /// [`MAX_LOCAL_BEGIN`]): a participant that commits many takes their ids ahead.
        count: u32,
    },
    /// Enlist RPC.
    Enlist {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
        /// The branch.
        branch: BranchSpec,
    },
    /// Commit RPC.
    Commit {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
        /// The caller may hear COMMITTED of a one-phase commit before its outcome is
        /// durable (`CommitRequest.answer_before_durable`: it calls Barrier before its
        /// participant forgets the branch).
        early: bool,
    },
    /// Commit RPC with `committed_locally`: the participant of a [`Event::BeginLocal`]
    /// transaction reports that it committed the branch. Answered once the outcome is
    /// written (the runtime syncs before answering a caller that needs it durable).
    CommittedLocally {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
    },
    /// Abort RPC with `unused`: the participant of a local transaction returns its id
    /// without having used it (ids begun ahead with [`Event::BeginLocal::count`]). Settled
    /// like an Abort (the branch is still asked: its answer decides), counted apart.
    Release {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
    },
    /// Abort RPC.
    Abort {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
        /// Why.
        reason: String,
    },
    /// A participant answered a Prepare (or the RPC failed).
    Voted {
        /// The transaction.
        tx: TxId,
        /// Index of the branch in the transaction.
        branch: usize,
        /// The answer.
        vote: RpcResult<Vote>,
    },
    /// A participant answered a Commit (or the RPC failed).
    CommitAcked {
        /// The transaction.
        tx: TxId,
        /// Index of the branch.
        branch: usize,
        /// The answer.
        ack: RpcResult<CommitAck>,
    },
    /// A participant answered an Abort (or the RPC failed).
    AbortAcked {
        /// The transaction.
        tx: TxId,
        /// Index of the branch.
        branch: usize,
        /// The answer.
        ack: RpcResult<AbortAck>,
    },
    /// A timer armed by [`Command::ArmTimer`] fired.
    Timer {
        /// The transaction.
        tx: TxId,
        /// Which timer.
        timer: Timer,
    },
    /// The COMMIT decision of `tx` is durable at `lsn`.
    LogDurable {
        /// The transaction.
        tx: TxId,
        /// Its LSN.
        lsn: Lsn,
    },
    /// The log could not make the decision durable. The log is now failed.
    LogFailed {
        /// The transaction.
        tx: TxId,
        /// What went wrong.
        error: String,
    },
    /// The [`Command::Sync`] of `tx` finished: everything it covers is durable.
    Synced {
        /// The transaction.
        tx: TxId,
    },
    /// The [`Command::Sync`] of `tx` failed. The log is now failed.
    SyncFailed {
        /// The transaction.
        tx: TxId,
        /// What went wrong.
        error: String,
    },
    /// Start-up: what the log says must be finished.
    Recovered(Recovered),
    /// Admin `Resolve` RPC: an operator's heuristic decision (see the module docs).
    Resolve {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
        /// What the operator asks for.
        request: ResolveRequest,
        /// For a transaction the engine no longer holds: its outcome as the runtime read
        /// it from the log (after a first attempt was answered [`ReplyOk::NotLive`]).
        logged: Option<Outcome>,
    },
    /// The audit record of [`Command::ForceAudit`] for `req` is durable.
    AuditDurable {
        /// The Resolve it belongs to.
        req: ReqId,
        /// Its LSN.
        lsn: Lsn,
        /// The wall-clock time the runtime stamped on it (ms since the Unix epoch).
        at_ms: u64,
    },
    /// The audit record for `req` could not be made durable. The log is now failed.
    AuditFailed {
        /// The Resolve it belongs to.
        req: ReqId,
        /// What went wrong.
        error: String,
    },
}

/// Timers the engine arms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The transaction stayed active too long.
    TxTimeout,
    /// Votes took too long.
    PrepareTimeout,
    /// Time to resend phase two to a branch.
    Retry {
        /// Index of the branch.
        branch: usize,
    },
}

/// At most this many local transactions are begun by one BeginLocal
/// ([`Event::BeginLocal::count`]).
pub const MAX_LOCAL_BEGIN: u32 = 256;

/// Successful replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyOk {
    /// Begin: the new id.
    Begun(TxId),
    /// BeginLocal: the new ids, as many as asked for, in order.
    BegunLocal(Vec<TxId>),
    /// Enlist done.
    Enlisted,
    /// Commit: the decision is COMMIT (durable where a log write was needed).
    Committed,
    /// Abort: the transaction is aborted.
    Aborted,
    /// Commit/Abort of a transaction the engine no longer holds (finished, or from an
    /// earlier epoch): the runtime answers from the decision log (presumed abort).
    /// For Resolve: ask again with [`Event::Resolve::logged`] filled in from the log.
    NotLive,
    /// Resolve: accepted, recorded and carried out.
    Resolved(ResolveReport),
}

/// Expected failures a caller handles. The service maps each to one gRPC code.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TxError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such transaction was ever issued here.
    #[error("{0}")]
    NotFound(String),
    /// The transaction is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A branch with this id already exists with other fields.
    #[error("{0}")]
    AlreadyExists(String),
    /// The transaction aborted; the message says why.
    #[error("{0}")]
    Aborted(String),
    /// The coordinator cannot take this work now (its log failed).
    #[error("{0}")]
    Unavailable(String),
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Write lazily (no sync).
    LogLazy(LazyRecord),
    /// Force a COMMIT decision; answer with [`Event::LogDurable`] or [`Event::LogFailed`].
    ForceCommit(CommitRecord),
    /// Make every record written so far (lazy ones included) durable; answer with
    /// [`Event::Synced`] or [`Event::SyncFailed`].
    Sync {
        /// The transaction waiting for it.
        tx: TxId,
    },
    /// Force an audit record (stamping its wall-clock time); answer with
    /// [`Event::AuditDurable`] or [`Event::AuditFailed`].
    ForceAudit {
        /// The Resolve it belongs to.
        req: ReqId,
        /// The record (`at_ms` is filled in by the runtime).
        record: AuditRecord,
    },
    /// Send one message to one branch; answer with the matching `*Acked`/`Voted` event.
    Send {
        /// The transaction.
        tx: TxId,
        /// Index of the branch.
        branch: usize,
        /// Where to send it.
        endpoint: String,
        /// The branch id, for the wire message.
        branch_id: String,
        /// What to send.
        message: Message,
        /// Must not be sent before the log's durable LSN reaches this.
        requires_durable: Option<Lsn>,
    },
    /// Answer a caller.
    Reply {
        /// The caller.
        req: ReqId,
        /// The answer.
        reply: Result<ReplyOk, TxError>,
    },
    /// Fire [`Event::Timer`] after `after_ms` (retry timers may be jittered by the runtime,
    /// within `[after_ms / 2, after_ms]`).
    ArmTimer {
        /// The transaction.
        tx: TxId,
        /// Which timer.
        timer: Timer,
        /// Delay.
        after_ms: u64,
    },
    /// Phase two of `tx` finished (every branch acknowledged): wake waiters. The engine
    /// has forgotten the transaction; the log (or presumed abort) answers from now on.
    Finished {
        /// The transaction.
        tx: TxId,
        /// Its outcome.
        outcome: Outcome,
    },
    /// The decision log failed: stop taking new work.
    Halt {
        /// Why.
        reason: String,
    },
}

/// A transaction's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Committed.
    Committed,
    /// Aborted.
    Aborted,
}

/// Where a transaction is (mirrors `twopc.v1.TxState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TxState {
    /// Branches may enlist.
    Active,
    /// Prepares out (or a one-phase commit in flight).
    Preparing,
    /// COMMIT being forced.
    Deciding,
    /// COMMIT durable; phase two running.
    Committing,
    /// ABORT decided; aborts being delivered.
    Aborting,
    /// The log failed while forcing this decision: the outcome is whatever a restart finds
    /// on disk. Nothing more is sent.
    InDoubt,
}

impl TxState {
    /// Upper-case name for messages.
    pub fn name(self) -> &'static str {
        match self {
            TxState::Active => "ACTIVE",
            TxState::Preparing => "PREPARING",
            TxState::Deciding => "DECIDING",
            TxState::Committing => "COMMITTING",
            TxState::Aborting => "ABORTING",
            TxState::InDoubt => "IN_DOUBT",
        }
    }
}

/// Where a branch is (mirrors `twopc.v1.BranchState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BranchState {
    /// Enlisted, nothing sent.
    Enlisted,
    /// Prepare sent, no vote.
    Preparing,
    /// Voted yes.
    Prepared,
    /// Voted read-only.
    ReadOnly,
    /// Voted no (or the prepare failed).
    VotedNo,
    /// Acknowledged commit.
    Committed,
    /// Acknowledged abort (or needs none).
    Aborted,
}

/// One branch inside the engine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BranchEntry {
    /// As enlisted.
    pub spec: BranchSpec,
    /// Protocol state.
    pub state: BranchState,
    /// Messages sent to it so far (prepare, commits, aborts).
    pub attempts: u32,
    /// Last transport error or no-vote reason.
    pub last_error: Option<String>,
    /// When the last message was sent to it (engine clock, ms): operators see how long
    /// ago the coordinator last tried.
    pub last_attempt_ms: Option<u64>,
    /// Consecutive failed deliveries of the current message: drives the backoff.
    failures: u32,
    /// A message is on its way and its answer has not arrived: do not send another.
    in_flight: bool,
    /// Abort delivery must be retried until acknowledged (the branch may hold prepared
    /// state). Branches that never saw a prepare get one courtesy abort.
    abort_must_ack: bool,
}

/// One transaction inside the engine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TxEntry {
    /// Protocol state.
    pub state: TxState,
    /// Branches in enlistment order.
    pub branches: Vec<BranchEntry>,
    /// When it began (runtime clock, ms).
    pub began_at_ms: u64,
    /// Why it aborted.
    pub abort_reason: Option<String>,
    /// LSN of its COMMIT record, once durable.
    pub decision_lsn: Option<Lsn>,
    /// Callers waiting for the decision (Commit RPCs).
    waiters: Vec<ReqId>,
    /// Abort RPCs waiting for the outcome: during a one-phase commit (the participant
    /// decides) or while the COMMIT is being forced (the log decides).
    abort_waiters: Vec<ReqId>,
    /// A `Preparing` record was written lazily and must be cleaned up on abort.
    logged_preparing: bool,
    /// Committing in one phase (single branch).
    one_phase: bool,
    /// A [`Command::Sync`] is outstanding: the one-phase intent (written when the first
    /// branch enlisted; a one-phase commit goes out once it is done) or the one-phase
    /// outcome (while `Committing`: the callers hear "committed" when it is done).
    sync_pending: bool,
    /// The one-phase intent naming the first branch is durable.
    intent_durable: bool,
    /// A caller waits for a one-phase outcome that must be durable before it is answered
    /// (a Commit without `early`, or an Abort).
    durable_answer: bool,
    /// Recovered from an intent, or a local transaction being aborted or timed out: the
    /// branch is asked with an Abort, whose answer says whether it had committed in one
    /// phase (the client may never have asked to commit).
    settle_by_abort: bool,
    /// Begun with `commit_locally` ([`Event::BeginLocal`]): its participant commits the
    /// single branch by itself and reports it; the coordinator sends no commit unless a
    /// plain Commit asks for one.
    local: bool,
    /// The one-phase outcome was written while the intent's sync was still outstanding
    /// and a caller needs it durable: sync once more when that sync returns.
    resync: bool,
    /// A local transaction being settled with an abort: why.
    settle_cause: Option<SettleCause>,
}

impl TxEntry {
    /// Begun with `commit_locally`: its participant commits the branch by itself.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// For a local transaction whose participant is being asked with an abort: why.
    pub fn settle_cause(&self) -> Option<SettleCause> {
        self.settle_cause
    }

    /// Branches that still owe an answer (vote or phase-two acknowledgement).
    pub fn pending_branches(&self) -> Vec<&BranchEntry> {
        self.branches
            .iter()
            .filter(|b| match self.state {
                TxState::Active => false,
                TxState::Preparing => b.state == BranchState::Preparing,
                TxState::Deciding | TxState::Committing | TxState::InDoubt => {
                    b.state == BranchState::Prepared
                }
                TxState::Aborting => {
                    b.abort_must_ack
                        && matches!(b.state, BranchState::Preparing | BranchState::Prepared)
                }
            })
            .collect()
    }

    /// The decided outcome, if any.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.state {
            TxState::Committing => Some(Outcome::Committed),
            TxState::Aborting => Some(Outcome::Aborted),
            _ => None,
        }
    }
}

/// Why the participant of a local transaction is asked with an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SettleCause {
    /// Its client asked to abort.
    Client,
    /// The transaction timed out before the participant reported the commit.
    Timeout,
    /// Its participant returned the id unused ([`Event::Release`]).
    Unused,
}

/// What the engine knows about an id it is not holding in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// Held in memory.
    Live,
    /// Issued in this epoch and already finished (the log, or presumed abort, answers).
    FinishedThisEpoch,
    /// Issued by an earlier start of this coordinator: the log, or presumed abort, answers.
    EarlierEpoch,
    /// Never issued here (another node, a future epoch, or a sequence not reached yet).
    Unknown,
}

/// The state machine. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Engine {
    cfg: EngineConfig,
    /// Identifies the data directory; part of every id.
    node: u32,
    /// This start's epoch; part of every id.
    epoch: u64,
    /// Next sequence number to issue.
    next_seq: u64,
    /// Transactions not yet finished. BTreeMap: ordered, so iteration (listing, model
    /// checking) is deterministic.
    txs: BTreeMap<TxId, TxEntry>,
    /// Set once the decision log failed: no new work is taken.
    halted: Option<String>,
    /// Clock of the last event (ms), for ages.
    now_ms: u64,
    /// Resolutions whose audit record is being forced, by request: what to do (or refuse)
    /// once it is durable.
    resolutions: BTreeMap<ReqId, PendingResolution>,
}

/// A judged resolution waiting for its audit record to be durable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PendingResolution {
    /// The record being forced.
    record: AuditRecord,
    /// `Some`: refused, with this answer. `None`: accepted, to be carried out.
    refusal: Option<TxError>,
    /// The outcome already known at judgement (a finished transaction).
    outcome: Option<Outcome>,
}

impl Engine {
    /// A fresh engine for `epoch` of `node`.
    pub fn new(cfg: EngineConfig, node: u32, epoch: u64) -> Self {
        Engine {
            cfg,
            node,
            epoch,
            next_seq: 1,
            txs: BTreeMap::new(),
            halted: None,
            now_ms: 0,
            resolutions: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// This start's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Why the engine stopped taking work, if it did.
    pub fn halted(&self) -> Option<&str> {
        self.halted.as_deref()
    }

    /// A transaction held in memory.
    pub fn tx(&self, tx: &TxId) -> Option<&TxEntry> {
        self.txs.get(tx)
    }

    /// Every transaction held in memory, in id order.
    pub fn txs(&self) -> impl Iterator<Item = (&TxId, &TxEntry)> {
        self.txs.iter()
    }

    /// Where an id comes from (see [`Provenance`]).
    pub fn provenance(&self, tx: &TxId) -> Provenance {
        if self.txs.contains_key(tx) {
            Provenance::Live
        } else if tx.node != self.node || tx.epoch > self.epoch || tx.seq == 0 {
            Provenance::Unknown
        } else if tx.epoch < self.epoch {
            Provenance::EarlierEpoch
        } else if tx.seq < self.next_seq {
            Provenance::FinishedThisEpoch
        } else {
            Provenance::Unknown
        }
    }

    /// The outcome a participant (or a repeated Commit) must be told for `tx`, given
    /// whether the decision log holds a COMMIT record for it. `Ok(None)`: not decided yet,
    /// ask again later. `Err`: never issued here. This is presumed abort in one place:
    /// no live state and no COMMIT record means ABORTED.
    pub fn outcome_of(&self, tx: &TxId, log_has_commit: bool) -> Result<Option<Outcome>, TxError> {
        if let Some(e) = self.txs.get(tx) {
            return Ok(e.outcome());
        }
        match self.provenance(tx) {
            Provenance::Unknown => Err(TxError::NotFound(format!(
                "transaction {tx} was never issued by this coordinator"
            ))),
            _ if log_has_commit => Ok(Some(Outcome::Committed)),
            _ => Ok(Some(Outcome::Aborted)),
        }
    }

    /// Handles one event at time `now_ms` and returns what to do, in order.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Command> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        match event {
            Event::Begin {
                req,
                timeout_ms,
                branches,
            } => self.on_begin(req, timeout_ms, branches, false, 1, &mut out),
            Event::BeginLocal {
                req,
                timeout_ms,
                branch,
                count,
            } => self.on_begin(req, timeout_ms, vec![branch], true, count, &mut out),
            Event::Enlist { req, tx, branch } => {
                let reply = self.on_enlist(tx, branch, &mut out);
                out.push(Command::Reply { req, reply });
            }
            Event::Commit { req, tx, early } => self.on_commit(req, tx, early, &mut out),
            Event::CommittedLocally { req, tx } => self.on_committed_locally(req, tx, &mut out),
            Event::Abort { req, tx, reason } => {
                self.on_abort(req, tx, reason, SettleCause::Client, &mut out)
            }
            Event::Release { req, tx } => self.on_release(req, tx, &mut out),
            Event::Voted { tx, branch, vote } => self.on_vote(tx, branch, vote, &mut out),
            Event::CommitAcked { tx, branch, ack } => self.on_commit_ack(tx, branch, ack, &mut out),
            Event::AbortAcked { tx, branch, ack } => self.on_abort_ack(tx, branch, ack, &mut out),
            Event::Timer { tx, timer } => self.on_timer(tx, timer, &mut out),
            Event::LogDurable { tx, lsn } => self.on_durable(tx, lsn, &mut out),
            Event::LogFailed { tx, error } => self.on_log_failed(tx, error, &mut out),
            Event::Synced { tx } => self.on_synced(tx, &mut out),
            Event::SyncFailed { tx, error } => self.on_sync_failed(tx, error, &mut out),
            Event::Recovered(rec) => self.on_recovered(rec, &mut out),
            Event::Resolve {
                req,
                tx,
                request,
                logged,
            } => self.on_resolve(req, tx, request, logged, &mut out),
            Event::AuditDurable { req, lsn, at_ms } => {
                self.on_audit_durable(req, lsn, at_ms, &mut out)
            }
            Event::AuditFailed { req, error } => self.on_audit_failed(req, error, &mut out),
        }
        // Remember when each branch was last tried (for operators).
        for cmd in &out {
            if let Command::Send { tx, branch, .. } = cmd {
                if let Some(b) = self
                    .txs
                    .get_mut(tx)
                    .and_then(|e| e.branches.get_mut(*branch))
                {
                    b.last_attempt_ms = Some(self.now_ms);
                }
            }
        }
        out
    }

    /// Begin (`count` 1, `local` false) and BeginLocal (`count` transactions at once):
    /// checks the request once, then begins each transaction and answers with their ids.
    fn on_begin(
        &mut self,
        req: ReqId,
        timeout_ms: u64,
        branches: Vec<BranchSpec>,
        local: bool,
        count: u32,
        out: &mut Vec<Command>,
    ) {
        if let Err(e) = self.check_begin(timeout_ms, &branches, local, count) {
            out.push(Command::Reply { req, reply: Err(e) });
            return;
        }
        let reply = if local {
            let txs = (0..count.max(1))
                .map(|_| self.begin_one(timeout_ms, &branches, true, out))
                .collect();
            ReplyOk::BegunLocal(txs)
        } else {
            ReplyOk::Begun(self.begin_one(timeout_ms, &branches, false, out))
        };
        out.push(Command::Reply {
            req,
            reply: Ok(reply),
        });
    }

    /// Why a Begin cannot be honoured, if it cannot.
    fn check_begin(
        &self,
        timeout_ms: u64,
        branches: &[BranchSpec],
        local: bool,
        count: u32,
    ) -> Result<(), TxError> {
        if let Some(why) = &self.halted {
            return Err(TxError::Unavailable(format!(
                "coordinator is not taking new transactions: {why}"
            )));
        }
        if timeout_ms > self.cfg.max_tx_timeout_ms {
            return Err(TxError::InvalidArgument(format!(
                "timeout_ms is {timeout_ms}; at most {} is allowed",
                self.cfg.max_tx_timeout_ms
            )));
        }
        if count > MAX_LOCAL_BEGIN {
            return Err(TxError::InvalidArgument(format!(
                "count is {count}; at most {MAX_LOCAL_BEGIN} local transactions per Begin"
            )));
        }
        self.check_new_branches(&[], branches)?;
        if local && !self.cfg.one_phase {
            return Err(TxError::FailedPrecondition(
                "commit_locally needs one-phase commits, which this coordinator has turned off \
                 (one_phase = false)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Begins one transaction of a checked Begin: a new id, its timeout, and (for one
    /// branch) its one-phase intent; a local one is in its participant's hands at once.
    fn begin_one(
        &mut self,
        timeout_ms: u64,
        branches: &[BranchSpec],
        local: bool,
        out: &mut Vec<Command>,
    ) -> TxId {
        let tx = TxId {
            node: self.node,
            epoch: self.epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let entry = TxEntry {
            state: TxState::Active,
            branches: Vec::new(),
            began_at_ms: self.now_ms,
            abort_reason: None,
            decision_lsn: None,
            waiters: Vec::new(),
            abort_waiters: Vec::new(),
            logged_preparing: false,
            one_phase: false,
            sync_pending: false,
            intent_durable: false,
            durable_answer: false,
            settle_by_abort: false,
            local,
            resync: false,
            settle_cause: None,
        };
        let mut entry = entry;
        for spec in branches {
            if !entry.branches.iter().any(|b| b.spec == *spec) {
                entry.branches.push(new_branch(spec.clone()));
            }
        }
        self.txs.insert(tx, entry);
        let after_ms = if timeout_ms == 0 {
            self.cfg.tx_timeout_ms
        } else {
            timeout_ms
        };
        out.push(Command::ArmTimer {
            tx,
            timer: Timer::TxTimeout,
            after_ms,
        });
        self.start_intent(tx, out);
        if let Some(entry) = self.txs.get_mut(&tx).filter(|_| local) {
            // The branch is in its participant's hands from the start.
            entry.state = TxState::Preparing;
            entry.one_phase = true;
            for b in &mut entry.branches {
                b.state = BranchState::Preparing;
                b.abort_must_ack = true;
            }
        }
        tx
    }

    /// Validates branches about to join a transaction that already has `existing`.
    fn check_new_branches(
        &self,
        existing: &[BranchEntry],
        new: &[BranchSpec],
    ) -> Result<(), TxError> {
        let mut seen: HashMap<&str, &BranchSpec> = existing
            .iter()
            .map(|b| (b.spec.branch_id.as_str(), &b.spec))
            .collect();
        let mut count = existing.len();
        for spec in new {
            crate::types::validate_branch_id(&spec.branch_id).map_err(TxError::InvalidArgument)?;
            crate::types::validate_endpoint(&spec.endpoint).map_err(TxError::InvalidArgument)?;
            match seen.get(spec.branch_id.as_str()) {
                Some(prev) if *prev == spec => continue,
                Some(_) => {
                    return Err(TxError::AlreadyExists(format!(
                        "branch {:?} is already enlisted with a different endpoint, commit_order or kind",
                        spec.branch_id
                    )))
                }
                None => {}
            }
            count += 1;
            if count > self.cfg.max_branches {
                return Err(TxError::InvalidArgument(format!(
                    "a transaction may have at most {} branches (--max-branches)",
                    self.cfg.max_branches
                )));
            }
            seen.insert(&spec.branch_id, spec);
        }
        Ok(())
    }

    fn on_enlist(
        &mut self,
        tx: TxId,
        spec: BranchSpec,
        out: &mut Vec<Command>,
    ) -> Result<ReplyOk, TxError> {
        let Some(entry) = self.txs.get(&tx) else {
            return Err(self.gone(&tx, "enlist in"));
        };
        if entry.state != TxState::Active {
            // A repeated enlist of a branch already in the transaction is still a success.
            if entry.branches.iter().any(|b| b.spec == spec) {
                return Ok(ReplyOk::Enlisted);
            }
            if entry.local {
                return Err(TxError::FailedPrecondition(format!(
                    "transaction {tx} was begun with commit_locally: its single branch commits \
                     in one phase and no other branch can join it"
                )));
            }
            return Err(TxError::FailedPrecondition(format!(
                "transaction {tx} is {}; branches can only be enlisted while it is ACTIVE",
                entry.state.name()
            )));
        }
        self.check_new_branches(&entry.branches, std::slice::from_ref(&spec))?;
        let entry = self.txs.get_mut(&tx).expect("checked above");
        if !entry.branches.iter().any(|b| b.spec == spec) {
            entry.branches.push(new_branch(spec));
            self.start_intent(tx, out);
        }
        Ok(ReplyOk::Enlisted)
    }

    /// A transaction just got its first branch: write its one-phase intent and sync it in
    /// the background, so that it is usually durable by the time the client (done with its
    /// work on the branch) calls Commit. A second branch makes it a two-phase commit, whose
    /// PREPARING record replaces the intent.
    fn start_intent(&mut self, tx: TxId, out: &mut Vec<Command>) {
        if !self.cfg.one_phase {
            return;
        }
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.branches.len() != 1 || entry.logged_preparing || entry.sync_pending {
            return;
        }
        entry.logged_preparing = true;
        entry.sync_pending = true;
        out.push(Command::LogLazy(LazyRecord::OnePhase {
            tx,
            branch: entry.branches[0].spec.clone(),
        }));
        out.push(Command::Sync { tx });
    }

    /// The error for an operation on a transaction not held in memory. The runtime answers
    /// Commit/Abort/Get for such ids from the log before it gets here; this covers the rest.
    fn gone(&self, tx: &TxId, what: &str) -> TxError {
        match self.provenance(tx) {
            Provenance::Unknown | Provenance::Live => TxError::NotFound(format!(
                "transaction {tx} was never issued by this coordinator"
            )),
            Provenance::FinishedThisEpoch | Provenance::EarlierEpoch => {
                TxError::FailedPrecondition(format!(
                    "cannot {what} transaction {tx}: it has already finished"
                ))
            }
        }
    }

    /// Reply for Commit/Abort of an id not held in memory.
    fn not_live(&self, tx: &TxId, what: &str) -> Result<ReplyOk, TxError> {
        match self.provenance(tx) {
            Provenance::FinishedThisEpoch | Provenance::EarlierEpoch => Ok(ReplyOk::NotLive),
            Provenance::Unknown | Provenance::Live => Err(self.gone(tx, what)),
        }
    }

    fn on_commit(&mut self, req: ReqId, tx: TxId, early: bool, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            out.push(Command::Reply {
                req,
                reply: self.not_live(&tx, "commit"),
            });
            return;
        };
        if !early {
            entry.durable_answer = true;
        }
        match entry.state {
            TxState::Active => {}
            TxState::Preparing if entry.local => {
                // A plain Commit of a local transaction: the coordinator asks the
                // participant to commit (it answers a repeat from its own state).
                entry.waiters.push(req);
                send_one_phase_commit(tx, entry, out);
                return;
            }
            TxState::Preparing | TxState::Deciding => {
                entry.waiters.push(req);
                return;
            }
            TxState::Committing if entry.one_phase => {
                // Committed by its branch; answered once the outcome is durable.
                entry.waiters.push(req);
                return;
            }
            TxState::Committing => {
                out.push(Command::Reply {
                    req,
                    reply: Ok(ReplyOk::Committed),
                });
                return;
            }
            TxState::Aborting => {
                let reply = Err(TxError::Aborted(abort_message(&tx, entry)));
                out.push(Command::Reply { req, reply });
                return;
            }
            TxState::InDoubt => {
                out.push(Command::Reply {
                    req,
                    reply: Err(in_doubt_error(&tx)),
                });
                return;
            }
        }
        entry.waiters.push(req);
        match entry.branches.len() {
            0 => {
                // Nothing to commit anywhere.
                let waiters = std::mem::take(&mut entry.waiters);
                reply_all(out, waiters, Ok(ReplyOk::Committed));
                self.txs.remove(&tx);
                out.push(Command::Finished {
                    tx,
                    outcome: Outcome::Committed,
                });
            }
            1 if self.cfg.one_phase => {
                // The commit goes out once the intent is durable: now, or when its sync
                // (started at enlist) returns (`on_synced`).
                entry.state = TxState::Preparing;
                entry.one_phase = true;
                let b = &mut entry.branches[0];
                b.state = BranchState::Preparing;
                b.abort_must_ack = true;
                if entry.intent_durable {
                    send(out, tx, 0, b, Message::Commit { one_phase: true }, None);
                } else if !entry.sync_pending {
                    // Its first sync failed (the log is failed): try once more.
                    entry.logged_preparing = true;
                    entry.sync_pending = true;
                    out.push(Command::LogLazy(LazyRecord::OnePhase {
                        tx,
                        branch: b.spec.clone(),
                    }));
                    out.push(Command::Sync { tx });
                }
            }
            _ => {
                entry.state = TxState::Preparing;
                entry.logged_preparing = true;
                let specs = entry.branches.iter().map(|b| b.spec.clone()).collect();
                out.push(Command::LogLazy(LazyRecord::Preparing {
                    tx,
                    branches: specs,
                }));
                for (i, b) in entry.branches.iter_mut().enumerate() {
                    b.state = BranchState::Preparing;
                    b.abort_must_ack = true;
                    send(out, tx, i, b, Message::Prepare, None);
                }
                out.push(Command::ArmTimer {
                    tx,
                    timer: Timer::PrepareTimeout,
                    after_ms: self.cfg.prepare_timeout_ms,
                });
            }
        }
    }

    /// A local transaction's id comes back unused: aborted like by its client (asking the
    /// branch), but only a local transaction's id can come back.
    fn on_release(&mut self, req: ReqId, tx: TxId, out: &mut Vec<Command>) {
        if let Some(entry) = self.txs.get(&tx).filter(|e| !e.local) {
            let reply = Err(TxError::FailedPrecondition(format!(
                "transaction {tx} was not begun with commit_locally (it is {}): only a local \
                 transaction's id can be returned unused; abort it instead",
                entry.state.name()
            )));
            out.push(Command::Reply { req, reply });
            return;
        }
        let reason = "its id was returned unused by its participant".to_string();
        self.on_abort(req, tx, reason, SettleCause::Unused, out);
    }

    fn on_abort(
        &mut self,
        req: ReqId,
        tx: TxId,
        reason: String,
        cause: SettleCause,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            out.push(Command::Reply {
                req,
                reply: self.not_live(&tx, "abort"),
            });
            return;
        };
        let why = match cause {
            SettleCause::Unused => reason,
            _ if reason.is_empty() => "aborted by the client".to_string(),
            _ => format!("aborted by the client: {reason}"),
        };
        match entry.state {
            TxState::Preparing if entry.local => {
                // The participant may have committed by itself: ask it with an abort.
                entry.abort_waiters.push(req);
                self.settle_local(tx, cause, why, out);
            }
            TxState::Preparing if entry.one_phase => {
                // A one-phase commit is in the participant's hands; its answer decides.
                entry.abort_waiters.push(req);
            }
            TxState::Active | TxState::Preparing => {
                self.decide_abort(tx, why, out);
                out.push(Command::Reply {
                    req,
                    reply: Ok(ReplyOk::Aborted),
                });
            }
            TxState::Aborting => out.push(Command::Reply {
                req,
                reply: Ok(ReplyOk::Aborted),
            }),
            TxState::Deciding => {
                // The COMMIT is being written but is not durable yet: a crash now would
                // make it an abort. Answer once the log has spoken.
                entry.abort_waiters.push(req);
            }
            TxState::Committing if entry.one_phase => entry.abort_waiters.push(req),
            TxState::Committing => out.push(Command::Reply {
                req,
                reply: Err(committed_error(&tx)),
            }),
            TxState::InDoubt => out.push(Command::Reply {
                req,
                reply: Err(in_doubt_error(&tx)),
            }),
        }
    }

    /// A local transaction is to be aborted (`why`): its participant may have committed
    /// by itself, so it is asked with an abort whose answer decides (as for a recovered
    /// intent).
    fn settle_local(&mut self, tx: TxId, cause: SettleCause, why: String, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.settle_by_abort {
            return;
        }
        entry.settle_cause = Some(cause);
        entry.abort_reason = Some(why);
        entry.settle_by_abort = true;
        if let Some(b) = entry.branches.first_mut() {
            if b.state == BranchState::Preparing && !b.in_flight {
                send(out, tx, 0, b, Message::Abort, None);
            }
        }
    }

    /// The participant of a local transaction (or of a recovered intent) reports that it
    /// committed the branch in one phase: the outcome is recorded as for a commit the
    /// coordinator sent, and the report answered once it is written.
    fn on_committed_locally(&mut self, req: ReqId, tx: TxId, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            out.push(Command::Reply {
                req,
                reply: self.not_live(&tx, "record the commit of"),
            });
            return;
        };
        if !(entry.local || entry.one_phase && entry.settle_by_abort) {
            let reply = Err(TxError::FailedPrecondition(format!(
                "transaction {tx} was not begun with commit_locally: the coordinator commits \
                 it (call Commit without committed_locally)"
            )));
            out.push(Command::Reply { req, reply });
            return;
        }
        match entry.state {
            TxState::Preparing => {
                entry.waiters.push(req);
                if let Some(b) = entry.branches.first_mut() {
                    // An abort or commit still on its way is answered by the same fact.
                    b.in_flight = false;
                }
                self.one_phase_committed(tx, out);
            }
            TxState::Committing => entry.waiters.push(req),
            TxState::Aborting => {
                let reply = Err(TxError::FailedPrecondition(format!(
                    "transaction {tx} is recorded ABORTED (its participant answered the \
                     coordinator's abort with ABORTED); a report that it committed \
                     contradicts that"
                )));
                out.push(Command::Reply { req, reply });
            }
            TxState::InDoubt => out.push(Command::Reply {
                req,
                reply: Err(in_doubt_error(&tx)),
            }),
            TxState::Active | TxState::Deciding => {
                // Unreachable for a transaction with one branch in its participant's
                // hands; answered rather than trusted.
                let reply = Err(TxError::FailedPrecondition(format!(
                    "transaction {tx} is {}: its participant cannot have committed it",
                    entry.state.name()
                )));
                out.push(Command::Reply { req, reply });
            }
        }
    }

    fn on_vote(&mut self, tx: TxId, i: usize, vote: RpcResult<Vote>, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let Some(b) = entry.branches.get_mut(i) else {
            return;
        };
        if b.state != BranchState::Preparing || entry.state == TxState::Active {
            return; // late or duplicate
        }
        b.in_flight = false;
        if entry.state != TxState::Preparing {
            // Already decided (abort): this branch's answer only tells whether an abort
            // must still reach it.
            if entry.state == TxState::Aborting {
                match vote {
                    Ok(Vote::Yes) | Err(_) => send_abort_if_idle(out, tx, i, b),
                    Ok(Vote::No(r)) => {
                        b.state = BranchState::VotedNo;
                        b.last_error = Some(r);
                        self.finish_abort_if_done(tx, out);
                    }
                    Ok(Vote::ReadOnly) => {
                        b.state = BranchState::ReadOnly;
                        self.finish_abort_if_done(tx, out);
                    }
                }
            }
            return;
        }
        match vote {
            Ok(Vote::Yes) => b.state = BranchState::Prepared,
            Ok(Vote::ReadOnly) => b.state = BranchState::ReadOnly,
            Ok(Vote::No(reason)) => {
                b.state = BranchState::VotedNo;
                b.last_error = Some(reason.clone());
                let why = format!("branch {} voted no: {reason}", b.spec.branch_id);
                self.decide_abort(tx, why, out);
                return;
            }
            Err(e) => {
                // Unknown whether it prepared: it stays Preparing so the abort is retried.
                b.last_error = Some(e.clone());
                let why = format!("prepare of branch {} failed: {e}", b.spec.branch_id);
                self.decide_abort(tx, why, out);
                return;
            }
        }
        if entry
            .branches
            .iter()
            .any(|b| b.state == BranchState::Preparing)
        {
            return;
        }
        // Every vote is in and none is no.
        let yes: Vec<BranchSpec> = entry
            .branches
            .iter()
            .filter(|b| b.state == BranchState::Prepared)
            .map(|b| b.spec.clone())
            .collect();
        if yes.is_empty() {
            // All read-only: nothing to commit, nothing to log.
            let waiters = std::mem::take(&mut entry.waiters);
            let logged = entry.logged_preparing;
            reply_all(out, waiters, Ok(ReplyOk::Committed));
            self.txs.remove(&tx);
            if logged {
                out.push(Command::LogLazy(LazyRecord::Aborted { tx }));
            }
            out.push(Command::Finished {
                tx,
                outcome: Outcome::Committed,
            });
            return;
        }
        entry.state = TxState::Deciding;
        out.push(Command::ForceCommit(CommitRecord {
            tx,
            branches: yes,
            decided_at_ms: 0,
        }));
    }

    fn on_durable(&mut self, tx: TxId, lsn: Lsn, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.state != TxState::Deciding {
            return;
        }
        entry.state = TxState::Committing;
        entry.decision_lsn = Some(lsn);
        let waiters = std::mem::take(&mut entry.waiters);
        reply_all(out, waiters, Ok(ReplyOk::Committed));
        let abort_waiters = std::mem::take(&mut entry.abort_waiters);
        reply_all(out, abort_waiters, Err(committed_error(&tx)));
        self.drive_commit(tx, out);
    }

    /// The transaction `tx` whose outstanding [`Command::Sync`] just ended (clearing the
    /// mark); `None` if there is no such sync (finished, or resolved meanwhile).
    fn take_sync(&mut self, tx: TxId) -> Option<&mut TxEntry> {
        let entry = self.txs.get_mut(&tx)?;
        if !entry.sync_pending {
            return None;
        }
        entry.sync_pending = false;
        Some(entry)
    }

    /// A one-phase intent is durable (send the commit, if the client asked for it) or a
    /// one-phase outcome is (answer).
    fn on_synced(&mut self, tx: TxId, out: &mut Vec<Command>) {
        let Some(entry) = self.take_sync(tx) else {
            return;
        };
        match entry.state {
            TxState::Active => entry.intent_durable = true,
            TxState::Preparing if entry.local => {
                entry.intent_durable = true;
                // A plain Commit that came before the intent was durable.
                if !entry.waiters.is_empty() {
                    send_one_phase_commit(tx, entry, out);
                }
            }
            TxState::Preparing if entry.one_phase => {
                entry.intent_durable = true;
                send_one_phase_commit(tx, entry, out);
            }
            TxState::Committing if entry.one_phase && entry.resync => {
                // The intent's sync returned; the outcome written since needs one more.
                entry.resync = false;
                entry.sync_pending = true;
                out.push(Command::Sync { tx });
            }
            TxState::Committing if entry.one_phase => self.finish_one_phase(tx, out),
            // A second branch made it a two-phase commit meanwhile: the intent is moot.
            _ => {}
        }
    }

    /// Answers the callers of a one-phase commit whose outcome record is written (and
    /// durable, where one of them needs that) and forgets the transaction.
    fn finish_one_phase(&mut self, tx: TxId, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.remove(&tx) else {
            return;
        };
        reply_all(out, entry.waiters, Ok(ReplyOk::Committed));
        reply_all(out, entry.abort_waiters, Err(committed_error(&tx)));
        out.push(Command::Finished {
            tx,
            outcome: Outcome::Committed,
        });
    }

    /// The branch of a one-phase commit has committed: write the outcome, then answer at
    /// once, or after its sync when a caller needs it durable (see `durable_answer`).
    fn one_phase_committed(&mut self, tx: TxId, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let Some(b) = entry.branches.first_mut() else {
            return;
        };
        b.state = BranchState::Committed;
        b.last_error = None;
        let specs = vec![b.spec.clone()];
        entry.state = TxState::Committing;
        out.push(Command::LogLazy(LazyRecord::OnePhaseCommitted {
            tx,
            branches: specs,
        }));
        if entry.durable_answer || !entry.abort_waiters.is_empty() {
            if entry.sync_pending {
                // The intent's sync (local transaction reported before it returned) does
                // not cover the outcome: another follows it.
                entry.resync = true;
            } else {
                entry.sync_pending = true;
                out.push(Command::Sync { tx });
            }
        } else {
            // The callers' participants keep their memory of the commit until a Barrier
            // shows this record durable; a restart before that asks them again.
            self.finish_one_phase(tx, out);
        }
    }

    /// The decision log failed: no new work from now on (once).
    fn halt(&mut self, error: &str, out: &mut Vec<Command>) {
        if self.halted.is_none() {
            let reason = format!("decision log failed: {error}");
            self.halted = Some(reason.clone());
            out.push(Command::Halt { reason });
        }
    }

    /// A sync a one-phase commit waited for failed: the log is failed, and whether the
    /// record reached the disk only a restart can tell.
    fn on_sync_failed(&mut self, tx: TxId, error: String, out: &mut Vec<Command>) {
        self.halt(&error, out);
        let Some(entry) = self.take_sync(tx) else {
            return;
        };
        // An intent synced in the background while ACTIVE: a Commit writes it again.
        if !entry.one_phase || !matches!(entry.state, TxState::Preparing | TxState::Committing) {
            return;
        }
        entry.state = TxState::InDoubt;
        let mut waiters = std::mem::take(&mut entry.waiters);
        waiters.append(&mut entry.abort_waiters);
        reply_all(out, waiters, Err(in_doubt_error(&tx)));
    }

    fn on_log_failed(&mut self, tx: TxId, error: String, out: &mut Vec<Command>) {
        self.halt(&error, out);
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.state != TxState::Deciding {
            return;
        }
        // The record may or may not be on disk: only a restart can tell. Never guess.
        entry.state = TxState::InDoubt;
        let mut waiters = std::mem::take(&mut entry.waiters);
        waiters.append(&mut entry.abort_waiters);
        reply_all(out, waiters, Err(in_doubt_error(&tx)));
    }

    /// Sends phase-two commits to the lowest tier that still has unacknowledged branches;
    /// finishes the transaction when none are left.
    fn drive_commit(&mut self, tx: TxId, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let lsn = entry.decision_lsn;
        let tier = entry
            .branches
            .iter()
            .filter(|b| b.state == BranchState::Prepared)
            .map(|b| b.spec.commit_order)
            .min();
        let Some(tier) = tier else {
            self.txs.remove(&tx);
            out.push(Command::LogLazy(LazyRecord::Done { tx }));
            out.push(Command::Finished {
                tx,
                outcome: Outcome::Committed,
            });
            return;
        };
        for (i, b) in entry.branches.iter_mut().enumerate() {
            if b.state == BranchState::Prepared && b.spec.commit_order == tier && !b.in_flight {
                send(out, tx, i, b, Message::Commit { one_phase: false }, lsn);
            }
        }
    }

    fn on_commit_ack(
        &mut self,
        tx: TxId,
        i: usize,
        ack: RpcResult<CommitAck>,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let one_phase = entry.one_phase;
        let Some(b) = entry.branches.get_mut(i) else {
            return;
        };
        if !b.in_flight {
            return; // duplicate
        }
        b.in_flight = false;
        if one_phase {
            if entry.state != TxState::Preparing {
                return;
            }
            match ack {
                Ok(CommitAck::Committed) => self.one_phase_committed(tx, out),
                Ok(CommitAck::Refused(reason)) => {
                    b.state = BranchState::Aborted;
                    b.last_error = Some(reason.clone());
                    let why = format!("branch {} refused to commit: {reason}", b.spec.branch_id);
                    self.decide_abort(tx, why, out);
                }
                Err(e) => {
                    // Whether it committed is unknown; ask again (the participant answers
                    // a repeated one-phase commit from its own state).
                    retry_later(&self.cfg, out, tx, i, b, e);
                }
            }
            return;
        }
        if entry.state != TxState::Committing || b.state != BranchState::Prepared {
            return;
        }
        match ack {
            Ok(_) => {
                b.state = BranchState::Committed;
                b.last_error = None;
                b.failures = 0;
                // Next tier once this one is fully acknowledged.
                let tier = b.spec.commit_order;
                let tier_open = entry
                    .branches
                    .iter()
                    .any(|o| o.state == BranchState::Prepared && o.spec.commit_order == tier);
                if !tier_open {
                    self.drive_commit(tx, out);
                }
            }
            Err(e) => {
                retry_later(&self.cfg, out, tx, i, b, e);
            }
        }
    }

    fn on_abort_ack(
        &mut self,
        tx: TxId,
        i: usize,
        ack: RpcResult<AbortAck>,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let settling = entry.settle_by_abort && entry.state == TxState::Preparing;
        let Some(b) = entry.branches.get_mut(i) else {
            return;
        };
        if !b.in_flight || !(settling || entry.state == TxState::Aborting) {
            return;
        }
        b.in_flight = false;
        if settling {
            // A recovered one-phase intent: the branch's answer is the outcome.
            match ack {
                Ok(AbortAck::AlreadyCommitted) => {
                    let _ = b;
                    self.one_phase_committed(tx, out)
                }
                Ok(AbortAck::Aborted) => {
                    b.state = BranchState::Aborted;
                    b.last_error = None;
                    // A local transaction aborted or timed out says why; a recovered
                    // intent has no other reason.
                    let why = entry.abort_reason.clone().unwrap_or_else(|| {
                        format!(
                            "the coordinator restarted before the one-phase commit was \
                             confirmed, and branch {} reports it rolled back",
                            b.spec.branch_id
                        )
                    });
                    self.decide_abort(tx, why, out);
                }
                Ok(AbortAck::Unreported) => {
                    let why = "the participant does not report whether it had committed the \
                               branch in one phase (it predates that answer); resolve the \
                               transaction once you know";
                    retry_later(&self.cfg, out, tx, i, b, why.to_string());
                }
                Err(e) => retry_later(&self.cfg, out, tx, i, b, e),
            }
            return;
        }
        match ack {
            Ok(_) => {
                b.state = BranchState::Aborted;
                b.last_error = None;
            }
            Err(e) if b.abort_must_ack => {
                retry_later(&self.cfg, out, tx, i, b, e);
                return;
            }
            Err(e) => {
                // A courtesy abort to a branch that never saw a prepare: once is enough.
                b.state = BranchState::Aborted;
                b.last_error = Some(e);
            }
        }
        self.finish_abort_if_done(tx, out);
    }

    fn on_timer(&mut self, tx: TxId, timer: Timer, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        match timer {
            Timer::TxTimeout => {
                if entry.state == TxState::Active {
                    self.decide_abort(tx, "transaction timed out while active".into(), out);
                } else if entry.state == TxState::Preparing && entry.local {
                    let why = "transaction timed out before its participant reported the commit";
                    self.settle_local(tx, SettleCause::Timeout, why.into(), out);
                }
            }
            Timer::PrepareTimeout => {
                if entry.state == TxState::Preparing && !entry.one_phase {
                    let slow: Vec<&str> = entry
                        .branches
                        .iter()
                        .filter(|b| b.state == BranchState::Preparing)
                        .map(|b| b.spec.branch_id.as_str())
                        .collect();
                    let why = format!(
                        "prepare timed out after {} ms waiting for branch(es) {}",
                        self.cfg.prepare_timeout_ms,
                        slow.join(", ")
                    );
                    self.decide_abort(tx, why, out);
                }
            }
            Timer::Retry { branch } => {
                let lsn = entry.decision_lsn;
                let state = entry.state;
                // A one-phase commit waits for its intent to be durable; a recovered one
                // is settled by an Abort.
                let one_phase = entry.one_phase && !entry.sync_pending && !entry.settle_by_abort;
                let settling = entry.settle_by_abort;
                let Some(b) = entry.branches.get_mut(branch) else {
                    return;
                };
                if b.in_flight {
                    return;
                }
                match state {
                    TxState::Committing if b.state == BranchState::Prepared => send(
                        out,
                        tx,
                        branch,
                        b,
                        Message::Commit { one_phase: false },
                        lsn,
                    ),
                    TxState::Preparing if one_phase && b.state == BranchState::Preparing => send(
                        out,
                        tx,
                        branch,
                        b,
                        Message::Commit { one_phase: true },
                        None,
                    ),
                    TxState::Preparing if settling && b.state == BranchState::Preparing => {
                        send(out, tx, branch, b, Message::Abort, None)
                    }
                    TxState::Aborting
                        if matches!(b.state, BranchState::Preparing | BranchState::Prepared) =>
                    {
                        send(out, tx, branch, b, Message::Abort, None)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Decides ABORT (no log write: presumed abort) and sends aborts.
    fn decide_abort(&mut self, tx: TxId, why: String, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        debug_assert!(matches!(entry.state, TxState::Active | TxState::Preparing));
        entry.state = TxState::Aborting;
        entry.abort_reason = Some(why);
        let msg = abort_message(&tx, entry);
        let waiters = std::mem::take(&mut entry.waiters);
        reply_all(out, waiters, Err(TxError::Aborted(msg)));
        let abort_waiters = std::mem::take(&mut entry.abort_waiters);
        reply_all(out, abort_waiters, Ok(ReplyOk::Aborted));
        for (i, b) in entry.branches.iter_mut().enumerate() {
            match b.state {
                BranchState::Enlisted | BranchState::VotedNo => {
                    // Never prepared: one courtesy abort so the participant can drop its
                    // open work now rather than at its own timeout.
                    b.abort_must_ack = false;
                    b.state = BranchState::Preparing;
                    send_abort_if_idle(out, tx, i, b);
                }
                BranchState::Preparing | BranchState::Prepared => send_abort_if_idle(out, tx, i, b),
                BranchState::ReadOnly | BranchState::Committed | BranchState::Aborted => {}
            }
        }
        self.finish_abort_if_done(tx, out);
    }

    fn finish_abort_if_done(&mut self, tx: TxId, out: &mut Vec<Command>) {
        let Some(entry) = self.txs.get(&tx) else {
            return;
        };
        if entry.state != TxState::Aborting {
            return;
        }
        let open = entry.branches.iter().any(|b| {
            b.in_flight
                || (b.abort_must_ack
                    && matches!(b.state, BranchState::Preparing | BranchState::Prepared))
        });
        if open {
            return;
        }
        let logged = entry.logged_preparing;
        self.txs.remove(&tx);
        if logged {
            out.push(Command::LogLazy(LazyRecord::Aborted { tx }));
        }
        out.push(Command::Finished {
            tx,
            outcome: Outcome::Aborted,
        });
    }

    fn on_recovered(&mut self, rec: Recovered, out: &mut Vec<Command>) {
        for c in rec.commits {
            let tx = c.tx;
            if self.txs.contains_key(&tx) {
                continue;
            }
            let mut entry = recovered_entry(self.now_ms, c.branches, TxState::Committing);
            for b in &mut entry.branches {
                b.state = BranchState::Prepared;
            }
            // Recovered decisions are durable by definition (read back from the log).
            entry.decision_lsn = None;
            self.txs.insert(tx, entry);
            self.drive_commit(tx, out);
        }
        for (tx, branches) in rec.undecided {
            if self.txs.contains_key(&tx) {
                continue;
            }
            let mut entry = recovered_entry(self.now_ms, branches, TxState::Aborting);
            entry.logged_preparing = true;
            entry.abort_reason = Some("coordinator restarted before deciding".into());
            for (i, b) in entry.branches.iter_mut().enumerate() {
                b.state = BranchState::Preparing;
                b.abort_must_ack = true;
                send_abort_if_idle(out, tx, i, b);
            }
            self.txs.insert(tx, entry);
            self.finish_abort_if_done(tx, out);
        }
        for (tx, branch) in rec.one_phase {
            if self.txs.contains_key(&tx) {
                continue;
            }
            // The commit may have reached the branch, or the client may never have asked
            // for it: abort, and the branch answers whether it had committed.
            let mut entry = recovered_entry(self.now_ms, vec![branch], TxState::Preparing);
            entry.logged_preparing = true;
            entry.one_phase = true;
            entry.intent_durable = true;
            entry.settle_by_abort = true;
            if let Some(b) = entry.branches.first_mut() {
                b.state = BranchState::Preparing;
                b.abort_must_ack = true;
                send(out, tx, 0, b, Message::Abort, None);
            }
            self.txs.insert(tx, entry);
        }
    }
}

/// Operator resolutions (see the module docs).
impl Engine {
    fn on_resolve(
        &mut self,
        req: ReqId,
        tx: TxId,
        request: ResolveRequest,
        logged: Option<Outcome>,
        out: &mut Vec<Command>,
    ) {
        let valid = crate::types::validate_resolve_reason(&request.reason)
            .and_then(|()| crate::types::validate_operator(&request.operator));
        if let Err(msg) = valid {
            let reply = Err(TxError::InvalidArgument(msg));
            out.push(Command::Reply { req, reply });
            return;
        }
        if let Some(why) = &self.halted {
            // Nothing can be recorded; a restart settles every outcome from the log.
            let reply = Err(TxError::Unavailable(format!(
                "cannot record a resolution of transaction {tx}: the coordinator halted ({why}); \
                 restart it, and the decision log settles the outcome"
            )));
            out.push(Command::Reply { req, reply });
            return;
        }
        let judged = match self.txs.get(&tx) {
            Some(_) => self.judge_live(tx, &request, out),
            None => match (self.provenance(&tx), logged) {
                (Provenance::Unknown | Provenance::Live, _) => {
                    let reply = Err(self.gone(&tx, "resolve"));
                    out.push(Command::Reply { req, reply });
                    return;
                }
                (_, None) => {
                    out.push(Command::Reply {
                        req,
                        reply: Ok(ReplyOk::NotLive),
                    });
                    return;
                }
                (_, Some(outcome)) => judge_finished(tx, &request, outcome),
            },
        };
        let Judged {
            prior_state,
            refusal,
            contradicts,
            branches,
            detail,
            outcome,
        } = judged;
        let record = AuditRecord {
            tx,
            decision: request.decision,
            operator: request.operator,
            reason: request.reason,
            force: request.force,
            at_ms: 0,
            prior_state,
            accepted: refusal.is_none(),
            contradicts,
            branches,
            detail,
        };
        self.resolutions.insert(
            req,
            PendingResolution {
                record: record.clone(),
                refusal,
                outcome,
            },
        );
        out.push(Command::ForceAudit { req, record });
    }

    /// Judges a resolution of a transaction held in memory. An accepted ABORT of an
    /// undecided transaction decides the abort here and now.
    fn judge_live(&mut self, tx: TxId, request: &ResolveRequest, out: &mut Vec<Command>) -> Judged {
        let entry = self.txs.get(&tx).expect("caller checked it is live");
        let state = entry.state;
        let prior_state = state.name().to_string();
        let decision = request.decision;
        let refuse = |msg: String| Judged {
            prior_state: prior_state.clone(),
            detail: msg.clone(),
            refusal: Some(TxError::FailedPrecondition(msg)),
            contradicts: false,
            branches: Vec::new(),
            outcome: None,
        };
        let pending: Vec<String> = entry
            .pending_branches()
            .iter()
            .map(|b| b.spec.branch_id.clone())
            .collect();
        let accept = |contradicts: bool, branches: Vec<String>, detail: String| Judged {
            prior_state: prior_state.clone(),
            refusal: None,
            contradicts,
            branches,
            detail,
            outcome: None,
        };
        match (state, decision) {
            (TxState::Preparing, _) if entry.one_phase => {
                let branches = entry
                    .branches
                    .iter()
                    .map(|b| b.spec.branch_id.clone())
                    .collect();
                accept(
                    false,
                    branches,
                    format!(
                        "one-phase commit: its single participant decides, so the operator's \
                         word is taken: the branch is heuristically {} and the transaction \
                         finishes {}",
                        past(decision),
                        outcome_name(decision)
                    ),
                )
            }
            (TxState::Active | TxState::Preparing, HeuristicDecision::Commit) => refuse(format!(
                "transaction {tx} is {}: it is undecided, and only the votes of its branches \
                 can make it COMMIT (even with force); resolve it to ABORT instead",
                state.name()
            )),
            (TxState::Active | TxState::Preparing, HeuristicDecision::Abort) => {
                let why = format!(
                    "resolved to ABORT by operator {}: {}",
                    request.operator, request.reason
                );
                self.decide_abort(tx, why, out);
                let branches = self
                    .txs
                    .get(&tx)
                    .map(|e| {
                        e.pending_branches()
                            .iter()
                            .map(|b| b.spec.branch_id.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                Judged {
                    outcome: Some(Outcome::Aborted),
                    ..accept(
                        false,
                        branches,
                        "aborted (an abort went to every branch); branches that had not \
                         acknowledged when this record became durable are heuristically \
                         aborted; participants that ask are told ABORTED"
                            .into(),
                    )
                }
            }
            (TxState::Deciding, _) => refuse(format!(
                "transaction {tx} is DECIDING: its COMMIT decision is being made durable right \
                 now; retry in a moment"
            )),
            (TxState::InDoubt, _) => refuse(format!(
                "transaction {tx} is in doubt: the decision log failed while recording its \
                 outcome; restart the coordinator"
            )),
            (TxState::Committing, HeuristicDecision::Commit) => accept(
                false,
                pending,
                "the branches still owing a commit acknowledgement are heuristically committed \
                 (no more retries; a later commit tier never sent its commit gets one, best \
                 effort); the transaction finishes COMMITTED"
                    .into(),
            ),
            (TxState::Aborting, HeuristicDecision::Abort) => accept(
                false,
                pending,
                "the branches still owing an abort acknowledgement are heuristically aborted \
                 (no more retries); the transaction finishes ABORTED"
                    .into(),
            ),
            (TxState::Committing, HeuristicDecision::Abort) if !request.force => refuse(format!(
                "transaction {tx} is COMMITTING: its COMMIT decision is durable (outcome \
                 COMMITTED), so resolving it to ABORT contradicts it; set force (--force) to \
                 record the contradiction and stop committing its branches anyway"
            )),
            (TxState::Aborting, HeuristicDecision::Commit) if !request.force => refuse(format!(
                "transaction {tx} is ABORTING: it is aborted (outcome ABORTED), so resolving it \
                 to COMMIT contradicts it; set force (--force) to record the contradiction and \
                 stop aborting its branches anyway"
            )),
            (TxState::Committing, HeuristicDecision::Abort) => accept(
                true,
                pending,
                "FORCED against the durable COMMIT decision: the branches still owing a commit \
                 acknowledgement are heuristically aborted (no more commits sent); the decision \
                 log still says COMMITTED and participants that ask are told so"
                    .into(),
            ),
            (TxState::Aborting, HeuristicDecision::Commit) => accept(
                true,
                pending,
                "FORCED against the abort: the branches still owing an abort acknowledgement \
                 are heuristically committed (no more aborts sent); the outcome stays ABORTED \
                 and participants that ask are told so"
                    .into(),
            ),
        }
    }

    fn on_audit_durable(&mut self, req: ReqId, _lsn: Lsn, at_ms: u64, out: &mut Vec<Command>) {
        let Some(pending) = self.resolutions.remove(&req) else {
            return;
        };
        let mut record = pending.record;
        record.at_ms = at_ms;
        if let Some(refusal) = pending.refusal {
            out.push(Command::Reply {
                req,
                reply: Err(refusal),
            });
            return;
        }
        let tx = record.tx;
        let (heuristic_branches, finished) = self.apply_resolution(tx, record.decision, out);
        let (state, outcome) = match self.txs.get(&tx) {
            Some(e) => (Some(e.state), e.outcome()),
            None => (None, finished.or(pending.outcome)),
        };
        let report = ResolveReport {
            record,
            state,
            outcome,
            heuristic_branches,
        };
        out.push(Command::Reply {
            req,
            reply: Ok(ReplyOk::Resolved(report)),
        });
    }

    fn on_audit_failed(&mut self, req: ReqId, error: String, out: &mut Vec<Command>) {
        self.halt(&error, out);
        if let Some(pending) = self.resolutions.remove(&req) {
            let reply = Err(TxError::Unavailable(format!(
                "the resolution of transaction {} could not be recorded ({error}), so no branch \
                 was marked heuristic; the coordinator takes no new work until restarted",
                pending.record.tx
            )));
            out.push(Command::Reply { req, reply });
        }
    }

    /// Carries out an accepted resolution now that its record is durable: marks the
    /// branches still owing an answer heuristically committed/aborted and finishes the
    /// transaction. Returns the marked branches and the outcome it finished with.
    fn apply_resolution(
        &mut self,
        tx: TxId,
        decision: HeuristicDecision,
        out: &mut Vec<Command>,
    ) -> (Vec<String>, Option<Outcome>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return (Vec::new(), None); // finished on its own meanwhile
        };
        let declared = match decision {
            HeuristicDecision::Commit => BranchState::Committed,
            HeuristicDecision::Abort => BranchState::Aborted,
        };
        let mut marked = Vec::new();
        match entry.state {
            // Committed by its branch, the outcome being synced: that finishes it.
            TxState::Committing if entry.one_phase => (marked, Some(Outcome::Committed)),
            TxState::Committing => {
                let lsn = entry.decision_lsn;
                let tier = entry
                    .branches
                    .iter()
                    .filter(|b| b.state == BranchState::Prepared)
                    .map(|b| b.spec.commit_order)
                    .min();
                for (i, b) in entry.branches.iter_mut().enumerate() {
                    if b.state != BranchState::Prepared {
                        continue;
                    }
                    let never_sent = tier.is_some_and(|t| b.spec.commit_order > t);
                    if decision == HeuristicDecision::Commit && never_sent && !b.in_flight {
                        // Its tier was never reached: one commit, best effort (the lower
                        // tiers are acknowledged or declared committed by now).
                        send(out, tx, i, b, Message::Commit { one_phase: false }, lsn);
                    }
                    b.state = declared;
                    b.in_flight = false;
                    marked.push(b.spec.branch_id.clone());
                }
                self.drive_commit(tx, out);
                (marked, Some(Outcome::Committed))
            }
            TxState::Aborting => {
                for b in entry.branches.iter_mut() {
                    let owes = b.abort_must_ack
                        && matches!(b.state, BranchState::Preparing | BranchState::Prepared);
                    if owes {
                        b.state = declared;
                        marked.push(b.spec.branch_id.clone());
                    } else if b.in_flight && b.state == BranchState::Preparing {
                        // A courtesy abort still on its way: no need to wait for it.
                        b.state = BranchState::Aborted;
                    }
                    b.in_flight = false;
                }
                self.finish_abort_if_done(tx, out);
                (marked, Some(Outcome::Aborted))
            }
            TxState::Preparing if entry.one_phase => {
                for b in entry.branches.iter_mut() {
                    b.state = declared;
                    b.in_flight = false;
                    marked.push(b.spec.branch_id.clone());
                }
                let waiters = std::mem::take(&mut entry.waiters);
                let abort_waiters = std::mem::take(&mut entry.abort_waiters);
                let outcome = match decision {
                    HeuristicDecision::Commit => {
                        reply_all(out, waiters, Ok(ReplyOk::Committed));
                        reply_all(out, abort_waiters, Err(committed_error(&tx)));
                        let specs = entry.branches.iter().map(|b| b.spec.clone()).collect();
                        out.push(Command::LogLazy(LazyRecord::OnePhaseCommitted {
                            tx,
                            branches: specs,
                        }));
                        Outcome::Committed
                    }
                    HeuristicDecision::Abort => {
                        entry.state = TxState::Aborting;
                        entry.abort_reason =
                            Some("one-phase commit resolved to ABORT by an operator".into());
                        let msg = abort_message(&tx, entry);
                        reply_all(out, waiters, Err(TxError::Aborted(msg)));
                        reply_all(out, abort_waiters, Ok(ReplyOk::Aborted));
                        out.push(Command::LogLazy(LazyRecord::Aborted { tx }));
                        Outcome::Aborted
                    }
                };
                // The operator's word replaces the intent on disk, so a restart does not
                // ask the branch again (best effort: the audit record is durable already).
                out.push(Command::Sync { tx });
                self.txs.remove(&tx);
                out.push(Command::Finished { tx, outcome });
                (marked, Some(outcome))
            }
            // Undecided ones were aborted when the resolution was accepted; DECIDING and
            // IN_DOUBT ones are refused.
            _ => (Vec::new(), None),
        }
    }
}

/// A judged resolution, before it becomes an [`AuditRecord`].
struct Judged {
    prior_state: String,
    refusal: Option<TxError>,
    contradicts: bool,
    branches: Vec<String>,
    detail: String,
    outcome: Option<Outcome>,
}

/// Judges a resolution of a finished transaction against the outcome the log gives it:
/// there is nothing left to stop, so an accepted one is only recorded.
fn judge_finished(tx: TxId, request: &ResolveRequest, outcome: Outcome) -> Judged {
    let (state, agrees) = match outcome {
        Outcome::Committed => ("COMMITTED", request.decision == HeuristicDecision::Commit),
        Outcome::Aborted => ("ABORTED", request.decision == HeuristicDecision::Abort),
    };
    let why = match outcome {
        Outcome::Committed => "a durable COMMIT decision is logged",
        Outcome::Aborted => "no COMMIT decision is logged: presumed abort",
    };
    let (refusal, contradicts, detail) = if agrees {
        (
            None,
            false,
            format!("the transaction already finished {state}; nothing left to do: recorded"),
        )
    } else if !request.force {
        let msg = format!(
            "transaction {tx} is {state} ({why}), so resolving it to {} contradicts it; set \
             force (--force) to record the contradiction anyway",
            request.decision.name()
        );
        (Some(TxError::FailedPrecondition(msg.clone())), false, msg)
    } else {
        (
            None,
            true,
            format!(
                "FORCED against the outcome {state} ({why}): recorded; the coordinator has \
                 finished it already, the decision log is unchanged and participants that ask \
                 are told {state}"
            ),
        )
    };
    Judged {
        prior_state: state.to_string(),
        refusal,
        contradicts,
        branches: Vec::new(),
        detail,
        outcome: Some(outcome),
    }
}

fn past(decision: HeuristicDecision) -> &'static str {
    match decision {
        HeuristicDecision::Commit => "committed",
        HeuristicDecision::Abort => "aborted",
    }
}

fn outcome_name(decision: HeuristicDecision) -> &'static str {
    match decision {
        HeuristicDecision::Commit => "COMMITTED",
        HeuristicDecision::Abort => "ABORTED",
    }
}

fn new_branch(spec: BranchSpec) -> BranchEntry {
    BranchEntry {
        spec,
        state: BranchState::Enlisted,
        attempts: 0,
        last_error: None,
        last_attempt_ms: None,
        failures: 0,
        in_flight: false,
        abort_must_ack: false,
    }
}

fn recovered_entry(now_ms: u64, branches: Vec<BranchSpec>, state: TxState) -> TxEntry {
    TxEntry {
        state,
        branches: branches.into_iter().map(new_branch).collect(),
        began_at_ms: now_ms,
        abort_reason: None,
        decision_lsn: None,
        waiters: Vec::new(),
        abort_waiters: Vec::new(),
        logged_preparing: false,
        one_phase: false,
        sync_pending: false,
        intent_durable: false,
        durable_answer: false,
        settle_by_abort: false,
        local: false,
        resync: false,
        settle_cause: None,
    }
}

/// Sends the one-phase commit of the single branch once its intent is durable, unless an
/// abort is asking (a recovered or settling transaction) or one is already on its way.
fn send_one_phase_commit(tx: TxId, entry: &mut TxEntry, out: &mut Vec<Command>) {
    if !entry.intent_durable || entry.settle_by_abort {
        return;
    }
    if let Some(b) = entry.branches.first_mut() {
        if b.state == BranchState::Preparing && !b.in_flight {
            send(out, tx, 0, b, Message::Commit { one_phase: true }, None);
        }
    }
}

fn send(
    out: &mut Vec<Command>,
    tx: TxId,
    i: usize,
    b: &mut BranchEntry,
    message: Message,
    requires_durable: Option<Lsn>,
) {
    b.in_flight = true;
    b.attempts = b.attempts.saturating_add(1);
    out.push(Command::Send {
        tx,
        branch: i,
        endpoint: b.spec.endpoint.clone(),
        branch_id: b.spec.branch_id.clone(),
        message,
        requires_durable,
    });
}

/// Records a failed delivery to branch `i` (`error`) and arms its retry timer with the
/// backoff of its consecutive failures.
fn retry_later(
    cfg: &EngineConfig,
    out: &mut Vec<Command>,
    tx: TxId,
    i: usize,
    b: &mut BranchEntry,
    error: String,
) {
    b.last_error = Some(error);
    b.failures = b.failures.saturating_add(1);
    out.push(Command::ArmTimer {
        tx,
        timer: Timer::Retry { branch: i },
        after_ms: backoff(cfg, b.failures),
    });
}

fn send_abort_if_idle(out: &mut Vec<Command>, tx: TxId, i: usize, b: &mut BranchEntry) {
    if !b.in_flight {
        send(out, tx, i, b, Message::Abort, None);
    }
}

fn reply_all(out: &mut Vec<Command>, reqs: Vec<ReqId>, reply: Result<ReplyOk, TxError>) {
    for req in reqs {
        out.push(Command::Reply {
            req,
            reply: reply.clone(),
        });
    }
}

fn abort_message(tx: &TxId, entry: &TxEntry) -> String {
    match &entry.abort_reason {
        Some(r) => format!("transaction {tx} aborted: {r}"),
        None => format!("transaction {tx} aborted"),
    }
}

fn committed_error(tx: &TxId) -> TxError {
    TxError::FailedPrecondition(format!(
        "transaction {tx} cannot be aborted: its outcome is COMMITTED"
    ))
}

fn in_doubt_error(tx: &TxId) -> TxError {
    TxError::Unavailable(format!(
        "the decision log failed while recording the outcome of transaction {tx}; \
         the outcome will be settled when the coordinator restarts"
    ))
}

/// Capped exponential backoff for attempt `attempts` (1-based).
pub fn backoff(cfg: &EngineConfig, attempts: u32) -> u64 {
    let shift = attempts.saturating_sub(1).min(30);
    cfg.retry_initial_ms
        .saturating_mul(1u64 << shift)
        .min(cfg.retry_max_ms)
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
