//! Tests of the local-commit core: every decision, driven event by event with no I/O and
//! the time passed in. `Rig` steps the core at a chosen time; `Rig::settle` plays a
//! coordinator that answers every call at once (for scenarios of many steps).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::core::{
    BarrierAnswer, BeginLocalAnswer, CallId, CallerId, Command, Durability, Event, Intent,
    LocalCore, Reply, WaiterId, SHUTDOWN_RELEASE,
};
use super::forget::{
    forgettable, Unforgotten, BARRIER_AT_SHUTDOWN, BARRIER_RETRY_MAX, BARRIER_RETRY_MIN,
    BARRIER_TIMEOUT, MAX_UNFORGOTTEN,
};
use super::report::{ReportAnswer, REPORT_ATTEMPTS, REPORT_BATCH};
use crate::ahead::MAX_AGE;

type Cmd = Command<String>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A core, the time, and what a settling coordinator saw.
struct Rig {
    core: LocalCore<String>,
    t0: Instant,
    now: Instant,
    /// The epoch the settling coordinator answers with.
    epoch: u64,
    /// Ids the settling coordinator has begun.
    begun: usize,
    /// What `settle` collected.
    replies: Vec<(CallerId, Reply<String>)>,
    released: Vec<String>,
    forgotten: Vec<Unforgotten>,
    begin_counts: Vec<u32>,
    durable: Vec<(WaiterId, Intent)>,
}

impl Rig {
    fn new(begin_ahead: u32) -> Rig {
        let t0 = Instant::now();
        Rig {
            core: LocalCore::new(begin_ahead),
            t0,
            now: t0,
            epoch: 7,
            begun: 0,
            replies: Vec::new(),
            released: Vec::new(),
            forgotten: Vec::new(),
            begin_counts: Vec::new(),
            durable: Vec::new(),
        }
    }

    fn at(&mut self, since_start: Duration) -> &mut Rig {
        self.now = self.t0 + since_start;
        self
    }

    fn step(&mut self, event: Event<String>) -> Vec<Cmd> {
        self.core.step(self.now, event)
    }

    fn begin(&mut self, caller: u64) -> Vec<Cmd> {
        self.step(Event::BeginLocal {
            caller: CallerId(caller),
            resource: "db".into(),
        })
    }

    fn begun(&mut self, call: CallId, ids: &[&str], epoch: u64) -> Vec<Cmd> {
        let (first, rest) = ids.split_first().map_or((String::new(), vec![]), |(f, r)| {
            (f.to_string(), r.iter().map(|s| s.to_string()).collect())
        });
        self.step(Event::BeginLocalAnswered {
            call,
            answer: BeginLocalAnswer::Begun {
                first,
                rest,
                epoch,
                timeout_ms: 0,
            },
        })
    }

    fn barrier(&mut self, call: CallId, answer: BarrierAnswer) -> Vec<Cmd> {
        self.step(Event::BarrierAnswered { call, answer })
    }

    fn committed(&mut self, tx_id: &str) -> Vec<Cmd> {
        self.step(Event::LocalCommitted {
            tx_id: tx_id.into(),
            branch_id: "svc:db".into(),
        })
    }

    fn reported(&mut self, call: CallId, answer: ReportAnswer) -> Vec<Cmd> {
        self.step(Event::ReportAnswered { call, answer })
    }

    fn forget(&mut self, tx_id: &str, epoch: u64) -> Vec<Cmd> {
        self.step(Event::Forget(entry(tx_id, epoch)))
    }

    /// Performs `commands` the way a coordinator that answers at once would, with the
    /// events they cause, until nothing is left.
    fn settle(&mut self, commands: Vec<Cmd>) {
        let mut todo: VecDeque<Cmd> = commands.into();
        while let Some(c) = todo.pop_front() {
            let next = match c {
                Command::BeginLocal { call, count, .. } => {
                    self.begin_counts.push(count);
                    let ids: Vec<String> = (0..count)
                        .map(|i| format!("tx{}", self.begun + i as usize))
                        .collect();
                    self.begun += count as usize;
                    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let epoch = self.epoch;
                    self.begun(call, &ids, epoch)
                }
                Command::Barrier { call, .. } => {
                    let epoch = self.epoch;
                    self.barrier(call, Ok(epoch))
                }
                Command::Report { call, .. } => {
                    let epoch = self.epoch;
                    self.reported(call, ReportAnswer::Recorded(epoch))
                }
                Command::Release { tx_ids } => {
                    self.released.extend(tx_ids);
                    vec![]
                }
                Command::ReleaseAtShutdown { tx_ids, .. } => {
                    self.released.extend(tx_ids);
                    self.step(Event::ReleasedAtShutdown)
                }
                Command::Forget(entries) => {
                    self.forgotten.extend(entries);
                    vec![]
                }
                Command::Reply { caller, reply } => {
                    self.replies.push((caller, reply));
                    vec![]
                }
                Command::Durable { waiters, intent } => {
                    self.durable
                        .extend(waiters.into_iter().map(|w| (w, intent.clone())));
                    vec![]
                }
                Command::ShutDown { .. } => vec![],
            };
            todo.extend(next);
        }
    }

    /// `n` callers of `begin_local`, one every `every`, each answered at once.
    fn load(&mut self, n: u64, every: Duration) {
        for i in 0..n {
            let at = self.now - self.t0 + every;
            let c = self.at(at).begin(1_000 + i);
            self.settle(c);
        }
    }
}

fn entry(tx_id: &str, epoch: u64) -> Unforgotten {
    Unforgotten {
        tx_id: tx_id.into(),
        branch_ids: vec!["svc:db".into()],
        epoch,
    }
}

/// The only command of `cmds` that matches `pick`.
fn one<T>(cmds: &[Cmd], pick: impl Fn(&Cmd) -> Option<T>) -> T {
    let mut found: Vec<T> = cmds.iter().filter_map(pick).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one matching command in {cmds:?}"
    );
    found.remove(0)
}

fn begin_call(cmds: &[Cmd]) -> (CallId, u32) {
    one(cmds, |c| match c {
        Command::BeginLocal { call, count, .. } => Some((*call, *count)),
        _ => None,
    })
}

fn barrier_call(cmds: &[Cmd]) -> (CallId, Duration) {
    one(cmds, |c| match c {
        Command::Barrier { call, within } => Some((*call, *within)),
        _ => None,
    })
}

fn report_calls(cmds: &[Cmd]) -> Vec<(CallId, Vec<String>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Report { call, tx_ids } => Some((*call, tx_ids.clone())),
            _ => None,
        })
        .collect()
}

/// The only report call of `cmds`.
fn report_call(cmds: &[Cmd]) -> (CallId, Vec<String>) {
    let mut calls = report_calls(cmds);
    assert_eq!(calls.len(), 1, "expected one report call in {cmds:?}");
    calls.remove(0)
}

fn pending_waiter(cmds: &[Cmd], caller: u64) -> WaiterId {
    one(cmds, |c| match c {
        Command::Reply {
            caller: c,
            reply:
                Reply::Local {
                    durable: Durability::Pending(w),
                    ..
                },
        } if *c == CallerId(caller) => Some(*w),
        _ => None,
    })
}

fn failed_report(retryable: bool) -> ReportAnswer {
    ReportAnswer::Failed {
        retryable,
        error: "Unavailable: down".into(),
    }
}

// --- ids begun ahead and the shared Barrier ---------------------------------------------

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

// --- reports of local commits -----------------------------------------------------------

#[test]
fn reports_queued_while_one_runs_go_together_in_the_next() {
    let mut r = Rig::new(128);
    let c = r.committed("t1");
    let (first, ids) = report_call(&c);
    assert_eq!(ids, vec!["t1"]);
    assert!(r.committed("t2").is_empty(), "one report call in flight");
    assert!(r.committed("t3").is_empty());
    let c = r.reported(first, ReportAnswer::Recorded(7));
    let reports = report_calls(&c);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].1, vec!["t2", "t3"]);
    // The recorded commit waits for a Barrier of its epoch.
    let (barrier, _) = barrier_call(&c);
    assert_eq!(
        r.barrier(barrier, Ok(7)),
        vec![Command::Forget(vec![entry("t1", 7)])]
    );
}

#[test]
fn a_report_carries_at_most_1024_commits() {
    let mut r = Rig::new(128);
    let (mut call, _) = report_call(&r.committed("first"));
    for i in 0..2_500 {
        assert!(r.committed(&format!("t{i}")).is_empty());
    }
    let mut sizes = Vec::new();
    loop {
        let c = r.reported(call, ReportAnswer::Recorded(7));
        match report_calls(&c).as_slice() {
            [(next, ids)] => {
                sizes.push(ids.len());
                call = *next;
            }
            [] => break,
            more => panic!("one batch call at a time: {more:?}"),
        }
    }
    assert_eq!(
        sizes,
        vec![REPORT_BATCH, REPORT_BATCH, 2_500 - 2 * REPORT_BATCH]
    );
    assert_eq!(r.core.reports_pending(), 0);
}

#[test]
fn a_failed_batch_is_reported_one_commit_at_a_time() {
    let mut r = Rig::new(128);
    let (first, _) = report_call(&r.committed("t1"));
    r.committed("t2");
    r.committed("t3");
    let c = r.reported(first, ReportAnswer::Recorded(7));
    let (batch, _) = report_call(&c);
    r.committed("t4");
    // Refused or unreachable alike: a failed batch goes one by one.
    for retryable in [true, false] {
        let mut r2 = Rig::new(128);
        let (b, _) = report_call(&r2.committed("a"));
        r2.committed("b");
        r2.committed("c");
        let c = r2.reported(b, ReportAnswer::Recorded(7));
        let (batch2, _) = report_call(&c);
        let alone: Vec<Vec<String>> = report_calls(&r2.reported(batch2, failed_report(retryable)))
            .into_iter()
            .map(|(_, ids)| ids)
            .collect();
        assert_eq!(alone, vec![vec!["b".to_string()], vec!["c".to_string()]]);
    }
    let c = r.reported(batch, failed_report(true));
    let ids: Vec<Vec<String>> = report_calls(&c).into_iter().map(|(_, ids)| ids).collect();
    assert_eq!(
        ids,
        vec![
            vec!["t2".to_string()],
            vec!["t3".to_string()],
            vec!["t4".to_string()]
        ],
        "each alone, then what was queued meanwhile"
    );
}

#[test]
fn a_report_alone_is_tried_20_times_with_backoff_from_100_ms_to_2_s() {
    let mut r = Rig::new(128);
    let (mut call, _) = report_call(&r.committed("t1"));
    let mut waits = Vec::new();
    let mut attempts = 1;
    loop {
        let c = r.reported(call, failed_report(true));
        assert!(report_calls(&c).is_empty(), "not before its backoff");
        let Some(at) = r.core.deadline() else { break };
        waits.push(at - r.now);
        // Just before: nothing; at the deadline: the next attempt.
        let before = at - r.t0 - ms(1);
        assert!(r.at(before).step(Event::Tick).is_empty());
        let c = r.at(at - r.t0).step(Event::Tick);
        let (next, ids) = report_call(&c);
        assert_eq!(ids, vec!["t1"]);
        attempts += 1;
        call = next;
    }
    assert_eq!(attempts, REPORT_ATTEMPTS);
    let mut expected = vec![ms(100), ms(200), ms(400), ms(800), ms(1_600)];
    expected.resize(REPORT_ATTEMPTS as usize - 1, BARRIER_RETRY_MAX);
    assert_eq!(waits, expected);
    assert_eq!(
        r.core.reports_pending(),
        0,
        "given up after the last attempt"
    );
}

#[test]
fn a_refused_report_alone_is_not_tried_again() {
    let mut r = Rig::new(128);
    let (call, _) = report_call(&r.committed("t1"));
    assert!(r.reported(call, failed_report(false)).is_empty());
    assert_eq!(r.core.deadline(), None);
    assert_eq!(r.core.reports_pending(), 0);
}

#[test]
fn a_report_that_got_through_on_a_later_attempt_is_forgotten_after_a_barrier() {
    let mut r = Rig::new(128);
    let (call, _) = report_call(&r.committed("t1"));
    r.reported(call, failed_report(true));
    let c = r.at(BARRIER_RETRY_MIN).step(Event::Tick);
    let (again, _) = report_call(&c);
    let c = r.reported(again, ReportAnswer::Recorded(9));
    let (barrier, _) = barrier_call(&c);
    assert_eq!(
        r.barrier(barrier, Ok(9)),
        vec![Command::Forget(vec![entry("t1", 9)])]
    );
}

// --- the forget queue -------------------------------------------------------------------

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
