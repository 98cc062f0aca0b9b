//! The checks of decisions: forced and lazy records, write-once, fencing, one-phase
//! outcomes and intents, recovery order, group commit and what a failed sync poisons.

use super::{assert_stats_sane, branches, commit, join_all, stats_delta, tx_of, SuiteOptions};
use crate::log::{CommitRecord, DecisionLog, LazyRecord, LogError, Recovered, StoredDecision};
use crate::types::TxId;

/// Checks that `log` recovers exactly `want` (`why` says which rule that is).
#[track_caller]
fn recovers<L: DecisionLog>(log: &L, want: Recovered, why: &str) {
    assert_eq!(log.recover().expect("recover()"), want, "{why}");
}

/// Checks that `log` holds the decision `record` for `tx`, finished if `done` (`why`
/// says which rule that is).
#[track_caller]
fn holds_decision<L: DecisionLog>(log: &L, tx: &TxId, record: CommitRecord, done: bool, why: &str) {
    assert_eq!(
        log.decision(tx).expect("decision()"),
        Some(StoredDecision { record, done }),
        "{why}"
    );
}

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
        holds_decision(
            log,
            &rec.tx,
            rec.clone(),
            false,
            "decision() must return what was forced",
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
    holds_decision(
        log,
        &t,
        first,
        true,
        "repeats keep the first record and its done flag",
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
    recovers(
        log,
        Recovered::default(),
        "a fenced write leaves nothing to recover",
    );
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
    recovers(
        log,
        Recovered {
            undecided: vec![(t1, branches(2, "p1"))],
            ..Recovered::default()
        },
        "a Preparing record without a decision is undecided",
    );
    assert_eq!(
        log.decision(&t1).expect("decision()"),
        None,
        "Preparing is not a decision"
    );
    log.record_lazy(e, LazyRecord::Aborted { tx: t1 })
        .expect("lazy");
    recovers(log, Recovered::default(), "Aborted drops Preparing");
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
    recovers(
        log,
        Recovered {
            commits: vec![rec2.clone()],
            ..Recovered::default()
        },
        "a decided transaction is a commit to finish, not undecided",
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
    holds_decision(
        log,
        &t2,
        rec2.clone(),
        false,
        "lazy records must not change a COMMIT record",
    );
    recovers(
        log,
        Recovered {
            commits: vec![rec2.clone()],
            ..Recovered::default()
        },
        "lazy records must not change the commit to finish",
    );

    log.record_lazy(e, LazyRecord::Done { tx: t2 })
        .expect("lazy");
    holds_decision(
        log,
        &t2,
        rec2.clone(),
        true,
        "Done marks the decision finished and keeps it",
    );
    recovers(log, Recovered::default(), "done commits are finished");
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
    recovers(
        log,
        Recovered::default(),
        "a one-phase commit is neither unfinished nor undecided",
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
    holds_decision(
        log,
        &t2,
        rec2,
        false,
        "a one-phase outcome does not overwrite a forced decision",
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
    recovers(
        log,
        Recovered {
            one_phase: vec![(t1, b1.clone()), (t2, b2.clone()), (t3, b3.clone())],
            ..Recovered::default()
        },
        "one-phase intents without an outcome are in doubt, in TxId order",
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
    recovers(
        log,
        Recovered {
            one_phase: vec![(t3, b3.clone())],
            ..Recovered::default()
        },
        "the outcome or an abort ends the intent",
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
