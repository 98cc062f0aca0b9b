//! The conformance suite every [`DecisionLog`] implementation must pass.
//!
//! Each `check_*` function exercises one clause of the contract in the [module
//! docs](super) on a fresh, empty log and panics (with a message naming the clause) when
//! the implementation breaks it; [`run_all`] runs them all, each on a new log from a
//! factory. It is ordinary library code (no test-only dependencies), so the sled log, the
//! in-memory log and any future implementation run the very same checks:
//!
//! ```ignore
//! conformance::run_all(
//!     || Subject::new(MemoryLog::new(), |log: &MemoryLog| log.set_fail_syncs(true)),
//!     SuiteOptions { expect_group_commit: false, ..SuiteOptions::default() },
//! ).await;
//! ```
//!
//! Orders the contract leaves as "oldest first" are checked as: [`Recovered::commits`](super::Recovered::commits) in
//! LSN (decision) order, [`Recovered::undecided`](super::Recovered::undecided) and [`Recovered::one_phase`](super::Recovered::one_phase) in [`TxId`] order
//! (node, epoch, seq).
//! "Same branches" means equal branch lists, order included.
//!
//! `decisions` holds the checks of decisions, lazy records, fencing, group commit and
//! poisoning; `audits` those of the audit records of heuristic resolutions; `collection`
//! those of collecting finished records.

use std::any::Any;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;

use super::{AuditRecord, CommitRecord, DecisionLog, LogStats};
use crate::types::{BranchKind, BranchSpec, HeuristicDecision, TxId};

mod audits;
mod collection;
mod decisions;

pub use audits::{check_audit_poisoning, check_audits};
pub use collection::check_collection;
pub use decisions::{
    check_fencing, check_force_and_read, check_group_commit, check_lazy_records, check_one_phase,
    check_one_phase_intent, check_poisoning, check_recover_order, check_sync_poisoning,
    check_write_once,
};

/// A fresh log under test plus the hooks the suite needs.
pub struct Subject<L> {
    /// The log; empty, as just created.
    pub log: L,
    /// Fault injection: makes every later sync of `log` fail.
    pub break_syncs: Box<dyn Fn(&L) + Send + Sync>,
    /// Whatever must outlive the log, e.g. its temporary directory. Dropped after `log`.
    pub keep_alive: Box<dyn Any + Send>,
}

impl<L: DecisionLog> Subject<L> {
    /// A subject with nothing to keep alive.
    pub fn new(log: L, break_syncs: impl Fn(&L) + Send + Sync + 'static) -> Self {
        Subject {
            log,
            break_syncs: Box::new(break_syncs),
            keep_alive: Box::new(()),
        }
    }

    /// Keeps `guard` (e.g. a `tempfile::TempDir`) alive as long as the subject.
    pub fn keep_alive(mut self, guard: impl Any + Send) -> Self {
        self.keep_alive = Box::new(guard);
        self
    }

    /// Calls the fault-injection hook.
    pub fn break_syncs(&self) {
        (self.break_syncs)(&self.log)
    }
}

/// What to expect from the implementation under test.
#[derive(Clone, Copy, Debug)]
pub struct SuiteOptions {
    /// Whether concurrent `force_commit`s must share syncs (fewer syncs than decisions,
    /// some batch larger than one). `true` for a log with a writer thread; a log that
    /// syncs inside each call (like [`super::MemoryLog`]) sets `false`.
    pub expect_group_commit: bool,
    /// How many concurrent `force_commit`s the group-commit check issues. Default 64.
    pub concurrent_forces: usize,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            expect_group_commit: true,
            concurrent_forces: 64,
        }
    }
}

/// Runs every check, each on a fresh subject from `make`.
pub async fn run_all<L: DecisionLog>(mut make: impl FnMut() -> Subject<L>, opts: SuiteOptions) {
    // One row a check: a fresh subject `s` from `make`, the check on it, then `s` dropped.
    macro_rules! on_fresh {
        ($($s:ident => $check:expr;)*) => {$({
            let $s = make();
            $check.await;
            drop($s);
        })*};
    }
    on_fresh! {
        s => check_force_and_read(&s.log);
        s => check_write_once(&s.log);
        s => check_fencing(&s.log);
        s => check_lazy_records(&s.log);
        s => check_one_phase(&s.log);
        s => check_one_phase_intent(&s.log);
        s => check_sync_poisoning(&s.log, &|| s.break_syncs());
        s => check_recover_order(&s.log);
        s => check_group_commit(&s.log, opts);
        s => check_poisoning(&s.log, &|| s.break_syncs());
        s => check_audits(&s.log);
        s => check_audit_poisoning(&s.log, &|| s.break_syncs());
        s => check_collection(&s.log);
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A transaction id of `log`'s node and epoch.
pub fn tx_of<L: DecisionLog>(log: &L, seq: u64) -> TxId {
    TxId {
        node: log.node_id(),
        epoch: log.epoch(),
        seq,
    }
}

/// `n` distinct branches; `tag` makes lists of the same length differ.
pub fn branches(n: usize, tag: &str) -> Vec<BranchSpec> {
    (0..n)
        .map(|i| BranchSpec {
            branch_id: format!("{tag}-{i}"),
            endpoint: format!("http://127.0.0.1:{}", 7001 + i),
            commit_order: u32::try_from(i % 3).unwrap_or(0),
            kind: if i % 2 == 0 {
                BranchKind::Database
            } else {
                BranchKind::Broker
            },
        })
        .collect()
}

/// A COMMIT record.
pub fn commit(tx: TxId, branches: Vec<BranchSpec>, decided_at_ms: u64) -> CommitRecord {
    CommitRecord {
        tx,
        branches,
        decided_at_ms,
    }
}

/// Polls all futures together (in order, within one task) until all are ready: each
/// one's first poll happens before any of them is awaited a second time, so N
/// `force_commit`s are all queued at once.
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (fut, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// An audit record; `n` makes records of the same transaction differ.
pub fn audit(tx: TxId, decision: HeuristicDecision, n: u64) -> AuditRecord {
    AuditRecord {
        tx,
        decision,
        operator: format!("operator-{n}"),
        reason: format!("reason {n}: participant gone for good"),
        force: n % 2 == 1,
        at_ms: 1_700_000_000_000 + n,
        prior_state: "COMMITTING".into(),
        accepted: n % 3 != 2,
        contradicts: n % 2 == 1,
        branches: (0..n % 3).map(|i| format!("b-{i}")).collect(),
        detail: format!("detail {n}"),
    }
}

fn stats_delta(after: LogStats, before: LogStats) -> LogStats {
    LogStats {
        syncs: after.syncs - before.syncs,
        decisions: after.decisions - before.decisions,
        batches: after.batches - before.batches,
        max_batch: after.max_batch,
    }
}

fn assert_stats_sane(s: LogStats, clause: &str) {
    assert!(
        s.syncs >= s.batches,
        "{clause}: fewer syncs than batches: {s:?}"
    );
    assert!(
        s.batches <= s.decisions,
        "{clause}: more batches than decisions: {s:?}"
    );
    assert!(
        s.decisions == 0 || s.max_batch >= 1,
        "{clause}: decisions made but max_batch is 0: {s:?}"
    );
}
