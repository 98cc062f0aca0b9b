//! One-phase commit of a single-branch transaction: the intent's sync, the commit sent
//! once it is durable, the outcome written (and synced when a caller needs it durable),
//! and what a failed sync leaves in doubt.

use super::state::{AnswerWhen, Logged, SyncState};
use super::*;

impl Engine {
    /// The transaction `tx` whose outstanding [`Command::Sync`] just ended (now idle), and
    /// whether another was asked for meanwhile; `None` if there is no such sync
    /// (finished, or resolved meanwhile).
    pub(super) fn take_sync(&mut self, tx: TxId) -> Option<(&mut TxEntry, bool)> {
        let entry = self.txs.get_mut(&tx)?;
        let again = match entry.sync {
            SyncState::Idle => return None,
            SyncState::Pending => false,
            SyncState::PendingThenAgain => true,
        };
        entry.sync = SyncState::Idle;
        Some((entry, again))
    }

    /// A one-phase intent is durable (send the commit, if the client asked for it) or a
    /// one-phase outcome is (answer).
    pub(super) fn on_synced(&mut self, tx: TxId, lsn: Lsn, out: &mut Out) {
        let Some((entry, again)) = self.take_sync(tx) else {
            return;
        };
        let one_phase = entry.protocol.is_one_phase();
        match entry.state {
            TxState::Active => mark_intent_durable(entry, lsn),
            TxState::Preparing if entry.is_local() => {
                mark_intent_durable(entry, lsn);
                // A plain Commit that came before the intent was durable.
                if !entry.waiters.is_empty() {
                    send_one_phase_commit(tx, entry, out);
                }
            }
            TxState::Preparing if one_phase => {
                mark_intent_durable(entry, lsn);
                send_one_phase_commit(tx, entry, out);
            }
            TxState::Committing if one_phase && again => {
                // The intent's sync returned; the outcome written since needs one more.
                entry.sync = SyncState::Pending;
                out.push(Command::Sync { tx });
            }
            TxState::Committing if one_phase => self.finish_one_phase(tx, Some(lsn), out),
            // A second branch made it a two-phase commit meanwhile: the intent is moot.
            _ => {}
        }
    }

    /// Answers the callers of a one-phase commit whose outcome record is written (and
    /// durable at `durable_at`, where one of them needs that) and forgets the transaction.
    pub(super) fn finish_one_phase(&mut self, tx: TxId, durable_at: Option<Lsn>, out: &mut Out) {
        let Some(entry) = self.txs.remove(&tx) else {
            return;
        };
        reply_all(out, entry.waiters, Ok(ReplyOk::Committed), durable_at);
        reply_all(
            out,
            entry.abort_waiters,
            Err(committed_error(&tx)),
            durable_at,
        );
        out.push(Command::Finished {
            tx,
            outcome: Outcome::Committed,
        });
    }

    /// The branch of a one-phase commit has committed: write the outcome, then answer at
    /// once, or after its sync when a caller needs it durable (see [`AnswerWhen`]).
    pub(super) fn one_phase_committed(&mut self, tx: TxId, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        // Only the single branch of a one-phase commit decides by itself.
        assert!(
            entry.protocol.is_one_phase() && entry.branches.len() == 1,
            "one-phase outcome recorded for transaction {tx}: {entry:?}"
        );
        let Some(b) = entry.branches.first_mut() else {
            return;
        };
        b.state = BranchState::Committed;
        b.last_error = None;
        let specs = vec![b.spec.clone()];
        entry.state = TxState::Committing;
        out.note(Note::Decided {
            tx,
            outcome: Outcome::Committed,
            cause: None,
        });
        out.push(Command::LogLazy(LazyRecord::OnePhaseCommitted {
            tx,
            branches: specs,
        }));
        if entry.answer == AnswerWhen::Durable || !entry.abort_waiters.is_empty() {
            if entry.sync == SyncState::Idle {
                entry.sync = SyncState::Pending;
                out.push(Command::Sync { tx });
            } else {
                // The intent's sync (local transaction reported before it returned) does
                // not cover the outcome: another follows it.
                entry.sync = SyncState::PendingThenAgain;
            }
        } else {
            // The callers' participants keep their memory of the commit until a Barrier
            // shows this record durable; a restart before that asks them again.
            self.finish_one_phase(tx, None, out);
        }
    }

    /// A sync a one-phase commit waited for failed: the log is failed, and whether the
    /// record reached the disk only a restart can tell.
    pub(super) fn on_sync_failed(&mut self, tx: TxId, error: String, out: &mut Out) {
        self.halt(&error, out);
        let Some((entry, _)) = self.take_sync(tx) else {
            return;
        };
        // An intent synced in the background while ACTIVE: a Commit writes it again.
        if !entry.protocol.is_one_phase()
            || !matches!(entry.state, TxState::Preparing | TxState::Committing)
        {
            return;
        }
        mark_in_doubt(tx, entry, out);
    }
}

/// The intent's sync returned: it is durable at `lsn` (if the transaction still has one).
pub(super) fn mark_intent_durable(entry: &mut TxEntry, lsn: Lsn) {
    if let Logged::Intent { durable_at } = &mut entry.logged {
        *durable_at = Some(lsn);
    }
}

/// Sends the one-phase commit of the single branch once its intent is durable, unless an
/// abort is asking (a recovered or settling transaction) or one is already on its way.
pub(super) fn send_one_phase_commit(tx: TxId, entry: &mut TxEntry, out: &mut Out) {
    let Some(intent_lsn) = entry.may_send_one_phase_commit() else {
        return;
    };
    if let Some(b) = entry.branches.first_mut() {
        if b.state == BranchState::Preparing && !b.in_flight {
            let commit = Message::Commit { one_phase: true };
            send(out, tx, 0, b, commit, Some(intent_lsn));
        }
    }
}

/// A Commit of a transaction with a single branch: it commits in one phase. The commit
/// goes out once the intent is durable: now, or when its sync (started at enlist)
/// returns (`on_synced`).
pub(super) fn start_one_phase(tx: TxId, entry: &mut TxEntry, out: &mut Out) {
    entry.state = TxState::Preparing;
    entry.protocol = Protocol::OnePhase;
    let intent_durable_at = entry.intent_durable_at();
    let b = &mut entry.branches[0];
    b.state = BranchState::Preparing;
    b.abort_must_ack = true;
    if let Some(lsn) = intent_durable_at {
        send(
            out,
            tx,
            0,
            b,
            Message::Commit { one_phase: true },
            Some(lsn),
        );
    } else if entry.sync == SyncState::Idle {
        // Its first sync failed (the log is failed): try once more.
        entry.logged = Logged::Intent { durable_at: None };
        entry.sync = SyncState::Pending;
        out.push(Command::LogLazy(LazyRecord::OnePhase {
            tx,
            branch: b.spec.clone(),
        }));
        out.push(Command::Sync { tx });
    }
}
