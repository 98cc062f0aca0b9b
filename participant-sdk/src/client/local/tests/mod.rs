//! Tests of the local-commit core: every decision, driven event by event with no I/O and
//! the time passed in. `Rig` steps the core at a chosen time; `Rig::settle` plays a
//! coordinator that answers every call at once (for scenarios of many steps).
//!
//! - `begin`: ids begun ahead, the shared Barrier, shutdown's give-back;
//! - `report`: reports of local commits;
//! - `forget`: the forget queue and its last Barrier;
//! - `driver`: the driver task over a fake coordinator (paused time).

mod begin;
mod driver;
mod forget;
mod report;

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
