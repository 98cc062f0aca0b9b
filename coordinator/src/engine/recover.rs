//! Start-up: what the decision log says must be finished. COMMIT records are re-driven,
//! undecided transactions aborted, one-phase intents settled by asking their branch.

use super::state::Logged;
use super::*;

impl Engine {
    pub(super) fn on_recovered(&mut self, rec: Recovered, out: &mut Out) {
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
            entry.logged = Logged::Preparing;
            entry.abort_reason = Some("coordinator restarted before deciding".into());
            // Presumed abort, decided now.
            out.note(Note::Decided {
                tx,
                outcome: Outcome::Aborted,
                cause: Some(AbortCause::Recovery),
            });
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
            entry.protocol = Protocol::Recovered;
            entry.logged = Logged::Intent {
                durable_at: Some(0),
            };
            if let Some(b) = entry.branches.first_mut() {
                b.state = BranchState::Preparing;
                b.abort_must_ack = true;
                send(out, tx, 0, b, Message::Abort, None);
            }
            self.txs.insert(tx, entry);
        }
    }
}

fn recovered_entry(now_ms: u64, branches: Vec<BranchSpec>, state: TxState) -> TxEntry {
    let branches = branches.into_iter().map(new_branch).collect();
    TxEntry::new(state, Protocol::TwoPhase, now_ms, branches)
}
