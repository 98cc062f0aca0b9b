//! Begin, Enlist and the trivial commit of an empty transaction.

use super::*;

#[test]
fn begin_issues_sequential_ids_of_this_epoch() {
    let mut e = engine();
    assert_eq!(begin(&mut e, &[]), tx(1));
    assert_eq!(begin(&mut e, &[]), tx(2));
    assert_eq!(e.provenance(&tx(2)), Provenance::Live);
    assert_eq!(e.provenance(&tx(3)), Provenance::Unknown);
    assert_eq!(
        e.provenance(&TxId {
            node: NODE,
            epoch: 2,
            seq: 9
        }),
        Provenance::EarlierEpoch
    );
    assert_eq!(
        e.provenance(&TxId {
            node: 1,
            epoch: EPOCH,
            seq: 1
        }),
        Provenance::Unknown
    );
    assert_eq!(
        e.provenance(&TxId {
            node: NODE,
            epoch: 4,
            seq: 1
        }),
        Provenance::Unknown
    );
}

#[test]
fn enlist_validates_and_is_idempotent() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin(&mut e, &[]);
    let enlist = |e: &mut Engine, b: BranchSpec| {
        e.handle(
            1,
            Event::Enlist {
                req: 7,
                tx: t,
                branch: b,
            },
        )
    };
    assert_eq!(
        enlist(&mut e, a.clone()),
        [intent_written(t, &a), vec![reply(7, Ok(ReplyOk::Enlisted))]].concat()
    );
    assert_eq!(
        enlist(&mut e, a.clone()),
        vec![reply(7, Ok(ReplyOk::Enlisted))],
        "a repeated enlist writes no second intent"
    );
    // Refused, one row per case: (the branch, whether it is a conflict rather than an
    // invalid argument).
    let other = BranchSpec {
        commit_order: 3,
        ..a.clone()
    };
    let bad_id = BranchSpec {
        branch_id: "no spaces".into(),
        ..a.clone()
    };
    let bad_ep = BranchSpec {
        branch_id: "x".into(),
        endpoint: "localhost".into(),
        ..a.clone()
    };
    for (branch, conflict) in [(other, true), (bad_id, false), (bad_ep, false)] {
        let cmds = enlist(&mut e, branch);
        match &cmds[0] {
            Command::Reply {
                reply: Err(TxError::AlreadyExists(_)),
                ..
            } if conflict => {}
            Command::Reply {
                reply: Err(TxError::InvalidArgument(_)),
                ..
            } if !conflict => {}
            other => panic!("expected a refusal (conflict: {conflict}), got {other:?}"),
        }
    }
    for i in 0..3 {
        assert_eq!(
            enlist(&mut e, spec(&format!("b{i}"), 0)),
            vec![reply(7, Ok(ReplyOk::Enlisted))]
        );
    }
    assert_eq!(
        enlist(&mut e, spec("b9", 0)),
        vec![reply(
            7,
            Err(TxError::InvalidArgument(
                "a transaction may have at most 4 branches (--max-branches)".into()
            ))
        )]
    );
    assert_eq!(e.tx(&t).map(|x| x.branches.len()), Some(4));
    // Too many or duplicate-conflicting branches in Begin are refused as a whole.
    let five: Vec<_> = (0..5).map(|i| spec(&format!("c{i}"), 0)).collect();
    assert!(matches!(
        e.handle(
            1,
            Event::Begin {
                req: 8,
                timeout_ms: 0,
                branches: five
            }
        )
        .as_slice(),
        [Command::Reply {
            reply: Err(TxError::InvalidArgument(_)),
            ..
        }]
    ));
    let clash = vec![
        a.clone(),
        BranchSpec {
            commit_order: 9,
            ..a.clone()
        },
    ];
    assert!(matches!(
        e.handle(
            1,
            Event::Begin {
                req: 8,
                timeout_ms: 0,
                branches: clash
            }
        )
        .as_slice(),
        [Command::Reply {
            reply: Err(TxError::AlreadyExists(_)),
            ..
        }]
    ));
    // Not active any more.
    e.handle(2, commit_ev(9, t));
    let late = enlist(&mut e, spec("late", 0));
    assert_eq!(
        late,
        vec![reply(
            7,
            Err(TxError::FailedPrecondition(format!(
                "transaction {t} is PREPARING; branches can only be enlisted while it is ACTIVE"
            )))
        )]
    );
    let unknown = TxId {
        node: NODE,
        epoch: EPOCH,
        seq: 77,
    };
    assert!(matches!(
        e.handle(
            3,
            Event::Enlist {
                req: 7,
                tx: unknown,
                branch: a
            }
        )
        .as_slice(),
        [Command::Reply {
            reply: Err(TxError::NotFound(_)),
            ..
        }]
    ));
}

#[test]
fn empty_transaction_commits_trivially() {
    let mut e = engine();
    let t = begin(&mut e, &[]);
    assert_eq!(
        e.handle(1, commit_ev(2, t)),
        vec![
            reply(2, Ok(ReplyOk::Committed)),
            finished(t, Outcome::Committed)
        ]
    );
}
