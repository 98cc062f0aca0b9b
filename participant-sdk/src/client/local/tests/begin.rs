//! Ids begun ahead, the Barrier shared by local transactions, and what shutdown gives back.

use std::time::Duration;

use super::*;

#[test]
fn one_barrier_in_flight_serves_every_begin_answered_before_it_started() {
    let mut r = Rig::new(128);
    // Light load: each caller begins its own id.
    let (b1, n1) = begin_call(&r.begin(1));
    let (b2, n2) = begin_call(&r.at(ms(100)).begin(2));
    assert_eq!((n1, n2), (1, 1));

    let c = r.begun(b1, &["t1"], 7);
    let w1 = pending_waiter(&c, 1);
    let (barrier1, within) = barrier_call(&c);
    assert_eq!(within, BARRIER_TIMEOUT);
    // Answered while the first Barrier runs: it waits for the next one.
    let c = r.begun(b2, &["t2"], 7);
    let w2 = pending_waiter(&c, 2);
    assert!(
        !c.iter().any(|c| matches!(c, Command::Barrier { .. })),
        "{c:?}"
    );

    let c = r.barrier(barrier1, Ok(7));
    let (barrier2, _) = barrier_call(&c);
    assert_eq!(
        c[0],
        Command::Durable {
            waiters: vec![w1],
            intent: Intent::Durable
        }
    );
    assert_eq!(
        r.barrier(barrier2, Ok(7)),
        vec![Command::Durable {
            waiters: vec![w2],
            intent: Intent::Durable
        }]
    );
    assert_eq!(r.core.tickets(), 0, "nothing kept once answered");
}

#[test]
fn the_barrier_tells_each_waiter_whether_its_intent_is_durable() {
    // (epoch of the BeginLocal, Barrier answer, verdict)
    let cases: &[(u64, BarrierAnswer, Intent)] = &[
        (7, Ok(7), Intent::Durable),
        (7, Ok(8), Intent::Restarted { begun: 7, now: 8 }),
        (
            7,
            Err("no answer within 5s".into()),
            Intent::Unknown("no answer within 5s".into()),
        ),
    ];
    for (epoch, answer, verdict) in cases {
        let mut r = Rig::new(128);
        let (call, _) = begin_call(&r.begin(1));
        let c = r.begun(call, &["t1"], *epoch);
        let w = pending_waiter(&c, 1);
        let (barrier, _) = barrier_call(&c);
        assert_eq!(
            r.barrier(barrier, answer.clone()),
            vec![Command::Durable {
                waiters: vec![w],
                intent: verdict.clone()
            }],
            "{answer:?}"
        );
    }
}

#[test]
fn after_a_coordinator_restart_the_waiters_of_the_old_epoch_fall_back() {
    let mut r = Rig::new(128);
    let (b1, _) = begin_call(&r.begin(1));
    let (b2, _) = begin_call(&r.begin(2));
    let (b3, _) = begin_call(&r.begin(3));
    let (first, _) = barrier_call(&r.begun(b1, &["t1"], 7));
    // The coordinator restarts: the next answer comes from epoch 8. Both wait for the
    // second Barrier.
    let w2 = pending_waiter(&r.begun(b2, &["t2"], 7), 2);
    let w3 = pending_waiter(&r.begun(b3, &["t3"], 8), 3);
    let (second, _) = barrier_call(&r.barrier(first, Ok(7)));
    assert_eq!(
        r.barrier(second, Ok(8)),
        vec![
            Command::Durable {
                waiters: vec![w2],
                intent: Intent::Restarted { begun: 7, now: 8 }
            },
            Command::Durable {
                waiters: vec![w3],
                intent: Intent::Durable
            },
        ]
    );
}

#[test]
fn pooled_ids_take_their_barriers_answer_known_or_pending() {
    let mut r = Rig::new(128);
    // Warm up the demand at 2,000 a second for one window: ids are begun ahead.
    r.load(300, Duration::from_micros(500));
    assert!(r.core.pooled() > 0, "ids wait in the pool");
    // Every caller got its own id.
    let mut ids: Vec<&str> = r
        .replies
        .iter()
        .map(|(_, reply)| match reply {
            Reply::Local { tx_id, .. } => tx_id.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no id handed out twice");
    assert_eq!(n, 300);
    // Answered at once, so pooled ids come with the verdict known.
    let last = r.replies.last().map(|(_, reply)| reply);
    assert!(
        matches!(
            last,
            Some(Reply::Local {
                durable: Durability::Known(Intent::Durable),
                ..
            })
        ),
        "{last:?}"
    );

    // A batch whose Barrier has not answered yet: its pooled ids wait for it.
    let mut r = Rig::new(4);
    let mut call = None;
    for i in 0..400 {
        let c = r.at(Duration::from_micros(500 * i)).begin(i);
        if let Some((b, 4)) = c.iter().find_map(|c| match c {
            Command::BeginLocal { call, count, .. } => Some((*call, *count)),
            _ => None,
        }) {
            call = Some(b);
            break;
        }
        r.settle(c);
    }
    let call = call.expect("a batch of 4");
    let c = r.begun(call, &["a", "b", "c", "d"], 7);
    let (barrier, _) = barrier_call(&c);
    let pooled = r.core.pooled();
    assert!(pooled >= 3, "{pooled}");
    let c = r.begin(900);
    let w = pending_waiter(&c, 900);
    assert!(r.barrier(barrier, Ok(7)).iter().any(|c| matches!(
        c,
        Command::Durable { waiters, intent: Intent::Durable } if waiters.contains(&w)
    )));
    // Once answered, the rest of the batch is handed out with the answer known.
    let c = r.begin(901);
    assert!(
        c.iter().any(|c| matches!(
            c,
            Command::Reply {
                reply: Reply::Local {
                    durable: Durability::Known(Intent::Durable),
                    ..
                },
                ..
            }
        )),
        "{c:?}"
    );
}

#[test]
fn a_batch_never_begins_more_than_begin_ahead() {
    // (begin_ahead, the largest BeginLocal at 2,000 a second: 40 ms ahead is ~80)
    let cases = [(0, 1), (1, 1), (8, 8), (64, 64), (128, 81), (256, 81)];
    for (cap, largest) in cases {
        let mut r = Rig::new(cap);
        r.load(600, Duration::from_micros(500));
        let max = r.begin_counts.iter().copied().max().unwrap_or(0);
        assert!(
            max <= largest && max >= largest.min(80),
            "begin_ahead {cap}: largest BeginLocal {max}"
        );
        if cap > 1 {
            assert!(
                r.begin_counts.len() < 600 / 2,
                "begin_ahead {cap}: {} BeginLocals for 600 callers",
                r.begin_counts.len()
            );
        }
    }
}

#[test]
fn ids_too_old_go_back_and_an_id_nobody_took_goes_back() {
    let mut r = Rig::new(128);
    r.load(300, Duration::from_micros(500));
    let pooled = r.core.pooled();
    assert!(pooled > 0);
    let later = r.now - r.t0 + MAX_AGE;
    let c = r.at(later).begin(5_000);
    let stale = one(&c, |c| match c {
        Command::Release { tx_ids } => Some(tx_ids.clone()),
        _ => None,
    });
    assert_eq!(stale.len(), pooled, "every pooled id of MAX_AGE goes back");
    assert!(matches!(c[0], Command::Release { .. }), "released first");

    assert_eq!(
        r.step(Event::Unclaimed { tx_id: "t9".into() }),
        vec![Command::Release {
            tx_ids: vec!["t9".into()]
        }]
    );
}

#[test]
fn a_coordinator_without_local_begins_turns_begin_ahead_off() {
    let mut r = Rig::new(128);
    let (call, _) = begin_call(&r.begin(1));
    assert_eq!(
        r.step(Event::BeginLocalAnswered {
            call,
            answer: BeginLocalAnswer::Off
        }),
        vec![Command::Reply {
            caller: CallerId(1),
            reply: Reply::Off
        }]
    );
    // Under load from then on: one id per BeginLocal, never a batch.
    r.load(400, Duration::from_micros(500));
    assert!(
        r.begin_counts.iter().all(|&n| n == 1),
        "{:?}",
        r.begin_counts
    );
}

#[test]
fn a_failed_begin_fails_its_caller_and_a_failed_refill_just_ends() {
    let mut r = Rig::new(128);
    let (call, _) = begin_call(&r.begin(1));
    assert_eq!(
        r.step(Event::BeginLocalAnswered {
            call,
            answer: BeginLocalAnswer::Failed("Unavailable".into())
        }),
        vec![Command::Reply {
            caller: CallerId(1),
            reply: Reply::Failed("Unavailable".into())
        }]
    );
    // Under load, fail every refill: callers still get ids (of their own), and refills
    // keep being tried (each failure ends its refill).
    let mut refills = 0;
    for i in 0..400u64 {
        let c = r
            .at(ms(1_000) + Duration::from_micros(500 * i))
            .begin(10 + i);
        for cmd in c {
            if let Command::BeginLocal { call, count, .. } = cmd {
                if count > 1 {
                    refills += 1;
                    let c = r.step(Event::BeginLocalAnswered {
                        call,
                        answer: BeginLocalAnswer::Failed("Unavailable".into()),
                    });
                    // A background refill fails silently; a caller's batch fails its
                    // caller.
                    assert!(
                        c.iter().all(|c| matches!(
                            c,
                            Command::Reply {
                                reply: Reply::Failed(_),
                                ..
                            }
                        )) && c.len() <= 1,
                        "{c:?}"
                    );
                } else {
                    let id = format!("own{i}");
                    r.begun(call, &[id.as_str()], 7);
                }
            }
        }
    }
    assert!(refills > 1, "a failed refill ends, so the next can start");
    assert_eq!(r.core.pooled(), 0);
}

#[test]
fn shutdown_gives_every_pooled_id_back_and_then_begins_nothing_ahead() {
    let mut r = Rig::new(128);
    r.load(300, Duration::from_micros(500));
    let pooled = r.core.pooled();
    assert!(pooled > 0);
    let c = r.step(Event::Shutdown {
        caller: Some(CallerId(77)),
    });
    let (ids, within) = one(&c, |c| match c {
        Command::ReleaseAtShutdown { tx_ids, within } => Some((tx_ids.clone(), *within)),
        _ => None,
    });
    assert_eq!((ids.len(), within), (pooled, SHUTDOWN_RELEASE));
    assert_eq!(r.core.pooled(), 0);
    assert!(
        !c.iter().any(|c| matches!(c, Command::ShutDown { .. })),
        "not done before the ids went back"
    );
    assert_eq!(
        r.step(Event::ReleasedAtShutdown),
        vec![Command::ShutDown {
            callers: vec![CallerId(77)]
        }]
    );
    // A second shutdown is answered at once.
    assert_eq!(
        r.step(Event::Shutdown {
            caller: Some(CallerId(78))
        }),
        vec![Command::ShutDown {
            callers: vec![CallerId(78)]
        }]
    );
    // Still under load after shutdown: one id per BeginLocal, none pooled.
    r.begin_counts.clear();
    r.load(300, Duration::from_micros(500));
    assert!(r.begin_counts.iter().all(|&n| n == 1));
    assert_eq!(r.core.pooled(), 0);
}

#[test]
fn a_refill_answered_after_shutdown_goes_back() {
    let mut r = Rig::new(128);
    let mut refill = None;
    for i in 0..400u64 {
        let c = r.at(Duration::from_micros(500 * i)).begin(i);
        let (mine, other): (Vec<Cmd>, Vec<Cmd>) = c
            .into_iter()
            .partition(|c| matches!(c, Command::BeginLocal { count, .. } if *count > 1));
        r.settle(other);
        if let Some(Command::BeginLocal { call, count, .. }) = mine.into_iter().next() {
            refill = Some((call, count));
            break;
        }
    }
    let (call, count) = refill.expect("a batch");
    r.settle(vec![Command::ShutDown { callers: vec![] }]);
    r.step(Event::Shutdown { caller: None });
    let ids: Vec<String> = (0..count).map(|i| format!("late{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let c = r.begun(call, &ids, 7);
    let back = c.iter().find_map(|c| match c {
        Command::Release { tx_ids } => Some(tx_ids.len()),
        _ => None,
    });
    let replied = c.iter().any(|c| matches!(c, Command::Reply { .. }));
    assert_eq!(
        back,
        Some(count as usize - usize::from(replied)),
        "every id nobody took goes back: {c:?}"
    );
    assert_eq!(r.core.pooled(), 0);
}
