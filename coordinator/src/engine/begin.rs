//! Begin, BeginLocal and Enlist: new transactions and their branches, and the
//! one-phase intent a transaction's first branch starts (synced in the background).

use super::state::{Logged, SyncState};
use super::*;

impl Engine {
    /// Begin (`count` 1, `local` false) and BeginLocal (`count` transactions at once):
    /// checks the request once, then begins each transaction and answers with their ids.
    pub(super) fn on_begin(
        &mut self,
        req: ReqId,
        timeout_ms: u64,
        branches: Vec<BranchSpec>,
        local: bool,
        count: u32,
        out: &mut Out,
    ) {
        if let Err(e) = self.check_begin(timeout_ms, &branches, local, count) {
            out.reply(req, Err(e));
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
        out.reply(req, Ok(reply));
    }

    /// Why a Begin cannot be honoured, if it cannot.
    pub(super) fn check_begin(
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
                "count is {count}; at most {MAX_LOCAL_BEGIN} local transactions per BeginLocal"
            )));
        }
        self.check_new_branches(&[], branches)?;
        if local && !self.cfg.one_phase {
            return Err(TxError::FailedPrecondition(
                "local commits need one-phase commits, which this coordinator has turned off \
                 (one_phase = false)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Begins one transaction of a checked Begin: a new id, its timeout, and (for one
    /// branch) its one-phase intent; a local one is in its participant's hands at once.
    pub(super) fn begin_one(
        &mut self,
        timeout_ms: u64,
        branches: &[BranchSpec],
        local: bool,
        out: &mut Out,
    ) -> TxId {
        let tx = TxId {
            node: self.node,
            epoch: self.epoch,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let protocol = if local {
            Protocol::Local { settling: None }
        } else {
            Protocol::TwoPhase
        };
        let mut entry = TxEntry::new(TxState::Active, protocol, self.now_ms, Vec::new());
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
            for b in &mut entry.branches {
                b.state = BranchState::Preparing;
                b.abort_must_ack = true;
            }
        }
        tx
    }

    /// Validates branches about to join a transaction that already has `existing`.
    pub(super) fn check_new_branches(
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

    pub(super) fn on_enlist(
        &mut self,
        tx: TxId,
        spec: BranchSpec,
        out: &mut Out,
    ) -> Result<ReplyOk, TxError> {
        let Some(entry) = self.txs.get(&tx) else {
            return Err(self.gone(&tx, "enlist in"));
        };
        if entry.state != TxState::Active {
            // A repeated enlist of a branch already in the transaction is still a success.
            if entry.branches.iter().any(|b| b.spec == spec) {
                return Ok(ReplyOk::Enlisted);
            }
            if entry.is_local() {
                return Err(TxError::FailedPrecondition(format!(
                    "transaction {tx} was begun with BeginLocal: its single branch commits \
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
    pub(super) fn start_intent(&mut self, tx: TxId, out: &mut Out) {
        if !self.cfg.one_phase {
            return;
        }
        let Some(entry) = self.txs.get_mut(&tx) else {
            return;
        };
        if entry.branches.len() != 1
            || entry.logged != Logged::Nothing
            || entry.sync != SyncState::Idle
        {
            return;
        }
        entry.logged = Logged::Intent { durable_at: None };
        entry.sync = SyncState::Pending;
        out.push(Command::LogLazy(LazyRecord::OnePhase {
            tx,
            branch: entry.branches[0].spec.clone(),
        }));
        out.push(Command::Sync { tx });
    }
}
