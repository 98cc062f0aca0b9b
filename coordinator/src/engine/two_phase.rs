//! Two-phase commit with presumed abort: Commit and Abort requests, votes, the forced
//! COMMIT decision, phase two tier by tier, aborts, and the timers that drive them. The
//! one-phase and local paths branch off from here to their own modules.

use super::one_phase::{send_one_phase_commit, start_one_phase};
use super::state::Logged;
use super::*;

impl Engine {
    pub(super) fn on_commit(
        &mut self,
        req: ReqId,
        tx: TxId,
        answer_before_durable: bool,
        out: &mut Out,
    ) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            out.reply(req, self.not_live(&tx, "commit"));
            return;
        };
        if !answer_before_durable {
            entry.answer = AnswerWhen::Durable;
        }
        match entry.state {
            TxState::Active => {}
            TxState::Preparing if entry.is_local() => {
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
            TxState::Committing if entry.protocol.is_one_phase() => {
                // Committed by its branch; answered once the outcome is durable.
                entry.waiters.push(req);
                return;
            }
            TxState::Committing => {
                out.reply_once_durable(req, Ok(ReplyOk::Committed), entry.decision_lsn);
                return;
            }
            TxState::Aborting => {
                let reply = Err(TxError::Aborted(abort_message(&tx, entry)));
                out.reply(req, reply);
                return;
            }
            TxState::InDoubt => {
                out.reply(req, Err(in_doubt_error(&tx)));
                return;
            }
        }
        entry.waiters.push(req);
        out.note(Note::CommitRequested { tx });
        match entry.branches.len() {
            0 => {
                // Nothing to commit anywhere.
                out.note(Note::Decided {
                    tx,
                    outcome: Outcome::Committed,
                    cause: None,
                });
                let waiters = std::mem::take(&mut entry.waiters);
                // Nothing was written: nothing to wait for.
                reply_all(out, waiters, Ok(ReplyOk::Committed), None);
                self.txs.remove(&tx);
                out.push(Command::Finished {
                    tx,
                    outcome: Outcome::Committed,
                });
            }
            1 if self.cfg.one_phase => start_one_phase(tx, entry, out),
            _ => start_prepare(&self.cfg, tx, entry, out),
        }
    }

    pub(super) fn on_abort(
        &mut self,
        req: ReqId,
        tx: TxId,
        reason: String,
        cause: SettleCause,
        out: &mut Out,
    ) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            out.reply(req, self.not_live(&tx, "abort"));
            return;
        };
        let why = match cause {
            SettleCause::Unused => reason,
            _ if reason.is_empty() => "aborted by the client".to_string(),
            _ => format!("aborted by the client: {reason}"),
        };
        match entry.state {
            TxState::Preparing if entry.is_local() => {
                // The participant may have committed by itself: ask it with an abort.
                entry.abort_waiters.push(req);
                self.settle_local(tx, cause, why, out);
            }
            TxState::Preparing if entry.protocol.is_one_phase() => {
                // A one-phase commit is in the participant's hands; its answer decides.
                entry.abort_waiters.push(req);
            }
            TxState::Active | TxState::Preparing => {
                self.decide_abort(tx, why, cause.into(), out);
                out.reply(req, Ok(ReplyOk::Aborted));
            }
            TxState::Aborting => out.reply(req, Ok(ReplyOk::Aborted)),
            TxState::Deciding => {
                // The COMMIT is being written but is not durable yet: a crash now would
                // make it an abort. Answer once the log has spoken.
                entry.abort_waiters.push(req);
            }
            TxState::Committing if entry.protocol.is_one_phase() => entry.abort_waiters.push(req),
            TxState::Committing => {
                out.reply_once_durable(req, Err(committed_error(&tx)), entry.decision_lsn)
            }
            TxState::InDoubt => out.reply(req, Err(in_doubt_error(&tx))),
        }
    }

    pub(super) fn on_vote(&mut self, tx: TxId, i: usize, vote: RpcResult<Vote>, out: &mut Out) {
        let ignored = Note::Ignored {
            answer: Answer::Vote,
        };
        let Some(entry) = self.txs.get_mut(&tx) else {
            return out.note(ignored);
        };
        let Some(b) = entry.branches.get_mut(i) else {
            return out.note(ignored);
        };
        if b.state != BranchState::Preparing || entry.state == TxState::Active {
            return out.note(ignored); // late or duplicate
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
                self.decide_abort(tx, why, AbortCause::VoteNo, out);
                return;
            }
            Err(e) => {
                // Unknown whether it prepared: it stays Preparing so the abort is retried.
                b.last_error = Some(e.clone());
                let why = format!("prepare of branch {} failed: {e}", b.spec.branch_id);
                self.decide_abort(tx, why, AbortCause::VoteNo, out);
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
        self.decide_on_votes(tx, out);
    }

    /// Every vote of `tx` is in and none is no: COMMIT is forced (or, with only read-only
    /// branches, nothing is left to commit).
    fn decide_on_votes(&mut self, tx: TxId, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let yes: Vec<BranchSpec> = entry
            .branches
            .iter()
            .filter(|b| b.state == BranchState::Prepared)
            .map(|b| b.spec.clone())
            .collect();
        if yes.is_empty() {
            // All read-only: nothing to commit, nothing to log.
            out.note(Note::Decided {
                tx,
                outcome: Outcome::Committed,
                cause: None,
            });
            let waiters = std::mem::take(&mut entry.waiters);
            let logged = entry.logged != Logged::Nothing;
            reply_all(out, waiters, Ok(ReplyOk::Committed), None);
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
        // COMMIT only with every vote in, none of them no, under two-phase commit.
        assert!(
            entry.state == TxState::Preparing
                && !entry.protocol.is_one_phase()
                && entry
                    .branches
                    .iter()
                    .all(|b| matches!(b.state, BranchState::Prepared | BranchState::ReadOnly)),
            "COMMIT about to be forced for transaction {tx} without every yes vote: {entry:?}"
        );
        entry.state = TxState::Deciding;
        out.push(Command::ForceCommit(CommitRecord {
            tx,
            branches: yes,
            decided_at_ms: 0,
        }));
    }

    pub(super) fn on_durable(&mut self, tx: TxId, lsn: Lsn, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.state != TxState::Deciding {
            return;
        }
        entry.state = TxState::Committing;
        entry.decision_lsn = Some(lsn);
        out.note(Note::Decided {
            tx,
            outcome: Outcome::Committed,
            cause: None,
        });
        out.note(Note::CommitDurable { tx });
        let waiters = std::mem::take(&mut entry.waiters);
        reply_all(out, waiters, Ok(ReplyOk::Committed), Some(lsn));
        let abort_waiters = std::mem::take(&mut entry.abort_waiters);
        reply_all(out, abort_waiters, Err(committed_error(&tx)), Some(lsn));
        self.drive_commit(tx, out);
    }

    pub(super) fn on_log_failed(&mut self, tx: TxId, error: String, out: &mut Out) {
        self.halt(&error, out);
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.state != TxState::Deciding {
            return;
        }
        // The record may or may not be on disk: only a restart can tell. Never guess.
        mark_in_doubt(tx, entry, out);
    }

    /// Sends phase-two commits to the lowest tier that still has unacknowledged branches;
    /// finishes the transaction when none are left.
    pub(super) fn drive_commit(&mut self, tx: TxId, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        // Phase two only of a durable COMMIT (a recovered one was read back from the log).
        assert!(
            entry.state == TxState::Committing,
            "phase two driven for transaction {tx} in state {}",
            entry.state.name()
        );
        let lsn = entry.decision_lsn;
        let tier = entry.lowest_open_tier();
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

    pub(super) fn on_commit_ack(
        &mut self,
        tx: TxId,
        i: usize,
        ack: RpcResult<CommitAck>,
        out: &mut Out,
    ) {
        let ignored = Note::Ignored {
            answer: Answer::Commit,
        };
        let Some(entry) = self.txs.get_mut(&tx) else {
            return out.note(ignored);
        };
        let one_phase = entry.protocol.is_one_phase();
        let Some(b) = entry.branches.get_mut(i) else {
            return out.note(ignored);
        };
        if !b.in_flight {
            return out.note(ignored); // duplicate
        }
        b.in_flight = false;
        if one_phase {
            if entry.state != TxState::Preparing {
                return out.note(ignored);
            }
            match ack {
                Ok(CommitAck::Committed) => self.one_phase_committed(tx, out),
                Ok(CommitAck::Refused(reason)) => {
                    b.state = BranchState::Aborted;
                    b.last_error = Some(reason.clone());
                    let why = format!("branch {} refused to commit: {reason}", b.spec.branch_id);
                    self.decide_abort(tx, why, AbortCause::VoteNo, out);
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
            return out.note(ignored);
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

    pub(super) fn on_abort_ack(
        &mut self,
        tx: TxId,
        i: usize,
        ack: RpcResult<AbortAck>,
        out: &mut Out,
    ) {
        let ignored = Note::Ignored {
            answer: Answer::Abort,
        };
        let Some(entry) = self.txs.get_mut(&tx) else {
            return out.note(ignored);
        };
        let settling = entry.protocol.settles_by_abort() && entry.state == TxState::Preparing;
        let Some(b) = entry.branches.get_mut(i) else {
            return out.note(ignored);
        };
        if !b.in_flight || !(settling || entry.state == TxState::Aborting) {
            return out.note(ignored);
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
                    let cause = match entry.protocol {
                        Protocol::Local {
                            settling: Some(cause),
                        } => cause.into(),
                        _ => AbortCause::Other,
                    };
                    self.decide_abort(tx, why, cause, out);
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

    pub(super) fn on_timer(&mut self, tx: TxId, timer: Timer, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        match timer {
            Timer::TxTimeout => {
                if entry.state == TxState::Active {
                    let why = "transaction timed out while active".into();
                    self.decide_abort(tx, why, AbortCause::TxTimeout, out);
                } else if entry.state == TxState::Preparing && entry.is_local() {
                    let why = "transaction timed out before its participant reported the commit";
                    self.settle_local(tx, SettleCause::Timeout, why.into(), out);
                }
            }
            Timer::PrepareTimeout => {
                if entry.state == TxState::Preparing && !entry.protocol.is_one_phase() {
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
                    self.decide_abort(tx, why, AbortCause::PrepareTimeout, out);
                }
            }
            Timer::Retry { branch } => {
                let lsn = entry.decision_lsn;
                let state = entry.state;
                // A one-phase commit goes again only with its intent durable (stamped with
                // the intent's LSN); a recovered or settling one is settled by an Abort.
                let settling = entry.protocol.settles_by_abort();
                let intent_lsn = entry
                    .may_send_one_phase_commit()
                    .filter(|_| entry.protocol.is_one_phase() && entry.sync == SyncState::Idle);
                let Some(b) = entry.branches.get_mut(branch) else {
                    return;
                };
                if b.in_flight {
                    return;
                }
                let message = match state {
                    TxState::Committing if b.state == BranchState::Prepared => {
                        Message::Commit { one_phase: false }
                    }
                    TxState::Preparing
                        if intent_lsn.is_some() && b.state == BranchState::Preparing =>
                    {
                        Message::Commit { one_phase: true }
                    }
                    TxState::Preparing if settling && b.state == BranchState::Preparing => {
                        Message::Abort
                    }
                    TxState::Aborting
                        if matches!(b.state, BranchState::Preparing | BranchState::Prepared) =>
                    {
                        Message::Abort
                    }
                    _ => return,
                };
                // A commit depends on the log: on the COMMIT decision, or on the intent.
                let requires = match message {
                    Message::Commit { one_phase: false } => lsn,
                    Message::Commit { one_phase: true } => intent_lsn,
                    Message::Prepare | Message::Abort => None,
                };
                send(out, tx, branch, b, message, requires);
                out.note(Note::Resent { message });
            }
        }
    }

    /// Decides ABORT (no log write: presumed abort) and sends aborts.
    pub(super) fn decide_abort(&mut self, tx: TxId, why: String, cause: AbortCause, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        // Only an undecided transaction can be aborted; kept in release builds: a broken
        // invariant stops the coordinator rather than let it decide twice.
        assert!(
            matches!(entry.state, TxState::Active | TxState::Preparing),
            "ABORT decided for transaction {tx} in state {}",
            entry.state.name()
        );
        entry.state = TxState::Aborting;
        entry.abort_reason = Some(why);
        out.note(Note::Decided {
            tx,
            outcome: Outcome::Aborted,
            cause: Some(cause),
        });
        let msg = abort_message(&tx, entry);
        let waiters = std::mem::take(&mut entry.waiters);
        reply_all(out, waiters, Err(TxError::Aborted(msg)), None);
        let abort_waiters = std::mem::take(&mut entry.abort_waiters);
        reply_all(out, abort_waiters, Ok(ReplyOk::Aborted), None);
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

    pub(super) fn finish_abort_if_done(&mut self, tx: TxId, out: &mut Out) {
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
        let logged = entry.logged != Logged::Nothing;
        self.txs.remove(&tx);
        if logged {
            out.push(Command::LogLazy(LazyRecord::Aborted { tx }));
        }
        out.push(Command::Finished {
            tx,
            outcome: Outcome::Aborted,
        });
    }
}

/// Phase one of a Commit with two or more branches: the PREPARING record (lazy) and a
/// prepare to every branch at once, bounded by the prepare timeout.
fn start_prepare(cfg: &EngineConfig, tx: TxId, entry: &mut TxEntry, out: &mut Out) {
    entry.state = TxState::Preparing;
    entry.logged = Logged::Preparing;
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
        after_ms: cfg.prepare_timeout_ms,
    });
}
