//! What the engine holds of a transaction: its [`TxState`], its branches, and its
//! [`Protocol`] (two-phase, or which one-phase path) with the log and sync state that
//! protocol needs, each an enum of its own, so a combination no path can reach cannot be
//! written down.

use super::ReqId;
use crate::log::Lsn;
use crate::types::BranchSpec;

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
    pub(super) failures: u32,
    /// A message is on its way and its answer has not arrived: do not send another.
    pub(super) in_flight: bool,
    /// Abort delivery must be retried until acknowledged (the branch may hold prepared
    /// state). Branches that never saw a prepare get one courtesy abort.
    pub(super) abort_must_ack: bool,
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
    pub(super) waiters: Vec<ReqId>,
    /// Abort RPCs waiting for the outcome: during a one-phase commit (the participant
    /// decides) or while the COMMIT is being forced (the log decides).
    pub(super) abort_waiters: Vec<ReqId>,
    /// How it commits: two-phase, or one of the one-phase paths.
    pub(super) protocol: Protocol,
    /// What the log holds of it before any decision (an abort cleans it up).
    pub(super) logged: Logged,
    /// The [`Command::Sync`](super::Command::Sync) it waits for, if any.
    pub(super) sync: SyncState,
    /// When the callers of a one-phase commit may hear COMMITTED.
    pub(super) answer: AnswerWhen,
}

/// How a transaction commits. Each one-phase path has a variant of its own, so a
/// combination no path can reach (a settling transaction that is not one-phase, say)
/// cannot be written down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Two-phase commit: prepares, a durable COMMIT, phase two. Also every transaction
    /// while ACTIVE, until a Commit with a single branch chooses [`Protocol::OnePhase`].
    TwoPhase,
    /// Its single branch commits in one phase, sent by the coordinator once the intent is
    /// durable; the participant's answer is the outcome.
    OnePhase,
    /// Begun with BeginLocal ([`Event::BeginLocal`](super::Event::BeginLocal)): its participant commits the
    /// single branch by itself and reports it; the coordinator sends no commit unless a
    /// plain Commit asks for one.
    Local {
        /// Being settled with an abort (the client aborted, the transaction timed out, or
        /// its id came back unused), whose answer says whether the participant had
        /// committed: why.
        settling: Option<SettleCause>,
    },
    /// A one-phase intent without an outcome, found by recovery: the client may never
    /// have asked to commit, so the branch is asked with an abort whose answer says
    /// whether it had committed.
    Recovered,
}

impl Protocol {
    /// The single branch commits in one phase (whoever sends the commit).
    pub fn is_one_phase(self) -> bool {
        self != Protocol::TwoPhase
    }

    /// The branch is asked with an abort whose answer decides (see [`Protocol::Local`]
    /// and [`Protocol::Recovered`]).
    pub(super) fn settles_by_abort(self) -> bool {
        matches!(
            self,
            Protocol::Local { settling: Some(_) } | Protocol::Recovered
        )
    }
}

/// What the log holds of an undecided transaction (lazily written): an abort writes an
/// [`LazyRecord::Aborted`](crate::log::LazyRecord::Aborted) to clean it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Logged {
    /// Nothing.
    Nothing,
    /// The one-phase intent naming its first branch (written when that branch enlisted).
    Intent {
        /// The durable LSN its sync returned (a one-phase commit may go out, stamped with
        /// it); `None` while the sync runs. An intent recovered from the log is durable
        /// before this start: LSN 0.
        durable_at: Option<Lsn>,
    },
    /// The PREPARING record of a two-phase commit (it replaces an intent).
    Preparing,
}

/// The [`Command::Sync`](super::Command::Sync) a transaction waits for: of its one-phase intent (a one-phase
/// commit goes out once it is done) or of its one-phase outcome (while `Committing`:
/// the callers hear COMMITTED when it is done).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum SyncState {
    /// None outstanding.
    Idle,
    /// One outstanding.
    Pending,
    /// One outstanding, and the one-phase outcome was written after it started while a
    /// caller needs it durable: sync once more when it returns.
    PendingThenAgain,
}

/// When the callers of a one-phase commit may hear COMMITTED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum AnswerWhen {
    /// As soon as the outcome is written: every Commit asked for it (`answer_before_durable`)
    /// (`answer_before_durable`: its participant keeps the commit's memory until a Barrier).
    Written,
    /// Once the outcome is durable: a Commit without `answer_before_durable` (or an Abort) waits.
    Durable,
}

impl TxEntry {
    /// How it commits.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Begun with BeginLocal: its participant commits the branch by itself.
    pub fn is_local(&self) -> bool {
        matches!(self.protocol, Protocol::Local { .. })
    }

    /// For a local transaction whose participant is being asked with an abort: why.
    pub fn settle_cause(&self) -> Option<SettleCause> {
        match self.protocol {
            Protocol::Local { settling } => settling,
            _ => None,
        }
    }

    /// The LSN at which the one-phase intent became durable, if it is.
    pub(super) fn intent_durable_at(&self) -> Option<Lsn> {
        match self.logged {
            Logged::Intent { durable_at } => durable_at,
            Logged::Nothing | Logged::Preparing => None,
        }
    }

    /// The one-phase commit may be sent (the intent is durable, at the LSN returned, and
    /// no abort is asking).
    pub(super) fn may_send_one_phase_commit(&self) -> Option<Lsn> {
        self.intent_durable_at()
            .filter(|_| !self.protocol.settles_by_abort())
    }

    /// A new entry in `state` with `branches`, nothing logged, nothing waiting.
    pub(super) fn new(
        state: TxState,
        protocol: Protocol,
        began_at_ms: u64,
        branches: Vec<BranchEntry>,
    ) -> Self {
        TxEntry {
            state,
            branches,
            began_at_ms,
            abort_reason: None,
            decision_lsn: None,
            waiters: Vec::new(),
            abort_waiters: Vec::new(),
            protocol,
            logged: Logged::Nothing,
            sync: SyncState::Idle,
            answer: AnswerWhen::Written,
        }
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

    /// The lowest commit tier that still has a prepared branch owing its commit
    /// acknowledgement (phase two commits tier by tier); `None` once every one answered.
    pub fn lowest_open_tier(&self) -> Option<u32> {
        self.branches
            .iter()
            .filter(|b| b.state == BranchState::Prepared)
            .map(|b| b.spec.commit_order)
            .min()
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
    /// Its participant returned the id unused ([`Event::Release`](super::Event::Release)).
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
