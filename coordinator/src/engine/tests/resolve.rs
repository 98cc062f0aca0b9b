//! Operator resolutions: judged, recorded durably either way, then carried out.

use super::*;

#[test]
fn resolve_commit_marks_the_stuck_branch_only_after_the_record_is_durable() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let t = committing_with_stuck_branch(&mut e, &a, &b);
    assert_eq!(
        e.tx(&t).map(|x| x.branches[1].last_attempt_ms),
        Some(Some(5))
    );

    let want = record(
        t,
        HeuristicDecision::Commit,
        false,
        "COMMITTING",
        true,
        false,
        &["mq"],
        "",
    );
    let cmds = e.handle(20, resolve_ev(50, t, HeuristicDecision::Commit, false));
    assert_eq!(cmds.len(), 1, "only the audit record: {cmds:?}");
    let rec = forced_audit(&cmds, 50);
    assert_eq!(
        AuditRecord {
            detail: String::new(),
            ..rec.clone()
        },
        want
    );
    assert!(rec.detail.contains("heuristically committed"), "{rec:?}");
    // Nothing changed yet: the retry still goes out while the record is being forced.
    assert_eq!(
        e.handle(21, timer(t, Timer::Retry { branch: 1 })),
        vec![commit_sent(t, 1, &b, Some(3))]
    );
    // Durable: the branch is heuristically committed and the transaction finishes.
    let cmds = e.handle(22, audit_durable(50, 4, 1_700_000_000_123));
    let report = ResolveReport {
        record: AuditRecord {
            at_ms: 1_700_000_000_123,
            ..rec
        },
        state: None,
        outcome: Some(Outcome::Committed),
        heuristic_branches: vec!["mq".into()],
    };
    assert_eq!(
        cmds,
        vec![
            Command::LogLazy(LazyRecord::Done { tx: t }),
            finished(t, Outcome::Committed),
            reply_once_durable(50, Ok(ReplyOk::Resolved(report)), Some(4)),
        ]
    );
    assert!(e.tx(&t).is_none());
    // The in-flight commit's late answer and a late timer change nothing.
    assert!(e
        .handle(23, commit_acked(t, 1, Err("still down".into())))
        .is_empty());
    assert!(e
        .handle(24, timer(t, Timer::Retry { branch: 1 }))
        .is_empty());
    // The outcome participants are told is the logged one.
    assert_eq!(e.outcome_of(&t, true), Ok(Some(Outcome::Committed)));
    // A duplicate durability event is ignored.
    assert!(e.handle(25, audit_durable(50, 4, 1)).is_empty());
}

#[test]
fn resolve_abort_of_a_committing_transaction_is_refused_unless_forced_and_recorded_either_way() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let t = committing_with_stuck_branch(&mut e, &a, &b);

    let cmds = e.handle(20, resolve_ev(51, t, HeuristicDecision::Abort, false));
    let rec = forced_audit(&cmds, 51);
    assert_eq!(cmds.len(), 1);
    assert!(!rec.accepted && !rec.contradicts && rec.branches.is_empty());
    assert_eq!(rec.prior_state, "COMMITTING");
    assert!(rec.detail.contains("COMMITTED"), "{}", rec.detail);
    let cmds = e.handle(21, audit_durable(51, 4, 9));
    match cmds.as_slice() {
        [Command::Reply {
            req: 51,
            reply: Err(TxError::FailedPrecondition(m)),
            requires_durable: Some(4),
        }] => assert!(m.contains("COMMITTED") && m.contains("force"), "{m}"),
        other => panic!("want a FAILED_PRECONDITION reply, got {other:?}"),
    }
    assert_eq!(
        e.tx(&t).map(|x| x.state),
        Some(TxState::Committing),
        "a refusal changes nothing"
    );

    // Forced: recorded as contradicting; the branch stops getting commits; COMMITTED stays.
    let cmds = e.handle(22, resolve_ev(52, t, HeuristicDecision::Abort, true));
    let rec = forced_audit(&cmds, 52);
    assert!(rec.accepted && rec.contradicts && rec.force);
    assert_eq!(rec.branches, vec!["mq".to_string()]);
    assert!(rec.detail.contains("FORCED"), "{}", rec.detail);
    let cmds = e.handle(23, audit_durable(52, 5, 10));
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::Send { .. })),
        "no message to any branch: {cmds:?}"
    );
    assert_eq!(cmds[..2], done_and_finished(t)[..]);
    let r = resolved(&cmds[2], 52, 5);
    assert_eq!(r.heuristic_branches, vec!["mq".to_string()]);
    assert_eq!(r.outcome, Some(Outcome::Committed));
    assert_eq!(r.record.at_ms, 10);
}

#[test]
fn resolve_commit_gives_a_never_reached_tier_one_best_effort_commit() {
    let mut e = engine();
    let (db, mq) = (spec("db", 0), spec("mq", 10));
    let t = prepared_pair(&mut e, &db, &mq);
    e.handle(5, Event::LogDurable { tx: t, lsn: 2 });
    e.handle(6, commit_acked(t, 0, Err("db down".into())));
    let cmds = e.handle(7, resolve_ev(60, t, HeuristicDecision::Commit, false));
    let rec = forced_audit(&cmds, 60);
    assert_eq!(rec.branches, vec!["db".to_string(), "mq".to_string()]);
    let cmds = e.handle(8, audit_durable(60, 3, 1));
    assert_eq!(
        cmds[..3],
        [
            commit_sent(t, 1, &mq, Some(2)),
            Command::LogLazy(LazyRecord::Done { tx: t }),
            finished(t, Outcome::Committed),
        ]
    );
    // Its answer comes after the transaction is finished: ignored.
    assert!(e
        .handle(9, commit_acked(t, 1, Ok(CommitAck::Committed)))
        .is_empty());
}

#[test]
fn resolve_abort_of_an_undecided_transaction_aborts_at_once_and_finishes_when_durable() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let t = preparing(&mut e, &a, &b);
    e.handle(2, voted(t, 0, Ok(Vote::Yes)));
    // b's prepare hangs. The abort is decided now: the Commit caller is told ABORTED and
    // a (idle) gets its abort; b gets one when its prepare returns.
    let cmds = e.handle(3, resolve_ev(70, t, HeuristicDecision::Abort, false));
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    match &cmds[0] {
        Command::Reply {
            req: 10,
            reply: Err(TxError::Aborted(m)),
            requires_durable: None,
        } => assert!(m.contains("resolved to ABORT by operator alice"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(cmds[1], send(t, 0, &a, Message::Abort, None));
    let rec = forced_audit(&cmds, 70);
    assert!(rec.accepted && !rec.contradicts);
    assert_eq!(rec.prior_state, "PREPARING");
    assert_eq!(rec.branches, vec!["db".to_string(), "mq".to_string()]);
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));
    // While it is being forced no COMMIT can happen: a late yes only gets an abort.
    assert_eq!(
        e.handle(4, voted(t, 1, Ok(Vote::Yes))),
        vec![send(t, 1, &b, Message::Abort, None)]
    );
    assert!(e
        .handle(5, abort_acked(t, 0, Ok(AbortAck::Aborted)))
        .is_empty());
    // Durable: b never acknowledged, so it is heuristically aborted and the tx finishes.
    let cmds = e.handle(6, audit_durable(70, 1, 2));
    assert_eq!(cmds[..2], aborted_and_finished(t)[..]);
    let r = resolved(&cmds[2], 70, 1);
    assert_eq!(r.heuristic_branches, vec!["mq".to_string()]);
    assert_eq!((r.state, r.outcome), (None, Some(Outcome::Aborted)));

    assert_eq!(e.outcome_of(&t, false), Ok(Some(Outcome::Aborted)));
}

#[test]
fn resolve_commit_of_an_undecided_or_deciding_transaction_is_refused() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let active = begin(&mut e, std::slice::from_ref(&a));
    for force in [false, true] {
        let cmds = e.handle(1, resolve_ev(80, active, HeuristicDecision::Commit, force));
        let rec = forced_audit(&cmds, 80);
        assert!(!rec.accepted, "{rec:?}");
        assert!(rec.detail.contains("undecided"), "{}", rec.detail);
        let cmds = e.handle(2, audit_durable(80, 1, 1));
        assert!(
            matches!(
                cmds.as_slice(),
                [Command::Reply {
                    req: 80,
                    reply: Err(TxError::FailedPrecondition(_)),
                    requires_durable: Some(1),
                }]
            ),
            "{cmds:?}"
        );
    }
    assert_eq!(e.tx(&active).map(|x| x.state), Some(TxState::Active));

    let deciding = prepared_pair(&mut e, &a, &b);
    for d in [HeuristicDecision::Commit, HeuristicDecision::Abort] {
        let cmds = e.handle(3, resolve_ev(81, deciding, d, true));
        let rec = forced_audit(&cmds, 81);
        assert!(!rec.accepted && rec.prior_state == "DECIDING", "{rec:?}");
        let cmds = e.handle(4, audit_durable(81, 2, 1));
        assert!(
            matches!(
                cmds.as_slice(),
                [Command::Reply {
                    reply: Err(TxError::FailedPrecondition(m)),
                    ..
                }] if m.contains("retry")
            ),
            "{cmds:?}"
        );
    }
    assert_eq!(e.tx(&deciding).map(|x| x.state), Some(TxState::Deciding));
}

#[test]
fn resolve_an_aborting_transaction() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let t = preparing(&mut e, &a, &b);
    e.handle(2, voted(t, 0, Ok(Vote::No("constraint".into()))));
    // b voted yes late: it owes an abort acknowledgement and its participant is down.
    e.handle(3, voted(t, 1, Ok(Vote::Yes)));
    e.handle(4, abort_acked(t, 1, Err("down".into())));
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));

    // COMMIT contradicts the abort: refused without force.
    let cmds = e.handle(5, resolve_ev(90, t, HeuristicDecision::Commit, false));
    let rec = forced_audit(&cmds, 90);
    assert!(!rec.accepted && rec.detail.contains("ABORTED"), "{rec:?}");
    e.handle(6, audit_durable(90, 1, 1));
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));

    // ABORT agrees: b is heuristically aborted and the transaction finishes.
    let cmds = e.handle(7, resolve_ev(91, t, HeuristicDecision::Abort, false));
    assert_eq!(forced_audit(&cmds, 91).branches, vec!["mq".to_string()]);
    let cmds = e.handle(8, audit_durable(91, 2, 2));
    assert_eq!(cmds[..2], aborted_and_finished(t)[..]);
    assert!(matches!(
        &cmds[2],
        Command::Reply {
            req: 91,
            reply: Ok(ReplyOk::Resolved(r)),
            requires_durable: Some(2),
        } if r.heuristic_branches == ["mq"]
    ));

    // Forced COMMIT of another aborting one: contradicting, recorded, outcome stays ABORTED.
    let t2 = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(10, commit_ev(11, t2));
    e.handle(11, abort_ev(12, t2, "client gave up"));
    let cmds = e.handle(12, resolve_ev(92, t2, HeuristicDecision::Commit, true));
    let rec = forced_audit(&cmds, 92);
    assert!(rec.accepted && rec.contradicts && rec.prior_state == "ABORTING");
    let cmds = e.handle(13, audit_durable(92, 3, 3));
    assert!(
        matches!(
            cmds.last(),
            Some(Command::Reply { req: 92, reply: Ok(ReplyOk::Resolved(r)), requires_durable: Some(3) })
                if r.outcome == Some(Outcome::Aborted) && r.heuristic_branches == ["db", "mq"]
        ),
        "{cmds:?}"
    );
    assert!(e.tx(&t2).is_none());
}

#[test]
fn resolve_a_stuck_one_phase_commit_either_way() {
    for decision in [HeuristicDecision::Commit, HeuristicDecision::Abort] {
        let mut e = engine();
        let a = spec("db", 0);
        let t = begin(&mut e, std::slice::from_ref(&a));
        one_phase_commit_sent(&mut e, 1, 10, t, &a);
        e.handle(2, commit_acked(t, 0, Err("unreachable".into())));
        let cmds = e.handle(3, resolve_ev(95, t, decision, false));
        let rec = forced_audit(&cmds, 95);
        assert!(rec.accepted && !rec.contradicts, "{rec:?}");
        assert!(rec.detail.contains("one-phase"), "{rec:?}");
        let cmds = e.handle(4, audit_durable(95, 1, 1));
        // A caller told COMMITTED waits for the audit record (LSN 1); an abort needs none.
        let (caller, lazy, outcome) = match decision {
            HeuristicDecision::Commit => (
                reply_once_durable(10, Ok(ReplyOk::Committed), Some(1)),
                vec![one_phase_committed(t, &a)],
                Outcome::Committed,
            ),
            HeuristicDecision::Abort => (
                aborted_reply(10, t, "one-phase commit resolved to ABORT by an operator"),
                vec![Command::LogLazy(LazyRecord::Aborted { tx: t })],
                Outcome::Aborted,
            ),
        };
        let mut want = vec![caller];
        want.extend(lazy);
        // The operator's word replaces the intent on disk.
        want.push(Command::Sync { tx: t });
        want.push(Command::Finished { tx: t, outcome });
        assert_eq!(cmds[..cmds.len() - 1], want[..], "{decision:?}");
        assert!(e.tx(&t).is_none());
    }
}

#[test]
fn resolve_a_finished_transaction_asks_the_log_then_only_records() {
    let mut e = engine();
    let t = begin(&mut e, &[]);
    e.handle(1, commit_ev(2, t));
    assert!(e.tx(&t).is_none());
    // First: not live, ask the log.
    assert_eq!(
        e.handle(2, resolve_ev(100, t, HeuristicDecision::Abort, false)),
        vec![reply(100, Ok(ReplyOk::NotLive))]
    );
    let with_log = |req, decision, force, logged| Event::Resolve {
        req,
        tx: t,
        request: ask(decision, force),
        logged: Some(logged),
    };
    let cases = [
        (
            HeuristicDecision::Abort,
            false,
            Outcome::Committed,
            false,
            false,
        ),
        (
            HeuristicDecision::Abort,
            true,
            Outcome::Committed,
            true,
            true,
        ),
        (
            HeuristicDecision::Commit,
            false,
            Outcome::Committed,
            true,
            false,
        ),
        (
            HeuristicDecision::Commit,
            false,
            Outcome::Aborted,
            false,
            false,
        ),
        (
            HeuristicDecision::Commit,
            true,
            Outcome::Aborted,
            true,
            true,
        ),
        (
            HeuristicDecision::Abort,
            false,
            Outcome::Aborted,
            true,
            false,
        ),
    ];
    for (i, (decision, force, logged, accepted, contradicts)) in cases.into_iter().enumerate() {
        let req = 101 + i as u64;
        let cmds = e.handle(3, with_log(req, decision, force, logged));
        let rec = forced_audit(&cmds, req);
        assert_eq!(
            (rec.accepted, rec.contradicts),
            (accepted, contradicts),
            "{decision:?} force {force} on {logged:?}: {rec:?}"
        );
        let name = match logged {
            Outcome::Committed => "COMMITTED",
            Outcome::Aborted => "ABORTED",
        };
        assert_eq!(rec.prior_state, name);
        let cmds = e.handle(4, audit_durable(req, req, 5));
        match (accepted, cmds.as_slice()) {
            (
                true,
                [Command::Reply {
                    reply: Ok(ReplyOk::Resolved(r)),
                    ..
                }],
            ) => {
                assert_eq!((r.state, r.outcome), (None, Some(logged)));
                assert!(r.heuristic_branches.is_empty());
            }
            (
                false,
                [Command::Reply {
                    reply: Err(TxError::FailedPrecondition(m)),
                    ..
                }],
            ) => {
                assert!(m.contains(name), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn resolve_validates_and_needs_a_working_log() {
    let mut e = engine();
    let a = spec("db", 0);
    let t = begin(&mut e, &[a]);
    let bad = |operator: &str, reason: &str| Event::Resolve {
        req: 1,
        tx: t,
        request: ResolveRequest {
            decision: HeuristicDecision::Abort,
            operator: operator.into(),
            reason: reason.into(),
            force: false,
        },
        logged: None,
    };
    for (op, why, needle) in [
        ("alice", "", "reason"),
        ("", "why", "operator"),
        ("alice", &"x".repeat(1025), "reason"),
    ] {
        let cmds = e.handle(1, bad(op, why));
        assert!(
            matches!(
                cmds.as_slice(),
                [Command::Reply {
                    reply: Err(TxError::InvalidArgument(m)),
                    ..
                }] if m.contains(needle)
            ),
            "{cmds:?}"
        );
    }
    assert!(matches!(
        e.handle(1, resolve_ev(2, tx(99), HeuristicDecision::Abort, false))
            .as_slice(),
        [Command::Reply {
            reply: Err(TxError::NotFound(_)),
            ..
        }]
    ));

    // The audit record cannot be made durable: halt, tell the operator, change nothing.
    let cmds = e.handle(2, resolve_ev(3, t, HeuristicDecision::Abort, false));
    forced_audit(&cmds, 3);
    let cmds = e.handle(
        3,
        Event::AuditFailed {
            req: 3,
            error: "disk gone".into(),
        },
    );
    assert!(matches!(&cmds[0], Command::Halt { .. }), "{cmds:?}");
    assert!(matches!(
        &cmds[1],
        Command::Reply { req: 3, reply: Err(TxError::Unavailable(m)), requires_durable: None } if m.contains("disk gone")
    ));
    assert!(e.halted().is_some());
    // Halted: nothing more can be recorded.
    assert!(matches!(
        e.handle(4, resolve_ev(4, t, HeuristicDecision::Abort, false))
            .as_slice(),
        [Command::Reply {
            reply: Err(TxError::Unavailable(_)),
            ..
        }]
    ));
}
