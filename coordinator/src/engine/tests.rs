//! Unit tests of the engine: the exact commands for every path, including duplicate and
//! late messages.

use super::*;
use crate::types::BranchKind;

const NODE: u32 = 0xabc;
const EPOCH: u64 = 3;

fn cfg() -> EngineConfig {
    EngineConfig {
        prepare_timeout_ms: 1_000,
        tx_timeout_ms: 5_000,
        max_tx_timeout_ms: 10_000,
        max_branches: 4,
        retry_initial_ms: 10,
        retry_max_ms: 80,
        one_phase: true,
    }
}

fn spec(id: &str, order: u32) -> BranchSpec {
    BranchSpec {
        branch_id: id.into(),
        endpoint: format!("http://127.0.0.1:{}", 7000 + order),
        commit_order: order,
        kind: if order == 0 {
            BranchKind::Database
        } else {
            BranchKind::Broker
        },
    }
}

fn engine() -> Engine {
    Engine::new(cfg(), NODE, EPOCH)
}

fn tx(seq: u64) -> TxId {
    TxId {
        node: NODE,
        epoch: EPOCH,
        seq,
    }
}

fn send(
    t: TxId,
    i: usize,
    b: &BranchSpec,
    message: Message,
    requires_durable: Option<Lsn>,
) -> Command {
    Command::Send {
        tx: t,
        branch: i,
        endpoint: b.endpoint.clone(),
        branch_id: b.branch_id.clone(),
        message,
        requires_durable,
    }
}

fn reply(req: ReqId, r: Result<ReplyOk, TxError>) -> Command {
    Command::Reply { req, reply: r }
}

/// The id a Begin answered with (its reply comes last).
fn begun(cmds: &[Command]) -> TxId {
    match cmds.last() {
        Some(Command::Reply {
            reply: Ok(ReplyOk::Begun(t)),
            ..
        }) => *t,
        Some(Command::Reply {
            reply: Ok(ReplyOk::BegunLocal(ts)),
            ..
        }) if ts.len() == 1 => ts[0],
        other => panic!("unexpected {other:?}"),
    }
}

/// Begins a transaction with `branches` enlisted through Begin.
fn begin(e: &mut Engine, branches: &[BranchSpec]) -> TxId {
    let cmds = e.handle(
        0,
        Event::Begin {
            req: 1,
            timeout_ms: 0,
            branches: branches.to_vec(),
        },
    );
    let t = begun(&cmds);
    assert_eq!(
        cmds[0],
        Command::ArmTimer {
            tx: t,
            timer: Timer::TxTimeout,
            after_ms: 5_000
        }
    );
    let rest = &cmds[1..cmds.len() - 1];
    if e.config().one_phase && branches.len() == 1 {
        assert_eq!(
            rest,
            &[
                Command::LogLazy(LazyRecord::OnePhase {
                    tx: t,
                    branch: branches[0].clone()
                }),
                Command::Sync { tx: t }
            ],
            "the first branch's one-phase intent is written and synced in the background"
        );
    } else {
        assert_eq!(rest, &[]);
    }
    t
}

/// Commits a two-branch transaction up to the force of its decision.
fn prepared_pair(e: &mut Engine, a: &BranchSpec, b: &BranchSpec) -> TxId {
    let t = begin(e, &[a.clone(), b.clone()]);
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    assert!(e
        .handle(
            2,
            Event::Voted {
                tx: t,
                branch: 0,
                vote: Ok(Vote::Yes)
            }
        )
        .is_empty());
    let cmds = e.handle(
        3,
        Event::Voted {
            tx: t,
            branch: 1,
            vote: Ok(Vote::Yes),
        },
    );
    assert!(
        matches!(cmds.as_slice(), [Command::ForceCommit(_)]),
        "{cmds:?}"
    );
    t
}

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
        vec![
            Command::LogLazy(LazyRecord::OnePhase {
                tx: t,
                branch: a.clone()
            }),
            Command::Sync { tx: t },
            reply(2, Ok(ReplyOk::Enlisted))
        ],
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
        e.handle(
            2,
            Event::Commit {
                req: 4,
                tx: t,
                early: false
            }
        ),
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
        e.handle(2, Event::Synced { tx: t }),
        vec![],
        "the intent's sync is moot for a two-phase commit (its PREPARING record replaced it)"
    );
    assert_eq!(
        e.handle(
            3,
            Event::Voted {
                tx: t,
                branch: 1,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            4,
            Event::Voted {
                tx: t,
                branch: 0,
                vote: Ok(Vote::Yes)
            }
        ),
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
            reply(4, Ok(ReplyOk::Committed)),
            send(t, 0, &a, Message::Commit { one_phase: false }, Some(7)),
            send(t, 1, &b, Message::Commit { one_phase: false }, Some(7)),
        ]
    );
    assert_eq!(
        e.handle(
            6,
            Event::CommitAcked {
                tx: t,
                branch: 1,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            7,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::Done { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            },
        ]
    );
    assert!(e.tx(&t).is_none());
    assert_eq!(e.provenance(&t), Provenance::FinishedThisEpoch);
    // A late duplicate ack, and a repeated Commit, after the engine forgot the transaction.
    assert_eq!(
        e.handle(
            8,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            8,
            Event::Commit {
                req: 9,
                tx: t,
                early: false
            }
        ),
        vec![reply(9, Ok(ReplyOk::NotLive))]
    );
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
            reply(10, Ok(ReplyOk::Committed)),
            send(t, 0, &db, Message::Commit { one_phase: false }, Some(1))
        ]
    );
    // A failed database commit is retried, and the broker still waits.
    assert_eq!(
        e.handle(
            6,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Err("down".into())
            }
        ),
        vec![Command::ArmTimer {
            tx: t,
            timer: Timer::Retry { branch: 0 },
            after_ms: 10
        }]
    );
    assert_eq!(
        e.handle(
            16,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 0 }
            }
        ),
        vec![send(
            t,
            0,
            &db,
            Message::Commit { one_phase: false },
            Some(1)
        )]
    );
    assert_eq!(
        e.handle(
            17,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![send(
            t,
            1,
            &mq,
            Message::Commit { one_phase: false },
            Some(1)
        )]
    );
    assert_eq!(
        e.handle(
            18,
            Event::CommitAcked {
                tx: t,
                branch: 1,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::Done { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            }
        ]
    );
}

#[test]
fn retries_back_off_exponentially_up_to_the_cap_and_never_stop() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = prepared_pair(&mut e, &a, &b);
    e.handle(5, Event::LogDurable { tx: t, lsn: 1 });
    e.handle(
        5,
        Event::CommitAcked {
            tx: t,
            branch: 1,
            ack: Ok(CommitAck::Committed),
        },
    );
    let mut delays = Vec::new();
    for i in 0..40u64 {
        let cmds = e.handle(
            10 + i,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Err("unreachable".into()),
            },
        );
        match cmds.as_slice() {
            [Command::ArmTimer {
                timer: Timer::Retry { branch: 0 },
                after_ms,
                ..
            }] => delays.push(*after_ms),
            other => panic!("{other:?}"),
        }
        let resend = e.handle(
            10 + i,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 0 },
            },
        );
        assert_eq!(
            resend,
            vec![send(
                t,
                0,
                &a,
                Message::Commit { one_phase: false },
                Some(1)
            )]
        );
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
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    assert_eq!(
        e.handle(
            2,
            Event::Voted {
                tx: t,
                branch: 0,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![]
    );
    let cmds = e.handle(
        3,
        Event::Voted {
            tx: t,
            branch: 1,
            vote: Ok(Vote::No("duplicate key".into())),
        },
    );
    assert_eq!(
        cmds,
        vec![
            reply(
                10,
                Err(TxError::Aborted(format!(
                    "transaction {t} aborted: branch b voted no: duplicate key"
                )))
            ),
            send(t, 0, &a, Message::Abort, None),
            // b voted no: one courtesy abort. c's prepare is still out: its abort waits for
            // the vote so the two messages cannot cross.
            send(t, 1, &b, Message::Abort, None),
        ]
    );
    // The late yes from c gets its abort now.
    assert_eq!(
        e.handle(
            4,
            Event::Voted {
                tx: t,
                branch: 2,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![send(t, 2, &c, Message::Abort, None)]
    );
    // A failed abort to a prepared branch is retried; a failed courtesy abort is not.
    assert_eq!(
        e.handle(
            5,
            Event::AbortAcked {
                tx: t,
                branch: 0,
                ack: Err("down".into())
            }
        ),
        vec![Command::ArmTimer {
            tx: t,
            timer: Timer::Retry { branch: 0 },
            after_ms: 10
        }]
    );
    assert_eq!(
        e.handle(
            5,
            Event::AbortAcked {
                tx: t,
                branch: 1,
                ack: Err("down".into())
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            6,
            Event::AbortAcked {
                tx: t,
                branch: 2,
                ack: Ok(AbortAck::Aborted)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            15,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 0 }
            }
        ),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.handle(
            26,
            Event::AbortAcked {
                tx: t,
                branch: 0,
                ack: Ok(AbortAck::Aborted)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::Aborted { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Aborted
            }
        ]
    );
    // Commit after the abort: the engine no longer holds it; presumed abort answers.
    assert_eq!(
        e.handle(
            27,
            Event::Commit {
                req: 11,
                tx: t,
                early: false
            }
        ),
        vec![reply(11, Ok(ReplyOk::NotLive))]
    );
}

#[test]
fn prepare_timeout_aborts_and_a_late_vote_is_answered_with_abort() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    e.handle(
        2,
        Event::Voted {
            tx: t,
            branch: 0,
            vote: Ok(Vote::Yes),
        },
    );
    let cmds = e.handle(
        1001,
        Event::Timer {
            tx: t,
            timer: Timer::PrepareTimeout,
        },
    );
    assert_eq!(
        cmds,
        vec![
            reply(
                10,
                Err(TxError::Aborted(format!(
                "transaction {t} aborted: prepare timed out after 1000 ms waiting for branch(es) b"
            )))
            ),
            send(t, 0, &a, Message::Abort, None),
        ]
    );
    // The transport gives up on b's prepare: whether it prepared is unknown, so it gets an
    // abort that is retried until acknowledged.
    assert_eq!(
        e.handle(
            1002,
            Event::Voted {
                tx: t,
                branch: 1,
                vote: Err("deadline".into())
            }
        ),
        vec![send(t, 1, &b, Message::Abort, None)]
    );
    e.handle(
        1003,
        Event::AbortAcked {
            tx: t,
            branch: 0,
            ack: Ok(AbortAck::Aborted),
        },
    );
    assert_eq!(
        e.handle(
            1004,
            Event::AbortAcked {
                tx: t,
                branch: 1,
                ack: Ok(AbortAck::Aborted)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::Aborted { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Aborted
            }
        ]
    );
    // The prepare timer of a decided transaction does nothing.
    assert_eq!(
        e.handle(
            2000,
            Event::Timer {
                tx: t,
                timer: Timer::PrepareTimeout
            }
        ),
        vec![]
    );
}

/// Commit of a single-branch transaction (begun with its branch) up to the one-phase
/// commit going out: the intent written at Begin becomes durable while the transaction is
/// active, so the commit goes out at once.
fn one_phase_commit_sent(e: &mut Engine, now: u64, req: ReqId, t: TxId, a: &BranchSpec) {
    one_phase_commit_sent_as(e, now, req, t, a, false)
}

/// [`one_phase_commit_sent`] for a Commit with `early` as given.
fn one_phase_commit_sent_as(
    e: &mut Engine,
    now: u64,
    req: ReqId,
    t: TxId,
    a: &BranchSpec,
    early: bool,
) {
    assert_eq!(
        e.handle(now, Event::Synced { tx: t }),
        vec![],
        "the intent became durable while the transaction was active"
    );
    assert_eq!(
        e.handle(now, Event::Commit { req, tx: t, early }),
        vec![send(t, 0, a, Message::Commit { one_phase: true }, None)],
        "the intent is durable: the one-phase commit goes out at once"
    );
}

#[test]
fn single_branch_commits_in_one_phase_with_its_intent_and_outcome_synced() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent(&mut e, 1, 10, t, &a);
    assert_eq!(
        e.handle(
            2,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx: t,
                branches: vec![a.clone()]
            }),
            Command::Sync { tx: t },
        ],
        "the client hears nothing before the outcome is durable"
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Committing));
    // A repeated Commit (and an Abort) waits for the same sync.
    assert_eq!(
        e.handle(
            2,
            Event::Commit {
                req: 14,
                tx: t,
                early: false
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            2,
            Event::Abort {
                req: 15,
                tx: t,
                reason: String::new()
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(3, Event::Synced { tx: t }),
        vec![
            reply(10, Ok(ReplyOk::Committed)),
            reply(14, Ok(ReplyOk::Committed)),
            reply(
                15,
                Err(TxError::FailedPrecondition(format!(
                    "transaction {t} cannot be aborted: its outcome is COMMITTED"
                )))
            ),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            },
        ]
    );
    // Refused one-phase commit: aborted, the intent dropped, nothing left to send.
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent(&mut e, 3, 11, t2, &a);
    assert_eq!(
        e.handle(
            4,
            Event::CommitAcked {
                tx: t2,
                branch: 0,
                ack: Ok(CommitAck::Refused("check violation".into()))
            }
        ),
        vec![
            reply(
                11,
                Err(TxError::Aborted(format!(
                    "transaction {t2} aborted: branch a refused to commit: check violation"
                )))
            ),
            Command::LogLazy(LazyRecord::Aborted { tx: t2 }),
            Command::Finished {
                tx: t2,
                outcome: Outcome::Aborted
            },
        ]
    );
    // Lost answer: the one-phase commit is asked again until the participant answers.
    let t3 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent(&mut e, 5, 12, t3, &a);
    assert_eq!(
        e.handle(
            6,
            Event::CommitAcked {
                tx: t3,
                branch: 0,
                ack: Err("timeout".into())
            }
        ),
        vec![Command::ArmTimer {
            tx: t3,
            timer: Timer::Retry { branch: 0 },
            after_ms: 10
        }]
    );
    assert_eq!(
        e.handle(
            16,
            Event::Timer {
                tx: t3,
                timer: Timer::Retry { branch: 0 }
            }
        ),
        vec![send(t3, 0, &a, Message::Commit { one_phase: true }, None)]
    );
    // An Abort during a one-phase commit waits for the participant's answer.
    assert_eq!(
        e.handle(
            17,
            Event::Abort {
                req: 13,
                tx: t3,
                reason: String::new()
            }
        ),
        vec![]
    );
    e.handle(
        18,
        Event::CommitAcked {
            tx: t3,
            branch: 0,
            ack: Ok(CommitAck::Committed),
        },
    );
    let cmds = e.handle(19, Event::Synced { tx: t3 });
    assert_eq!(cmds[0], reply(12, Ok(ReplyOk::Committed)));
    assert_eq!(
        cmds[1],
        reply(
            13,
            Err(TxError::FailedPrecondition(format!(
                "transaction {t3} cannot be aborted: its outcome is COMMITTED"
            )))
        )
    );
}

#[test]
fn a_one_phase_commit_waits_for_its_intent_even_when_a_retry_timer_fires() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin(&mut e, std::slice::from_ref(&a));
    assert_eq!(
        e.handle(
            1,
            Event::Commit {
                req: 10,
                tx: t,
                early: false
            }
        ),
        vec![],
        "the intent's sync (started at Begin) is still running"
    );
    assert_eq!(
        e.handle(
            2,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 0 }
            }
        ),
        vec![],
        "nothing goes to the branch before the intent is durable"
    );
    assert_eq!(
        e.handle(3, Event::Synced { tx: t }),
        vec![send(t, 0, &a, Message::Commit { one_phase: true }, None)]
    );
    // A stale Synced for a finished or unknown transaction does nothing.
    let other = TxId {
        node: NODE,
        epoch: EPOCH,
        seq: 999,
    };
    assert_eq!(e.handle(2, Event::Synced { tx: other }), vec![]);
}

#[test]
fn a_failed_one_phase_sync_leaves_the_transaction_in_doubt_and_halts() {
    let mut e = engine();
    let a = spec("a", 0);
    // The intent's sync fails: nothing was sent, the restart decides.
    let t = begin(&mut e, std::slice::from_ref(&a));
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    let cmds = e.handle(
        2,
        Event::SyncFailed {
            tx: t,
            error: "disk gone".into(),
        },
    );
    assert!(matches!(&cmds[0], Command::Halt { reason } if reason.contains("disk gone")));
    assert!(
        matches!(&cmds[1], Command::Reply { req: 10, reply: Err(TxError::Unavailable(m)) } if m.contains("restarts")),
        "{cmds:?}"
    );
    assert_eq!(cmds.len(), 2, "nothing is sent: {cmds:?}");
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::InDoubt));
}

#[test]
fn an_early_answer_comes_before_the_outcome_sync_unless_someone_needs_it_durable() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent_as(&mut e, 1, 10, t, &a, true);
    assert_eq!(
        e.handle(
            2,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx: t,
                branches: vec![a.clone()]
            }),
            reply(10, Ok(ReplyOk::Committed)),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            },
        ],
        "answered with the outcome written but not synced (the caller's Barrier syncs it)"
    );
    // An Abort waiting as well is told COMMITTED only once that is durable.
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent_as(&mut e, 3, 11, t2, &a, true);
    e.handle(
        3,
        Event::Abort {
            req: 12,
            tx: t2,
            reason: String::new(),
        },
    );
    let cmds = e.handle(
        4,
        Event::CommitAcked {
            tx: t2,
            branch: 0,
            ack: Ok(CommitAck::Committed),
        },
    );
    assert_eq!(cmds.last(), Some(&Command::Sync { tx: t2 }), "{cmds:?}");
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    // So is a second Commit that did not ask for an early answer.
    let t3 = begin(&mut e, std::slice::from_ref(&a));
    one_phase_commit_sent_as(&mut e, 5, 13, t3, &a, true);
    assert_eq!(
        e.handle(
            5,
            Event::Commit {
                req: 14,
                tx: t3,
                early: false
            }
        ),
        vec![]
    );
    let cmds = e.handle(
        6,
        Event::CommitAcked {
            tx: t3,
            branch: 0,
            ack: Ok(CommitAck::Committed),
        },
    );
    assert_eq!(cmds.last(), Some(&Command::Sync { tx: t3 }), "{cmds:?}");
    assert_eq!(
        e.handle(7, Event::Synced { tx: t3 }),
        vec![
            reply(13, Ok(ReplyOk::Committed)),
            reply(14, Ok(ReplyOk::Committed)),
            Command::Finished {
                tx: t3,
                outcome: Outcome::Committed
            },
        ]
    );
}

#[test]
fn the_intent_of_an_active_transaction_is_dropped_with_it_and_rewritten_after_a_failed_sync() {
    let mut e = engine();
    let a = spec("a", 0);
    // Aborted while its intent syncs: the intent is removed; the late Synced does nothing.
    let t = begin(&mut e, std::slice::from_ref(&a));
    e.handle(
        1,
        Event::Abort {
            req: 10,
            tx: t,
            reason: String::new(),
        },
    );
    let cmds = e.handle(
        1,
        Event::AbortAcked {
            tx: t,
            branch: 0,
            ack: Ok(AbortAck::Aborted),
        },
    );
    assert!(
        cmds.contains(&Command::LogLazy(LazyRecord::Aborted { tx: t })),
        "{cmds:?}"
    );
    assert_eq!(e.handle(2, Event::Synced { tx: t }), vec![]);
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
                early: true
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

/// Feeds recovery one one-phase intent (`tx`, `a`) and checks that the branch is asked
/// with an abort: the client may never have asked to commit, and the answer says what the
/// branch did.
fn recover_intent(e: &mut Engine, now: u64, tx: TxId, a: &BranchSpec) {
    let cmds = e.handle(
        now,
        Event::Recovered(Recovered {
            one_phase: vec![(tx, a.clone())],
            ..Recovered::default()
        }),
    );
    assert_eq!(cmds, vec![send(tx, 0, a, Message::Abort, None)]);
    assert_eq!(
        e.outcome_of(&tx, false),
        Ok(None),
        "undecided until the branch answers"
    );
}

#[test]
fn recovered_one_phase_intents_ask_their_branch_again() {
    let mut e = engine();
    let a = spec("a", 0);
    let old = TxId {
        node: NODE,
        epoch: EPOCH - 1,
        seq: 7,
    };
    recover_intent(&mut e, 0, old, &a);
    // An answer that does not say, or none: asked again (with an abort, never a commit).
    for (now, ack) in [
        (1, Ok(AbortAck::Unreported)),
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
            e.handle(
                now + 20,
                Event::Timer {
                    tx: old,
                    timer: Timer::Retry { branch: 0 }
                }
            ),
            vec![send(old, 0, &a, Message::Abort, None)]
        );
    }
    let last_error = e.tx(&old).and_then(|x| x.branches[0].last_error.clone());
    assert_eq!(last_error.as_deref(), Some("connection refused"));
    // A client that asks meanwhile waits for the branch's answer.
    assert_eq!(
        e.handle(
            55,
            Event::Commit {
                req: 9,
                tx: old,
                early: false
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            60,
            Event::AbortAcked {
                tx: old,
                branch: 0,
                ack: Ok(AbortAck::AlreadyCommitted),
            },
        ),
        vec![
            Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx: old,
                branches: vec![a.clone()]
            }),
            Command::Sync { tx: old },
        ],
        "committed in one phase: the outcome is written, and synced for the waiting client"
    );
    assert_eq!(e.outcome_of(&old, false), Ok(Some(Outcome::Committed)));
    assert_eq!(
        e.handle(61, Event::Synced { tx: old }),
        vec![
            reply(9, Ok(ReplyOk::Committed)),
            Command::Finished {
                tx: old,
                outcome: Outcome::Committed
            }
        ]
    );
    // Nobody waiting: the outcome is written and the transaction finished at once.
    let old1 = TxId { seq: 9, ..old };
    recover_intent(&mut e, 62, old1, &a);
    assert_eq!(
        e.handle(
            63,
            Event::AbortAcked {
                tx: old1,
                branch: 0,
                ack: Ok(AbortAck::AlreadyCommitted),
            },
        ),
        vec![
            Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx: old1,
                branches: vec![a.clone()]
            }),
            Command::Finished {
                tx: old1,
                outcome: Outcome::Committed
            }
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
                early: true
            }
        ),
        vec![]
    );
    let cmds = e.handle(
        72,
        Event::AbortAcked {
            tx: old2,
            branch: 0,
            ack: Ok(AbortAck::Aborted),
        },
    );
    assert_eq!(
        cmds,
        vec![
            reply(
                10,
                Err(TxError::Aborted(format!(
                    "transaction {old2} aborted: the coordinator restarted before the one-phase \
                     commit was confirmed, and branch a reports it rolled back"
                )))
            ),
            Command::LogLazy(LazyRecord::Aborted { tx: old2 }),
            Command::Finished {
                tx: old2,
                outcome: Outcome::Aborted
            }
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
    let a = spec("a", 0);
    let t = begin(&mut e, std::slice::from_ref(&a));
    let cmds = e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    assert_eq!(cmds[1], send(t, 0, &a, Message::Prepare, None));
}

#[test]
fn read_only_branches_skip_phase_two_and_all_read_only_needs_no_log() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    e.handle(
        2,
        Event::Voted {
            tx: t,
            branch: 0,
            vote: Ok(Vote::ReadOnly),
        },
    );
    assert_eq!(
        e.handle(
            3,
            Event::Voted {
                tx: t,
                branch: 1,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![Command::ForceCommit(CommitRecord {
            tx: t,
            branches: vec![b.clone()],
            decided_at_ms: 0
        })]
    );
    assert_eq!(
        e.handle(4, Event::LogDurable { tx: t, lsn: 2 }),
        vec![
            reply(10, Ok(ReplyOk::Committed)),
            send(t, 1, &b, Message::Commit { one_phase: false }, Some(2))
        ]
    );

    let t2 = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        5,
        Event::Commit {
            req: 11,
            tx: t2,
            early: false,
        },
    );
    e.handle(
        6,
        Event::Voted {
            tx: t2,
            branch: 0,
            vote: Ok(Vote::ReadOnly),
        },
    );
    assert_eq!(
        e.handle(
            7,
            Event::Voted {
                tx: t2,
                branch: 1,
                vote: Ok(Vote::ReadOnly)
            }
        ),
        vec![
            reply(11, Ok(ReplyOk::Committed)),
            Command::LogLazy(LazyRecord::Aborted { tx: t2 }),
            Command::Finished {
                tx: t2,
                outcome: Outcome::Committed
            },
        ]
    );
}

#[test]
fn duplicate_and_late_messages_change_nothing() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    // A second Commit while preparing joins the first: no new prepares.
    assert_eq!(
        e.handle(
            1,
            Event::Commit {
                req: 11,
                tx: t,
                early: false
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            2,
            Event::Voted {
                tx: t,
                branch: 0,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![]
    );
    // The same vote twice, and a vote for a branch index that does not exist.
    assert_eq!(
        e.handle(
            2,
            Event::Voted {
                tx: t,
                branch: 0,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            2,
            Event::Voted {
                tx: t,
                branch: 9,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![]
    );
    let before = e.clone();
    // Phase-two answers before there is a decision are ignored.
    assert_eq!(
        e.handle(
            2,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            2,
            Event::AbortAcked {
                tx: t,
                branch: 0,
                ack: Ok(AbortAck::Aborted)
            }
        ),
        vec![]
    );
    assert_eq!(e.handle(2, Event::LogDurable { tx: t, lsn: 4 }), vec![]);
    assert_eq!(e.tx(&t), before.tx(&t));
    e.handle(
        3,
        Event::Voted {
            tx: t,
            branch: 1,
            vote: Ok(Vote::Yes),
        },
    );
    let cmds = e.handle(4, Event::LogDurable { tx: t, lsn: 4 });
    assert_eq!(
        &cmds[..2],
        &[
            reply(10, Ok(ReplyOk::Committed)),
            reply(11, Ok(ReplyOk::Committed))
        ]
    );
    // A second durable notice, and a vote arriving after the decision.
    assert_eq!(e.handle(5, Event::LogDurable { tx: t, lsn: 4 }), vec![]);
    assert_eq!(
        e.handle(
            5,
            Event::Voted {
                tx: t,
                branch: 1,
                vote: Ok(Vote::No("late".into()))
            }
        ),
        vec![]
    );
    // Commit again after the decision answers at once.
    assert_eq!(
        e.handle(
            6,
            Event::Commit {
                req: 12,
                tx: t,
                early: false
            }
        ),
        vec![reply(12, Ok(ReplyOk::Committed))]
    );
    // Timers for other phases do nothing.
    assert_eq!(
        e.handle(
            7,
            Event::Timer {
                tx: t,
                timer: Timer::TxTimeout
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            7,
            Event::Timer {
                tx: t,
                timer: Timer::PrepareTimeout
            }
        ),
        vec![]
    );
    // A retry timer while the commit is still in flight sends nothing twice.
    assert_eq!(
        e.handle(
            7,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 0 }
            }
        ),
        vec![]
    );
    // Events for unknown transactions are ignored.
    let stranger = TxId {
        node: 1,
        epoch: 1,
        seq: 1,
    };
    assert_eq!(
        e.handle(
            8,
            Event::Voted {
                tx: stranger,
                branch: 0,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![]
    );
    assert_eq!(
        e.handle(
            8,
            Event::Timer {
                tx: stranger,
                timer: Timer::TxTimeout
            }
        ),
        vec![]
    );
}

#[test]
fn abort_requests() {
    let mut e = engine();
    let (a, b) = (spec("a", 0), spec("b", 0));
    // Active: courtesy aborts, then forgotten.
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    let cmds = e.handle(
        1,
        Event::Abort {
            req: 20,
            tx: t,
            reason: "user cancelled".into(),
        },
    );
    assert_eq!(
        cmds,
        vec![
            send(t, 0, &a, Message::Abort, None),
            send(t, 1, &b, Message::Abort, None),
            reply(20, Ok(ReplyOk::Aborted))
        ]
    );
    assert_eq!(
        e.handle(
            1,
            Event::Abort {
                req: 21,
                tx: t,
                reason: String::new()
            }
        ),
        vec![reply(21, Ok(ReplyOk::Aborted))]
    );
    assert_eq!(
        e.handle(
            1,
            Event::Commit {
                req: 22,
                tx: t,
                early: false
            }
        ),
        vec![reply(
            22,
            Err(TxError::Aborted(format!(
                "transaction {t} aborted: aborted by the client: user cancelled"
            )))
        )]
    );
    e.handle(
        2,
        Event::AbortAcked {
            tx: t,
            branch: 0,
            ack: Ok(AbortAck::Aborted),
        },
    );
    assert_eq!(
        e.handle(
            2,
            Event::AbortAcked {
                tx: t,
                branch: 1,
                ack: Err("gone".into())
            }
        ),
        vec![Command::Finished {
            tx: t,
            outcome: Outcome::Aborted
        }]
    );

    // Decided commit: an Abort while the COMMIT is being forced waits for the log (a crash
    // before the sync would make it an abort); once durable it is refused, as it is
    // while committing.
    let t2 = prepared_pair(&mut e, &a, &b);
    let refused = Err(TxError::FailedPrecondition(format!(
        "transaction {t2} cannot be aborted: its outcome is COMMITTED"
    )));
    assert_eq!(
        e.handle(
            4,
            Event::Abort {
                req: 23,
                tx: t2,
                reason: String::new()
            }
        ),
        vec![]
    );
    let cmds = e.handle(5, Event::LogDurable { tx: t2, lsn: 1 });
    assert_eq!(
        &cmds[..2],
        &[
            reply(10, Ok(ReplyOk::Committed)),
            reply(23, refused.clone())
        ]
    );
    assert_eq!(
        e.handle(
            6,
            Event::Abort {
                req: 24,
                tx: t2,
                reason: String::new()
            }
        ),
        vec![reply(24, refused)]
    );
    // If the force fails instead, the waiting Abort hears that the outcome is in doubt.
    let t3 = prepared_pair(&mut e, &a, &b);
    assert_eq!(
        e.handle(
            7,
            Event::Abort {
                req: 25,
                tx: t3,
                reason: String::new()
            }
        ),
        vec![]
    );
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
                reply: Err(TxError::Unavailable(_))
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
        e.handle(
            7,
            Event::Abort {
                req: 25,
                tx: unknown,
                reason: String::new()
            }
        ),
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
        e.handle(
            7,
            Event::Abort {
                req: 26,
                tx: old,
                reason: String::new()
            }
        ),
        vec![reply(26, Ok(ReplyOk::NotLive))]
    );
}

#[test]
fn transaction_timeout_aborts_only_active_transactions() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin(&mut e, std::slice::from_ref(&a));
    assert_eq!(
        e.handle(
            5_000,
            Event::Timer {
                tx: t,
                timer: Timer::TxTimeout
            }
        ),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));
    assert_eq!(
        e.handle(
            5_001,
            Event::Commit {
                req: 3,
                tx: t,
                early: false
            }
        ),
        vec![reply(
            3,
            Err(TxError::Aborted(format!(
                "transaction {t} aborted: transaction timed out while active"
            )))
        )]
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
        vec![
            Command::LogLazy(LazyRecord::OnePhase {
                tx: t,
                branch: a.clone()
            }),
            Command::Sync { tx: t },
            reply(7, Ok(ReplyOk::Enlisted))
        ]
    );
    assert_eq!(
        enlist(&mut e, a.clone()),
        vec![reply(7, Ok(ReplyOk::Enlisted))],
        "a repeated enlist writes no second intent"
    );
    let other = BranchSpec {
        commit_order: 3,
        ..a.clone()
    };
    assert!(matches!(
        enlist(&mut e, other)[0],
        Command::Reply {
            reply: Err(TxError::AlreadyExists(_)),
            ..
        }
    ));
    let bad_id = BranchSpec {
        branch_id: "no spaces".into(),
        ..a.clone()
    };
    assert!(matches!(
        enlist(&mut e, bad_id)[0],
        Command::Reply {
            reply: Err(TxError::InvalidArgument(_)),
            ..
        }
    ));
    let bad_ep = BranchSpec {
        branch_id: "x".into(),
        endpoint: "localhost".into(),
        ..a.clone()
    };
    assert!(matches!(
        enlist(&mut e, bad_ep)[0],
        Command::Reply {
            reply: Err(TxError::InvalidArgument(_)),
            ..
        }
    ));
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
    e.handle(
        2,
        Event::Commit {
            req: 9,
            tx: t,
            early: false,
        },
    );
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
            reply: Err(TxError::Unavailable(_))
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
            send(
                old_commit,
                0,
                &db,
                Message::Commit { one_phase: false },
                None
            ),
            send(old_undecided, 0, &db, Message::Abort, None),
        ]
    );
    assert_eq!(
        e.tx(&old_commit).map(|x| x.state),
        Some(TxState::Committing)
    );
    // A participant asking meanwhile hears COMMITTED; Abort is refused.
    assert!(matches!(
        e.handle(
            1,
            Event::Abort {
                req: 1,
                tx: old_commit,
                reason: String::new()
            }
        )
        .as_slice(),
        [Command::Reply {
            reply: Err(TxError::FailedPrecondition(_)),
            ..
        }]
    ));
    assert_eq!(
        e.handle(
            2,
            Event::CommitAcked {
                tx: old_commit,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![send(
            old_commit,
            1,
            &mq,
            Message::Commit { one_phase: false },
            None
        )]
    );
    assert_eq!(
        e.handle(
            3,
            Event::CommitAcked {
                tx: old_commit,
                branch: 1,
                ack: Ok(CommitAck::Committed)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::Done { tx: old_commit }),
            Command::Finished {
                tx: old_commit,
                outcome: Outcome::Committed
            },
        ]
    );
    assert_eq!(
        e.handle(
            4,
            Event::AbortAcked {
                tx: old_undecided,
                branch: 0,
                ack: Ok(AbortAck::Aborted)
            }
        ),
        vec![
            Command::LogLazy(LazyRecord::Aborted { tx: old_undecided }),
            Command::Finished {
                tx: old_undecided,
                outcome: Outcome::Aborted
            },
        ]
    );
    // New ids start over in the new epoch.
    assert_eq!(begin(&mut e, &[]), tx(1));
}

#[test]
fn empty_transaction_commits_trivially() {
    let mut e = engine();
    let t = begin(&mut e, &[]);
    assert_eq!(
        e.handle(
            1,
            Event::Commit {
                req: 2,
                tx: t,
                early: false
            }
        ),
        vec![
            reply(2, Ok(ReplyOk::Committed)),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            }
        ]
    );
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

// ---------------------------------------------------------------------------------------
// Operator resolutions
// ---------------------------------------------------------------------------------------

fn ask(decision: HeuristicDecision, force: bool) -> ResolveRequest {
    ResolveRequest {
        decision,
        operator: "alice".into(),
        reason: "participant host decommissioned".into(),
        force,
    }
}

fn resolve_ev(req: ReqId, t: TxId, decision: HeuristicDecision, force: bool) -> Event {
    Event::Resolve {
        req,
        tx: t,
        request: ask(decision, force),
        logged: None,
    }
}

/// The audit record the engine must force for a resolution.
#[allow(clippy::too_many_arguments)]
fn record(
    t: TxId,
    decision: HeuristicDecision,
    force: bool,
    prior: &str,
    accepted: bool,
    contradicts: bool,
    branches: &[&str],
    detail: &str,
) -> AuditRecord {
    AuditRecord {
        tx: t,
        decision,
        operator: "alice".into(),
        reason: "participant host decommissioned".into(),
        force,
        at_ms: 0,
        prior_state: prior.into(),
        accepted,
        contradicts,
        branches: branches.iter().map(|b| b.to_string()).collect(),
        detail: detail.into(),
    }
}

/// The single ForceAudit of `cmds` (which must hold nothing else unless `others`).
#[track_caller]
fn forced_audit(cmds: &[Command], req: ReqId) -> AuditRecord {
    let audits: Vec<&AuditRecord> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::ForceAudit { req: r, record } if *r == req => Some(record),
            _ => None,
        })
        .collect();
    assert_eq!(audits.len(), 1, "want one ForceAudit for {req}: {cmds:?}");
    audits[0].clone()
}

/// A two-branch transaction in phase two: `a` acknowledged, `b` failing (one retry armed).
fn committing_with_stuck_branch(e: &mut Engine, a: &BranchSpec, b: &BranchSpec) -> TxId {
    let t = prepared_pair(e, a, b);
    e.handle(5, Event::LogDurable { tx: t, lsn: 3 });
    e.handle(
        6,
        Event::CommitAcked {
            tx: t,
            branch: 0,
            ack: Ok(CommitAck::Committed),
        },
    );
    assert_eq!(
        e.handle(
            7,
            Event::CommitAcked {
                tx: t,
                branch: 1,
                ack: Err("connection refused".into()),
            },
        ),
        vec![Command::ArmTimer {
            tx: t,
            timer: Timer::Retry { branch: 1 },
            after_ms: 10
        }]
    );
    t
}

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
        e.handle(
            21,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 1 }
            }
        ),
        vec![send(
            t,
            1,
            &b,
            Message::Commit { one_phase: false },
            Some(3)
        )]
    );
    // Durable: the branch is heuristically committed and the transaction finishes.
    let cmds = e.handle(
        22,
        Event::AuditDurable {
            req: 50,
            lsn: 4,
            at_ms: 1_700_000_000_123,
        },
    );
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
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            },
            reply(50, Ok(ReplyOk::Resolved(report))),
        ]
    );
    assert!(e.tx(&t).is_none());
    // The in-flight commit's late answer and a late timer change nothing.
    assert!(e
        .handle(
            23,
            Event::CommitAcked {
                tx: t,
                branch: 1,
                ack: Err("still down".into())
            }
        )
        .is_empty());
    assert!(e
        .handle(
            24,
            Event::Timer {
                tx: t,
                timer: Timer::Retry { branch: 1 }
            }
        )
        .is_empty());
    // The outcome participants are told is the logged one.
    assert_eq!(e.outcome_of(&t, true), Ok(Some(Outcome::Committed)));
    // A duplicate durability event is ignored.
    assert!(e
        .handle(
            25,
            Event::AuditDurable {
                req: 50,
                lsn: 4,
                at_ms: 1
            }
        )
        .is_empty());
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
    let cmds = e.handle(
        21,
        Event::AuditDurable {
            req: 51,
            lsn: 4,
            at_ms: 9,
        },
    );
    match cmds.as_slice() {
        [Command::Reply {
            req: 51,
            reply: Err(TxError::FailedPrecondition(m)),
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
    let cmds = e.handle(
        23,
        Event::AuditDurable {
            req: 52,
            lsn: 5,
            at_ms: 10,
        },
    );
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::Send { .. })),
        "no message to any branch: {cmds:?}"
    );
    assert_eq!(
        cmds[..2],
        [
            Command::LogLazy(LazyRecord::Done { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            }
        ]
    );
    match &cmds[2] {
        Command::Reply {
            req: 52,
            reply: Ok(ReplyOk::Resolved(r)),
        } => {
            assert_eq!(r.heuristic_branches, vec!["mq".to_string()]);
            assert_eq!(r.outcome, Some(Outcome::Committed));
            assert_eq!(r.record.at_ms, 10);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn resolve_commit_gives_a_never_reached_tier_one_best_effort_commit() {
    let mut e = engine();
    let (db, mq) = (spec("db", 0), spec("mq", 10));
    let t = prepared_pair(&mut e, &db, &mq);
    e.handle(5, Event::LogDurable { tx: t, lsn: 2 });
    e.handle(
        6,
        Event::CommitAcked {
            tx: t,
            branch: 0,
            ack: Err("db down".into()),
        },
    );
    let cmds = e.handle(7, resolve_ev(60, t, HeuristicDecision::Commit, false));
    let rec = forced_audit(&cmds, 60);
    assert_eq!(rec.branches, vec!["db".to_string(), "mq".to_string()]);
    let cmds = e.handle(
        8,
        Event::AuditDurable {
            req: 60,
            lsn: 3,
            at_ms: 1,
        },
    );
    assert_eq!(
        cmds[..3],
        [
            send(t, 1, &mq, Message::Commit { one_phase: false }, Some(2)),
            Command::LogLazy(LazyRecord::Done { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Committed
            },
        ]
    );
    // Its answer comes after the transaction is finished: ignored.
    assert!(e
        .handle(
            9,
            Event::CommitAcked {
                tx: t,
                branch: 1,
                ack: Ok(CommitAck::Committed)
            }
        )
        .is_empty());
}

#[test]
fn resolve_abort_of_an_undecided_transaction_aborts_at_once_and_finishes_when_durable() {
    let mut e = engine();
    let (a, b) = (spec("db", 0), spec("mq", 0));
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    e.handle(
        2,
        Event::Voted {
            tx: t,
            branch: 0,
            vote: Ok(Vote::Yes),
        },
    );
    // b's prepare hangs. The abort is decided now: the Commit caller is told ABORTED and
    // a (idle) gets its abort; b gets one when its prepare returns.
    let cmds = e.handle(3, resolve_ev(70, t, HeuristicDecision::Abort, false));
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    match &cmds[0] {
        Command::Reply {
            req: 10,
            reply: Err(TxError::Aborted(m)),
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
        e.handle(
            4,
            Event::Voted {
                tx: t,
                branch: 1,
                vote: Ok(Vote::Yes)
            }
        ),
        vec![send(t, 1, &b, Message::Abort, None)]
    );
    assert!(e
        .handle(
            5,
            Event::AbortAcked {
                tx: t,
                branch: 0,
                ack: Ok(AbortAck::Aborted)
            }
        )
        .is_empty());
    // Durable: b never acknowledged, so it is heuristically aborted and the tx finishes.
    let cmds = e.handle(
        6,
        Event::AuditDurable {
            req: 70,
            lsn: 1,
            at_ms: 2,
        },
    );
    assert_eq!(
        cmds[..2],
        [
            Command::LogLazy(LazyRecord::Aborted { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Aborted
            }
        ]
    );
    match &cmds[2] {
        Command::Reply {
            req: 70,
            reply: Ok(ReplyOk::Resolved(r)),
        } => {
            assert_eq!(r.heuristic_branches, vec!["mq".to_string()]);
            assert_eq!((r.state, r.outcome), (None, Some(Outcome::Aborted)));
        }
        other => panic!("{other:?}"),
    }
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
        let cmds = e.handle(
            2,
            Event::AuditDurable {
                req: 80,
                lsn: 1,
                at_ms: 1,
            },
        );
        assert!(
            matches!(
                cmds.as_slice(),
                [Command::Reply {
                    req: 80,
                    reply: Err(TxError::FailedPrecondition(_))
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
        let cmds = e.handle(
            4,
            Event::AuditDurable {
                req: 81,
                lsn: 2,
                at_ms: 1,
            },
        );
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
    let t = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        1,
        Event::Commit {
            req: 10,
            tx: t,
            early: false,
        },
    );
    e.handle(
        2,
        Event::Voted {
            tx: t,
            branch: 0,
            vote: Ok(Vote::No("constraint".into())),
        },
    );
    // b voted yes late: it owes an abort acknowledgement and its participant is down.
    e.handle(
        3,
        Event::Voted {
            tx: t,
            branch: 1,
            vote: Ok(Vote::Yes),
        },
    );
    e.handle(
        4,
        Event::AbortAcked {
            tx: t,
            branch: 1,
            ack: Err("down".into()),
        },
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));

    // COMMIT contradicts the abort: refused without force.
    let cmds = e.handle(5, resolve_ev(90, t, HeuristicDecision::Commit, false));
    let rec = forced_audit(&cmds, 90);
    assert!(!rec.accepted && rec.detail.contains("ABORTED"), "{rec:?}");
    e.handle(
        6,
        Event::AuditDurable {
            req: 90,
            lsn: 1,
            at_ms: 1,
        },
    );
    assert_eq!(e.tx(&t).map(|x| x.state), Some(TxState::Aborting));

    // ABORT agrees: b is heuristically aborted and the transaction finishes.
    let cmds = e.handle(7, resolve_ev(91, t, HeuristicDecision::Abort, false));
    assert_eq!(forced_audit(&cmds, 91).branches, vec!["mq".to_string()]);
    let cmds = e.handle(
        8,
        Event::AuditDurable {
            req: 91,
            lsn: 2,
            at_ms: 2,
        },
    );
    assert_eq!(
        cmds[..2],
        [
            Command::LogLazy(LazyRecord::Aborted { tx: t }),
            Command::Finished {
                tx: t,
                outcome: Outcome::Aborted
            }
        ]
    );
    assert!(matches!(
        &cmds[2],
        Command::Reply {
            req: 91,
            reply: Ok(ReplyOk::Resolved(r)),
        } if r.heuristic_branches == ["mq"]
    ));

    // Forced COMMIT of another aborting one: contradicting, recorded, outcome stays ABORTED.
    let t2 = begin(&mut e, &[a.clone(), b.clone()]);
    e.handle(
        10,
        Event::Commit {
            req: 11,
            tx: t2,
            early: false,
        },
    );
    e.handle(
        11,
        Event::Abort {
            req: 12,
            tx: t2,
            reason: "client gave up".into(),
        },
    );
    let cmds = e.handle(12, resolve_ev(92, t2, HeuristicDecision::Commit, true));
    let rec = forced_audit(&cmds, 92);
    assert!(rec.accepted && rec.contradicts && rec.prior_state == "ABORTING");
    let cmds = e.handle(
        13,
        Event::AuditDurable {
            req: 92,
            lsn: 3,
            at_ms: 3,
        },
    );
    assert!(
        matches!(
            cmds.last(),
            Some(Command::Reply { req: 92, reply: Ok(ReplyOk::Resolved(r)) })
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
        e.handle(
            2,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Err("unreachable".into()),
            },
        );
        let cmds = e.handle(3, resolve_ev(95, t, decision, false));
        let rec = forced_audit(&cmds, 95);
        assert!(rec.accepted && !rec.contradicts, "{rec:?}");
        assert!(rec.detail.contains("one-phase"), "{rec:?}");
        let cmds = e.handle(
            4,
            Event::AuditDurable {
                req: 95,
                lsn: 1,
                at_ms: 1,
            },
        );
        let (caller, lazy, outcome) = match decision {
            HeuristicDecision::Commit => (
                Ok(ReplyOk::Committed),
                vec![Command::LogLazy(LazyRecord::OnePhaseCommitted {
                    tx: t,
                    branches: vec![a.clone()],
                })],
                Outcome::Committed,
            ),
            HeuristicDecision::Abort => (
                Err(TxError::Aborted(format!(
                    "transaction {t} aborted: one-phase commit resolved to ABORT by an operator"
                ))),
                vec![Command::LogLazy(LazyRecord::Aborted { tx: t })],
                Outcome::Aborted,
            ),
        };
        let mut want = vec![reply(10, caller)];
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
    e.handle(
        1,
        Event::Commit {
            req: 2,
            tx: t,
            early: false,
        },
    );
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
        let cmds = e.handle(
            4,
            Event::AuditDurable {
                req,
                lsn: req,
                at_ms: 5,
            },
        );
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
        Command::Reply { req: 3, reply: Err(TxError::Unavailable(m)) } if m.contains("disk gone")
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

/// Begins a local transaction (`commit_locally`) of branch `a` as request `req`: answered
/// at once, its intent written and synced in the background.
fn begin_local(e: &mut Engine, now: u64, req: ReqId, a: &BranchSpec) -> TxId {
    let cmds = e.handle(
        now,
        Event::BeginLocal {
            req,
            timeout_ms: 0,
            branch: a.clone(),
            count: 1,
        },
    );
    let t = begun(&cmds);
    assert_eq!(
        cmds,
        vec![
            Command::ArmTimer {
                tx: t,
                timer: Timer::TxTimeout,
                after_ms: 5_000
            },
            Command::LogLazy(LazyRecord::OnePhase {
                tx: t,
                branch: a.clone()
            }),
            Command::Sync { tx: t },
            reply(req, Ok(ReplyOk::BegunLocal(vec![t]))),
        ],
        "answered before the intent is durable (the participant waits for a Barrier)"
    );
    let entry = e.tx(&t).expect("held");
    assert_eq!(
        entry.state,
        TxState::Preparing,
        "in its participant's hands"
    );
    assert_eq!(
        entry
            .pending_branches()
            .iter()
            .map(|b| b.spec.branch_id.as_str())
            .collect::<Vec<_>>(),
        vec!["a"]
    );
    t
}

/// The answer, record and end of a local transaction its participant answered ABORTED
/// (asked with an abort for the caller `req`).
fn aborted_by_its_branch(t: TxId, req: ReqId) -> Vec<Command> {
    vec![
        reply(req, Ok(ReplyOk::Aborted)),
        Command::LogLazy(LazyRecord::Aborted { tx: t }),
        Command::Finished {
            tx: t,
            outcome: Outcome::Aborted,
        },
    ]
}

/// The outcome record and answers of a one-phase commit finished without a sync.
fn committed_at_once(t: TxId, a: &BranchSpec, req: ReqId) -> Vec<Command> {
    vec![
        Command::LogLazy(LazyRecord::OnePhaseCommitted {
            tx: t,
            branches: vec![a.clone()],
        }),
        reply(req, Ok(ReplyOk::Committed)),
        Command::Finished {
            tx: t,
            outcome: Outcome::Committed,
        },
    ]
}

#[test]
fn a_local_transaction_is_recorded_when_its_participant_reports_and_sends_nothing() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin_local(&mut e, 0, 1, &a);
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
    assert!(
        matches!(&refused[..], [Command::Reply { reply: Err(TxError::FailedPrecondition(m)), .. }]
            if m.contains("commit_locally")),
        "{refused:?}"
    );
    assert_eq!(e.handle(2, Event::Synced { tx: t }), vec![]);
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
    assert_eq!(e.handle(7, Event::Synced { tx: t2 }), vec![]);

    // A report for a transaction the coordinator commits itself is refused.
    let t3 = begin(&mut e, std::slice::from_ref(&a));
    let refused = e.handle(8, Event::CommittedLocally { req: 7, tx: t3 });
    assert!(
        matches!(&refused[..], [Command::Reply { req: 7, reply: Err(TxError::FailedPrecondition(m)) }]
            if m.contains("not begun with commit_locally")),
        "{refused:?}"
    );
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
    assert!(
        matches!(&refused[..], [Command::Reply { req: 1, reply: Err(TxError::FailedPrecondition(m)) }]
            if m.contains("one_phase = false")),
        "{refused:?}"
    );
}

#[test]
fn an_abort_or_timeout_of_a_local_transaction_asks_its_participant_what_it_did() {
    let mut e = engine();
    let a = spec("a", 0);
    // Aborted by its owner: the participant rolls back and says so.
    let t = begin_local(&mut e, 0, 1, &a);
    e.handle(1, Event::Synced { tx: t });
    assert_eq!(
        e.handle(
            2,
            Event::Abort {
                req: 2,
                tx: t,
                reason: "out of stock".into()
            }
        ),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.handle(
            3,
            Event::AbortAcked {
                tx: t,
                branch: 0,
                ack: Ok(AbortAck::Aborted)
            }
        ),
        aborted_by_its_branch(t, 2)
    );

    // Timed out, but the participant had committed (its report is late): COMMITTED.
    let t2 = begin_local(&mut e, 10, 3, &a);
    e.handle(11, Event::Synced { tx: t2 });
    assert_eq!(
        e.handle(
            5_010,
            Event::Timer {
                tx: t2,
                timer: Timer::TxTimeout
            }
        ),
        vec![send(t2, 0, &a, Message::Abort, None)]
    );
    let cmds = e.handle(
        5_011,
        Event::AbortAcked {
            tx: t2,
            branch: 0,
            ack: Ok(AbortAck::AlreadyCommitted),
        },
    );
    assert_eq!(
        cmds,
        vec![
            Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx: t2,
                branches: vec![a.clone()],
            }),
            Command::Finished {
                tx: t2,
                outcome: Outcome::Committed,
            },
        ]
    );

    // Aborted while the participant commits: its report comes first and decides; the
    // Abort caller hears COMMITTED once that is durable, and the abort's late answer
    // changes nothing.
    let t3 = begin_local(&mut e, 20, 4, &a);
    e.handle(21, Event::Synced { tx: t3 });
    e.handle(
        22,
        Event::Abort {
            req: 5,
            tx: t3,
            reason: String::new(),
        },
    );
    assert_eq!(
        e.handle(23, Event::CommittedLocally { req: 6, tx: t3 }),
        vec![
            Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx: t3,
                branches: vec![a.clone()],
            }),
            Command::Sync { tx: t3 },
        ]
    );
    assert_eq!(
        e.handle(24, Event::Synced { tx: t3 }),
        vec![
            reply(6, Ok(ReplyOk::Committed)),
            reply(5, Err(committed_error(&t3))),
            Command::Finished {
                tx: t3,
                outcome: Outcome::Committed,
            },
        ]
    );
    assert_eq!(
        e.handle(
            25,
            Event::AbortAcked {
                tx: t3,
                branch: 0,
                ack: Ok(AbortAck::AlreadyCommitted)
            }
        ),
        vec![]
    );

    // The same before the intent's sync returned: that sync does not cover the outcome,
    // so a second one follows it before the Abort caller is answered.
    let t4 = begin_local(&mut e, 30, 7, &a);
    assert_eq!(
        e.handle(
            31,
            Event::Abort {
                req: 8,
                tx: t4,
                reason: String::new(),
            }
        ),
        vec![send(t4, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.handle(32, Event::CommittedLocally { req: 9, tx: t4 }),
        vec![Command::LogLazy(LazyRecord::OnePhaseCommitted {
            tx: t4,
            branches: vec![a.clone()],
        })]
    );
    assert_eq!(
        e.handle(33, Event::Synced { tx: t4 }),
        vec![Command::Sync { tx: t4 }]
    );
    assert_eq!(
        e.handle(34, Event::Synced { tx: t4 }),
        vec![
            reply(9, Ok(ReplyOk::Committed)),
            reply(8, Err(committed_error(&t4))),
            Command::Finished {
                tx: t4,
                outcome: Outcome::Committed,
            },
        ]
    );
}

#[test]
fn a_plain_commit_of_a_local_transaction_is_sent_once_its_intent_is_durable() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin_local(&mut e, 0, 1, &a);
    assert_eq!(
        e.handle(
            1,
            Event::Commit {
                req: 2,
                tx: t,
                early: true
            }
        ),
        vec![],
        "waits for the intent"
    );
    assert_eq!(
        e.handle(2, Event::Synced { tx: t }),
        vec![send(t, 0, &a, Message::Commit { one_phase: true }, None)]
    );
    assert_eq!(
        e.handle(
            3,
            Event::CommitAcked {
                tx: t,
                branch: 0,
                ack: Ok(CommitAck::Committed)
            }
        ),
        committed_at_once(t, &a, 2)
    );
}

#[test]
fn a_recovered_intent_takes_its_participants_report() {
    let mut e = engine();
    let a = spec("a", 0);
    let old = TxId {
        node: NODE,
        epoch: EPOCH - 1,
        seq: 9,
    };
    recover_intent(&mut e, 0, old, &a);
    assert_eq!(
        e.handle(1, Event::CommittedLocally { req: 1, tx: old }),
        committed_at_once(old, &a, 1)
    );
    assert_eq!(
        e.handle(
            2,
            Event::AbortAcked {
                tx: old,
                branch: 0,
                ack: Ok(AbortAck::AlreadyCommitted)
            }
        ),
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
        matches!(&refused[..], [Command::Reply { req: 4, reply: Err(TxError::InvalidArgument(m)) }]
            if m.contains("at most 256")),
        "{refused:?}"
    );
    assert_eq!(e.txs().count(), live, "nothing begun");
}

#[test]
fn an_unused_local_id_goes_back_like_an_abort_and_only_a_local_one() {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin_local(&mut e, 0, 1, &a);
    e.handle(1, Event::Synced { tx: t });
    // The branch is still asked: its answer decides.
    assert_eq!(
        e.handle(2, Event::Release { req: 2, tx: t }),
        vec![send(t, 0, &a, Message::Abort, None)]
    );
    assert_eq!(
        e.tx(&t).and_then(|x| x.settle_cause()),
        Some(SettleCause::Unused)
    );
    let cmds = e.handle(
        3,
        Event::AbortAcked {
            tx: t,
            branch: 0,
            ack: Ok(AbortAck::Aborted),
        },
    );
    assert_eq!(cmds, aborted_by_its_branch(t, 2));
    // An ordinary transaction's id cannot come back unused.
    let t2 = begin(&mut e, std::slice::from_ref(&a));
    let refused = e.handle(4, Event::Release { req: 3, tx: t2 });
    assert!(
        matches!(&refused[..], [Command::Reply { req: 3, reply: Err(TxError::FailedPrecondition(m)) }]
            if m.contains("not begun with commit_locally")),
        "{refused:?}"
    );
    assert_eq!(e.tx(&t2).map(|x| x.state), Some(TxState::Active));
}
