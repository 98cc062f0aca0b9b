//! Two-phase commit: the exact commands of a commit, phase-two tiers, retries, no votes, timeouts, read-only branches, late and duplicate messages, aborts, a failed decision write.

use super::*;

#[test]
fn two_phase_commit_exact_commands() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let t = begin(&mut e, &[]);
    assert_eq!(
        e.handle(
            1,
            Event::Enlist {
                req: 2,
                tx: t,
                branch: a.clone()
            }
        ),
        [intent_written(t, &a), vec![reply(2, Ok(ReplyOk::Enlisted))]].concat(),
        "the first branch's one-phase intent, in case it stays the only one"
    );
    assert_eq!(
        e.handle(
            1,
            Event::Enlist {
                req: 3,
                tx: t,
                branch: b.clone()
            }
        ),
        vec![reply(3, Ok(ReplyOk::Enlisted))]
    );
    assert_eq!(
        e.handle(2, commit_ev(4, t)),
        vec![
            Command::LogLazy(LazyRecord::Preparing {
                tx: t,
                branches: vec![a.clone(), b.clone()]
            }),
            send(t, 0, &a, Message::Prepare, None),
            send(t, 1, &b, Message::Prepare, None),
            Command::ArmTimer {
                tx: t,
                timer: Timer::PrepareTimeout,
                after_ms: 1_000
            },
        ]
    );
    assert_eq!(
        e.handle(2, synced(t)),
        vec![],
        "the intent's sync is moot for a two-phase commit (its PREPARING record replaced it)"
    );
    assert_eq!(e.handle(3, voted(t, 1, Ok(Vote::Yes))), vec![]);
    assert_eq!(
        e.handle(4, voted(t, 0, Ok(Vote::Yes))),
        vec![Command::ForceCommit(CommitRecord {
            tx: t,
            branches: vec![a.clone(), b.clone()],
            decided_at_ms: 0
        })]
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Deciding));
    // No commit goes out before the decision is durable; then both, stamped with the LSN.
    assert_eq!(
        e.handle(5, Event::LogDurable { tx: t, lsn: 7 }),
        vec![
            reply_once_durable(4, Ok(ReplyOk::Committed), Some(7)),
            commit_sent(t, 0, &a, Some(7)),
            commit_sent(t, 1, &b, Some(7)),
        ]
    );
    assert_eq!(
        e.handle(6, commit_acked(t, 1, Ok(CommitAck::Committed))),
        vec![]
    );
    assert_eq!(
        e.handle(7, commit_acked(t, 0, Ok(CommitAck::Committed))),
        done_and_finished(t)
    );
    assert!(e.tx(&t).is_none());
    assert_eq!(e.provenance(&t), Provenance::FinishedThisEpoch);
    // A late duplicate ack, and a repeated Commit, after the engine forgot the transaction.
    assert_eq!(
        e.handle(8, commit_acked(t, 0, Ok(CommitAck::Committed))),
        vec![]
    );
    commit_is_not_live(&mut e, 8, 9, t);
}

#[test]
fn phase_two_goes_tier_by_tier() {
    let mut e = engine();
    let (db, mq) = (spec("db", 0), spec("mq", 10));
    let t = prepared_pair(&mut e, &db, &mq);
    // Only the database tier is sent first.
    assert_eq!(
        e.handle(5, Event::LogDurable { tx: t, lsn: 1 }),
        vec![
            reply_once_durable(10, Ok(ReplyOk::Committed), Some(1)),
            commit_sent(t, 0, &db, Some(1))
        ]
    );
    // A failed database commit is retried, and the broker still waits.
    assert_eq!(
        e.handle(6, commit_acked(t, 0, Err("down".into()))),
        vec![retry_armed(t, 0, 10)]
    );
    assert_eq!(
        e.handle(16, timer(t, Timer::Retry { branch: 0 })),
        vec![commit_sent(t, 0, &db, Some(1))]
    );
    assert_eq!(
        e.handle(17, commit_acked(t, 0, Ok(CommitAck::Committed))),
        vec![commit_sent(t, 1, &mq, Some(1))]
    );
    assert_eq!(
        e.handle(18, commit_acked(t, 1, Ok(CommitAck::Committed))),
        done_and_finished(t)
    );
}

#[test]
fn retries_back_off_exponentially_up_to_the_cap_and_never_stop() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = prepared_pair(&mut e, &a, &b);
    e.handle(5, Event::LogDurable { tx: t, lsn: 1 });
    e.handle(5, commit_acked(t, 1, Ok(CommitAck::Committed)));
    let mut delays = Vec::new();
    for i in 0..40u64 {
        let cmds = e.handle(10 + i, commit_acked(t, 0, Err("unreachable".into())));
        match cmds.as_slice() {
            [Command::ArmTimer {
                timer: Timer::Retry { branch: 0 },
                after_ms,
                ..
            }] => delays.push(*after_ms),
            other => panic!("{other:?}"),
        }
        let resend = e.handle(10 + i, timer(t, Timer::Retry { branch: 0 }));
        assert_eq!(resend, vec![commit_sent(t, 0, &a, Some(1))]);
    }
    assert_eq!(&delays[..5], &[10, 20, 40, 80, 80]);
    assert!(delays.iter().all(|d| *d <= 80));
    let entry = e.tx(&t).expect("still driving");
    assert_eq!(entry.branches[0].attempts, 42, "1 prepare + 41 commits");
    assert_eq!(entry.branches[0].last_error.as_deref(), Some("unreachable"));
}

#[test]
fn a_no_vote_aborts_and_aborts_reach_every_branch_that_may_have_prepared() {
    let mut e = engine();
    let (a, b, c) = (spec("a", 0), spec("b", 0), spec("c", 10));
    let t = begin(&mut e, &[a.clone(), b.clone(), c.clone()]);
    e.handle(1, commit_ev(10, t));
    assert_eq!(e.handle(2, voted(t, 0, Ok(Vote::Yes))), vec![]);
    let cmds = e.handle(3, voted(t, 1, Ok(Vote::No("duplicate key".into()))));
    assert_eq!(
        cmds,
        vec![
            aborted_reply(10, t, "branch b voted no: duplicate key"),
            send(t, 0, &a, Message::Abort, None),
            // b voted no: one courtesy abort. c's prepare is still out: its abort waits for
            // the vote so the two messages cannot cross.
            send(t, 1, &b, Message::Abort, None),
        ]
    );
    // The late yes from c gets its abort now.
    assert_eq!(
        e.handle(4, voted(t, 2, Ok(Vote::Yes))),
        vec![send(t, 2, &c, Message::Abort, None)]
    );
    // A failed abort to a prepared branch is retried; a failed courtesy abort is not.
    assert_eq!(
        e.handle(5, abort_acked(t, 0, Err("down".into()))),
        vec![retry_armed(t, 0, 10)]
    );
    assert_eq!(e.handle(5, abort_acked(t, 1, Err("down".into()))), vec![]);
    assert_eq!(
        e.handle(6, abort_acked(t, 2, Ok(AbortAck::Aborted))),
        vec![]
    );
    assert_eq!(
        e.handle(15, timer(t, Timer::Retry { branch: 0 })),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.handle(26, abort_acked(t, 0, Ok(AbortAck::Aborted))),
        aborted_and_finished(t)
    );
    // Commit after the abort: the engine no longer holds it; presumed abort answers.
    commit_is_not_live(&mut e, 27, 11, t);
}

#[test]
fn prepare_timeout_aborts_and_a_late_vote_is_answered_with_abort() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = preparing(&mut e, &a, &b);
    e.handle(2, voted(t, 0, Ok(Vote::Yes)));
    let cmds = e.handle(1001, timer(t, Timer::PrepareTimeout));
    assert_eq!(
        cmds,
        vec![
            aborted_reply(
                10,
                t,
                "prepare timed out after 1000 ms waiting for branch(es) b"
            ),
            send(t, 0, &a, Message::Abort, None),
        ]
    );
    // The transport gives up on b's prepare: whether it prepared is unknown, so it gets an
    // abort that is retried until acknowledged.
    assert_eq!(
        e.handle(1002, voted(t, 1, Err("deadline".into()))),
        vec![send(t, 1, &b, Message::Abort, None)]
    );
    e.handle(1003, abort_acked(t, 0, Ok(AbortAck::Aborted)));
    assert_eq!(
        e.handle(1004, abort_acked(t, 1, Ok(AbortAck::Aborted))),
        aborted_and_finished(t)
    );
    // The prepare timer of a decided transaction does nothing.
    assert_eq!(e.handle(2000, timer(t, Timer::PrepareTimeout)), vec![]);
}

#[test]
fn read_only_branches_skip_phase_two_and_all_read_only_needs_no_log() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = preparing(&mut e, &a, &b);
    e.handle(2, voted(t, 0, Ok(Vote::ReadOnly)));
    assert_eq!(
        e.handle(3, voted(t, 1, Ok(Vote::Yes))),
        vec![Command::ForceCommit(CommitRecord {
            tx: t,
            branches: vec![b.clone()],
            decided_at_ms: 0
        })]
    );
    assert_eq!(
        e.handle(4, Event::LogDurable { tx: t, lsn: 2 }),
        vec![
            reply_once_durable(10, Ok(ReplyOk::Committed), Some(2)),
            commit_sent(t, 1, &b, Some(2))
        ]
    );

    let t2 = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(5, commit_ev(11, t2));
    e.handle(6, voted(t2, 0, Ok(Vote::ReadOnly)));
    assert_eq!(
        e.handle(7, voted(t2, 1, Ok(Vote::ReadOnly))),
        vec![
            reply(11, Ok(ReplyOk::Committed)),
            Command::LogLazy(LazyRecord::Aborted { tx: t2 }),
            finished(t2, Outcome::Committed),
        ]
    );
}

#[test]
fn duplicate_and_late_messages_change_nothing() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = preparing(&mut e, &a, &b);
    // A second Commit while preparing joins the first: no new prepares.
    assert_eq!(e.handle(1, commit_ev(11, t)), vec![]);
    assert_eq!(e.handle(2, voted(t, 0, Ok(Vote::Yes))), vec![]);
    // The same vote twice, and a vote for a branch index that does not exist.
    assert_eq!(e.handle(2, voted(t, 0, Ok(Vote::Yes))), vec![]);
    assert_eq!(e.handle(2, voted(t, 9, Ok(Vote::Yes))), vec![]);
    let before = e.clone();
    // Phase-two answers before there is a decision are ignored.
    assert_eq!(
        e.handle(2, commit_acked(t, 0, Ok(CommitAck::Committed))),
        vec![]
    );
    assert_eq!(
        e.handle(2, abort_acked(t, 0, Ok(AbortAck::Aborted))),
        vec![]
    );
    assert_eq!(e.handle(2, Event::LogDurable { tx: t, lsn: 4 }), vec![]);
    assert_eq!(e.tx(&t), before.tx(&t));
    e.handle(3, voted(t, 1, Ok(Vote::Yes)));
    let cmds = e.handle(4, Event::LogDurable { tx: t, lsn: 4 });
    assert_eq!(
        &cmds[..2],
        &[
            reply_once_durable(10, Ok(ReplyOk::Committed), Some(4)),
            reply_once_durable(11, Ok(ReplyOk::Committed), Some(4))
        ]
    );
    // A second durable notice, and a vote arriving after the decision.
    assert_eq!(e.handle(5, Event::LogDurable { tx: t, lsn: 4 }), vec![]);
    assert_eq!(
        e.handle(5, voted(t, 1, Ok(Vote::No("late".into())))),
        vec![]
    );
    // Commit again after the decision answers at once.
    assert_eq!(
        e.handle(6, commit_ev(12, t)),
        vec![reply_once_durable(12, Ok(ReplyOk::Committed), Some(4))]
    );
    // Timers for other phases do nothing.
    assert_eq!(e.handle(7, timer(t, Timer::TxTimeout)), vec![]);
    assert_eq!(e.handle(7, timer(t, Timer::PrepareTimeout)), vec![]);
    // A retry timer while the commit is still in flight sends nothing twice.
    assert_eq!(e.handle(7, timer(t, Timer::Retry { branch: 0 })), vec![]);
    // Events for unknown transactions are ignored.
    let stranger = TxId {
        node: 1,
        epoch: 1,
        seq: 1,
    };
    assert_eq!(e.handle(8, voted(stranger, 0, Ok(Vote::Yes))), vec![]);
    assert_eq!(e.handle(8, timer(stranger, Timer::TxTimeout)), vec![]);
}

#[test]
fn abort_requests() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    // Active: courtesy aborts, then forgotten.
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    let cmds = e.handle(1, abort_ev(20, t, "user cancelled"));
    assert_eq!(
        cmds,
        vec![
            send(t, 0, &a, Message::Abort, None),
            send(t, 1, &b, Message::Abort, None),
            reply(20, Ok(ReplyOk::Aborted))
        ]
    );
    assert_eq!(
        e.handle(1, abort_ev(21, t, "")),
        vec![reply(21, Ok(ReplyOk::Aborted))]
    );
    assert_eq!(
        e.handle(1, commit_ev(22, t)),
        vec![aborted_reply(
            22,
            t,
            "aborted by the client: user cancelled"
        )]
    );
    e.handle(2, abort_acked(t, 0, Ok(AbortAck::Aborted)));
    assert_eq!(
        e.handle(2, abort_acked(t, 1, Err("gone".into()))),
        vec![finished(t, Outcome::Aborted)]
    );

    // Decided commit: an Abort while the COMMIT is being forced waits for the log (a crash
    // before the sync would make it an abort); once durable it is refused, as it is
    // while committing.
    let t2 = prepared_pair(&mut e, &a, &b);
    let refused = Err(TxError::FailedPrecondition(format!(
        "transaction {t2} cannot be aborted: its outcome is COMMITTED"
    )));
    assert_eq!(e.handle(4, abort_ev(23, t2, "")), vec![]);
    let cmds = e.handle(5, Event::LogDurable { tx: t2, lsn: 1 });
    assert_eq!(
        &cmds[..2],
        &[
            reply_once_durable(10, Ok(ReplyOk::Committed), Some(1)),
            reply_once_durable(23, refused.clone(), Some(1))
        ]
    );
    assert_eq!(
        e.handle(6, abort_ev(24, t2, "")),
        vec![reply_once_durable(24, refused, Some(1))]
    );
    // If the force fails instead, the waiting Abort hears that the outcome is in doubt.
    let t3 = prepared_pair(&mut e, &a, &b);
    assert_eq!(e.handle(7, abort_ev(25, t3, "")), vec![]);
    let cmds = e.handle(
        8,
        Event::LogFailed {
            tx: t3,
            error: "EIO".into(),
        },
    );
    assert!(
        matches!(
            &cmds[2],
            Command::Reply {
                req: 25,
                reply: Err(TxError::Unavailable(_)),
                requires_durable: None,
            }
        ),
        "{cmds:?}"
    );

    // Unknown and earlier-epoch ids.
    let unknown = TxId {
        node: NODE,
        epoch: EPOCH,
        seq: 99,
    };
    assert_eq!(
        e.handle(7, abort_ev(25, unknown, "")),
        vec![reply(
            25,
            Err(TxError::NotFound(format!(
                "transaction {unknown} was never issued by this coordinator"
            )))
        )]
    );
    let old = TxId {
        node: NODE,
        epoch: 1,
        seq: 5,
    };
    assert_eq!(
        e.handle(7, abort_ev(26, old, "")),
        vec![reply(26, Ok(ReplyOk::NotLive))]
    );
}

#[test]
fn transaction_timeout_aborts_only_active_transactions() {
    let mut e = engine();
    let (a, t) = begin_one(&mut e);
    assert_eq!(
        e.handle(5_000, timer(t, Timer::TxTimeout)),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));
    assert_eq!(
        e.handle(5_001, commit_ev(3, t)),
        vec![aborted_reply(3, t, "transaction timed out while active")]
    );
    // A per-transaction timeout and its upper bound.
    let cmds = e.handle(
        1,
        Event::Begin {
            req: 4,
            timeout_ms: 250,
            branches: vec![],
        },
    );
    assert_eq!(
        cmds[0],
        Command::ArmTimer {
            tx: tx(2),
            timer: Timer::TxTimeout,
            after_ms: 250
        }
    );
    let cmds = e.handle(
        1,
        Event::Begin {
            req: 5,
            timeout_ms: 10_001,
            branches: vec![],
        },
    );
    assert_eq!(
        cmds,
        vec![reply(
            5,
            Err(TxError::InvalidArgument(
                "timeout_ms is 10001; at most 10000 is allowed".into()
            ))
        )]
    );
}

#[test]
fn a_failed_decision_write_halts_and_leaves_the_outcome_to_restart() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = prepared_pair(&mut e, &a, &b);
    let cmds = e.handle(
        4,
        Event::LogFailed {
            tx: t,
            error: "EIO".into(),
        },
    );
    assert_eq!(
        cmds[0],
        Command::Halt {
            reason: "decision log failed: EIO".into()
        }
    );
    assert!(matches!(
        &cmds[1],
        Command::Reply {
            req: 10,
            reply: Err(TxError::Unavailable(_)),
            requires_durable: None,
        }
    ));
    assert_eq!(cmds.len(), 2, "nothing is sent to any branch: {cmds:?}");
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::InDoubt));
    // A late durable notice cannot resurrect it, and no new work is taken.
    assert_eq!(e.handle(5, Event::LogDurable { tx: t, lsn: 1 }), vec![]);
    assert!(matches!(
        e.handle(
            6,
            Event::Begin {
                req: 11,
                timeout_ms: 0,
                branches: vec![]
            }
        )
        .as_slice(),
        [Command::Reply {
            reply: Err(TxError::Unavailable(_)),
            ..
        }]
    ));
}

#[test]
fn backoff_is_capped() {
    let c = cfg();
    assert_eq!(
        (1..=6).map(|a| backoff(&c, a)).collect::<Vec<_>>(),
        vec![10, 20, 40, 80, 80, 80]
    );
    assert_eq!(backoff(&c, u32::MAX), 80);
}
