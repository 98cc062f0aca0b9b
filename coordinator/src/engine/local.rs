//! Local transactions (BeginLocal): the participant commits its single branch in
//! one phase by itself and reports it; an id may come back unused; an abort or a timeout
//! settles the branch by asking it with an abort.

use super::*;

impl Engine {
    /// A local transaction's id comes back unused: aborted like by its client (asking the
    /// branch), but only a local transaction's id can come back.
    pub(super) fn on_release(&mut self, req: ReqId, tx: TxId, out: &mut Out) {
        if let Some(entry) = self.txs.get(&tx).filter(|e| !e.is_local()) {
            let reply = Err(TxError::FailedPrecondition(format!(
                "transaction {tx} was not begun with BeginLocal (it is {}): only a local \
                 transaction's id can be given back with ReleaseUnused; abort it instead",
                entry.state.name()
            )));
            out.reply(req, reply);
            return;
        }
        let reason = "its id was returned unused by its participant".to_string();
        self.on_abort(req, tx, reason, SettleCause::Unused, out);
    }

    /// A local transaction is to be aborted (`why`): its participant may have committed
    /// by itself, so it is asked with an abort whose answer decides (as for a recovered
    /// intent).
    pub(super) fn settle_local(
        &mut self,
        tx: TxId,
        cause: SettleCause,
        why: String,
        out: &mut Out,
    ) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        let Protocol::Local { settling: None } = entry.protocol else {
            return; // already settling (or not local)
        };
        entry.protocol = Protocol::Local {
            settling: Some(cause),
        };
        entry.abort_reason = Some(why);
        if let Some(b) = entry.branches.first_mut() {
            if b.state == BranchState::Preparing && !b.in_flight {
                send(out, tx, 0, b, Message::Abort, None);
            }
        }
    }

    /// The participant of a local transaction (or of a recovered intent) reports that it
    /// committed the branch in one phase: the outcome is recorded as for a commit the
    /// coordinator sent, and the report answered once it is written.
    pub(super) fn on_committed_locally(&mut self, req: ReqId, tx: TxId, out: &mut Out) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            out.reply(req, self.not_live(&tx, "record the commit of"));
            return;
        };
        if !matches!(entry.protocol, Protocol::Local { .. } | Protocol::Recovered) {
            let reply = Err(TxError::FailedPrecondition(format!(
                "transaction {tx} was not begun with BeginLocal: the coordinator commits it \
                 (call Commit, not ReportLocalCommits)"
            )));
            out.reply(req, reply);
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
                out.reply(req, reply);
            }
            TxState::InDoubt => out.reply(req, Err(in_doubt_error(&tx))),
            TxState::Active | TxState::Deciding => {
                // Unreachable for a transaction with one branch in its participant's
                // hands; answered rather than trusted.
                let reply = Err(TxError::FailedPrecondition(format!(
                    "transaction {tx} is {}: its participant cannot have committed it",
                    entry.state.name()
                )));
                out.reply(req, reply);
            }
        }
    }
}
