//! The checks of audit records (heuristic resolutions): forced, LSN-numbered, fenced,
//! append-only and write-once, separate from decisions, and poisoned by a failed sync.

use super::{assert_stats_sane, audit, branches, commit, stats_delta, tx_of};
use crate::log::{DecisionLog, LazyRecord, LogError, Recovered, StoredDecision};
use crate::types::{HeuristicDecision, TxId};

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
