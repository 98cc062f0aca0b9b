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
//! Orders the contract leaves as "oldest first" are checked as: [`Recovered::commits`] in
//! LSN (decision) order, [`Recovered::undecided`] and [`Recovered::one_phase`] in [`TxId`] order
//! (node, epoch, seq).
//! "Same branches" means equal branch lists, order included.

use std::any::Any;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;

use super::{
    AuditRecord, CommitRecord, DecisionLog, LazyRecord, LogError, LogStats, Recovered,
    StoredDecision,
};
use crate::types::{BranchKind, BranchSpec, HeuristicDecision, TxId};

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
    let s = make();
    check_force_and_read(&s.log).await;
    drop(s);
    let s = make();
    check_write_once(&s.log).await;
    drop(s);
    let s = make();
    check_fencing(&s.log).await;
    drop(s);
    let s = make();
    check_lazy_records(&s.log).await;
    drop(s);
    let s = make();
    check_one_phase(&s.log).await;
    drop(s);
    let s = make();
    check_one_phase_intent(&s.log).await;
    drop(s);
    let s = make();
    check_sync_poisoning(&s.log, &|| s.break_syncs()).await;
    drop(s);
    let s = make();
    check_recover_order(&s.log).await;
    drop(s);
    let s = make();
    check_group_commit(&s.log, opts).await;
    drop(s);
    let s = make();
    check_poisoning(&s.log, &|| s.break_syncs()).await;
    drop(s);
    let s = make();
    check_audits(&s.log).await;
    drop(s);
    let s = make();
    check_audit_poisoning(&s.log, &|| s.break_syncs()).await;
    drop(s);
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

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// Durable means synced; reads come from the log; LSNs grow; stats count it.
pub async fn check_force_and_read<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    assert!(e >= 1, "epochs start at 1, got {e}");
    assert!(!log.is_failed(), "a fresh log is not poisoned");
    let before = log.stats();
    assert_stats_sane(before, "fresh log");

    let mut last = 0;
    let mut records = Vec::new();
    for seq in 1..=5u64 {
        let rec = commit(tx_of(log, seq), branches(seq as usize, "fr"), 1_000 + seq);
        let lsn = log
            .force_commit(e, rec.clone())
            .await
            .expect("force_commit of a new decision");
        assert!(lsn >= 1, "LSNs start at 1, got {lsn}");
        assert!(lsn > last, "LSNs increase: {lsn} after {last}");
        assert!(
            log.durable_lsn() >= lsn,
            "durable_lsn {} < returned lsn {lsn}",
            log.durable_lsn()
        );
        last = lsn;
        records.push(rec);
    }
    for rec in &records {
        assert_eq!(
            log.decision(&rec.tx).expect("decision()"),
            Some(StoredDecision {
                record: rec.clone(),
                done: false
            }),
            "decision() must return what was forced"
        );
    }
    assert_eq!(log.decision(&tx_of(log, 999)).expect("decision()"), None);
    let other_node = TxId {
        node: log.node_id().wrapping_add(1),
        ..tx_of(log, 1)
    };
    assert_eq!(
        log.decision(&other_node).expect("decision()"),
        None,
        "keys include the node"
    );

    let d = stats_delta(log.stats(), before);
    assert_eq!(
        d.decisions, 5,
        "stats.decisions counts forced decisions: {d:?}"
    );
    assert!(d.syncs >= 1 && d.batches >= 1, "forcing must sync: {d:?}");
    assert_stats_sane(log.stats(), "after 5 forces");
    assert!(!log.is_failed());
}

/// Write-once decisions: same branches is idempotent, anything else is a conflict.
pub async fn check_write_once<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let t = tx_of(log, 1);
    let first = commit(t, branches(2, "wo"), 1_000);
    let lsn1 = log
        .force_commit(e, first.clone())
        .await
        .expect("first force");

    let again = commit(t, branches(2, "wo"), 2_000);
    let lsn2 = log
        .force_commit(e, again)
        .await
        .expect("same tx + same branches is idempotent");
    assert!(
        lsn2 >= lsn1,
        "idempotent repeat returns the same or a newer LSN: {lsn2} < {lsn1}"
    );
    assert!(log.durable_lsn() >= lsn2);

    for different in [branches(3, "wo"), branches(2, "other"), vec![]] {
        let err = log
            .force_commit(e, commit(t, different.clone(), 3_000))
            .await
            .expect_err("a different decision must be refused");
        assert!(
            matches!(err, LogError::Conflict { tx } if tx == t),
            "want Conflict, got {err:?}"
        );
    }
    assert_eq!(
        log.decision(&t)
            .expect("decision()")
            .map(|d| d.record.branches),
        Some(first.branches.clone()),
        "a refused decision must not change the stored one"
    );
    assert!(!log.is_failed(), "a conflict does not poison the log");

    // Concurrent duplicates and a concurrent conflicting decision for a new transaction.
    let t2 = tx_of(log, 2);
    let same = commit(t2, branches(1, "c"), 10);
    let diff = commit(t2, branches(2, "c"), 10);
    let results = join_all(vec![
        log.force_commit(e, same.clone()),
        log.force_commit(e, same.clone()),
        log.force_commit(e, diff),
    ])
    .await;
    assert!(
        results[0].is_ok() && results[1].is_ok(),
        "duplicates both succeed: {results:?}"
    );
    assert!(
        matches!(results[2], Err(LogError::Conflict { tx }) if tx == t2),
        "the later, different decision conflicts: {results:?}"
    );
    for lsn in results.iter().take(2).flatten() {
        assert!(log.durable_lsn() >= *lsn);
    }
    assert_eq!(
        log.decision(&t2)
            .expect("decision()")
            .map(|d| d.record.branches),
        Some(same.branches)
    );

    // Still write-once after the decision is done.
    log.record_lazy(e, LazyRecord::Done { tx: t })
        .expect("done");
    log.force_commit(e, commit(t, branches(2, "wo"), 5))
        .await
        .expect("idempotent after Done");
    assert!(
        matches!(
            log.force_commit(e, commit(t, vec![], 5)).await,
            Err(LogError::Conflict { .. })
        ),
        "conflict after Done"
    );
    assert_eq!(
        log.decision(&t).expect("decision()"),
        Some(StoredDecision {
            record: first,
            done: true
        }),
        "repeats keep the first record and its done flag"
    );
}

/// Fencing: writes with another epoch are refused and change nothing.
pub async fn check_fencing<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let before = log.stats();
    let t = tx_of(log, 1);
    for wrong in [e + 1, e - 1, u64::MAX] {
        let err = log
            .force_commit(wrong, commit(t, branches(1, "f"), 0))
            .await
            .expect_err("force_commit with a foreign epoch must be fenced");
        assert!(
            matches!(err, LogError::Fenced { caller, current } if caller == wrong && current == e),
            "want Fenced {{ caller: {wrong}, current: {e} }}, got {err:?}"
        );
        let lazy = [
            LazyRecord::Preparing {
                tx: t,
                branches: branches(1, "f"),
            },
            LazyRecord::Aborted { tx: t },
            LazyRecord::Done { tx: t },
            LazyRecord::OnePhaseCommitted {
                tx: t,
                branches: branches(1, "f"),
            },
            LazyRecord::OnePhase {
                tx: t,
                branch: branches(1, "f")[0].clone(),
            },
        ];
        for rec in lazy {
            let res = log.record_lazy(wrong, rec.clone());
            assert!(
                matches!(
                    res,
                    Err(LogError::Fenced { caller, current }) if caller == wrong && current == e
                ),
                "record_lazy({rec:?}) with epoch {wrong} must be fenced, got {res:?}"
            );
        }
    }
    assert_eq!(
        log.decision(&t).expect("decision()"),
        None,
        "a fenced write stores nothing"
    );
    assert_eq!(log.recover().expect("recover()"), Recovered::default());
    assert_eq!(log.stats().decisions, before.decisions);
    assert!(!log.is_failed(), "fencing does not poison the log");
    log.force_commit(e, commit(t, branches(1, "f"), 0))
        .await
        .expect("own epoch still works");
}

/// Lazy records: Preparing/Aborted/Done semantics; never touch a decision.
pub async fn check_lazy_records<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let (t1, t2, t3) = (tx_of(log, 1), tx_of(log, 2), tx_of(log, 3));

    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: t1,
            branches: branches(2, "p1"),
        },
    )
    .expect("lazy");
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered {
            commits: vec![],
            undecided: vec![(t1, branches(2, "p1"))],
            one_phase: vec![],
        },
        "a Preparing record without a decision is undecided"
    );
    assert_eq!(
        log.decision(&t1).expect("decision()"),
        None,
        "Preparing is not a decision"
    );
    log.record_lazy(e, LazyRecord::Aborted { tx: t1 })
        .expect("lazy");
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered::default(),
        "Aborted drops Preparing"
    );
    log.record_lazy(e, LazyRecord::Aborted { tx: t1 })
        .expect("Aborted twice is harmless");

    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: t2,
            branches: branches(2, "p2"),
        },
    )
    .expect("lazy");
    let rec2 = commit(t2, branches(2, "p2"), 42);
    log.force_commit(e, rec2.clone()).await.expect("force");
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered {
            commits: vec![rec2.clone()],
            undecided: vec![],
            one_phase: vec![],
        },
        "a decided transaction is a commit to finish, not undecided"
    );
    // Lazy records never delete or overwrite the decision.
    log.record_lazy(e, LazyRecord::Aborted { tx: t2 })
        .expect("lazy");
    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: t2,
            branches: branches(1, "x"),
        },
    )
    .expect("lazy");
    log.record_lazy(
        e,
        LazyRecord::OnePhaseCommitted {
            tx: t2,
            branches: branches(1, "x"),
        },
    )
    .expect("lazy");
    assert_eq!(
        log.decision(&t2).expect("decision()"),
        Some(StoredDecision {
            record: rec2.clone(),
            done: false
        }),
        "lazy records must not change a COMMIT record"
    );
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered {
            commits: vec![rec2.clone()],
            undecided: vec![],
            one_phase: vec![],
        }
    );

    log.record_lazy(e, LazyRecord::Done { tx: t2 })
        .expect("lazy");
    assert_eq!(
        log.decision(&t2).expect("decision()"),
        Some(StoredDecision {
            record: rec2.clone(),
            done: true
        }),
        "Done marks the decision finished and keeps it"
    );
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered::default(),
        "done commits are finished"
    );
    log.record_lazy(e, LazyRecord::Done { tx: t2 })
        .expect("Done twice is harmless");
    assert_eq!(
        log.decision(&t2).expect("decision()").map(|d| d.done),
        Some(true)
    );

    log.record_lazy(e, LazyRecord::Done { tx: t3 })
        .expect("Done without a decision is harmless");
    assert_eq!(
        log.decision(&t3).expect("decision()"),
        None,
        "Done creates no decision"
    );
    assert!(!log.is_failed());
}

/// One-phase records: a done COMMIT without a sync, never overwriting a decision.
pub async fn check_one_phase<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let (t1, t2) = (tx_of(log, 1), tx_of(log, 2));
    let before = log.stats();

    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: t1,
            branches: branches(1, "op"),
        },
    )
    .expect("lazy");
    log.record_lazy(
        e,
        LazyRecord::OnePhaseCommitted {
            tx: t1,
            branches: branches(1, "op"),
        },
    )
    .expect("lazy");
    let d = log
        .decision(&t1)
        .expect("decision()")
        .expect("a one-phase commit is a COMMIT decision");
    assert!(d.done, "a one-phase commit is already done");
    assert_eq!(d.record.tx, t1);
    assert_eq!(d.record.branches, branches(1, "op"));
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered::default(),
        "a one-phase commit is neither unfinished nor undecided"
    );
    assert_eq!(
        log.stats().decisions,
        before.decisions,
        "a one-phase record is not forced"
    );

    // Does not overwrite a forced decision.
    let rec2 = commit(t2, branches(2, "forced"), 9);
    log.force_commit(e, rec2.clone()).await.expect("force");
    log.record_lazy(
        e,
        LazyRecord::OnePhaseCommitted {
            tx: t2,
            branches: branches(1, "op"),
        },
    )
    .expect("lazy");
    assert_eq!(
        log.decision(&t2).expect("decision()"),
        Some(StoredDecision {
            record: rec2,
            done: false
        })
    );

    // Forcing the same decision later is idempotent (and makes it durable); a different
    // one conflicts.
    let lsn = log
        .force_commit(e, commit(t1, branches(1, "op"), 1))
        .await
        .expect("forcing a one-phase decision again is idempotent");
    assert!(
        lsn >= 1 && log.durable_lsn() >= lsn,
        "lsn {lsn}, durable {}",
        log.durable_lsn()
    );
    assert!(matches!(
        log.force_commit(e, commit(t1, branches(2, "op"), 1)).await,
        Err(LogError::Conflict { .. })
    ));
    let d = log
        .decision(&t1)
        .expect("decision()")
        .expect("still decided");
    assert_eq!(d.record.branches, branches(1, "op"));
}

/// One-phase intents: recovered as in doubt until the outcome (or an abort) replaces
/// them; `sync` is a sync, not a decision.
pub async fn check_one_phase_intent<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let (t1, t2, t3) = (tx_of(log, 1), tx_of(log, 2), tx_of(log, 3));
    let b1 = branches(1, "i1")[0].clone();
    let b2 = branches(1, "i2")[0].clone();
    let b3 = branches(1, "i3")[0].clone();
    for (t, b) in [(t1, &b1), (t2, &b2), (t3, &b3)] {
        log.record_lazy(
            e,
            LazyRecord::OnePhase {
                tx: t,
                branch: b.clone(),
            },
        )
        .expect("lazy");
    }
    let before = log.stats();
    log.sync(e).await.expect("sync");
    let after = log.stats();
    assert!(
        after.syncs > before.syncs,
        "sync() must sync (syncs {} -> {})",
        before.syncs,
        after.syncs
    );
    assert_eq!(
        (after.decisions, after.batches),
        (before.decisions, before.batches),
        "sync() is not a decision"
    );
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered {
            commits: vec![],
            undecided: vec![],
            one_phase: vec![(t1, b1.clone()), (t2, b2.clone()), (t3, b3.clone())],
        },
        "one-phase intents without an outcome are in doubt, in TxId order"
    );
    assert_eq!(
        log.decision(&t1).expect("decision()"),
        None,
        "an intent is not a decision"
    );
    log.record_lazy(
        e,
        LazyRecord::OnePhaseCommitted {
            tx: t1,
            branches: vec![b1.clone()],
        },
    )
    .expect("lazy");
    log.record_lazy(e, LazyRecord::Aborted { tx: t2 })
        .expect("lazy");
    log.sync(e).await.expect("sync");
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered {
            commits: vec![],
            undecided: vec![],
            one_phase: vec![(t3, b3.clone())],
        },
        "the outcome or an abort ends the intent"
    );
    assert_eq!(
        log.decision(&t1).expect("decision()").map(|d| d.done),
        Some(true),
        "the one-phase outcome answers COMMITTED"
    );
    let wrong = e + 1;
    let res = log.sync(wrong).await;
    assert!(
        matches!(res, Err(LogError::Fenced { caller, current }) if caller == wrong && current == e),
        "sync() with epoch {wrong} must be fenced, got {res:?}"
    );
    assert!(!log.is_failed());
}

/// A failed `sync` poisons the log like a failed forced write.
pub async fn check_sync_poisoning<L: DecisionLog>(log: &L, break_syncs: &dyn Fn()) {
    let e = log.epoch();
    let t = tx_of(log, 1);
    log.record_lazy(
        e,
        LazyRecord::OnePhase {
            tx: t,
            branch: branches(1, "sp")[0].clone(),
        },
    )
    .expect("lazy");
    break_syncs();
    let res = log.sync(e).await;
    assert!(
        matches!(res, Err(LogError::Failed(_))),
        "a failed sync must be an error, got {res:?}"
    );
    assert!(log.is_failed(), "a failed sync poisons the log");
    assert!(
        matches!(log.sync(e).await, Err(LogError::Failed(_))),
        "a poisoned log refuses later syncs"
    );
}

/// Recovery returns unfinished commits in LSN order and undecided ones in TxId order.
pub async fn check_recover_order<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let mut forced = Vec::new();
    for seq in [5u64, 3, 9, 4] {
        let rec = commit(tx_of(log, seq), branches(1, &format!("r{seq}")), seq);
        log.force_commit(e, rec.clone()).await.expect("force");
        forced.push(rec);
    }
    log.record_lazy(e, LazyRecord::Done { tx: tx_of(log, 9) })
        .expect("lazy");
    for seq in [8u64, 2, 7] {
        log.record_lazy(
            e,
            LazyRecord::Preparing {
                tx: tx_of(log, seq),
                branches: branches(2, "u"),
            },
        )
        .expect("lazy");
    }
    // Preparing for a decided transaction is not undecided.
    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: tx_of(log, 3),
            branches: branches(1, "r3"),
        },
    )
    .expect("lazy");
    // An older epoch sorts first.
    let old = TxId {
        node: log.node_id(),
        epoch: e - 1,
        seq: 100,
    };
    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: old,
            branches: branches(1, "old"),
        },
    )
    .expect("lazy");

    let rec = log.recover().expect("recover()");
    let want_commits: Vec<CommitRecord> = forced.into_iter().filter(|r| r.tx.seq != 9).collect();
    assert_eq!(
        rec.commits, want_commits,
        "unfinished commits, oldest decision first"
    );
    let undecided: Vec<TxId> = rec.undecided.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        undecided,
        vec![old, tx_of(log, 2), tx_of(log, 7), tx_of(log, 8)],
        "undecided transactions, oldest id first"
    );
    assert_eq!(
        rec.undecided[1].1,
        branches(2, "u"),
        "undecided entries carry their branches"
    );
}

/// Group commit: concurrent forces all succeed, are durable, and share syncs.
pub async fn check_group_commit<L: DecisionLog>(log: &L, opts: SuiteOptions) {
    let e = log.epoch();
    let n = opts.concurrent_forces.max(2);
    let before = log.stats();
    let futures: Vec<_> = (1..=n as u64)
        .map(|seq| log.force_commit(e, commit(tx_of(log, seq), branches(2, "g"), seq)))
        .collect();
    let lsns: Vec<u64> = join_all(futures)
        .await
        .into_iter()
        .map(|r| r.expect("concurrent force_commit"))
        .collect();
    let durable = log.durable_lsn();
    assert!(
        lsns.iter().all(|l| *l <= durable),
        "every returned LSN is durable ({durable}): {lsns:?}"
    );
    let mut distinct = lsns.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        n,
        "distinct decisions get distinct LSNs: {lsns:?}"
    );

    let after = log.stats();
    let d = stats_delta(after, before);
    assert_eq!(d.decisions, n as u64, "every decision counted: {d:?}");
    assert!(
        d.batches >= 1 && d.syncs >= d.batches,
        "at least one sync per batch: {d:?}"
    );
    assert_stats_sane(after, "group commit");
    if opts.expect_group_commit {
        assert!(
            d.syncs < n as u64,
            "{n} concurrent forces must share syncs, got {} syncs in {} batches",
            d.syncs,
            d.batches
        );
        assert!(
            after.max_batch >= 2,
            "some batch must hold more than one decision: {after:?}"
        );
    }
    for seq in 1..=n as u64 {
        assert!(log
            .decision(&tx_of(log, seq))
            .expect("decision()")
            .is_some());
    }
}

/// Fail-stop: after an injected sync failure nothing is reported durable and every
/// later write fails.
pub async fn check_poisoning<L: DecisionLog>(log: &L, break_syncs: &dyn Fn()) {
    let e = log.epoch();
    let good = commit(tx_of(log, 1), branches(1, "ok"), 1);
    let lsn = log
        .force_commit(e, good.clone())
        .await
        .expect("force before the failure");
    let durable = log.durable_lsn();
    let decisions = log.stats().decisions;

    break_syncs();
    let lost = commit(tx_of(log, 2), branches(1, "lost"), 2);
    let err = log
        .force_commit(e, lost.clone())
        .await
        .expect_err("a failed sync must fail the call");
    assert!(
        matches!(err, LogError::Failed(_)),
        "want Failed, got {err:?}"
    );
    assert!(log.is_failed(), "a failed sync poisons the log");
    assert_eq!(log.durable_lsn(), durable, "a failed sync advances nothing");
    assert_eq!(
        log.stats().decisions,
        decisions,
        "a failed decision is not counted"
    );

    let results = join_all(
        (3..=10u64)
            .map(|seq| log.force_commit(e, commit(tx_of(log, seq), branches(1, "x"), seq)))
            .collect(),
    )
    .await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(LogError::Failed(_)))),
        "every later force fails: {results:?}"
    );
    assert!(
        matches!(
            log.force_commit(e, good.clone()).await,
            Err(LogError::Failed(_))
        ),
        "even an idempotent repeat fails once poisoned"
    );
    for rec in [
        LazyRecord::Preparing {
            tx: tx_of(log, 11),
            branches: branches(1, "x"),
        },
        LazyRecord::Done { tx: good.tx },
        LazyRecord::Aborted { tx: lost.tx },
        LazyRecord::OnePhaseCommitted {
            tx: tx_of(log, 12),
            branches: branches(1, "x"),
        },
    ] {
        let res = log.record_lazy(e, rec.clone());
        assert!(
            matches!(res, Err(LogError::Failed(_))),
            "record_lazy({rec:?}) after poisoning: {res:?}"
        );
    }
    // Fail-stop beats fencing: a poisoned log says Failed whatever the epoch.
    assert!(matches!(
        log.force_commit(e + 1, commit(tx_of(log, 13), vec![], 0))
            .await,
        Err(LogError::Failed(_))
    ));
    let read = log.decision(&lost.tx);
    assert!(
        !matches!(read, Ok(Some(_))),
        "a decision whose sync failed must never be reported: {read:?}"
    );
    assert_eq!(log.durable_lsn(), durable);
    assert!(lsn <= durable);
}

/// Audit records: forced (durable, LSN-numbered, fenced), append-only and write-once,
/// separate from decisions.
pub async fn check_audits<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let (t1, t2) = (tx_of(log, 1), tx_of(log, 2));
    assert_eq!(
        log.audits(&t1).expect("audits()"),
        vec![],
        "no audit records yet"
    );
    let before = log.stats();

    let a1 = audit(t1, HeuristicDecision::Abort, 1);
    let lsn1 = log
        .force_audit(e, a1.clone())
        .await
        .expect("force_audit of a new record");
    assert!(lsn1 >= 1, "LSNs start at 1, got {lsn1}");
    assert!(
        log.durable_lsn() >= lsn1,
        "an audit record is durable when force_audit returns: durable {} < {lsn1}",
        log.durable_lsn()
    );
    assert_eq!(log.audits(&t1).expect("audits()"), vec![a1.clone()]);
    assert_eq!(
        log.decision(&t1).expect("decision()"),
        None,
        "an audit record is not a decision"
    );
    assert_eq!(
        log.recover().expect("recover()"),
        Recovered::default(),
        "audit records are not recovered as work"
    );

    // Interleaved with a decision: LSNs keep growing, both kinds are kept apart.
    let rec = commit(t1, branches(2, "au"), 5);
    let lsn_c = log.force_commit(e, rec.clone()).await.expect("force");
    assert!(lsn_c > lsn1, "one LSN sequence: {lsn_c} after {lsn1}");
    let a2 = audit(t1, HeuristicDecision::Commit, 2);
    let a3 = audit(t1, HeuristicDecision::Commit, 3);
    // The same content twice is two uses, two records.
    let lsn2 = log.force_audit(e, a2.clone()).await.expect("force_audit");
    let lsn3 = log.force_audit(e, a3.clone()).await.expect("force_audit");
    let lsn3b = log.force_audit(e, a3.clone()).await.expect("force_audit");
    assert!(
        lsn_c < lsn2 && lsn2 < lsn3 && lsn3 < lsn3b,
        "LSNs increase: {lsn_c} {lsn2} {lsn3} {lsn3b}"
    );
    let b1 = audit(t2, HeuristicDecision::Abort, 4);
    log.force_audit(e, b1.clone()).await.expect("force_audit");
    assert_eq!(
        log.audits(&t1).expect("audits()"),
        vec![a1.clone(), a2.clone(), a3.clone(), a3.clone()],
        "records of a transaction, oldest first, every use kept"
    );
    assert_eq!(log.audits(&t2).expect("audits()"), vec![b1.clone()]);
    assert_eq!(
        log.decision(&t1).expect("decision()"),
        Some(StoredDecision {
            record: rec.clone(),
            done: false
        }),
        "audit records do not touch the decision"
    );
    let other_node = TxId {
        node: log.node_id().wrapping_add(1),
        ..t1
    };
    assert_eq!(
        log.audits(&other_node).expect("audits()"),
        vec![],
        "keys include the node"
    );

    // Write-once: no lazy record or decision changes or removes them.
    for lazy in [
        LazyRecord::Done { tx: t1 },
        LazyRecord::Aborted { tx: t1 },
        LazyRecord::Preparing {
            tx: t2,
            branches: branches(1, "x"),
        },
        LazyRecord::Aborted { tx: t2 },
        LazyRecord::OnePhaseCommitted {
            tx: t2,
            branches: branches(1, "x"),
        },
    ] {
        log.record_lazy(e, lazy).expect("lazy");
    }
    log.force_commit(e, commit(t2, branches(1, "x"), 1))
        .await
        .expect("forcing the one-phase decision");
    assert_eq!(
        log.audits(&t1).expect("audits()"),
        vec![a1.clone(), a2, a3.clone(), a3],
        "audit records are write-once"
    );
    assert_eq!(log.audits(&t2).expect("audits()"), vec![b1]);
    assert_eq!(
        log.decision(&t1).expect("decision()").map(|d| d.done),
        Some(true)
    );

    // Not decisions in the stats; their syncs count.
    let d = stats_delta(log.stats(), before);
    assert_eq!(
        d.decisions, 2,
        "audit records are not counted as decisions: {d:?}"
    );
    assert!(
        d.syncs >= 3,
        "forcing an audit record syncs (5 audit forces, 2 decisions): {d:?}"
    );
    assert_stats_sane(log.stats(), "after audits");

    // Fencing: refused, nothing stored.
    let t3 = tx_of(log, 3);
    for wrong in [e + 1, e - 1] {
        let err = log
            .force_audit(wrong, audit(t3, HeuristicDecision::Abort, 9))
            .await
            .expect_err("force_audit with a foreign epoch must be fenced");
        assert!(
            matches!(err, LogError::Fenced { caller, current } if caller == wrong && current == e),
            "want Fenced, got {err:?}"
        );
    }
    assert_eq!(
        log.audits(&t3).expect("audits()"),
        vec![],
        "a fenced audit stores nothing"
    );
    assert!(!log.is_failed(), "fencing does not poison the log");
}

/// Fail-stop for audit records: a failed sync fails the call, poisons the log, and the
/// record is never reported.
pub async fn check_audit_poisoning<L: DecisionLog>(log: &L, break_syncs: &dyn Fn()) {
    let e = log.epoch();
    let t = tx_of(log, 1);
    let kept = audit(t, HeuristicDecision::Commit, 1);
    log.force_audit(e, kept.clone()).await.expect("force_audit");
    let durable = log.durable_lsn();

    break_syncs();
    let err = log
        .force_audit(e, audit(t, HeuristicDecision::Abort, 2))
        .await
        .expect_err("a failed sync must fail force_audit");
    assert!(
        matches!(err, LogError::Failed(_)),
        "want Failed, got {err:?}"
    );
    assert!(log.is_failed(), "a failed audit sync poisons the log");
    assert_eq!(log.durable_lsn(), durable, "a failed sync advances nothing");
    assert!(
        matches!(
            log.force_commit(e, commit(tx_of(log, 2), branches(1, "p"), 1))
                .await,
            Err(LogError::Failed(_))
        ),
        "every later write fails"
    );
    assert!(
        matches!(log.force_audit(e, kept).await, Err(LogError::Failed(_))),
        "every later audit fails"
    );
    let read = log.audits(&t);
    assert!(
        !matches!(&read, Ok(v) if v.len() > 1),
        "an audit record whose sync failed must never be reported: {read:?}"
    );
}
