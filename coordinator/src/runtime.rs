//! The runtime: carries out the engine's commands with real I/O.
//!
//! One [`Runtime`] owns the [`Engine`] (behind a mutex that is never held across an
//! `await`), the [`DecisionLog`] and the [`Transport`]. Every input becomes an
//! [`Event`]; its dispatcher feeds it to the engine and executes the commands it
//! returns:
//!
//! * lazy log records are written *while the engine lock is held*, so no reader can see
//!   the engine forget a transaction before the log holds what answers for it;
//! * forced decisions go to the log's group-commit writer, and their durability comes back
//!   as [`Event::LogDurable`];
//! * sends and replies are checked, in one place, against the log position they depend
//!   on ([`Command::Send::requires_durable`], [`Command::Reply::requires_durable`]: a
//!   commit or an answer before the record behind it is durable stops the process);
//!   sends run as tasks;
//! * timers live in one task with a delay queue (cheap for millions of pending timeouts);
//!   retry timers get jitter here, keeping the engine deterministic;
//! * replies complete the oneshot of the waiting RPC;
//! * [`Metrics`] look at every event and the commands it produced (the engine knows
//!   nothing of them).
//!
//! # Fail points
//!
//! With the crate feature `failpoints` (and `FAILPOINTS` read by the binary),
//! `<name>=return(abort)` aborts the process on the spot (SIGABRT, no cleanup) at these
//! crash points; without the feature they compile to nothing. For all but
//! `before_log_decision` and `after_decision_durable`, any other action is ignored:
//!
//! * `coordinator::before_prepare`: Commit was accepted and the PREPARING record (lazily)
//!   written, before the first prepare of the transaction is sent;
//! * `coordinator::after_first_prepare`: the first branch's prepare RPC returned (that
//!   participant has prepared), before its vote reaches the engine (so no decision can
//!   have been made); the other prepares may be in flight;
//! * `coordinator::before_log_decision`: every vote is yes, before the COMMIT record is
//!   written;
//! * `coordinator::after_decision_durable`: the COMMIT record is durable, before any
//!   commit is sent;
//! * `coordinator::between_tiers`: phase two, a lower `commit_order` tier is acknowledged,
//!   before the next tier's commit is sent.
//! * `coordinator::before_one_phase_sync`: a one-phase commit's record was written
//!   lazily, before the sync that makes it durable. The first such sync of a transaction
//!   covers its intent (written when its branch enlisted; no commit sent yet), the second
//!   its outcome (the branch has committed, the client not yet answered; only for a
//!   client that did not ask for an early answer): `1*off->return(abort)` crashes at the
//!   second.
//! * `coordinator::before_barrier_sync`: a Barrier call arrived, before the log sync that
//!   answers it (one-phase outcomes answered early may not be durable yet).
//! * `coordinator::during_collection`: the collector deleted a batch of finished records
//!   (written, not synced), before the next batch ([`collector`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::StreamExt;
use tokio_util::time::DelayQueue;
use tracing::{debug, error, info, warn};

use crate::engine::{Command, Engine, EngineConfig, Event, Message, ReplyOk, Timer, TxError};
use crate::log::{DecisionLog, LogError, Lsn};
use crate::metrics::Metrics;
use crate::transport::Transport;
use crate::types::{BranchSpec, TxId};

/// Called once when the coordinator halts, with the reason.
type HaltHook = Box<dyn Fn(&str) + Send + Sync>;

/// Settings of the runtime beyond the engine's.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Protocol knobs.
    pub engine: EngineConfig,
    /// Default wait for phase two in Commit.
    pub commit_wait: Duration,
    /// How long finished decision records are kept before the collector deletes them
    /// ([`collector`]); `None`: kept forever.
    pub retention: Option<Duration>,
}

/// What a Commit RPC learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitResult {
    /// Branches whose commit is not acknowledged yet.
    pub pending: Vec<String>,
    /// The epoch of this start of the coordinator (see [`Runtime::barrier`]).
    pub epoch: u64,
}

impl CommitResult {
    /// Committed with nothing pending, answered in `epoch`.
    fn finished(epoch: u64) -> Self {
        CommitResult {
            pending: Vec::new(),
            epoch,
        }
    }
}

/// The coordinator runtime. Cheap to clone (an `Arc`).
pub struct Runtime<L: DecisionLog, T: Transport> {
    inner: Arc<Inner<L, T>>,
}

impl<L: DecisionLog, T: Transport> Clone for Runtime<L, T> {
    fn clone(&self) -> Self {
        Runtime {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<L, T> {
    /// The protocol state machine.
    engine: Mutex<Engine>,
    /// Its configuration (fixed at start; read without the engine's lock).
    config: EngineConfig,
    /// Where decisions become durable.
    log: Arc<L>,
    /// How messages reach participants.
    transport: T,
    /// Replies the engine will send, by request id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<ReplyOk, TxError>>>>,
    /// Source of request ids.
    next_req: AtomicU64,
    /// Commit RPCs waiting for phase two to finish, by transaction.
    finished: Mutex<HashMap<TxId, Arc<Notify>>>,
    /// Timer requests for the timer task.
    timers: mpsc::UnboundedSender<(TxId, Timer, Duration)>,
    /// The runtime's clock origin (engine time is ms since this).
    started: Instant,
    /// Set when the engine halted (the log failed).
    halted: AtomicBool,
    /// Called with `false` when the coordinator stops serving (health reporting).
    on_halt: Mutex<Option<HaltHook>>,
    /// Prometheus metrics, recorded as events pass through [`Inner::dispatch`].
    metrics: Metrics,
    /// Options.
    opts: RuntimeOptions,
}

impl<L: DecisionLog, T: Transport> Runtime<L, T> {
    /// A runtime over `log` and `transport`. Must be called inside a tokio runtime (it
    /// spawns the timer task). Call [`Runtime::recover`] before serving.
    pub fn new(opts: RuntimeOptions, log: Arc<L>, transport: T) -> Self {
        let engine = Engine::new(opts.engine.clone(), log.node_id(), log.epoch());
        let (timers, rx) = mpsc::unbounded_channel();
        let metrics = Metrics::new(log.durable_lsn());
        let inner = Arc::new(Inner {
            engine: Mutex::new(engine),
            config: opts.engine.clone(),
            log,
            transport,
            pending: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            finished: Mutex::new(HashMap::new()),
            timers,
            started: Instant::now(),
            halted: AtomicBool::new(false),
            on_halt: Mutex::new(None),
            metrics,
            opts,
        });
        tokio::spawn(timer_task(Arc::downgrade(&inner), rx));
        Runtime { inner }
    }

    /// Registers what to do when the coordinator halts (e.g. report NOT_SERVING).
    pub fn on_halt(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *lock(&self.inner.on_halt) = Some(Box::new(f));
    }

    /// The decision log.
    pub fn log(&self) -> &Arc<L> {
        &self.inner.log
    }

    /// Whether the coordinator stopped taking work.
    pub fn is_halted(&self) -> bool {
        self.inner.halted.load(Ordering::SeqCst)
    }

    /// The metrics this runtime records.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// One scrape: refreshes the gauges computed from the engine and the log, then
    /// encodes every metric in the Prometheus text format. Both happen under the
    /// engine's lock, so a scrape is one consistent snapshot of what the engine's events
    /// record (an event handled between the refresh and the encoding could otherwise show
    /// its recovery counts beside gauges computed before it).
    pub fn render_metrics(&self) -> Result<String, prometheus::Error> {
        let stats = self.inner.log.stats();
        let halted = self.is_halted();
        let engine = lock(&self.inner.engine);
        self.inner
            .metrics
            .refresh(&engine, self.inner.now_ms(), stats, halted);
        // `engine` is still held: it is dropped after the encoding.
        self.inner.metrics.encode()
    }

    /// Reads the log and schedules every unfinished transaction, then starts the
    /// collector (with a retention set). Call once. Returns how many (commits to
    /// re-drive, undecided to abort).
    pub fn recover(&self) -> Result<(usize, usize), LogError> {
        let rec = self.without_resolved(self.inner.log.recover()?)?;
        let counts = (rec.commits.len(), rec.undecided.len());
        info!(
            commits = counts.0,
            undecided = counts.1,
            one_phase = rec.one_phase.len(),
            "recovery: re-driving unfinished transactions"
        );
        self.inner.dispatch(Event::Recovered(rec));
        // Sampling starts once the recovered transactions are held (see `collector`).
        if let Some(retention) = self.inner.opts.retention {
            tokio::spawn(collector::run(Arc::downgrade(&self.inner), retention));
        }
        Ok(counts)
    }

    /// The timeout of a transaction begun without one of its own (`--tx-timeout-ms`).
    pub fn default_tx_timeout_ms(&self) -> u64 {
        self.inner.config.tx_timeout_ms
    }

    /// Begin RPC.
    pub async fn begin(&self, timeout_ms: u64, branches: Vec<BranchSpec>) -> Result<TxId, TxError> {
        match self
            .request(|req| Event::Begin {
                req,
                timeout_ms,
                branches,
            })
            .await?
        {
            ReplyOk::Begun(tx) => Ok(tx),
            other => Err(unexpected(other)),
        }
    }

    /// BeginLocal RPC: begins `count` local transactions (0 counts as one) whose
    /// one-phase intents naming `branch` are written and synced in the background; its
    /// participant commits each by itself once a Barrier of this epoch returned, and
    /// reports it ([`Runtime::committed_locally`]). Refused with one-phase commits turned
    /// off.
    pub async fn begin_local(
        &self,
        timeout_ms: u64,
        branch: BranchSpec,
        count: u32,
    ) -> Result<Vec<TxId>, TxError> {
        if !self.inner.config.one_phase {
            return Err(TxError::FailedPrecondition(
                "local commits need one-phase commits, which this coordinator runs with off \
                 (--one-phase false); begin an ordinary transaction instead"
                    .into(),
            ));
        }
        match self
            .request(|req| Event::BeginLocal {
                req,
                timeout_ms,
                branch,
                count,
            })
            .await?
        {
            ReplyOk::BegunLocal(txs) => Ok(txs),
            other => Err(unexpected(other)),
        }
    }

    /// ReportLocalCommits RPC, for one transaction: the participant of a local transaction
    /// reports that it committed; recorded as COMMITTED (synced before the answer unless
    /// `answer_before_durable`).
    pub async fn committed_locally(
        &self,
        tx: TxId,
        answer_before_durable: bool,
    ) -> Result<CommitResult, TxError> {
        let epoch = self.inner.log.epoch();
        named_crash_point("coordinator::before_local_commit_record");
        match self
            .request(|req| Event::CommittedLocally { req, tx })
            .await?
        {
            ReplyOk::Committed => {
                // The outcome record is written (before the reply left the engine).
                if !answer_before_durable {
                    self.sync_log().await?;
                }
                Ok(CommitResult::finished(epoch))
            }
            ReplyOk::NotLive => self.answer_reported(tx, answer_before_durable, epoch).await,
            other => Err(unexpected(other)),
        }
    }

    /// Enlist RPC.
    pub async fn enlist(&self, tx: TxId, branch: BranchSpec) -> Result<(), TxError> {
        self.request(|req| Event::Enlist { req, tx, branch })
            .await
            .map(|_| ())
    }

    /// Commit RPC: runs the protocol, then waits up to `wait` (None: the default; zero:
    /// not at all) for phase two. With `early`, a one-phase commit is answered before its
    /// outcome is durable (the caller calls [`Runtime::barrier`] before its participant
    /// forgets the branch).
    pub async fn commit(
        &self,
        tx: TxId,
        wait: Option<Duration>,
        answer_before_durable: bool,
    ) -> Result<CommitResult, TxError> {
        let epoch = self.inner.log.epoch();
        match self
            .request(|req| Event::Commit {
                req,
                tx,
                answer_before_durable,
            })
            .await?
        {
            ReplyOk::Committed => {}
            ReplyOk::NotLive => {
                return self.answer_finished(tx, answer_before_durable, epoch).await
            }
            other => return Err(unexpected(other)),
        }
        let wait = wait.unwrap_or(self.inner.opts.commit_wait);
        if !wait.is_zero() {
            self.wait_finished(tx, wait).await;
        }
        let pending = match lock(&self.inner.engine).tx(&tx) {
            Some(e) => e
                .pending_branches()
                .iter()
                .map(|b| b.spec.branch_id.clone())
                .collect(),
            None => Vec::new(),
        };
        Ok(CommitResult { pending, epoch })
    }

    /// Barrier RPC: returns once every record written before the call is durable (one log
    /// sync, shared with the other writes of the moment), with this start's epoch.
    pub async fn barrier(&self) -> Result<u64, TxError> {
        if let Some(why) = lock(&self.inner.engine).halted() {
            return Err(TxError::Unavailable(format!(
                "coordinator is not taking new work: {why}"
            )));
        }
        named_crash_point("coordinator::before_barrier_sync");
        self.sync_log().await?;
        Ok(self.inner.log.epoch())
    }

    /// Makes every record written so far durable.
    async fn sync_log(&self) -> Result<(), TxError> {
        let epoch = self.inner.log.epoch();
        self.inner
            .log
            .sync(epoch)
            .await
            .map(|_| ())
            .map_err(|e| TxError::Unavailable(format!("could not sync the decision log: {e}")))
    }

    /// Abort RPC. Refused for a forgotten transaction (its outcome is not known).
    pub async fn abort(&self, tx: TxId, reason: String) -> Result<(), TxError> {
        let forgotten = Err(finished::forgotten(&tx, "aborted"));
        self.aborted(tx, |req| Event::Abort { req, tx, reason }, forgotten)
            .await
    }

    /// ReleaseUnused RPC: the participant returns a local transaction's id it did not
    /// use; settled like an abort, counted apart. A forgotten one is long finished and
    /// was never used: nothing is left to give back.
    pub async fn release(&self, tx: TxId) -> Result<(), TxError> {
        self.aborted(tx, |req| Event::Release { req, tx }, Ok(()))
            .await
    }

    async fn request(&self, make: impl FnOnce(u64) -> Event) -> Result<ReplyOk, TxError> {
        let req = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(req, tx);
        self.inner.dispatch(make(req));
        match rx.await {
            Ok(reply) => reply,
            Err(_) => Err(TxError::Unavailable("coordinator is shutting down".into())),
        }
    }

    async fn wait_finished(&self, tx: TxId, wait: Duration) {
        let notify = lock(&self.inner.finished).entry(tx).or_default().clone();
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let done = |rt: &Self| {
            lock(&rt.inner.engine)
                .tx(&tx)
                .is_none_or(|e| e.state != crate::engine::TxState::Committing)
        };
        if !done(self) {
            let _ = tokio::time::timeout(wait, notified).await;
        }
        if done(self) {
            lock(&self.inner.finished).remove(&tx);
        }
    }
}

impl<L: DecisionLog, T: Transport> Inner<L, T> {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Feeds one event to the engine and carries out its commands.
    fn dispatch(self: &Arc<Self>, event: Event) {
        let mut deferred = Vec::new();
        {
            let mut engine = lock(&self.engine);
            self.metrics.before(&event);
            let (cmds, notes) = engine.handle_noted(self.now_ms(), event);
            self.metrics.after(&cmds, &notes);
            let epoch = engine.epoch();
            for cmd in cmds {
                match cmd {
                    Command::LogLazy(record) => {
                        if let Err(e) = self.log.record_lazy(epoch, record.clone()) {
                            error!(error = %e, "lazy log write failed");
                            let tx = lazy_tx(&record);
                            deferred.push(Deferred::Event(Event::LogFailed {
                                tx,
                                error: e.to_string(),
                            }));
                        }
                    }
                    other => deferred.push(Deferred::Cmd(other)),
                }
            }
        }
        // The syncs one event asked for (many, for local transactions begun at once)
        // share one call.
        let mut syncs = Vec::new();
        for item in deferred.into_iter() {
            match item {
                Deferred::Cmd(Command::Sync { tx }) => syncs.push(tx),
                Deferred::Cmd(cmd) => self.execute(cmd),
                Deferred::Event(ev) => self.dispatch(ev),
            }
        }
        if !syncs.is_empty() {
            self.sync_then_tell(syncs);
        }
    }

    /// Syncs the log in the background, then tells the engine for each of `txs`
    /// ([`Event::Synced`], or [`Event::SyncFailed`]).
    fn sync_then_tell(self: &Arc<Self>, txs: Vec<TxId>) {
        let me = self.clone();
        let epoch = self.log.epoch();
        tokio::spawn(async move {
            // The first sync of a one-phase commit covers its intent (nothing sent
            // yet), the second its outcome (the branch has committed).
            named_crash_point("coordinator::before_one_phase_sync");
            let result = me.log.sync(epoch).await;
            for tx in txs {
                let ev = match &result {
                    Ok(lsn) => Event::Synced { tx, lsn: *lsn },
                    Err(e) => {
                        error!(%tx, error = %e, "could not sync a one-phase commit's record");
                        Event::SyncFailed {
                            tx,
                            error: e.to_string(),
                        }
                    }
                };
                me.dispatch(ev);
            }
        });
    }

    /// Ordering is data: a command stamped with the log position it depends on
    /// ([`Command::Send::requires_durable`], [`Command::Reply::requires_durable`]) goes out
    /// only if the log is durable that far. The engine emits such commands only after the
    /// log said so, so a miss is a bug: the process stops rather than send a commit, or
    /// give an answer, the log cannot back.
    fn assert_durable(&self, requires_durable: Option<Lsn>, what: impl FnOnce() -> String) {
        let Some(lsn) = requires_durable else {
            return;
        };
        let durable = self.log.durable_lsn();
        if durable < lsn {
            error!(
                lsn,
                durable,
                "BUG: {} about to go out before the log is durable at the LSN it depends on",
                what()
            );
            std::process::abort();
        }
    }

    fn execute(self: &Arc<Self>, cmd: Command) {
        match cmd {
            Command::LogLazy(_) => unreachable!("lazy writes happen under the engine lock"),
            Command::ForceAudit { req, record } => self.force_audit(req, record),
            Command::Sync { tx } => self.sync_then_tell(vec![tx]),
            Command::ForceCommit(mut record) => {
                record.decided_at_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let me = self.clone();
                let epoch = self.log.epoch();
                if unsafe_commit_before_durable() {
                    // Deliberately broken (test-only, failpoints builds): commits go out at
                    // once and the decision reaches the log later, so a crash in between
                    // loses a decision some branches already acted on. The fault campaign
                    // must catch this.
                    self.dispatch(Event::LogDurable {
                        tx: record.tx,
                        lsn: 0,
                    });
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = me.log.force_commit(epoch, record).await;
                    });
                    return;
                }
                tokio::spawn(async move {
                    let tx = record.tx;
                    fail::fail_point!("coordinator::before_log_decision", crash_point);
                    let ev = match me.log.force_commit(epoch, record).await {
                        Ok(lsn) => {
                            me.metrics.durable_advanced(me.log.durable_lsn());
                            fail::fail_point!("coordinator::after_decision_durable", |arg| {
                                crash_point(arg)
                            });
                            Event::LogDurable { tx, lsn }
                        }
                        Err(e) => {
                            error!(%tx, error = %e, "could not make the COMMIT decision durable");
                            Event::LogFailed {
                                tx,
                                error: e.to_string(),
                            }
                        }
                    };
                    me.dispatch(ev);
                });
            }
            Command::Send {
                tx,
                branch,
                endpoint,
                branch_id,
                message,
                requires_durable,
            } => {
                self.assert_durable(requires_durable, || format!("{message:?} to {tx}"));
                // Prepares of a transaction are sent once, in branch order: branch 0's is
                // the first one.
                if message == Message::Prepare && branch == 0 {
                    named_crash_point("coordinator::before_prepare");
                }
                if let Message::Commit { one_phase: false } = message {
                    self.between_tiers_crash_point(tx, branch);
                }
                let me = self.clone();
                tokio::spawn(async move {
                    debug!(%tx, branch_id, ?message, "send");
                    let ev = match message {
                        Message::Prepare => {
                            let vote = me.transport.prepare(&endpoint, tx, &branch_id).await;
                            if branch == 0 {
                                named_crash_point("coordinator::after_first_prepare");
                            }
                            Event::Voted { tx, branch, vote }
                        }
                        Message::Commit { one_phase } => {
                            let ack = me
                                .transport
                                .commit(&endpoint, tx, &branch_id, one_phase)
                                .await;
                            if let Err(e) = &ack {
                                warn!(%tx, branch_id, error = %e, "commit not acknowledged; will retry");
                            }
                            Event::CommitAcked { tx, branch, ack }
                        }
                        Message::Abort => {
                            let ack = me.transport.abort(&endpoint, tx, &branch_id).await;
                            Event::AbortAcked { tx, branch, ack }
                        }
                    };
                    me.dispatch(ev);
                });
            }
            Command::Reply {
                req,
                reply,
                requires_durable,
            } => {
                self.assert_durable(requires_durable, || format!("the answer {reply:?}"));
                if let Some(sender) = lock(&self.pending).remove(&req) {
                    let _ = sender.send(reply);
                }
            }
            Command::ArmTimer {
                tx,
                timer,
                after_ms,
            } => {
                let after_ms = match timer {
                    Timer::Retry { .. } if after_ms > 1 => {
                        rand::rng().random_range(after_ms / 2..=after_ms)
                    }
                    _ => after_ms,
                };
                let _ = self
                    .timers
                    .send((tx, timer, Duration::from_millis(after_ms)));
            }
            Command::Finished { tx, outcome } => {
                debug!(%tx, ?outcome, "finished");
                if let Some(n) = lock(&self.finished).remove(&tx) {
                    n.notify_waiters();
                }
            }
            Command::Halt { reason } => {
                error!(
                    reason,
                    "coordinator halted: no new transactions are accepted"
                );
                self.halted.store(true, Ordering::SeqCst);
                if let Some(f) = lock(&self.on_halt).as_ref() {
                    f(&reason);
                }
            }
        }
    }
}

impl<L: DecisionLog, T: Transport> Inner<L, T> {
    /// The `coordinator::between_tiers` crash point: phase two is about to send the commit
    /// of `branch`, and a branch of the same transaction in a lower `commit_order` tier is
    /// already acknowledged (so a tier finished and this is the next one). Only such
    /// sends evaluate the fail point (so counts like `1*off->return(abort)` count tier
    /// crossings). Compiled out without the feature.
    #[cfg(feature = "failpoints")]
    fn between_tiers_crash_point(&self, tx: TxId, branch: usize) {
        let crosses = {
            let engine = lock(&self.engine);
            engine.tx(&tx).is_some_and(|e| {
                e.branches.get(branch).is_some_and(|b| {
                    e.branches.iter().any(|o| {
                        o.state == crate::engine::BranchState::Committed
                            && o.spec.commit_order < b.spec.commit_order
                    })
                })
            })
        };
        if crosses {
            named_crash_point("coordinator::between_tiers");
        }
    }

    #[cfg(not(feature = "failpoints"))]
    #[inline(always)]
    fn between_tiers_crash_point(&self, _tx: TxId, _branch: usize) {}
}

/// Items to carry out after the engine lock is released.
enum Deferred {
    Cmd(Command),
    Event(Event),
}

fn lazy_tx(record: &crate::log::LazyRecord) -> TxId {
    use crate::log::LazyRecord::*;
    match record {
        Preparing { tx, .. }
        | OnePhase { tx, .. }
        | Aborted { tx }
        | Done { tx }
        | OnePhaseCommitted { tx, .. } => *tx,
    }
}

/// The deliberately broken variant the fault campaign uses to prove its checker: with the
/// `failpoints` feature and `TWOPC_UNSAFE_COMMIT_BEFORE_DURABLE=1`, commits are sent before
/// the decision is durable. Never available in normal builds.
fn unsafe_commit_before_durable() -> bool {
    #[cfg(feature = "failpoints")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            let on = std::env::var_os("TWOPC_UNSAFE_COMMIT_BEFORE_DURABLE").is_some_and(|v| v == "1");
            if on {
                error!("TWOPC_UNSAFE_COMMIT_BEFORE_DURABLE=1: commits are sent before decisions are durable (test-only broken variant)");
            }
            on
        })
    }
    #[cfg(not(feature = "failpoints"))]
    {
        false
    }
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
/// What a crash-point failpoint does: `abort` kills the process on the spot (like
/// SIGKILL, no cleanup); anything else is ignored.
fn crash_point(arg: Option<String>) {
    if arg.as_deref() == Some("abort") {
        eprintln!("failpoint hit: aborting the process");
        std::process::abort();
    }
}

/// A crash point of the runtime named in its message: with the `failpoints` feature,
/// `<name>=return(abort)` aborts the process on the spot; any other action is ignored
/// (nothing is skipped). Without the feature it compiles to nothing.
#[cfg(feature = "failpoints")]
pub(crate) fn named_crash_point(name: &str) {
    if let Some(arg) = fail::eval(name, |arg| arg) {
        crash_point_at(name, arg);
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn named_crash_point(_name: &str) {}

/// What a named crash point does when it fires: `abort` kills the process (like SIGKILL,
/// no cleanup), saying which point it was; anything else is ignored.
#[cfg(feature = "failpoints")]
fn crash_point_at(name: &str, arg: Option<String>) {
    if arg.as_deref() == Some("abort") {
        eprintln!("failpoint {name} hit: aborting the process");
        std::process::abort();
    }
}

async fn timer_task<L: DecisionLog, T: Transport>(
    inner: std::sync::Weak<Inner<L, T>>,
    mut rx: mpsc::UnboundedReceiver<(TxId, Timer, Duration)>,
) {
    let mut queue: DelayQueue<(TxId, Timer)> = DelayQueue::new();
    loop {
        tokio::select! {
            req = rx.recv() => match req {
                Some((tx, timer, after)) => { queue.insert((tx, timer), after); }
                None => return,
            },
            Some(expired) = queue.next(), if !queue.is_empty() => {
                let (tx, timer) = expired.into_inner();
                let Some(inner) = inner.upgrade() else { return };
                inner.dispatch(Event::Timer { tx, timer });
            }
        }
    }
}

fn unexpected(reply: ReplyOk) -> TxError {
    TxError::Unavailable(format!("internal error: unexpected engine reply {reply:?}"))
}

/// Locks a mutex, recovering from poisoning: every critical section here leaves the data
/// consistent before any point that could panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Admin side (operator resolutions, audit records): a child module so it can use
/// the runtime's private state.
#[path = "runtime_admin.rs"]
mod admin;
#[path = "runtime_collector.rs"]
pub mod collector;
#[path = "runtime_finished.rs"]
mod finished;

pub use finished::{Known, TxView};
