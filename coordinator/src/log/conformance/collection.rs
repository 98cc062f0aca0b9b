//! The checks of collection: finished records of ids below the cut-off go, with the
//! low-water mark raised over them; nothing unfinished, above it or audited goes with
//! them.

use super::{audit, branches, commit, tx_of};
use crate::log::{Collected, DecisionLog, LazyRecord, Recovered};
use crate::types::{HeuristicDecision, TxId};

/// Collection deletes only finished records of ids below the cut-off, raises the
/// low-water mark over them (so their ids are forgotten, not unknown), keeps open COMMIT
/// records, preparing records, one-phase intents, records at or above the cut-off and
/// audit records, and stops at its limit.
pub async fn check_collection<L: DecisionLog>(log: &L) {
    let e = log.epoch();
    let old_done = [tx_of(log, 1), tx_of(log, 2), tx_of(log, 3)];
    let open = tx_of(log, 4);
    let young_done = tx_of(log, 5);
    let preparing = tx_of(log, 6);
    let intent = tx_of(log, 7);
    let one_phase = tx_of(log, 8);
    for tx in old_done {
        log.force_commit(e, commit(tx, branches(2, "co"), 1_000))
            .await
            .expect("force_commit");
        log.record_lazy(e, LazyRecord::Done { tx }).expect("Done");
    }
    log.force_commit(e, commit(open, branches(2, "co"), 1_000))
        .await
        .expect("force_commit");
    log.force_commit(e, commit(young_done, branches(2, "co"), 9_000))
        .await
        .expect("force_commit");
    log.record_lazy(e, LazyRecord::Done { tx: young_done })
        .expect("Done");
    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: preparing,
            branches: branches(2, "co"),
        },
    )
    .expect("Preparing");
    log.record_lazy(
        e,
        LazyRecord::OnePhase {
            tx: intent,
            branch: branches(1, "co")[0].clone(),
        },
    )
    .expect("OnePhase");
    log.record_lazy(
        e,
        LazyRecord::OnePhaseCommitted {
            tx: one_phase,
            branches: branches(1, "co"),
        },
    )
    .expect("OnePhaseCommitted");
    log.force_audit(e, audit(old_done[0], HeuristicDecision::Commit, 1))
        .await
        .expect("force_audit");
    log.sync(e).await.expect("sync");
    let recovered_before = log.recover().expect("recover");
    let kept = log.kept().expect("kept()");
    assert_eq!(
        (kept.records, kept.oldest_decided_at_ms),
        (6, Some(1_000)),
        "kept: three old finished, the open one, the young one and the one-phase outcome \
         (intents, preparing and audit records are not decision records)"
    );
    for tx in old_done {
        assert!(
            !log.collected(&tx).expect("collected()"),
            "nothing is forgotten before a collection"
        );
    }

    // The cut-off falls between the old records (and the open one) and the young one.
    // The limit stops the first call after two records.
    assert_eq!(
        log.collect(&young_done, 2).expect("collect"),
        Collected {
            records: 2,
            more: true
        },
        "a collection stops at its limit and says there is more"
    );
    assert_eq!(
        log.collect(&young_done, 100).expect("collect"),
        Collected {
            records: 1,
            more: false
        },
        "the rest of the old finished records"
    );
    assert_eq!(
        log.collect(&young_done, 100).expect("collect"),
        Collected::default(),
        "a second collection finds nothing more"
    );
    for tx in old_done {
        assert_eq!(
            log.decision(&tx).expect("decision()"),
            None,
            "a collected record is gone"
        );
        assert!(
            log.collected(&tx).expect("collected()"),
            "a collected id is forgotten, not unknown"
        );
    }
    assert_eq!(
        log.kept().expect("kept()").records,
        3,
        "collected records are no longer kept"
    );
    for tx in [open, young_done, one_phase] {
        assert!(
            log.decision(&tx).expect("decision()").is_some(),
            "{tx}: an open record, or one at or above the cut-off, is kept"
        );
    }
    assert_eq!(
        log.recover().expect("recover"),
        recovered_before,
        "collection never touches what recovery must finish"
    );
    assert_eq!(
        log.audits(&old_done[0]).expect("audits()").len(),
        1,
        "audit records are kept"
    );
    // Above the mark, of another epoch or another node: not forgotten (presumed abort
    // still answers for those without a record).
    for tx in [
        tx_of(log, 999),
        TxId {
            epoch: e + 1,
            ..old_done[0]
        },
        TxId {
            node: log.node_id().wrapping_add(1),
            ..old_done[0]
        },
    ] {
        assert!(
            !log.collected(&tx).expect("collected()"),
            "{tx} is not below a low-water mark of this log"
        );
    }

    // A later cut-off takes the rest of the finished ones, never the open one.
    let rest = log.collect(&tx_of(log, u64::MAX), 100).expect("collect");
    assert_eq!(
        rest.records, 2,
        "the young record and the one-phase outcome"
    );
    assert!(log.decision(&open).expect("decision()").is_some());
    let Recovered { commits, .. } = log.recover().expect("recover");
    assert_eq!(
        commits.iter().map(|c| c.tx).collect::<Vec<_>>(),
        vec![open],
        "the open COMMIT is still recovered"
    );
    assert!(log.collected(&young_done).expect("collected()"));
    assert!(
        log.collected(&open).expect("collected()"),
        "below the mark, but decision() finds it: ask decision() first"
    );
}
