//! The driver: the one task that owns the local-commit core ([`LocalCore`]) and performs
//! its commands over a [`LocalCoordinator`] (the gRPC client in production). Callers talk
//! to it through [`LocalHandle`]: requests over a channel, answers on oneshots. Calls run
//! concurrently inside the task (each becomes an event when it ends); the task sleeps
//! until the core's next deadline when it has nothing else to do. It ends once every
//! handle is gone (which also shuts the core down) and nothing is left in flight.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;
use twopc_proto::v1 as pb;

use super::core::{
    BarrierAnswer, BeginLocalAnswer, CallerId, Command, Durability, Event, Intent, LocalCore,
    Reply, WaiterId,
};
use super::forget::Unforgotten;
use super::report::ReportAnswer;
use crate::error::{Error, Result};
use crate::resource::Registry;

/// The coordinator calls the local-commit machinery makes. Each call stands alone (no
/// ordering between calls is assumed: the core keeps at most one Barrier per purpose and
/// one report batch in flight itself) and may be made concurrently with others. A call
/// is bounded by the implementation (the client's `call_timeout`), except `barrier`, which
/// the driver bounds as the core says.
pub(crate) trait LocalCoordinator: Send + Sync + 'static {
    /// BeginLocal of `count` transactions of `branch`: their ids (at least one; an
    /// answer without any is a failure), [`BeginLocalAnswer::Off`] when the coordinator
    /// runs with one-phase commits off (FAILED_PRECONDITION), or why it failed.
    fn begin_local(
        &self,
        branch: pb::Branch,
        count: u32,
    ) -> impl Future<Output = BeginLocalAnswer<Error>> + Send;

    /// Barrier: the coordinator's epoch once everything it wrote before the call arrived
    /// is durable, or why not.
    fn barrier(&self) -> impl Future<Output = BarrierAnswer> + Send;

    /// ReportLocalCommits of `tx_ids` (answered before the record is durable).
    fn report(&self, tx_ids: Vec<String>) -> impl Future<Output = ReportAnswer> + Send;

    /// ReleaseUnused of an id begun ahead and never used.
    fn release(
        &self,
        tx_id: String,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;

    /// Abort of a local transaction whose branch refused to commit.
    fn abort(
        &self,
        tx_id: String,
        reason: String,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;
}

/// What a `begin_local` got.
pub(crate) enum Began {
    /// A local transaction: its id, and the answer that tells whether its intent is
    /// durable (the Barrier's verdict).
    Local {
        tx_id: String,
        durable: oneshot::Receiver<Intent>,
    },
    /// The coordinator begins no local transactions: begin an ordinary one.
    Off,
}

/// A request of the handle to the driver.
enum Request {
    BeginLocal {
        resource: String,
        branch: pb::Branch,
        reply: oneshot::Sender<Result<Began>>,
    },
    Committed {
        tx_id: String,
        branch_id: String,
    },
    Forget(Unforgotten),
    Abort {
        tx_id: String,
        reason: String,
    },
    Shutdown(oneshot::Sender<()>),
}

/// The handle's side of the driver. Dropping it (with every clone of the `TwoPc`) shuts
/// the core down and lets the driver end.
pub(crate) struct LocalHandle {
    requests: mpsc::UnboundedSender<Request>,
    /// How many ids wait in the pools, as of the driver's last step.
    pooled: Arc<AtomicUsize>,
}

/// Starts the driver of a core that begins at most `begin_ahead` ids per BeginLocal,
/// calling `coordinator` and telling `registry`'s resources what to forget.
pub(crate) fn start<C: LocalCoordinator>(
    coordinator: Arc<C>,
    registry: Registry,
    begin_ahead: u32,
) -> LocalHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let pooled = Arc::new(AtomicUsize::new(0));
    let driver = Driver {
        core: LocalCore::new(begin_ahead),
        coordinator,
        registry,
        requests: rx,
        inflight: FuturesUnordered::new(),
        callers: HashMap::new(),
        waiters: HashMap::new(),
        shutdowns: HashMap::new(),
        branches: HashMap::new(),
        pooled: pooled.clone(),
        next_caller: 0,
    };
    tokio::spawn(driver.run());
    LocalHandle {
        requests: tx,
        pooled,
    }
}

/// The driver has ended (it outlives every handle, so this means it panicked).
fn gone() -> Error {
    Error::Usage("the local-commit task of this TwoPc handle has stopped".into())
}

impl LocalHandle {
    /// Begins a local transaction of `resource` (whose branch is `branch`): from the
    /// pool, or with a BeginLocal.
    pub(crate) async fn begin_local(&self, resource: &str, branch: pb::Branch) -> Result<Began> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::BeginLocal {
                resource: resource.to_string(),
                branch,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Reports the local commit of `tx_id` in the background, then forgets its branch
    /// after a Barrier.
    pub(crate) fn committed(&self, tx_id: String, branch_id: String) {
        let _ = self.requests.send(Request::Committed { tx_id, branch_id });
    }

    /// Forgets the branches of `entry` after a Barrier of its epoch.
    pub(crate) fn forget(&self, entry: Unforgotten) {
        let _ = self.requests.send(Request::Forget(entry));
    }

    /// Tells the coordinator in the background that the local commit of `tx_id` was
    /// refused (the branch rolled back), so it finishes the transaction now rather than at
    /// its timeout.
    pub(crate) fn refused(&self, tx_id: String, reason: String) {
        let _ = self.requests.send(Request::Abort { tx_id, reason });
    }

    /// Gives the ids begun ahead back and runs the last forget Barrier; returns when
    /// both are done (each bounded).
    pub(crate) async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.requests.send(Request::Shutdown(done)).is_ok() {
            let _ = finished.await;
        }
    }

    /// How many ids wait in the pools.
    pub(crate) fn pooled(&self) -> usize {
        self.pooled.load(Ordering::Relaxed)
    }
}

/// The driver task's state.
struct Driver<C> {
    /// Every decision; the driver only performs what it says.
    core: LocalCore<Error>,
    /// Where the calls go.
    coordinator: Arc<C>,
    /// The resources told what to forget.
    registry: Registry,
    /// The handle's requests; closed once every handle is gone.
    requests: mpsc::UnboundedReceiver<Request>,
    /// Calls in flight; each ends with the event to feed the core, if any.
    inflight: FuturesUnordered<BoxFuture<'static, Option<Event<Error>>>>,
    /// `begin_local` callers waiting for their reply.
    callers: HashMap<CallerId, oneshot::Sender<Result<Began>>>,
    /// Local transactions waiting for their Barrier's verdict.
    waiters: HashMap<WaiterId, oneshot::Sender<Intent>>,
    /// Shutdown callers waiting for the shutdown work.
    shutdowns: HashMap<CallerId, oneshot::Sender<()>>,
    /// The branch of each resource, as the latest `begin_local` gave it.
    branches: HashMap<String, pb::Branch>,
    /// Published after every step for [`LocalHandle::pooled`].
    pooled: Arc<AtomicUsize>,
    /// Names the next caller (`begin_local`, shutdown).
    next_caller: u64,
}

impl<C: LocalCoordinator> Driver<C> {
    async fn run(mut self) {
        let mut open = true;
        loop {
            let deadline = self.core.deadline().map(Instant::from_std);
            tokio::select! {
                request = self.requests.recv(), if open => match request {
                    Some(r) => self.request(r),
                    None => {
                        open = false;
                        self.step(Event::Shutdown { caller: None });
                    }
                },
                Some(event) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if let Some(event) = event {
                        self.step(event);
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => self.step(Event::Tick),
                else => return,
            }
        }
    }

    fn caller(&mut self) -> CallerId {
        self.next_caller += 1;
        CallerId(self.next_caller)
    }

    fn request(&mut self, request: Request) {
        match request {
            Request::BeginLocal {
                resource,
                branch,
                reply,
            } => {
                let caller = self.caller();
                self.callers.insert(caller, reply);
                self.branches.insert(resource.clone(), branch);
                self.step(Event::BeginLocal { caller, resource });
            }
            Request::Committed { tx_id, branch_id } => {
                self.step(Event::LocalCommitted { tx_id, branch_id })
            }
            Request::Forget(entry) => self.step(Event::Forget(entry)),
            Request::Abort { tx_id, reason } => {
                let c = self.coordinator.clone();
                self.inflight.push(Box::pin(async move {
                    if let Err(e) = c.abort(tx_id.clone(), reason).await {
                        debug!(%tx_id, error = %e,
                            "abort after a refused local commit failed; the coordinator settles it at the transaction timeout");
                    }
                    None
                }));
            }
            Request::Shutdown(done) => {
                let caller = self.caller();
                self.shutdowns.insert(caller, done);
                self.step(Event::Shutdown {
                    caller: Some(caller),
                });
            }
        }
    }

    /// Feeds `event` to the core and performs its commands (and the events they cause).
    fn step(&mut self, event: Event<Error>) {
        let mut events = vec![event];
        while let Some(event) = events.pop() {
            for command in self.core.step(Instant::now().into_std(), event) {
                events.extend(self.perform(command));
            }
        }
        self.pooled.store(self.core.pooled(), Ordering::Relaxed);
    }

    /// Performs `command`; an event when one follows at once (a reply nobody took).
    fn perform(&mut self, command: Command<Error>) -> Option<Event<Error>> {
        let c = self.coordinator.clone();
        match command {
            Command::BeginLocal {
                call,
                resource,
                count,
            } => {
                let branch = self.branches.get(&resource).cloned();
                self.inflight.push(Box::pin(async move {
                    let answer = match branch {
                        Some(branch) => c.begin_local(branch, count).await,
                        None => BeginLocalAnswer::Failed(Error::Usage(format!(
                            "resource {resource:?} has no branch here"
                        ))),
                    };
                    Some(Event::BeginLocalAnswered { call, answer })
                }));
            }
            Command::Barrier { call, within } => {
                self.inflight.push(Box::pin(async move {
                    let answer = bounded(within, c.barrier()).await;
                    Some(Event::BarrierAnswered { call, answer })
                }));
            }
            Command::Report { call, tx_ids } => {
                crate::crash_point("participant::after_local_commit_before_report");
                self.inflight.push(Box::pin(async move {
                    let answer = c.report(tx_ids).await;
                    Some(Event::ReportAnswered { call, answer })
                }));
            }
            Command::Release { tx_ids } => {
                for tx_id in tx_ids {
                    let c = c.clone();
                    self.inflight.push(Box::pin(async move {
                        release(&*c, tx_id).await;
                        None
                    }));
                }
            }
            Command::ReleaseAtShutdown { tx_ids, within } => {
                self.inflight.push(Box::pin(async move {
                    let all = futures::future::join_all(
                        tx_ids.into_iter().map(|tx_id| release(&*c, tx_id)),
                    );
                    let _ = tokio::time::timeout(within, all).await;
                    Some(Event::ReleasedAtShutdown)
                }));
            }
            Command::Forget(entries) => {
                for u in &entries {
                    tell_outcome_known(&self.registry, &u.tx_id, &u.branch_ids);
                }
            }
            Command::Reply { caller, reply } => return self.reply(caller, reply),
            Command::Durable { waiters, intent } => {
                for w in waiters {
                    if let Some(tx) = self.waiters.remove(&w) {
                        let _ = tx.send(intent.clone());
                    }
                }
            }
            Command::ShutDown { callers } => {
                for caller in callers {
                    if let Some(done) = self.shutdowns.remove(&caller) {
                        let _ = done.send(());
                    }
                }
            }
        }
        None
    }

    /// Answers a `begin_local` caller; a local transaction nobody took goes back.
    fn reply(&mut self, caller: CallerId, reply: Reply<Error>) -> Option<Event<Error>> {
        let to = self.callers.remove(&caller)?;
        let (tx_id, waiter, answer) = match reply {
            Reply::Local { tx_id, durable, .. } => {
                let (tell, told) = oneshot::channel();
                let waiter = match durable {
                    Durability::Known(intent) => {
                        let _ = tell.send(intent);
                        None
                    }
                    Durability::Pending(w) => {
                        self.waiters.insert(w, tell);
                        Some(w)
                    }
                };
                let began = Began::Local {
                    tx_id: tx_id.clone(),
                    durable: told,
                };
                (Some(tx_id), waiter, Ok(began))
            }
            Reply::Off => (None, None, Ok(Began::Off)),
            Reply::Failed(e) => (None, None, Err(e)),
        };
        if to.send(answer).is_ok() {
            return None;
        }
        if let Some(w) = waiter {
            self.waiters.remove(&w);
        }
        tx_id.map(|tx_id| Event::Unclaimed { tx_id })
    }
}

/// `call`'s answer, or a failure after `within`.
async fn bounded(within: Duration, call: impl Future<Output = BarrierAnswer>) -> BarrierAnswer {
    match tokio::time::timeout(within, call).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Sleeps until `deadline` (forever without one; the select guards that case).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Gives one unused id back; a failure is only logged.
async fn release<C: LocalCoordinator>(c: &C, tx_id: String) {
    if let Err(e) = c.release(tx_id.clone()).await {
        debug!(%tx_id, error = %e,
            "could not give back an unused transaction id; the coordinator settles it at its timeout");
    }
}

/// Tells the registered resources of `branch_ids` that the coordinator holds the outcome
/// of transaction `tx_id`.
pub(crate) fn tell_outcome_known(registry: &Registry, tx_id: &str, branch_ids: &[String]) {
    let Ok(registry) = registry.read() else {
        return;
    };
    for branch_id in branch_ids {
        let name = branch_id.split_once(':').map_or("", |(_, r)| r);
        if let Some(resource) = registry.get(name) {
            resource.outcome_known(tx_id, branch_id);
        }
    }
}
