//! Recovery at start: COMMIT records re-driven, undecided transactions aborted, one-phase intents settled by asking the branch.

use super::*;

#[test]
fn recovered_one_phase_intents_ask_their_branch_again() {
    let (mut e, a, old) = one_recovered_intent(7);
    // An answer without a result, or none: asked again (with an abort, never a commit).
    for (now, ack) in [
        (1, Err("answered without a result".to_string())),
        (30, Err("connection refused".to_string())),
    ] {
        assert_eq!(
            e.handle(
                now,
                Event::AbortAcked {
                    tx: old,
                    branch: 0,
                    ack
                }
            ),
            vec![Command::ArmTimer {
                tx: old,
                timer: Timer::Retry { branch: 0 },
                after_ms: if now == 1 { 10 } else { 20 }
            }]
        );
        assert_eq!(
            e.handle(now + 20, timer(old, Timer::Retry { branch: 0 })),
            vec![send(old, 0, &a, Message::Abort, None)]
        );
    }
    let last_error = e.tx(&old).and_then(|x| x.branches[0].last_error.clone());
    assert_eq!(last_error.as_deref(), Some("connection refused"));
    // A client that asks meanwhile waits for the branch's answer.
    assert_eq!(e.handle(55, commit_ev(9, old)), vec![]);
    assert_eq!(
        e.handle(60, abort_acked(old, 0, Ok(AbortAck::AlreadyCommitted)),),
        outcome_written(old, &a),
        "committed in one phase: the outcome is written, and synced for the waiting client"
    );
    assert_eq!(e.outcome_of(&old, false), Ok(Some(Outcome::Committed)));
    assert_eq!(
        e.handle(61, synced(old)),
        vec![
            reply_once_durable(9, Ok(ReplyOk::Committed), Some(SYNCED_LSN)),
            finished(old, Outcome::Committed)
        ]
    );
    // Nobody waiting: the outcome is written and the transaction finished at once.
    let old1 = TxId { seq: 9, ..old };
    recover_intent(&mut e, 62, old1, &a);
    assert_eq!(
        e.handle(63, abort_acked(old1, 0, Ok(AbortAck::AlreadyCommitted)),),
        vec![
            one_phase_committed(old1, &a),
            finished(old1, Outcome::Committed)
        ]
    );
    // A branch that reports it aborted (or never had it): aborted, the intent dropped.
    let old2 = TxId { seq: 8, ..old };
    recover_intent(&mut e, 70, old2, &a);
    assert_eq!(
        e.handle(
            71,
            Event::Commit {
                req: 10,
                tx: old2,
                answer_before_durable: true
            }
        ),
        vec![]
    );
    let cmds = e.handle(72, abort_acked(old2, 0, Ok(AbortAck::Aborted)));
    assert_eq!(
        cmds,
        vec![
            aborted_reply(
                10,
                old2,
                "the coordinator restarted before the one-phase \
                     commit was confirmed, and branch a reports it rolled back"
            ),
            Command::LogLazy(LazyRecord::Aborted { tx: old2 }),
            finished(old2, Outcome::Aborted)
        ]
    );
}

#[test]
fn recovery_redrives_commits_and_aborts_undecided_transactions() {
    let mut e = engine();
    let (db, mq) = (spec("db", 0), spec("mq", 10));
    let old_commit = TxId {
        node: NODE,
        epoch: 2,
        seq: 4,
    };
    let old_undecided = TxId {
        node: NODE,
        epoch: 2,
        seq: 5,
    };
    let cmds = e.handle(
        0,
        Event::Recovered(Recovered {
            commits: vec![CommitRecord {
                tx: old_commit,
                branches: vec![db.clone(), mq.clone()],
                decided_at_ms: 1,
            }],
            undecided: vec![(old_undecided, vec![db.clone()])],
            one_phase: vec![],
        }),
    );
    assert_eq!(
        cmds,
        vec![
            commit_sent(old_commit, 0, &db, None),
            send(old_undecided, 0, &db, Message::Abort, None),
        ]
    );
    assert_eq!(
        e.tx(&old_commit).map(|x| x.state),
        Some(TxState::Committing)
    );
    // A participant asking meanwhile hears COMMITTED; Abort is refused.
    assert!(matches!(
        e.handle(1, abort_ev(1, old_commit, "")).as_slice(),
        [Command::Reply {
            reply: Err(TxError::FailedPrecondition(_)),
            ..
        }]
    ));
    assert_eq!(
        e.handle(2, commit_acked(old_commit, 0, Ok(CommitAck::Committed))),
        vec![commit_sent(old_commit, 1, &mq, None)]
    );
    assert_eq!(
        e.handle(3, commit_acked(old_commit, 1, Ok(CommitAck::Committed))),
        done_and_finished(old_commit)
    );
    assert_eq!(
        e.handle(4, abort_acked(old_undecided, 0, Ok(AbortAck::Aborted))),
        aborted_and_finished(old_undecided)
    );
    // New ids start over in the new epoch.
    assert_eq!(begin(&mut e, &[]), tx(1));
}
