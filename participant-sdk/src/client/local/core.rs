//! The local-commit core: a state machine without I/O. It takes [`Event`]s (a
//! `begin_local` call, the answer of a call it asked for, a local commit to report, a
//! transaction to forget, time passing, shutdown) with the time they happen at, and
//! returns [`Command`]s (calls to make, ids to give back, branches to forget, answers to
//! hand to waiting callers). It never awaits, never reads a clock and knows no gRPC; the
//! driver (`driver.rs`) performs its commands and feeds it their answers.
//!
//! It owns four things, each with its own part:
//! - the pools of ids begun ahead ([`crate::ahead`]) and the BeginLocal calls that fill
//!   them (here);
//! - the Barrier shared by every local transaction waiting for its intent to be durable:
//!   one call in flight, serving every BeginLocal answered before it started (here);
//! - the reports of local commits ([`super::report`]);
//! - the forget queue ([`super::forget`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::debug;

use super::forget::{ForgetLane, Unforgotten, BARRIER_TIMEOUT};
use super::report::{ReportAnswer, ReportLane};
use crate::ahead::{self, Ahead, Pools, Take, Ticket};

/// How long [`crate::TwoPc::shutdown`] waits for the ids begun ahead and not used to go
/// back.
pub(crate) const SHUTDOWN_RELEASE: Duration = Duration::from_secs(2);

/// The answer of a `Barrier`: the coordinator's epoch, or why the call failed.
pub(crate) type BarrierAnswer = Result<u64, String>;

/// A call the core asked for; its answer comes back with the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CallId(pub(crate) u64);

/// Someone waiting for an answer of the core (a `begin_local` caller, a shutdown), named
/// by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CallerId(pub(crate) u64);

/// A local transaction waiting for the Barrier that shows its intent durable, named by
/// the core in [`Durability::Pending`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WaiterId(pub(crate) u64);

/// Hands out the core's call, waiter and ticket numbers (one sequence: each is unique).
#[derive(Default)]
pub(crate) struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }

    pub(crate) fn call(&mut self) -> CallId {
        CallId(self.next())
    }

    fn waiter(&mut self) -> WaiterId {
        WaiterId(self.next())
    }

    fn ticket(&mut self) -> Ticket {
        Ticket(self.next())
    }
}

/// What happened. `E` is the error a failed BeginLocal hands its caller.
#[derive(Debug, PartialEq)]
pub(crate) enum Event<E> {
    /// `begin_local` on `resource` (registered; the driver knows its branch).
    BeginLocal { caller: CallerId, resource: String },
    /// The answer of [`Command::BeginLocal`] `call`.
    BeginLocalAnswered {
        call: CallId,
        answer: BeginLocalAnswer<E>,
    },
    /// The answer of [`Command::Barrier`] `call`.
    BarrierAnswered { call: CallId, answer: BarrierAnswer },
    /// A local transaction committed here: report it.
    LocalCommitted { tx_id: String, branch_id: String },
    /// The answer of [`Command::Report`] `call`.
    ReportAnswered { call: CallId, answer: ReportAnswer },
    /// A transaction committed through the coordinator: forget its branches after a
    /// Barrier of the answer's epoch.
    Forget(Unforgotten),
    /// The caller a [`Reply::Local`] was for went away before it arrived: its id was
    /// never used.
    Unclaimed { tx_id: String },
    /// The [`Command::ReleaseAtShutdown`] calls ended (answered, or past their bound).
    ReleasedAtShutdown,
    /// Time passed (see [`LocalCore::deadline`]).
    Tick,
    /// The handle shuts down (`caller`: who waits for [`Command::ShutDown`]; none when
    /// every handle was dropped).
    Shutdown { caller: Option<CallerId> },
}

/// How a BeginLocal call ended.
#[derive(Debug, PartialEq)]
pub(crate) enum BeginLocalAnswer<E> {
    /// Transactions begun (at least one): their ids, the coordinator's epoch and their
    /// timeout (0: unknown).
    Begun {
        first: String,
        rest: Vec<String>,
        epoch: u64,
        timeout_ms: u64,
    },
    /// The coordinator runs with one-phase commits off (it refused BeginLocal as a
    /// failed precondition).
    Off,
    /// The call failed.
    Failed(E),
}

/// What to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Command<E> {
    /// Call BeginLocal for `count` transactions of `resource`'s branch.
    BeginLocal {
        call: CallId,
        resource: String,
        count: u32,
    },
    /// Call Barrier, bounded by `within` (then it failed).
    Barrier { call: CallId, within: Duration },
    /// Call ReportLocalCommits for these local commits (answered early).
    Report { call: CallId, tx_ids: Vec<String> },
    /// Give these ids begun ahead back unused (ReleaseUnused), in the background.
    Release { tx_ids: Vec<String> },
    /// Give these ids back at shutdown, at most `within` in all; then
    /// [`Event::ReleasedAtShutdown`].
    ReleaseAtShutdown {
        tx_ids: Vec<String>,
        within: Duration,
    },
    /// Tell the resources of these branches that the coordinator holds the outcome.
    Forget(Vec<Unforgotten>),
    /// Answer a `begin_local` caller.
    Reply { caller: CallerId, reply: Reply<E> },
    /// The Barrier for these waiters answered.
    Durable {
        waiters: Vec<WaiterId>,
        intent: Intent,
    },
    /// The shutdown work is done (ids given back, last forget Barrier answered): answer
    /// these shutdown callers.
    ShutDown { callers: Vec<CallerId> },
}

/// The answer to a `begin_local` caller.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply<E> {
    /// A local transaction.
    Local {
        tx_id: String,
        /// The coordinator epoch of its BeginLocal answer.
        epoch: u64,
        durable: Durability,
    },
    /// The coordinator begins no local transactions: begin an ordinary one.
    Off,
    /// BeginLocal failed.
    Failed(E),
}

/// Whether a local transaction's intent is durable: known already, or told later by a
/// [`Command::Durable`] for the waiter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    Known(Intent),
    Pending(WaiterId),
}

/// What the Barrier asked after a BeginLocal answer says about its intents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Durable: the Barrier reported the BeginLocal's epoch. The branch may commit here.
    Durable,
    /// The coordinator restarted in between (another epoch): its intent may be lost, so
    /// the commit goes through the coordinator.
    Restarted { begun: u64, now: u64 },
    /// The Barrier failed: commit through the coordinator.
    Unknown(String),
}

impl Intent {
    fn of(begun: u64, answer: &BarrierAnswer) -> Intent {
        match answer {
            Ok(now) if *now == begun => Intent::Durable,
            Ok(now) => Intent::Restarted { begun, now: *now },
            Err(e) => Intent::Unknown(e.clone()),
        }
    }
}

/// A BeginLocal in flight.
struct BeginCall {
    resource: String,
    /// The `begin_local` caller whose id is the first; none for a background refill.
    caller: Option<CallerId>,
    /// It refills the pool (more than one id): the pool's refill ends with its answer.
    refill: bool,
}

/// The intents of one BeginLocal answer.
struct TicketState {
    /// The BeginLocal's epoch.
    epoch: u64,
    /// What its Barrier said, once answered.
    intent: Option<Intent>,
    /// Transactions of it waiting for that answer.
    waiters: Vec<WaiterId>,
    /// Its ids still pooled: the answer is kept for them while there are any.
    pooled: usize,
}

/// The Barrier shared by local transactions: at most one in flight, for every ticket
/// queued before it started.
#[derive(Default)]
struct DurableLane {
    /// Answered since the Barrier in flight started: they wait for the next one.
    queued: Vec<Ticket>,
    /// The Barrier in flight and the answers it covers.
    in_flight: Option<(CallId, Vec<Ticket>)>,
}

/// Where the handle is in its shutdown.
#[derive(Debug, PartialEq)]
enum Shutdown {
    Running,
    /// Shutting down: waiting for the releases (`releasing`) and the forget lane.
    Stopping {
        callers: Vec<CallerId>,
        releasing: bool,
    },
    Done,
}

/// The local-commit state of one handle (see the module docs).
pub(crate) struct LocalCore<E> {
    /// At most this many ids per BeginLocal (the builder's `begin_ahead`).
    begin_ahead: u32,
    /// Numbers calls, waiters and tickets (deterministic: tests name them).
    ids: Ids,
    /// Ids begun ahead, per resource.
    pools: Pools,
    /// BeginLocal calls in flight.
    begins: HashMap<CallId, BeginCall>,
    /// BeginLocal answers whose Barrier has not answered yet, or whose ids are pooled.
    tickets: HashMap<Ticket, TicketState>,
    /// The Barrier local transactions wait for (never retried: a failure sends their
    /// commits through the coordinator).
    durable: DurableLane,
    /// Reports of local commits.
    reports: ReportLane,
    /// Branches waiting for a Barrier to be forgotten (fed by the reports and by
    /// commits through the coordinator).
    forget: ForgetLane,
    /// Running, shutting down, or shut down (then nothing is begun ahead).
    shutdown: Shutdown,
    /// The core only passes a failed BeginLocal's error on to its caller.
    _error: std::marker::PhantomData<fn() -> E>,
}

impl<E> LocalCore<E> {
    /// A core that begins at most `begin_ahead` ids per BeginLocal.
    pub(crate) fn new(begin_ahead: u32) -> Self {
        LocalCore {
            begin_ahead,
            ids: Ids::default(),
            pools: Pools::default(),
            begins: HashMap::new(),
            tickets: HashMap::new(),
            durable: DurableLane::default(),
            reports: ReportLane::default(),
            forget: ForgetLane::default(),
            shutdown: Shutdown::Running,
            _error: std::marker::PhantomData,
        }
    }

    /// Handles `event`, which happened at `now`; returns what to do, in order.
    pub(crate) fn step(&mut self, now: Instant, event: Event<E>) -> Vec<Command<E>> {
        let mut out = Vec::new();
        match event {
            Event::BeginLocal { caller, resource } => {
                self.begin_local(caller, resource, now, &mut out)
            }
            Event::BeginLocalAnswered { call, answer } => {
                self.begin_answered(call, answer, now, &mut out)
            }
            Event::BarrierAnswered { call, answer } => {
                if self.forget.owns(call) {
                    self.forget
                        .answered(call, answer, now, &mut self.ids, &mut out);
                    self.check_shutdown(&mut out);
                } else {
                    self.barrier_answered(call, answer, &mut out);
                }
            }
            Event::LocalCommitted { tx_id, branch_id } => {
                self.reports
                    .committed((tx_id, branch_id), &mut self.ids, &mut out)
            }
            Event::ReportAnswered { call, answer } => {
                let recorded = self
                    .reports
                    .answered(call, answer, now, &mut self.ids, &mut out);
                for entry in recorded {
                    self.forget.push(entry, &mut self.ids, &mut out);
                }
            }
            Event::Forget(entry) => self.forget.push(entry, &mut self.ids, &mut out),
            Event::Unclaimed { tx_id } => out.push(Command::Release {
                tx_ids: vec![tx_id],
            }),
            Event::ReleasedAtShutdown => {
                if let Shutdown::Stopping { releasing, .. } = &mut self.shutdown {
                    *releasing = false;
                }
                self.check_shutdown(&mut out);
            }
            Event::Tick => {
                self.reports.tick(now, &mut self.ids, &mut out);
                self.forget.tick(now, &mut self.ids, &mut out);
            }
            Event::Shutdown { caller } => self.begin_shutdown(caller, &mut out),
        }
        out
    }

    /// When the core wants an [`Event::Tick`]: the earliest retry or backoff end.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match (self.reports.deadline(), self.forget.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How many ids wait in the pools (for [`crate::TwoPc::begun_ahead`]).
    pub(crate) fn pooled(&self) -> usize {
        self.pools.len()
    }

    fn begin_local(
        &mut self,
        caller: CallerId,
        resource: String,
        now: Instant,
        out: &mut Vec<Command<E>>,
    ) {
        // After shutdown nothing is taken ahead: nobody would give it back.
        let max = match self.shutdown {
            Shutdown::Running => self.begin_ahead,
            _ => 1,
        };
        let taken = self.pools.take(&resource, max, now);
        self.release(taken.stale, out);
        if let Some(count) = taken.refill {
            self.call_begin(&resource, count, None, out);
        }
        match taken.take {
            Take::Ready(a) => {
                let durable = self.claim(a.ticket);
                out.push(Command::Reply {
                    caller,
                    reply: Reply::Local {
                        tx_id: a.tx_id,
                        epoch: a.epoch,
                        durable,
                    },
                });
            }
            Take::Begin(count) => self.call_begin(&resource, count, Some(caller), out),
        }
    }

    fn call_begin(
        &mut self,
        resource: &str,
        count: u32,
        caller: Option<CallerId>,
        out: &mut Vec<Command<E>>,
    ) {
        let call = self.ids.call();
        self.begins.insert(
            call,
            BeginCall {
                resource: resource.to_string(),
                caller,
                // A caller's batch of more than one refills the pool too.
                refill: caller.is_none() || count > 1,
            },
        );
        out.push(Command::BeginLocal {
            call,
            resource: resource.to_string(),
            count,
        });
    }

    /// An id of `ticket` leaves its pool for a caller: how it learns its intent durable.
    fn claim(&mut self, ticket: Ticket) -> Durability {
        let Some(state) = self.tickets.get_mut(&ticket) else {
            // Every pooled id's ticket is kept; this cannot happen, and the commit then
            // goes safely through the coordinator.
            return Durability::Known(Intent::Unknown("the Begin of this id is unknown".into()));
        };
        state.pooled = state.pooled.saturating_sub(1);
        match state.intent.clone() {
            Some(intent) => {
                if state.pooled == 0 {
                    self.tickets.remove(&ticket);
                }
                Durability::Known(intent)
            }
            None => {
                let waiter = self.ids.waiter();
                state.waiters.push(waiter);
                Durability::Pending(waiter)
            }
        }
    }

    /// Gives `ids` back (they left the pools).
    fn release(&mut self, ids: Vec<Ahead>, out: &mut Vec<Command<E>>) {
        if ids.is_empty() {
            return;
        }
        out.push(Command::Release {
            tx_ids: self.unpool(ids),
        });
    }

    /// `ids` left the pools unused: their tickets no longer keep an answer for them.
    fn unpool(&mut self, ids: Vec<Ahead>) -> Vec<String> {
        ids.into_iter()
            .map(|a| {
                if let Some(state) = self.tickets.get_mut(&a.ticket) {
                    state.pooled = state.pooled.saturating_sub(1);
                    if state.pooled == 0 && state.intent.is_some() {
                        self.tickets.remove(&a.ticket);
                    }
                }
                a.tx_id
            })
            .collect()
    }

    fn begin_answered(
        &mut self,
        call: CallId,
        answer: BeginLocalAnswer<E>,
        now: Instant,
        out: &mut Vec<Command<E>>,
    ) {
        let Some(BeginCall {
            resource,
            caller,
            refill,
        }) = self.begins.remove(&call)
        else {
            return;
        };
        if refill {
            self.pools.end_refill(&resource);
        }
        match answer {
            BeginLocalAnswer::Begun {
                first,
                rest,
                epoch,
                timeout_ms,
            } => {
                let ticket = self.ids.ticket();
                let mut state = TicketState {
                    epoch,
                    intent: None,
                    waiters: Vec::new(),
                    pooled: 0,
                };
                let mut pooled = Vec::new();
                match caller {
                    Some(caller) => {
                        let waiter = self.ids.waiter();
                        state.waiters.push(waiter);
                        out.push(Command::Reply {
                            caller,
                            reply: Reply::Local {
                                tx_id: first,
                                epoch,
                                durable: Durability::Pending(waiter),
                            },
                        });
                    }
                    None => pooled.push(first),
                }
                pooled.extend(rest);
                if self.shutdown != Shutdown::Running {
                    // Answered after shutdown gave the pools back: give these back too.
                    if !pooled.is_empty() {
                        out.push(Command::Release { tx_ids: pooled });
                    }
                } else {
                    let max_age = ahead::max_age(timeout_ms);
                    state.pooled = pooled.len();
                    let ids = pooled
                        .into_iter()
                        .map(|tx_id| Ahead {
                            tx_id,
                            epoch,
                            ticket,
                            begun: now,
                            max_age,
                        })
                        .collect();
                    self.pools.put(&resource, ids);
                }
                if state.waiters.is_empty() && state.pooled == 0 {
                    return;
                }
                self.tickets.insert(ticket, state);
                // The intents were written before the answer; a Barrier that starts from
                // now on returns once they are durable. It runs while the application
                // does its work.
                self.durable.queued.push(ticket);
                self.start_barrier(out);
            }
            BeginLocalAnswer::Off => {
                debug!(%resource, "the coordinator does not begin local transactions");
                self.pools.turn_off(&resource);
                if let Some(caller) = caller {
                    out.push(Command::Reply {
                        caller,
                        reply: Reply::Off,
                    });
                }
            }
            BeginLocalAnswer::Failed(e) => match caller {
                Some(caller) => out.push(Command::Reply {
                    caller,
                    reply: Reply::Failed(e),
                }),
                None => debug!(%resource, "could not begin local transactions ahead"),
            },
        }
    }

    /// Starts the shared Barrier for the queued tickets, unless one is in flight.
    fn start_barrier(&mut self, out: &mut Vec<Command<E>>) {
        if self.durable.in_flight.is_some() || self.durable.queued.is_empty() {
            return;
        }
        let call = self.ids.call();
        self.durable.in_flight = Some((call, std::mem::take(&mut self.durable.queued)));
        out.push(Command::Barrier {
            call,
            within: BARRIER_TIMEOUT,
        });
    }

    fn barrier_answered(&mut self, call: CallId, answer: BarrierAnswer, out: &mut Vec<Command<E>>) {
        let tickets = match self.durable.in_flight.take() {
            Some((c, tickets)) if c == call => tickets,
            other => {
                self.durable.in_flight = other;
                return;
            }
        };
        // One command per verdict: every waiter of one epoch hears the same.
        let mut told: Vec<(Intent, Vec<WaiterId>)> = Vec::new();
        for ticket in tickets {
            let Some(state) = self.tickets.get_mut(&ticket) else {
                continue;
            };
            let intent = Intent::of(state.epoch, &answer);
            let waiters = std::mem::take(&mut state.waiters);
            if !waiters.is_empty() {
                match told.iter_mut().find(|(i, _)| *i == intent) {
                    Some((_, w)) => w.extend(waiters),
                    None => told.push((intent.clone(), waiters)),
                }
            }
            if state.pooled == 0 {
                self.tickets.remove(&ticket);
            } else {
                state.intent = Some(intent);
            }
        }
        for (intent, waiters) in told {
            out.push(Command::Durable { waiters, intent });
        }
        self.start_barrier(out);
    }

    fn begin_shutdown(&mut self, caller: Option<CallerId>, out: &mut Vec<Command<E>>) {
        match &mut self.shutdown {
            Shutdown::Done => {
                out.extend(caller.map(|c| Command::ShutDown { callers: vec![c] }));
                return;
            }
            Shutdown::Stopping { callers, .. } => {
                callers.extend(caller);
                return;
            }
            Shutdown::Running => {}
        }
        // Ids begun ahead go back while the participant server can still answer the
        // coordinator's question about them.
        let unused = self.pools.drain();
        let releasing = !unused.is_empty();
        if releasing {
            out.push(Command::ReleaseAtShutdown {
                tx_ids: self.unpool(unused),
                within: SHUTDOWN_RELEASE,
            });
        }
        self.shutdown = Shutdown::Stopping {
            callers: caller.into_iter().collect(),
            releasing,
        };
        self.forget.shutdown(&mut self.ids, out);
        self.check_shutdown(out);
    }

    /// Answers the shutdown callers once the releases and the forget lane are done.
    fn check_shutdown(&mut self, out: &mut Vec<Command<E>>) {
        if let Shutdown::Stopping {
            callers,
            releasing: false,
        } = &mut self.shutdown
        {
            if self.forget.stopped() {
                let callers = std::mem::take(callers);
                self.shutdown = Shutdown::Done;
                out.push(Command::ShutDown { callers });
            }
        }
    }
}

#[cfg(test)]
impl<E> LocalCore<E> {
    /// Reports queued, in flight or waiting to be tried again.
    pub(crate) fn reports_pending(&self) -> usize {
        self.reports.pending()
    }

    /// Entries waiting to be forgotten.
    pub(crate) fn unforgotten(&self) -> usize {
        self.forget.len()
    }

    /// BeginLocal answers whose Barrier answer is still kept.
    pub(crate) fn tickets(&self) -> usize {
        self.tickets.len()
    }
}
