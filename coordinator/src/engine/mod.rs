//! The protocol engine: two-phase commit with presumed abort, as a pure state machine.
//!
//! [`Engine::handle`] takes one [`Event`] (an RPC arrived, a participant answered, a timer
//! fired, the log made a decision durable, recovery found records) and returns the
//! [`Command`]s the runtime must carry out (write to the log, send to a participant, reply
//! to a caller, arm a timer, notify waiters). It never awaits, never reads a clock (time
//! comes in with the event) and never draws random numbers, so it can be unit-tested
//! command by command, simulated, and model-checked.
//!
//! # Layout
//! One module per concern, each an `impl Engine` block of the handlers it owns:
//! `messages` (events in, commands out) and `state` (what is held of a transaction;
//! its [`Protocol`] says which path commits it) are the data; `begin` (Begin, BeginLocal,
//! Enlist, the one-phase intent), `two_phase` (Commit, Abort, votes, the decision, phase
//! two, timers), `one_phase` (the intent's sync, the one-phase commit and its outcome),
//! `local` (transactions begun with BeginLocal), `recover` (start-up) and `resolve` (operator
//! resolutions) are the handlers. [`Engine::handle`] dispatches.
//!
//! # Ordering is data
//! A commit may only be sent once the record behind it is durable: the COMMIT decision
//! for a phase-two commit, the one-phase intent for a one-phase commit. A caller may only
//! hear COMMITTED once the decision (or the one-phase outcome) is, unless it asked to be
//! answered before that (`answer_before_durable`); an operator only hears of a resolution once its audit record is. The
//! engine emits such commands only after the log said so ([`Event::LogDurable`],
//! [`Event::Synced`], [`Event::AuditDurable`], each with the LSN it reached) and stamps each
//! with that LSN ([`Command::Send::requires_durable`], [`Command::Reply::requires_durable`]);
//! the runtime checks the stamp against the log's durable LSN in one place and stops the
//! process if it is not, rather than guess.
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
//! before a caller hears "committed", unless every caller asked to be answered before
//! ([`Event::Commit::answer_before_durable`]): such a caller promises that its participant keeps what
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

mod begin;
mod local;
mod messages;
mod one_phase;
mod recover;
mod resolve;
mod state;
mod two_phase;

pub use messages::*;
pub use state::*;

use std::collections::{BTreeMap, HashMap};

use crate::log::{AuditRecord, CommitRecord, LazyRecord, Lsn, Recovered};
use crate::types::{BranchSpec, HeuristicDecision, TxId};
use resolve::PendingResolution;

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

impl EngineConfig {
    /// The defaults, also those of `twopc serve`'s settings
    /// ([`crate::config::ServeConfig`] takes them from here).
    pub const DEFAULT: EngineConfig = EngineConfig {
        prepare_timeout_ms: 10_000,
        tx_timeout_ms: 60_000,
        max_tx_timeout_ms: 24 * 3600 * 1000,
        max_branches: 64,
        retry_initial_ms: 50,
        retry_max_ms: 5_000,
        one_phase: true,
    };
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::DEFAULT
    }
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

/// What handling one event produced: the commands to carry out, in order, and notes of
/// what happened.
#[derive(Debug, Default)]
struct Out {
    cmds: Vec<Command>,
    notes: Vec<Note>,
}

impl Out {
    fn push(&mut self, cmd: Command) {
        self.cmds.push(cmd);
    }

    fn note(&mut self, note: Note) {
        self.notes.push(note);
    }

    /// Answers `req` with something that needs nothing durable (an id, an error, an
    /// abort: presumed abort needs no record).
    fn reply(&mut self, req: ReqId, reply: Result<ReplyOk, TxError>) {
        self.reply_once_durable(req, reply, None);
    }

    /// Answers `req` once the log is durable up to `requires_durable`: the answer reports
    /// a record (a COMMIT, a one-phase outcome, an audit record) the runtime must not
    /// answer for before the log backs it.
    fn reply_once_durable(
        &mut self,
        req: ReqId,
        reply: Result<ReplyOk, TxError>,
        requires_durable: Option<Lsn>,
    ) {
        self.cmds.push(Command::Reply {
            req,
            reply,
            requires_durable,
        });
    }
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

    /// The lowest id this engine may still change: its oldest transaction held in memory,
    /// else the next id it will issue. Every id of this node below it is finished for
    /// good (the collector's horizon, sampled over time).
    pub fn lowest_open(&self) -> TxId {
        self.txs.keys().next().copied().unwrap_or(TxId {
            node: self.node,
            epoch: self.epoch,
            seq: self.next_seq,
        })
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
        self.handle_noted(now_ms, event).0
    }

    /// [`Engine::handle`], and what happened as [`Note`]s (decisions with their cause,
    /// answers ignored as late or duplicate, re-sends, phase boundaries): the metrics
    /// count these instead of re-deriving them from the engine's state.
    pub fn handle_noted(&mut self, now_ms: u64, event: Event) -> (Vec<Command>, Vec<Note>) {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Out::default();
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
                out.reply(req, reply);
            }
            Event::Commit {
                req,
                tx,
                answer_before_durable,
            } => self.on_commit(req, tx, answer_before_durable, &mut out),
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
            Event::Synced { tx, lsn } => self.on_synced(tx, lsn, &mut out),
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
        for cmd in &out.cmds {
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
        (out.cmds, out.notes)
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

    /// The decision log failed: no new work from now on (once).
    fn halt(&mut self, error: &str, out: &mut Out) {
        if self.halted.is_none() {
            let reason = format!("decision log failed: {error}");
            self.halted = Some(reason.clone());
            out.push(Command::Halt { reason });
        }
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

fn send(
    out: &mut Out,
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
    out: &mut Out,
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

fn send_abort_if_idle(out: &mut Out, tx: TxId, i: usize, b: &mut BranchEntry) {
    if !b.in_flight {
        send(out, tx, i, b, Message::Abort, None);
    }
}

/// The log failed while recording `tx`'s outcome: whether the record reached the disk
/// only a restart can tell, so the transaction is in doubt and every caller waiting on it
/// is told so. Never a guess.
fn mark_in_doubt(tx: TxId, entry: &mut TxEntry, out: &mut Out) {
    entry.state = TxState::InDoubt;
    out.note(Note::InDoubt { tx });
    let mut waiters = std::mem::take(&mut entry.waiters);
    waiters.append(&mut entry.abort_waiters);
    reply_all(out, waiters, Err(in_doubt_error(&tx)), None);
}

/// Answers every one of `reqs` with `reply`, once the log is durable up to
/// `requires_durable` (see [`Out::reply_once_durable`]).
fn reply_all(
    out: &mut Out,
    reqs: Vec<ReqId>,
    reply: Result<ReplyOk, TxError>,
    requires_durable: Option<Lsn>,
) {
    for req in reqs {
        out.reply_once_durable(req, reply.clone(), requires_durable);
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
mod tests;
