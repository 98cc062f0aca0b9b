//! What goes in and out of the engine: the [`Event`]s the runtime feeds it, the
//! [`Command`]s it returns, and the values they carry (votes, acknowledgements, replies,
//! errors, timers).

use super::ReqId;
use super::{Outcome, SettleCause, TxState};
use crate::log::{AuditRecord, CommitRecord, LazyRecord, Lsn, Recovered};
use crate::types::{BranchSpec, HeuristicDecision, TxId};

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
    /// BeginLocal RPC: a transaction with this single branch whose
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
        answer_before_durable: bool,
    },
    /// ReportLocalCommits RPC (one of its ids): the participant of a [`Event::BeginLocal`]
    /// transaction reports that it committed the branch. Answered once the outcome is
    /// written (the runtime syncs before answering a caller that needs it durable).
    CommittedLocally {
        /// The caller.
        req: ReqId,
        /// The transaction.
        tx: TxId,
    },
    /// ReleaseUnused RPC: the participant of a local transaction returns its id
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
    /// The [`Command::Sync`] of `tx` finished: everything it covers is durable, up to
    /// `lsn`.
    Synced {
        /// The transaction.
        tx: TxId,
        /// The log's durable LSN that covers every record written before the sync.
        lsn: Lsn,
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
        /// Must not be answered before the log's durable LSN reaches this: the record the
        /// answer reports (a COMMIT decision, a one-phase outcome, an audit record).
        requires_durable: Option<Lsn>,
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

/// What happened while the engine handled an event, reported as data by
/// [`Engine::handle_noted`](super::Engine::handle_noted): the metrics count these instead
/// of re-deriving them from the engine's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// A Commit request took an active transaction into the commit protocol.
    CommitRequested {
        /// The transaction.
        tx: TxId,
    },
    /// The transaction was decided by this process (a COMMIT decision recovered from the
    /// log was taken by an earlier one and is not noted again).
    Decided {
        /// The transaction.
        tx: TxId,
        /// The decision.
        outcome: Outcome,
        /// What decided an abort (`None` for a commit).
        cause: Option<AbortCause>,
    },
    /// Its COMMIT decision became durable.
    CommitDurable {
        /// The transaction.
        tx: TxId,
    },
    /// The log failed while recording its outcome: in doubt until a restart.
    InDoubt {
        /// The transaction.
        tx: TxId,
    },
    /// A phase-two message was sent again after a failed delivery.
    Resent {
        /// What was sent.
        message: Message,
    },
    /// A participant's answer changed nothing: it came late, twice, or for a transaction
    /// (or branch) the engine no longer holds.
    Ignored {
        /// Which kind of answer.
        answer: Answer,
    },
}

/// What decided an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortCause {
    /// A no vote, a failed prepare, or a refused one-phase commit.
    VoteNo,
    /// Votes took longer than the prepare timeout.
    PrepareTimeout,
    /// The transaction stayed active (or its local commit unreported) too long.
    TxTimeout,
    /// Its client asked.
    Client,
    /// Undecided when the coordinator restarted.
    Recovery,
    /// An operator's resolution.
    Operator,
    /// A local transaction's id came back unused.
    Unused,
    /// A recovered one-phase intent whose branch reports it rolled back.
    Other,
}

impl From<SettleCause> for AbortCause {
    fn from(cause: SettleCause) -> Self {
        match cause {
            SettleCause::Client => AbortCause::Client,
            SettleCause::Timeout => AbortCause::TxTimeout,
            SettleCause::Unused => AbortCause::Unused,
        }
    }
}

/// A kind of participant answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Answer {
    /// To a prepare.
    Vote,
    /// To a commit.
    Commit,
    /// To an abort.
    Abort,
}
