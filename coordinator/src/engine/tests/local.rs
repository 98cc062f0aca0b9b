//! Local transactions (BeginLocal): reported commits, aborts and timeouts that ask the participant, unused ids.

use super::*;

#[test]
fn a_local_transaction_is_recorded_when_its_participant_reports_and_sends_nothing() {
    let (mut e, a, t) = one_local();
    // No other branch can join it.
    let b = spec("b", 10);
    let refused = e.handle(
        1,
        Event::Enlist {
            req: 2,
            tx: t,
            branch: b.clone(),
        },
    );
    assert_refused(&refused, 2, "was begun with BeginLocal");
    assert_eq!(e.handle(2, synced(t)), vec![]);
    // The report is answered once its record is written; nothing goes to the branch.
    assert_eq!(
        e.handle(3, Event::CommittedLocally { req: 3, tx: t }),
        committed_at_once(t, &a, 3)
    );
    assert_eq!(e.tx(&t), None);
    // A repeated report is answered from the log by the runtime.
    assert_eq!(
        e.handle(4, Event::CommittedLocally { req: 4, tx: t }),
        vec![reply(4, Ok(ReplyOk::NotLive))]
    );

    // Reported before the intent's own sync returned: recorded all the same (the
    // participant saw a Barrier cover the intent); the late sync changes nothing.
    let t2 = begin_local(&mut e, 5, 5, &a);
    assert_eq!(
        e.handle(6, Event::CommittedLocally { req: 6, tx: t2 }),
        committed_at_once(t2, &a, 6)
    );
    assert_eq!(e.handle(7, synced(t2)), vec![]);

    // A report for a transaction the coordinator commits itself is refused.
    let t3 = begin(&mut e, std::slice::from_ref(&a));
    let refused = e.handle(8, Event::CommittedLocally { req: 7, tx: t3 });
    assert_refused(&refused, 7, "not begun with BeginLocal");
    assert_eq!(e.tx(&t3).map(|x| x.state), Some(TxState::Active));

    // Without one-phase commits there is no local commit either.
    let mut off = Engine::new(
        EngineConfig {
            one_phase: false,
            ..cfg()
        },
        NODE,
        EPOCH,
    );
    let refused = off.handle(
        0,
        Event::BeginLocal {
            req: 1,
            timeout_ms: 0,
            branch: a.clone(),
            count: 1,
        },
    );
    assert_refused(&refused, 1, "one_phase = false");
}

#[test]
fn an_abort_or_timeout_of_a_local_transaction_asks_its_participant_what_it_did() {
    // Aborted by its owner: the participant rolls back and says so.
    let (mut e, a, t) = one_local();
    e.handle(1, synced(t));
    assert_eq!(
        e.handle(2, abort_ev(2, t, "out of stock")),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.handle(3, abort_acked(t, 0, Ok(AbortAck::Aborted))),
        aborted_by_its_branch(t, 2)
    );

    // Timed out, but the participant had committed (its report is late): COMMITTED.
    let t2 = begin_local(&mut e, 10, 3, &a);
    e.handle(11, synced(t2));
    assert_eq!(
        e.handle(5_010, timer(t2, Timer::TxTimeout)),
        vec![send(t2, 0, &a, Message::Abort, None)]
    );
    let cmds = e.handle(5_011, abort_acked(t2, 0, Ok(AbortAck::AlreadyCommitted)));
    assert_eq!(
        cmds,
        vec![
            one_phase_committed(t2, &a),
            finished(t2, Outcome::Committed),
        ]
    );

    // Aborted while the participant commits: its report comes first and decides; the
    // Abort caller hears COMMITTED once that is durable, and the abort's late answer
    // changes nothing.
    let t3 = begin_local(&mut e, 20, 4, &a);
    e.handle(21, synced(t3));
    e.handle(22, abort_ev(5, t3, ""));
    assert_eq!(
        e.handle(23, Event::CommittedLocally { req: 6, tx: t3 }),
        vec![one_phase_committed(t3, &a), Command::Sync { tx: t3 },]
    );
    assert_eq!(e.handle(24, synced(t3)), report_beat_abort(t3, 6, 5));
    assert_eq!(
        e.handle(25, abort_acked(t3, 0, Ok(AbortAck::AlreadyCommitted))),
        vec![]
    );

    // The same before the intent's sync returned: that sync does not cover the outcome,
    // so a second one follows it before the Abort caller is answered.
    let t4 = begin_local(&mut e, 30, 7, &a);
    assert_eq!(
        e.handle(31, abort_ev(8, t4, "")),
        vec![send(t4, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.handle(32, Event::CommittedLocally { req: 9, tx: t4 }),
        vec![one_phase_committed(t4, &a)]
    );
    assert_eq!(e.handle(33, synced(t4)), vec![Command::Sync { tx: t4 }]);
    assert_eq!(e.handle(34, synced(t4)), report_beat_abort(t4, 9, 8));
}

#[test]
fn a_plain_commit_of_a_local_transaction_is_sent_once_its_intent_is_durable() {
    let (mut e, a, t) = one_local();
    assert_eq!(
        e.handle(
            1,
            Event::Commit {
                req: 2,
                tx: t,
                answer_before_durable: true
            }
        ),
        vec![],
        "waits for the intent"
    );
    assert_eq!(
        e.handle(2, synced(t)),
        vec![commit_one_phase_sent(t, 0, &a)]
    );
    assert_eq!(
        e.handle(3, commit_acked(t, 0, Ok(CommitAck::Committed))),
        committed_at_once(t, &a, 2)
    );
}

#[test]
fn a_recovered_intent_takes_its_participants_report() {
    let (mut e, a, old) = one_recovered_intent(9);
    assert_eq!(
        e.handle(1, Event::CommittedLocally { req: 1, tx: old }),
        committed_at_once(old, &a, 1)
    );
    assert_eq!(
        e.handle(2, abort_acked(old, 0, Ok(AbortAck::AlreadyCommitted))),
        vec![]
    );
}

#[test]
fn local_transactions_are_begun_many_at_once_each_with_its_own_intent() {
    let mut e = engine();
    let a = spec("a", 0);
    let cmds = e.handle(
        0,
        Event::BeginLocal {
            req: 1,
            timeout_ms: 0,
            branch: a.clone(),
            count: 3,
        },
    );
    let Some(Command::Reply {
        req: 1,
        reply: Ok(ReplyOk::BegunLocal(txs)),
        requires_durable: None,
    }) = cmds.last()
    else {
        panic!("unexpected {cmds:?}");
    };
    assert_eq!(txs.len(), 3);
    let mut want = Vec::new();
    for &t in txs {
        want.extend([
            Command::ArmTimer {
                tx: t,
                timer: Timer::TxTimeout,
                after_ms: 5_000,
            },
            Command::LogLazy(LazyRecord::OnePhase {
                tx: t,
                branch: a.clone(),
            }),
            Command::Sync { tx: t },
        ]);
        let entry = e.tx(&t).expect("held");
        assert!(entry.is_local());
        assert_eq!(entry.state, TxState::Preparing);
    }
    want.push(reply(1, Ok(ReplyOk::BegunLocal(txs.clone()))));
    assert_eq!(
        cmds, want,
        "one reply, every id with its timeout and intent"
    );
    let distinct: std::collections::HashSet<_> = txs.iter().collect();
    assert_eq!(distinct.len(), 3, "distinct ids");
    // Each is a transaction of its own: one is reported, another aborted.
    let (t0, t1) = (txs[0], txs[1]);
    assert_eq!(
        e.handle(1, Event::CommittedLocally { req: 2, tx: t0 }),
        committed_at_once(t0, &a, 2)
    );
    assert_eq!(e.tx(&t1).map(|x| x.state), Some(TxState::Preparing));

    // 0 counts as one; more than the limit is refused and begins nothing.
    let one = e.handle(
        2,
        Event::BeginLocal {
            req: 3,
            timeout_ms: 0,
            branch: a.clone(),
            count: 0,
        },
    );
    assert!(
        matches!(one.last(), Some(Command::Reply { reply: Ok(ReplyOk::BegunLocal(v)), .. }) if v.len() == 1)
    );
    let live = e.txs().count();
    let refused = e.handle(
        3,
        Event::BeginLocal {
            req: 4,
            timeout_ms: 0,
            branch: a.clone(),
            count: MAX_LOCAL_BEGIN + 1,
        },
    );
    assert!(
        matches!(&refused[..], [Command::Reply { req: 4, reply: Err(TxError::InvalidArgument(m)), requires_durable: None }]
            if m.contains("at most 256")),
        "{refused:?}"
    );
    assert_eq!(e.txs().count(), live, "nothing begun");
}

#[test]
fn an_unused_local_id_goes_back_like_an_abort_and_only_a_local_one() {
    let (mut e, a, t) = one_local();
    e.handle(1, synced(t));
    // The branch is still asked: its answer decides.
    assert_eq!(
        e.handle(2, Event::Release { req: 2, tx: t }),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.tx(&t).and_then(|x| x.settle_cause()),
        Some(SettleCause::Unused)
    );
    let cmds = e.handle(3, abort_acked(t, 0, Ok(AbortAck::Aborted)));
    assert_eq!(cmds, aborted_by_its_branch(t, 2));
    // An ordinary transaction's id cannot come back unused.
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    let refused = e.handle(4, Event::Release { req: 3, tx: t2 });
    assert_refused(&refused, 3, "not begun with BeginLocal");
    assert_eq!(e.tx(&t2).map(|x| x.state), Some(TxState::Active));
}

/// What the sync that makes the local commit of `t` durable emits when its report
/// (request `report_req`) overtook an Abort (request `abort_req`): the report is answered
/// COMMITTED, the Abort that `t` committed, and `t` is finished.
fn report_beat_abort(t: TxId, report_req: ReqId, abort_req: ReqId) -> Vec<Command> {
    vec![
        reply_once_durable(report_req, Ok(ReplyOk::Committed), Some(SYNCED_LSN)),
        reply_once_durable(abort_req, Err(committed_error(&t)), Some(SYNCED_LSN)),
        finished(t, Outcome::Committed),
    ]
}
