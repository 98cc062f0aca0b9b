//! One-phase commit of a single branch: its intent and outcome syncs, answers before durable, failed syncs, the switch.

use super::*;

#[test]
fn single_branch_commits_in_one_phase_with_its_intent_and_outcome_synced() {
    let mut e = engine();
    let (a, t) = begin_one(&mut e);
    one_phase_commit_sent(&mut e, 1, 10, t, &a);
    assert_eq!(
        e.handle(2, commit_acked(t, 0, Ok(CommitAck::Committed))),
        outcome_written(t, &a),
        "the client hears nothing before the outcome is durable"
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Committing));
    // A repeated Commit (and an Abort) waits for the same sync.
    assert_eq!(e.handle(2, commit_ev(14, t)), vec![]);
    assert_eq!(e.handle(2, abort_ev(15, t, "")), vec![]);
    assert_eq!(
        e.handle(3, synced(t)),
        vec![
            reply_once_durable(10, Ok(ReplyOk::Committed), Some(SYNCED_LSN)),
            reply_once_durable(14, Ok(ReplyOk::Committed), Some(SYNCED_LSN)),
            reply_once_durable(
                15,
                Err(TxError::FailedPrecondition(format!(
                    "transaction {t} cannot be aborted: its outcome is COMMITTED"
                ))),
                Some(SYNCED_LSN)
            ),
            finished(t, Outcome::Committed),
        ]
    );
    // Refused one-phase commit: aborted, the intent dropped, nothing left to send.
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent(&mut e, 3, 11, t2, &a);
    assert_eq!(
        e.handle(
            4,
            commit_acked(t2, 0, Ok(CommitAck::Refused("check violation".into())))
        ),
        vec![
            aborted_reply(11, t2, "branch a refused to commit: check violation"),
            Command::LogLazy(LazyRecord::Aborted { tx: t2 }),
            finished(t2, Outcome::Aborted),
        ]
    );
    // Lost answer: the one-phase commit is asked again until the participant answers.
    let t3 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent(&mut e, 5, 12, t3, &a);
    assert_eq!(
        e.handle(6, commit_acked(t3, 0, Err("timeout".into()))),
        vec![retry_armed(t3, 0, 10)]
    );
    assert_eq!(
        e.handle(16, timer(t3, Timer::Retry { branch: 0 })),
        vec![commit_one_phase_sent(t3, 0, &a)]
    );
    // An Abort during a one-phase commit waits for the participant's answer.
    assert_eq!(e.handle(17, abort_ev(13, t3, "")), vec![]);
    e.handle(18, commit_acked(t3, 0, Ok(CommitAck::Committed)));
    let cmds = e.handle(19, synced(t3));
    assert_eq!(
        cmds[0],
        reply_once_durable(12, Ok(ReplyOk::Committed), Some(SYNCED_LSN))
    );
    assert_eq!(
        cmds[1],
        reply_once_durable(
            13,
            Err(TxError::FailedPrecondition(format!(
                "transaction {t3} cannot be aborted: its outcome is COMMITTED"
            ))),
            Some(SYNCED_LSN)
        )
    );
}

#[test]
fn a_one_phase_commit_waits_for_its_intent_even_when_a_retry_timer_fires() {
    let mut e = engine();
    let (a, t) = begin_one(&mut e);
    assert_eq!(
        e.handle(1, commit_ev(10, t)),
        vec![],
        "the intent's sync (started at Begin) is still running"
    );
    assert_eq!(
        e.handle(2, timer(t, Timer::Retry { branch: 0 })),
        vec![],
        "nothing goes to the branch before the intent is durable"
    );
    assert_eq!(
        e.handle(3, synced(t)),
        vec![commit_one_phase_sent(t, 0, &a)]
    );
    // A stale Synced for a finished or unknown transaction does nothing.
    let other = TxId {
        node: NODE,
        epoch: EPOCH,
        seq: 999,
    };
    assert_eq!(e.handle(2, synced(other)), vec![]);
}

#[test]
fn a_failed_one_phase_sync_leaves_the_transaction_in_doubt_and_halts() {
    let mut e = engine();
    let a = spec("a", 0);
    // The intent's sync fails: nothing was sent, the restart decides.
    let t = begin(&mut e, std::slice::from_ref(&a));
    e.handle(1, commit_ev(10, t));
    let cmds = e.handle(
        2,
        Event::SyncFailed {
            tx: t,
            error: "disk gone".into(),
        },
    );
    assert!(matches!(&cmds[0], Command::Halt { reason } if reason.contains("disk gone")));
    assert!(
        matches!(&cmds[1], Command::Reply { req: 10, reply: Err(TxError::Unavailable(m)), requires_durable: None } if m.contains("restarts")),
        "{cmds:?}"
    );
    assert_eq!(cmds.len(), 2, "nothing is sent: {cmds:?}");
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::InDoubt));
}

#[test]
fn answered_before_durable_unless_someone_needs_the_outcome_durable() {
    let mut e = engine();
    let (a, t) = begin_one(&mut e);
    one_phase_commit_sent_as(&mut e, 1, 10, t, &a, true);
    assert_eq!(
        e.handle(2, commit_acked(t, 0, Ok(CommitAck::Committed))),
        committed_at_once(t, &a, 10),
        "answered with the outcome written but not synced (the caller's Barrier syncs it)"
    );
    // An Abort waiting as well is told COMMITTED only once that is durable.
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent_as(&mut e, 3, 11, t2, &a, true);
    e.handle(3, abort_ev(12, t2, ""));
    let cmds = e.handle(4, commit_acked(t2, 0, Ok(CommitAck::Committed)));
    assert_eq!(cmds.last(), Some(&Command::Sync { tx: t2 }), "{cmds:?}");
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    // So is a second Commit without answer_before_durable.
    let t3 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent_as(&mut e, 5, 13, t3, &a, true);
    assert_eq!(e.handle(5, commit_ev(14, t3)), vec![]);
    let cmds = e.handle(6, commit_acked(t3, 0, Ok(CommitAck::Committed)));
    assert_eq!(cmds.last(), Some(&Command::Sync { tx: t3 }), "{cmds:?}");
    assert_eq!(
        e.handle(7, synced(t3)),
        vec![
            reply_once_durable(13, Ok(ReplyOk::Committed), Some(SYNCED_LSN)),
            reply_once_durable(14, Ok(ReplyOk::Committed), Some(SYNCED_LSN)),
            finished(t3, Outcome::Committed),
        ]
    );
}

#[test]
fn the_intent_of_an_active_transaction_is_dropped_with_it_and_rewritten_after_a_failed_sync() {
    let mut e = engine();
    let a = spec("a", 0);
    // Aborted while its intent syncs: the intent is removed; the late Synced does nothing.
    let t = begin(&mut e, std::slice::from_ref(&a));
    e.handle(1, abort_ev(10, t, ""));
    let cmds = e.handle(1, abort_acked(t, 0, Ok(AbortAck::Aborted)));
    assert!(
        cmds.contains(&Command::LogLazy(LazyRecord::Aborted { tx: t })),
        "{cmds:?}"
    );
    assert_eq!(e.handle(2, synced(t)), vec![]);
    // The background sync fails: the log is failed, nothing else happens yet...
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    let cmds = e.handle(
        3,
        Event::SyncFailed {
            tx: t2,
            error: "disk gone".into(),
        },
    );
    assert!(
        matches!(cmds.as_slice(), [Command::Halt { .. }]),
        "{cmds:?}"
    );
    assert_eq!(e.tx(&t2).map(|x| x.state), Some(TxState::Active));
    // ...and a Commit does not send anything before the intent is durable.
    assert_eq!(
        e.handle(
            4,
            Event::Commit {
                req: 11,
                tx: t2,
                answer_before_durable: true
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::OnePhase {
                tx: t2,
                branch: a.clone()
            }),
            Command::Sync { tx: t2 },
        ]
    );
}

#[test]
fn one_phase_can_be_switched_off() {
    let mut e = Engine::new(
        EngineConfig {
            one_phase: false,
            ..cfg()
        },
        NODE,
        EPOCH,
    );
    let (a, t) = begin_one(&mut e);
    let cmds = e.handle(1, commit_ev(10, t));
    assert_eq!(cmds[1], send(t, 0, &a, Message::Prepare, None));
}
