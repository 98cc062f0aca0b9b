//! The forget queue: the epoch filter, the bound, the backoff and the last Barrier.

use std::time::Duration;

use super::*;

#[test]
fn only_commits_of_the_barriers_epoch_are_forgotten() {
    let batch = vec![entry("a", 3), entry("b", 2), entry("c", 3), entry("d", 4)];
    // (the Barrier's epoch, the entries forgotten)
    let cases: &[(u64, &[&str])] = &[(3, &["a", "c"]), (2, &["b"]), (5, &[]), (0, &[])];
    for (epoch, kept) in cases {
        let got: Vec<String> = forgettable(batch.clone(), *epoch)
            .into_iter()
            .map(|u| u.tx_id)
            .collect();
        assert_eq!(&got, kept, "Barrier of epoch {epoch}");
    }
    // The same through the core: the entries of another epoch are dropped.
    let mut r = Rig::new(128);
    let (barrier, _) = barrier_call(&r.forget("a", 3));
    for (tx, epoch) in [("b", 2), ("c", 3), ("d", 4)] {
        assert!(r.forget(tx, epoch).is_empty(), "one Barrier in flight");
    }
    let c = r.barrier(barrier, Ok(3));
    assert_eq!(c[0], Command::Forget(vec![entry("a", 3)]));
    let (next, _) = barrier_call(&c);
    assert_eq!(
        r.barrier(next, Ok(3)),
        vec![Command::Forget(vec![entry("c", 3)])]
    );
    assert_eq!(r.core.unforgotten(), 0, "b and d are dropped, not kept");
}

#[test]
fn the_forget_queue_is_bounded_and_drops_the_oldest() {
    let mut r = Rig::new(128);
    let (barrier, _) = barrier_call(&r.forget("in-flight", 1));
    for i in 0..MAX_UNFORGOTTEN + 3 {
        r.forget(&i.to_string(), 1);
    }
    assert_eq!(
        r.core.unforgotten(),
        MAX_UNFORGOTTEN + 1,
        "queued + in flight"
    );
    let c = r.barrier(barrier, Ok(1));
    let (next, _) = barrier_call(&c);
    let c = r.barrier(next, Ok(1));
    let forgotten = one(&c, |c| match c {
        Command::Forget(entries) => Some(entries.clone()),
        _ => None,
    });
    assert_eq!(forgotten.len(), MAX_UNFORGOTTEN);
    assert_eq!(
        forgotten.first().map(|u| u.tx_id.as_str()),
        Some("3"),
        "the three oldest were dropped"
    );
}

#[test]
fn a_failed_forget_barrier_is_tried_again_with_backoff_from_100_ms_to_2_s() {
    let mut r = Rig::new(128);
    let (mut barrier, _) = barrier_call(&r.forget("t1", 7));
    let mut waits = Vec::new();
    for failure in 0..8 {
        let c = r.barrier(barrier, Err("Unavailable".into()));
        assert!(c.is_empty(), "{c:?}");
        // Queued during the backoff: no Barrier until it ends.
        assert!(r.forget(&format!("n{failure}"), 7).is_empty());
        let at = r.core.deadline().expect("a backoff");
        waits.push(at - r.now);
        assert!(r.at(at - r.t0 - ms(1)).step(Event::Tick).is_empty());
        let c = r.at(at - r.t0).step(Event::Tick);
        barrier = barrier_call(&c).0;
    }
    assert_eq!(
        waits,
        vec![
            ms(100),
            ms(200),
            ms(400),
            ms(800),
            ms(1_600),
            ms(2_000),
            ms(2_000),
            ms(2_000)
        ]
    );
    // Success forgets the failed batch and what came since, and resets the backoff.
    let c = r.barrier(barrier, Ok(7));
    let forgotten = one(&c, |c| match c {
        Command::Forget(entries) => Some(entries.len()),
        _ => None,
    });
    assert_eq!(forgotten, 9);
    let (b, _) = barrier_call(&r.forget("again", 7));
    r.barrier(b, Err("Unavailable".into()));
    assert_eq!(
        r.core.deadline().map(|at| at - r.now),
        Some(BARRIER_RETRY_MIN)
    );
}

#[test]
fn shutdown_sends_one_last_barrier_for_everything_waiting_to_be_forgotten() {
    // (in flight at shutdown, backing off at shutdown, last Barrier's answer, forgotten)
    let cases: &[(bool, bool, BarrierAnswer, usize)] = &[
        (true, false, Ok(7), 2),
        (false, true, Ok(7), 2),
        (true, false, Ok(8), 0),
        (true, false, Err("Unavailable".into()), 0),
    ];
    for (in_flight, backing_off, answer, forgotten) in cases {
        let mut r = Rig::new(128);
        let (first, _) = barrier_call(&r.forget("t1", 7));
        if *backing_off {
            r.barrier(first, Err("Unavailable".into()));
        }
        r.forget("t2", 7);
        assert_eq!(*in_flight, !*backing_off);
        let c = r.step(Event::Shutdown {
            caller: Some(CallerId(1)),
        });
        let (last, within) = barrier_call(&c);
        assert_eq!(within, BARRIER_AT_SHUTDOWN);
        assert_eq!(r.core.deadline(), None, "no backoff any more");
        // The abandoned Barrier's answer changes nothing.
        assert!(r.barrier(first, Ok(7)).is_empty());
        let c = r.barrier(last, answer.clone());
        let got = c
            .iter()
            .find_map(|c| match c {
                Command::Forget(e) => Some(e.len()),
                _ => None,
            })
            .unwrap_or(0);
        assert_eq!(got, *forgotten, "{answer:?}");
        assert_eq!(
            c.last(),
            Some(&Command::ShutDown {
                callers: vec![CallerId(1)]
            })
        );
        // Entries that come after are dropped: nobody would Barrier for them.
        assert!(r.forget("late", 7).is_empty());
        assert_eq!(r.core.unforgotten(), 0);
    }
}

#[test]
fn shutdown_with_nothing_to_do_is_answered_at_once() {
    let mut r = Rig::new(128);
    assert_eq!(
        r.step(Event::Shutdown {
            caller: Some(CallerId(1))
        }),
        vec![Command::ShutDown {
            callers: vec![CallerId(1)]
        }]
    );
}

#[test]
fn shutdown_waits_for_the_ids_going_back_and_the_last_barrier() {
    let mut r = Rig::new(128);
    r.load(300, Duration::from_micros(500));
    let (barrier, _) = barrier_call(&r.forget("t1", 7));
    let c = r.step(Event::Shutdown {
        caller: Some(CallerId(1)),
    });
    assert!(c
        .iter()
        .any(|c| matches!(c, Command::ReleaseAtShutdown { .. })));
    let (last, _) = barrier_call(&c);
    assert!(r
        .step(Event::Shutdown {
            caller: Some(CallerId(2))
        })
        .is_empty());
    assert!(r.barrier(barrier, Ok(7)).is_empty());
    assert_eq!(
        r.barrier(last, Ok(7)),
        vec![Command::Forget(vec![entry("t1", 7)])],
        "the ids are still going back"
    );
    assert_eq!(
        r.step(Event::ReleasedAtShutdown),
        vec![Command::ShutDown {
            callers: vec![CallerId(1), CallerId(2)]
        }]
    );
}

#[test]
fn the_core_wakes_for_its_earliest_deadline() {
    let mut r = Rig::new(128);
    assert_eq!(r.core.deadline(), None);
    let (report, _) = report_call(&r.committed("t1"));
    let (barrier, _) = barrier_call(&r.forget("f1", 7));
    r.at(ms(50)).barrier(barrier, Err("Unavailable".into()));
    r.at(ms(100)).reported(report, failed_report(true));
    // Forget backoff ends at 150 ms, the report's retry at 200 ms.
    assert_eq!(r.core.deadline(), Some(r.t0 + ms(150)));
    let c = r.at(ms(150)).step(Event::Tick);
    barrier_call(&c);
    assert_eq!(r.core.deadline(), Some(r.t0 + ms(200)));
}
