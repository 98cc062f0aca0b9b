//! Prometheus metrics of the coordinator, and the HTTP endpoint that serves them.
//!
//! [`Metrics`] is a registry of its own (not the process-global default one) that the
//! [`Runtime`](crate::runtime::Runtime) records into while events pass through its
//! dispatcher; the [engine](crate::engine) stays pure and knows nothing of it. The engine
//! says what happened as data ([`Note`]: a decision with its cause, an answer ignored as
//! late or duplicate, a re-send, a phase boundary); the runtime hands the event to
//! [`Metrics::before`] and the commands and notes the engine returned to
//! [`Metrics::after`], which count them. Nothing here reads or compares the engine's
//! state. Recording is atomics plus, for transactions in the commit protocol, one small
//! entry in a map of phase start times.
//!
//! Gauges about what is live (transactions in doubt, the oldest one's age, recovery
//! progress, halted) and the decision log's counters are computed when scraped, by
//! [`Metrics::refresh`].
//!
//! # Metrics
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `twopc_transactions_begun_total` | counter | transactions issued by Begin (one Begin of local transactions may issue up to 256) |
//! | `twopc_transactions_committed_total` | counter | COMMIT decisions taken by this process (durable two-phase, one-phase acknowledged, read-only or empty) |
//! | `twopc_transactions_aborted_total{reason}` | counter | ABORT decisions by reason: `vote_no` (a no vote, a failed prepare or a refused one-phase commit), `prepare_timeout`, `tx_timeout`, `client`, `recovery` (undecided at restart), `operator` (an Admin `Resolve` to ABORT of an undecided or one-phase transaction), `unused` (a local transaction's id begun ahead and returned unused by its participant), `other` |
//! | `twopc_prepare_round_seconds` | histogram | Commit request → every vote yes (COMMIT about to be forced) |
//! | `twopc_decision_force_seconds` | histogram | COMMIT forced → durable |
//! | `twopc_phase_two_seconds` | histogram | COMMIT durable → every branch acknowledged |
//! | `twopc_commit_seconds` | histogram | Commit request → phase two finished (committed transactions) |
//! | `twopc_phase_two_retries_total{message}` | counter | phase-two sends beyond the first per branch (`commit`, `abort`) |
//! | `twopc_participant_answers_ignored_total{answer}` | counter | late or duplicate answers (`vote`, `commit`, `abort`) the engine ignored |
//! | `twopc_transactions_live` | gauge | transactions the coordinator holds in memory |
//! | `twopc_transactions_in_doubt` | gauge | live transactions past Commit: preparing, deciding, or decided with phase two unfinished |
//! | `twopc_transactions_in_doubt_oldest_age_seconds` | gauge | age (since Begin, or since the restart for recovered ones) of the oldest of those; 0 if none |
//! | `twopc_log_syncs_total` | counter | decision-log syncs |
//! | `twopc_log_decisions_total` | counter | COMMIT decisions made durable |
//! | `twopc_log_sync_batch_size` | histogram | decisions made durable per group-commit sync |
//! | `twopc_recovery_transactions{kind}` | gauge | found by recovery at start: `commit` (to re-drive), `abort` (undecided, to abort), `one_phase` (one-phase commits whose outcome was not recorded: their branch is asked again) |
//! | `twopc_recovery_remaining{kind}` | gauge | of those, still unfinished |
//! | `twopc_halted` | gauge | 1 once the decision log failed and no new work is taken |
//! | `twopc_log_records_collected_total` | counter | finished decision records deleted after the retention (`--decision-retention-ms`) |
//! | `twopc_log_records_kept` | gauge | decision records the log keeps, open and finished (counted by the collector about once a minute, less often when counting takes long) |
//! | `twopc_log_record_oldest_kept_age_seconds` | gauge | age of the oldest of them at that count; 0 if none |
//! | `twopc_forgotten_answers_total` | counter | requests about a transaction whose record was collected, answered FORGOTTEN |
//! | `twopc_heuristic_resolutions_total{decision,result}` | counter | operator resolutions (Admin `Resolve`) whose audit record is durable: `decision` `commit`/`abort`; `result` `accepted`, `contradicting` (accepted with force against the known outcome) or `refused` |
//!
//! Outcomes are counted when they are decided, not when phase two finishes; COMMIT
//! decisions recovered from the log were taken by an earlier process and are not counted
//! again (they show in `twopc_recovery_*`); a one-phase commit recovered from its intent
//! is counted when its branch answers (the process that crashed may have counted it too). An operator resolution decides an outcome only
//! for a transaction that was undecided (ACTIVE, PREPARING, or a one-phase commit in
//! flight); resolving one already decided counts in `twopc_heuristic_resolutions_total`
//! only, never as a second decision.
//!
//! # Endpoint
//!
//! [`spawn`] serves `GET /metrics` (Prometheus text exposition format 0.0.4) on a listener
//! of its own, over HTTP/1.1; other paths answer 404, other methods on `/metrics` 405.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::engine::{Command, Engine, Event, Message, Note, Outcome, ReplyOk, ReqId, TxState};
use crate::log::LogStats;
use crate::types::{HeuristicDecision, TxId};

/// Upper bounds of the latency histograms (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Upper bounds of the group-commit batch histogram (decisions per sync).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Why a transaction aborted (the engine notes it), as a label value of
/// `twopc_transactions_aborted_total`.
use crate::engine::AbortCause as AbortReason;

impl AbortReason {
    const ALL: [AbortReason; 8] = [
        AbortReason::VoteNo,
        AbortReason::PrepareTimeout,
        AbortReason::TxTimeout,
        AbortReason::Client,
        AbortReason::Recovery,
        AbortReason::Operator,
        AbortReason::Unused,
        AbortReason::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            AbortReason::VoteNo => "vote_no",
            AbortReason::PrepareTimeout => "prepare_timeout",
            AbortReason::TxTimeout => "tx_timeout",
            AbortReason::Client => "client",
            AbortReason::Recovery => "recovery",
            AbortReason::Operator => "operator",
            AbortReason::Unused => "unused",
            AbortReason::Other => "other",
        }
    }
}

/// Index into [`Metrics::ignored`] (answer kinds).
const ANSWERS: [&str; 3] = ["vote", "commit", "abort"];

/// Values of the `result` label of `twopc_heuristic_resolutions_total`, in the order of
/// [`Metrics::resolutions`]' inner index.
const RESOLUTION_RESULTS: [&str; 3] = ["accepted", "contradicting", "refused"];

/// An operator resolution whose audit record is being forced: the audit events name only
/// the request, so this is how the record's verdict is found.
#[derive(Clone, Copy, Debug)]
struct PendingAudit {
    decision: HeuristicDecision,
    /// Index into [`RESOLUTION_RESULTS`].
    result: usize,
}

/// When a transaction in the commit protocol passed each phase boundary.
#[derive(Clone, Copy, Debug)]
struct PhaseTimes {
    commit: Instant,
    force: Option<Instant>,
    durable: Option<Instant>,
}

/// Transactions found by recovery, to report how many are still unfinished.
#[derive(Debug, Default)]
struct RecoveryLeft {
    commits: Vec<TxId>,
    aborts: Vec<TxId>,
    one_phase: Vec<TxId>,
}

/// The metrics of the collection of finished decision records (fed by the runtime's
/// collector and by answers about forgotten transactions).
pub struct CollectionMetrics {
    collected: IntCounter,
    kept: IntGauge,
    oldest_kept: Gauge,
    forgotten: IntCounter,
}

impl CollectionMetrics {
    fn new(r: &Registry) -> Self {
        CollectionMetrics {
            collected: counter(
                r,
                "twopc_log_records_collected_total",
                "Finished decision records deleted after the retention",
            ),
            kept: gauge(
                r,
                "twopc_log_records_kept",
                "Decision records the log keeps (open and finished), as last counted",
            ),
            oldest_kept: register(
                r,
                Gauge::with_opts(Opts::new(
                    "twopc_log_record_oldest_kept_age_seconds",
                    "Age of the oldest decision record kept, as last counted (0 if none)",
                ))
                .expect("valid gauge"),
            ),
            forgotten: counter(
                r,
                "twopc_forgotten_answers_total",
                "Requests about a transaction whose record was collected (answered FORGOTTEN)",
            ),
        }
    }

    /// `records` finished records were collected.
    pub fn collected(&self, records: u64) {
        self.collected.inc_by(records);
    }

    /// What the log keeps, counted now: `records`, the oldest decided `oldest_age_ms` ago.
    pub fn kept(&self, records: u64, oldest_age_ms: u64) {
        self.kept.set(i64::try_from(records).unwrap_or(i64::MAX));
        self.oldest_kept.set(oldest_age_ms as f64 / 1000.0);
    }

    /// A request about a forgotten transaction was answered so.
    pub fn forgotten_answered(&self) {
        self.forgotten.inc();
    }
}

/// The coordinator's metrics registry. See the module docs for the list.
pub struct Metrics {
    /// Collection of finished decision records.
    pub collection: CollectionMetrics,
    registry: Registry,
    begun: IntCounter,
    committed: IntCounter,
    /// By [`AbortReason::ALL`] index.
    aborted: Vec<IntCounter>,
    prepare_round: Histogram,
    decision_force: Histogram,
    phase_two: Histogram,
    commit_total: Histogram,
    retries_commit: IntCounter,
    retries_abort: IntCounter,
    /// By [`ANSWERS`] index.
    ignored: Vec<IntCounter>,
    live: IntGauge,
    in_doubt: IntGauge,
    in_doubt_oldest: Gauge,
    syncs: IntCounter,
    decisions: IntCounter,
    batch_size: Histogram,
    recovery_commits: IntGauge,
    recovery_aborts: IntGauge,
    recovery_one_phase: IntGauge,
    remaining_commits: IntGauge,
    remaining_aborts: IntGauge,
    remaining_one_phase: IntGauge,
    halted: IntGauge,
    /// Recorded resolutions: by decision (commit, abort), then [`RESOLUTION_RESULTS`].
    resolutions: [Vec<IntCounter>; 2],
    /// Resolutions whose audit record is being forced, by request.
    pending_audits: Mutex<HashMap<ReqId, PendingAudit>>,
    /// Phase start times of transactions past Commit (only touched under the engine lock).
    phases: Mutex<HashMap<TxId, PhaseTimes>>,
    /// The highest durable LSN seen, for batch sizes.
    last_durable: AtomicU64,
    /// Log counters at the last scrape, for counter deltas.
    last_stats: Mutex<LogStats>,
    recovery: Mutex<RecoveryLeft>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a collector. The definitions are static, so this cannot fail except by a
/// programming error (a duplicate or malformed name), which the tests catch.
fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("static metric definitions are valid and unique");
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::with_opts(Opts::new(name, help)).expect("valid counter"),
    )
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge"),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid histogram"),
    )
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Metrics {
    /// A fresh registry. `durable_lsn` is the log's durable LSN at start (batch sizes are
    /// measured from there).
    pub fn new(durable_lsn: u64) -> Self {
        let r = Registry::new();
        let aborted = counter_vec(
            &r,
            "twopc_transactions_aborted_total",
            "ABORT decisions, by reason",
            "reason",
        );
        let retries = counter_vec(
            &r,
            "twopc_phase_two_retries_total",
            "Phase-two sends beyond the first per branch, by message",
            "message",
        );
        let ignored = counter_vec(
            &r,
            "twopc_participant_answers_ignored_total",
            "Late or duplicate participant answers the engine ignored, by answer",
            "answer",
        );
        let recovery = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "twopc_recovery_transactions",
                    "Transactions found by recovery at start: commit (re-drive), abort (undecided), one_phase (ask the branch again)",
                ),
                &["kind"],
            )
            .expect("valid gauge"),
        );
        let remaining = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "twopc_recovery_remaining",
                    "Transactions found by recovery that are still unfinished",
                ),
                &["kind"],
            )
            .expect("valid gauge"),
        );
        let resolutions = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "twopc_heuristic_resolutions_total",
                    "Operator resolutions recorded durably, by decision and result",
                ),
                &["decision", "result"],
            )
            .expect("valid counter"),
        );
        let resolutions_of = |decision: &str| -> Vec<IntCounter> {
            RESOLUTION_RESULTS
                .iter()
                .map(|result| resolutions.with_label_values(&[decision, result]))
                .collect()
        };
        let in_doubt_oldest = register(
            &r,
            Gauge::with_opts(Opts::new(
                "twopc_transactions_in_doubt_oldest_age_seconds",
                "Age of the oldest live transaction past Commit (0 if none)",
            ))
            .expect("valid gauge"),
        );
        Metrics {
            begun: counter(
                &r,
                "twopc_transactions_begun_total",
                "Transactions issued by Begin",
            ),
            committed: counter(
                &r,
                "twopc_transactions_committed_total",
                "COMMIT decisions taken by this process",
            ),
            aborted: AbortReason::ALL
                .iter()
                .map(|reason| aborted.with_label_values(&[reason.label()]))
                .collect(),
            prepare_round: histogram(
                &r,
                "twopc_prepare_round_seconds",
                "Commit request until every vote is yes",
                LATENCY_BUCKETS,
            ),
            decision_force: histogram(
                &r,
                "twopc_decision_force_seconds",
                "COMMIT decision forced until durable",
                LATENCY_BUCKETS,
            ),
            phase_two: histogram(
                &r,
                "twopc_phase_two_seconds",
                "COMMIT durable until every branch acknowledged",
                LATENCY_BUCKETS,
            ),
            commit_total: histogram(
                &r,
                "twopc_commit_seconds",
                "Commit request until phase two finished, committed transactions",
                LATENCY_BUCKETS,
            ),
            retries_commit: retries.with_label_values(&["commit"]),
            retries_abort: retries.with_label_values(&["abort"]),
            ignored: ANSWERS
                .iter()
                .map(|a| ignored.with_label_values(&[a]))
                .collect(),
            live: gauge(&r, "twopc_transactions_live", "Transactions held in memory"),
            in_doubt: gauge(
                &r,
                "twopc_transactions_in_doubt",
                "Live transactions past Commit (preparing, deciding, or phase two unfinished)",
            ),
            in_doubt_oldest,
            syncs: counter(&r, "twopc_log_syncs_total", "Decision-log syncs"),
            decisions: counter(
                &r,
                "twopc_log_decisions_total",
                "COMMIT decisions made durable",
            ),
            batch_size: histogram(
                &r,
                "twopc_log_sync_batch_size",
                "Decisions made durable per group-commit sync",
                BATCH_BUCKETS,
            ),
            recovery_commits: recovery.with_label_values(&["commit"]),
            recovery_aborts: recovery.with_label_values(&["abort"]),
            recovery_one_phase: recovery.with_label_values(&["one_phase"]),
            remaining_commits: remaining.with_label_values(&["commit"]),
            remaining_aborts: remaining.with_label_values(&["abort"]),
            remaining_one_phase: remaining.with_label_values(&["one_phase"]),
            halted: gauge(
                &r,
                "twopc_halted",
                "1 once the decision log failed and no new work is taken",
            ),
            resolutions: [resolutions_of("commit"), resolutions_of("abort")],
            pending_audits: Mutex::new(HashMap::new()),
            collection: CollectionMetrics::new(&r),
            registry: r,
            phases: Mutex::new(HashMap::new()),
            last_durable: AtomicU64::new(durable_lsn),
            last_stats: Mutex::new(LogStats::default()),
            recovery: Mutex::new(RecoveryLeft::default()),
        }
    }

    /// The registry (to add more collectors or gather directly).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn aborted(&self, reason: AbortReason) {
        // `ALL` lists the reasons in declaration order.
        self.aborted[reason as usize].inc();
    }

    /// Called with the event the engine (locked) is about to handle: what the event
    /// itself says (recovery's findings, a resolution's audit record made durable).
    pub fn before(&self, event: &Event) {
        match event {
            Event::AuditDurable { req, .. } | Event::AuditFailed { req, .. } => {
                let pending = lock(&self.pending_audits).remove(req);
                if let (Some(p), Event::AuditDurable { .. }) = (pending, event) {
                    let decision = match p.decision {
                        HeuristicDecision::Commit => 0,
                        HeuristicDecision::Abort => 1,
                    };
                    self.resolutions[decision][p.result].inc();
                }
            }
            Event::Recovered(rec) => {
                let commits: Vec<TxId> = rec.commits.iter().map(|c| c.tx).collect();
                let aborts: Vec<TxId> = rec.undecided.iter().map(|(tx, _)| *tx).collect();
                let one_phase: Vec<TxId> = rec.one_phase.iter().map(|(tx, _)| *tx).collect();
                self.recovery_commits.set(commits.len() as i64);
                self.recovery_aborts.set(aborts.len() as i64);
                self.recovery_one_phase.set(one_phase.len() as i64);
                self.remaining_commits.set(commits.len() as i64);
                self.remaining_aborts.set(aborts.len() as i64);
                self.remaining_one_phase.set(one_phase.len() as i64);
                let mut left = lock(&self.recovery);
                left.commits.extend(commits);
                left.aborts.extend(aborts);
                left.one_phase.extend(one_phase);
            }
            _ => {}
        }
    }

    /// Called (the engine still locked) with what it returned for the event: the
    /// commands, and its notes of what happened. Nothing here looks at the engine.
    pub fn after(&self, cmds: &[Command], notes: &[Note]) {
        let mut now_cell: Option<Instant> = None;
        let mut now = || *now_cell.get_or_insert_with(Instant::now);
        for note in notes {
            match *note {
                Note::CommitRequested { tx } => {
                    let times = PhaseTimes {
                        commit: now(),
                        force: None,
                        durable: None,
                    };
                    lock(&self.phases).insert(tx, times);
                }
                Note::Decided {
                    outcome: Outcome::Committed,
                    ..
                } => self.committed.inc(),
                Note::Decided {
                    outcome: Outcome::Aborted,
                    cause,
                    ..
                } => self.aborted(cause.unwrap_or(AbortReason::Other)),
                Note::CommitDurable { tx } => {
                    let t = now();
                    if let Some(times) = lock(&self.phases).get_mut(&tx) {
                        if let Some(force) = times.force {
                            self.decision_force.observe(secs(t - force));
                        }
                        times.durable = Some(t);
                    }
                }
                Note::InDoubt { tx } => {
                    lock(&self.phases).remove(&tx);
                }
                Note::Resent { message } => match message {
                    Message::Commit { .. } => self.retries_commit.inc(),
                    Message::Abort => self.retries_abort.inc(),
                    Message::Prepare => {}
                },
                Note::Ignored { answer } => self.ignored[answer as usize].inc(),
            }
        }
        for cmd in cmds {
            match cmd {
                Command::Reply {
                    reply: Ok(ReplyOk::Begun(_)),
                    ..
                } => self.begun.inc(),
                Command::Reply {
                    reply: Ok(ReplyOk::BegunLocal(txs)),
                    ..
                } => self.begun.inc_by(txs.len() as u64),
                Command::ForceAudit { req, record } => {
                    let result = match (record.accepted, record.contradicts) {
                        (false, _) => 2,
                        (true, true) => 1,
                        (true, false) => 0,
                    };
                    let pending = PendingAudit {
                        decision: record.decision,
                        result,
                    };
                    lock(&self.pending_audits).insert(*req, pending);
                }
                Command::ForceCommit(record) => {
                    let t = now();
                    if let Some(times) = lock(&self.phases).get_mut(&record.tx) {
                        self.prepare_round.observe(secs(t - times.commit));
                        times.force = Some(t);
                    }
                }
                Command::Finished { tx, outcome } => {
                    let times = lock(&self.phases).remove(tx);
                    if let (Some(times), Outcome::Committed) = (times, outcome) {
                        let t = now();
                        if let Some(durable) = times.durable {
                            self.phase_two.observe(secs(t - durable));
                        }
                        self.commit_total.observe(secs(t - times.commit));
                    }
                }
                _ => {}
            }
        }
    }

    /// Called when a forced decision came back durable, with the log's durable LSN then:
    /// the advance since the last call is one group-commit batch (two batches completing
    /// before either's first waiter runs are counted as one).
    pub fn durable_advanced(&self, durable_lsn: u64) {
        let prev = self.last_durable.fetch_max(durable_lsn, Ordering::AcqRel);
        if durable_lsn > prev {
            self.batch_size.observe((durable_lsn - prev) as f64);
        }
    }

    /// Updates the scrape-time values from the engine (locked by the caller), the runtime
    /// clock `now_ms` (the engine's time base), the log's counters and the halted flag.
    /// Walks every live transaction once.
    pub fn refresh(&self, engine: &Engine, now_ms: u64, stats: LogStats, halted: bool) {
        let mut live = 0i64;
        let mut in_doubt = 0i64;
        let mut oldest_ms = 0u64;
        for (_, e) in engine.txs() {
            live += 1;
            if e.state != TxState::Active {
                in_doubt += 1;
                oldest_ms = oldest_ms.max(now_ms.saturating_sub(e.began_at_ms));
            }
        }
        self.live.set(live);
        self.in_doubt.set(in_doubt);
        self.in_doubt_oldest.set(oldest_ms as f64 / 1000.0);
        {
            let mut left = lock(&self.recovery);
            left.commits.retain(|tx| engine.tx(tx).is_some());
            left.aborts.retain(|tx| engine.tx(tx).is_some());
            left.one_phase.retain(|tx| engine.tx(tx).is_some());
            self.remaining_commits.set(left.commits.len() as i64);
            self.remaining_aborts.set(left.aborts.len() as i64);
            self.remaining_one_phase.set(left.one_phase.len() as i64);
        }
        {
            let mut last = lock(&self.last_stats);
            self.syncs.inc_by(stats.syncs.saturating_sub(last.syncs));
            self.decisions
                .inc_by(stats.decisions.saturating_sub(last.decisions));
            *last = stats;
        }
        self.halted.set(i64::from(halted));
    }

    /// The registry in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The running metrics endpoint; stops serving (and drops open connections) when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Produces the exposition text of one scrape.
pub type Render = Arc<dyn Fn() -> Result<String, prometheus::Error> + Send + Sync>;

/// Serves `GET /metrics` on `listener` with what `render` returns, until the returned
/// handle is dropped. Must be called inside a tokio runtime.
pub fn spawn(listener: TcpListener, render: Render) -> MetricsServer {
    MetricsServer {
        task: tokio::spawn(serve(listener, render)),
    }
}

async fn serve(listener: TcpListener, render: Render) {
    // Connections live in the set, so they end with the accept loop.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let render = render.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let resp = respond(&req, &render);
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                        {
                            debug!(%peer, error = %e, "metrics connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is allowed\n".into(),
        );
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return resp;
    }
    match render() {
        Ok(text) => reply(StatusCode::OK, prometheus::TEXT_FORMAT, text),
        Err(e) => {
            warn!(error = %e, "metrics could not be encoded");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN,
                format!("metrics could not be encoded: {e}\n"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{AbortAck, CommitAck, EngineConfig, Timer, Vote};
    use crate::log::Recovered;
    use crate::types::{BranchKind, BranchSpec};

    fn spec(id: &str) -> BranchSpec {
        BranchSpec {
            branch_id: id.into(),
            endpoint: "http://127.0.0.1:7000".into(),
            commit_order: 0,
            kind: BranchKind::Database,
        }
    }

    /// Feeds one event through the engine the way the runtime does.
    fn step(e: &mut Engine, m: &Metrics, now_ms: u64, ev: Event) -> Vec<Command> {
        m.before(&ev);
        let (cmds, notes) = e.handle_noted(now_ms, ev);
        m.after(&cmds, &notes);
        cmds
    }

    fn begin(e: &mut Engine, m: &Metrics, ids: &[&str]) -> TxId {
        let branches = ids.iter().map(|id| spec(id)).collect();
        let cmds = step(
            e,
            m,
            0,
            Event::Begin {
                req: 1,
                timeout_ms: 0,
                branches,
            },
        );
        begun(&cmds)
    }

    /// The id a Begin answered with.
    fn begun(cmds: &[Command]) -> TxId {
        cmds.iter()
            .find_map(|c| match c {
                Command::Reply {
                    reply: Ok(ReplyOk::Begun(tx)),
                    ..
                } => Some(*tx),
                Command::Reply {
                    reply: Ok(ReplyOk::BegunLocal(txs)),
                    ..
                } => txs.first().copied(),
                _ => None,
            })
            .expect("begun")
    }

    fn aborted(m: &Metrics, reason: AbortReason) -> u64 {
        m.aborted[reason as usize].get()
    }

    fn engine() -> Engine {
        Engine::new(EngineConfig::default(), 7, 1)
    }

    #[test]
    fn local_transactions_count_by_what_decided_them() {
        let m = Metrics::new(0);
        let mut e = engine();
        let begin_local = |e: &mut Engine| {
            let branch = spec("a");
            let (req, timeout_ms) = (1, 0);
            begun(&step(
                e,
                &m,
                0,
                Event::BeginLocal {
                    req,
                    timeout_ms,
                    branch,
                    count: 1,
                },
            ))
        };
        // Committed: when its report arrives.
        let t1 = begin_local(&mut e);
        assert_eq!(m.committed.get(), 0);
        step(&mut e, &m, 1, Event::CommittedLocally { req: 2, tx: t1 });
        assert_eq!(m.committed.get(), 1);
        // Aborted by its client, or at its timeout: decided by the participant's answer,
        // counted by why it was asked.
        let aborted_by = |e: &mut Engine, tx: TxId, ask: Event| {
            step(e, &m, 2, ask);
            let ack = Ok(AbortAck::Aborted);
            step(e, &m, 3, Event::AbortAcked { tx, branch: 0, ack });
        };
        let t2 = begin_local(&mut e);
        let reason = "no".to_string();
        aborted_by(
            &mut e,
            t2,
            Event::Abort {
                req: 3,
                tx: t2,
                reason,
            },
        );
        assert_eq!(aborted(&m, AbortReason::Client), 1);
        let t3 = begin_local(&mut e);
        let timer = Timer::TxTimeout;
        aborted_by(&mut e, t3, Event::Timer { tx: t3, timer });
        assert_eq!(aborted(&m, AbortReason::TxTimeout), 1);
        // Given back unused by its participant: counted apart from the client's aborts.
        let t4 = begin_local(&mut e);
        aborted_by(&mut e, t4, Event::Release { req: 4, tx: t4 });
        assert_eq!(aborted(&m, AbortReason::Unused), 1);
        assert_eq!(aborted(&m, AbortReason::Client), 1);
        assert_eq!(aborted(&m, AbortReason::Other), 0);
        // Ids begun many at once are counted one by one.
        let before = m.begun.get();
        let (req, timeout_ms, branch, count) = (5, 0, spec("a"), 5);
        let ev = Event::BeginLocal {
            req,
            timeout_ms,
            branch,
            count,
        };
        step(&mut e, &m, 4, ev);
        assert_eq!(m.begun.get(), before + 5);
    }

    #[test]
    fn abort_reasons_are_classified_by_the_event_that_decided() {
        let m = Metrics::new(0);
        let mut e = engine();
        // Transaction timeout while active.
        let t1 = begin(&mut e, &m, &["a"]);
        let ev = Event::Timer {
            tx: t1,
            timer: Timer::TxTimeout,
        };
        step(&mut e, &m, 10, ev);
        assert_eq!(aborted(&m, AbortReason::TxTimeout), 1);
        // Prepare timeout.
        let t2 = begin(&mut e, &m, &["a", "b"]);
        step(
            &mut e,
            &m,
            10,
            Event::Commit {
                req: 2,
                tx: t2,
                answer_before_durable: false,
            },
        );
        let ev = Event::Timer {
            tx: t2,
            timer: Timer::PrepareTimeout,
        };
        step(&mut e, &m, 20, ev);
        assert_eq!(aborted(&m, AbortReason::PrepareTimeout), 1);
        // A refused one-phase commit counts as a no vote.
        let t3 = begin(&mut e, &m, &["a"]);
        step(
            &mut e,
            &m,
            10,
            Event::Commit {
                req: 3,
                tx: t3,
                answer_before_durable: false,
            },
        );
        step(&mut e, &m, 10, Event::Synced { tx: t3, lsn: 1 });
        let ev = Event::CommitAcked {
            tx: t3,
            branch: 0,
            ack: Ok(CommitAck::Refused("no".into())),
        };
        step(&mut e, &m, 20, ev);
        assert_eq!(aborted(&m, AbortReason::VoteNo), 1);
        // Recovery aborts every undecided transaction it finds.
        let rec = Recovered {
            commits: Vec::new(),
            undecided: vec![(
                TxId {
                    node: 7,
                    epoch: 0,
                    seq: 9,
                },
                vec![spec("z")],
            )],
            one_phase: Vec::new(),
        };
        step(&mut e, &m, 30, Event::Recovered(rec));
        assert_eq!(aborted(&m, AbortReason::Recovery), 1);
        assert_eq!(m.recovery_aborts.get(), 1);
        assert_eq!(aborted(&m, AbortReason::Client), 0);
        assert_eq!(m.committed.get(), 0);
        assert_eq!(m.begun.get(), 3);
        // A recovered one-phase intent: counted as found, and remaining until its branch
        // answers (then it is a COMMIT decided now).
        let old = TxId {
            node: 7,
            epoch: 0,
            seq: 10,
        };
        let rec = Recovered {
            one_phase: vec![(old, spec("z"))],
            ..Recovered::default()
        };
        step(&mut e, &m, 40, Event::Recovered(rec));
        m.refresh(&e, 40, LogStats::default(), false);
        assert_eq!(m.recovery_one_phase.get(), 1);
        assert_eq!(m.remaining_one_phase.get(), 1);
        let ev = Event::CommitAcked {
            tx: old,
            branch: 0,
            ack: Ok(CommitAck::Committed),
        };
        step(&mut e, &m, 41, ev);
        step(&mut e, &m, 42, Event::Synced { tx: old, lsn: 1 });
        m.refresh(&e, 42, LogStats::default(), false);
        assert_eq!(m.remaining_one_phase.get(), 0);
        assert_eq!(m.committed.get(), 1);
    }

    fn resolve(e: &mut Engine, m: &Metrics, req: ReqId, tx: TxId, abort: bool, force: bool) {
        let decision = if abort {
            HeuristicDecision::Abort
        } else {
            HeuristicDecision::Commit
        };
        let request = crate::engine::ResolveRequest {
            decision,
            operator: "bob".into(),
            reason: "host gone".into(),
            force,
        };
        let ev = Event::Resolve {
            req,
            tx,
            request,
            logged: None,
        };
        let cmds = step(e, m, 50, ev);
        assert!(
            cmds.iter()
                .any(|c| matches!(c, Command::ForceAudit { req: r, .. } if *r == req)),
            "{cmds:?}"
        );
        let ev = Event::AuditDurable {
            req,
            lsn: 1,
            at_ms: 1,
        };
        step(e, m, 60, ev);
    }

    fn resolutions(m: &Metrics, abort: bool, result: &str) -> u64 {
        let i = RESOLUTION_RESULTS
            .iter()
            .position(|r| *r == result)
            .expect("a result label");
        m.resolutions[usize::from(abort)][i].get()
    }

    #[test]
    fn operator_resolutions_count_once_as_decisions_and_always_as_resolutions() {
        let m = Metrics::new(0);
        let mut e = engine();
        // An undecided two-phase transaction resolved to ABORT: one abort, by the operator;
        // the abort acknowledgements that finish it are not a second one.
        let t1 = begin(&mut e, &m, &["a", "b"]);
        step(
            &mut e,
            &m,
            10,
            Event::Commit {
                req: 2,
                tx: t1,
                answer_before_durable: false,
            },
        );
        resolve(&mut e, &m, 3, t1, true, false);
        assert_eq!(aborted(&m, AbortReason::Operator), 1);
        assert_eq!(resolutions(&m, true, "accepted"), 1);
        for branch in [0, 1] {
            let ev = Event::AbortAcked {
                tx: t1,
                branch,
                ack: Ok(AbortAck::Aborted),
            };
            step(&mut e, &m, 70, ev);
        }
        let late = Event::Voted {
            tx: t1,
            branch: 0,
            vote: Ok(Vote::Yes),
        };
        step(&mut e, &m, 80, late);
        assert!(e.tx(&t1).is_none(), "finished");
        assert_eq!(aborted(&m, AbortReason::Operator), 1);

        // One-phase commits in flight: the operator's word decides them when its record
        // is durable; the participant's late answer changes nothing.
        let t2 = begin(&mut e, &m, &["a"]);
        step(
            &mut e,
            &m,
            10,
            Event::Commit {
                req: 5,
                tx: t2,
                answer_before_durable: false,
            },
        );
        resolve(&mut e, &m, 6, t2, false, false);
        assert_eq!(m.committed.get(), 1);
        let t3 = begin(&mut e, &m, &["a"]);
        step(
            &mut e,
            &m,
            10,
            Event::Commit {
                req: 8,
                tx: t3,
                answer_before_durable: false,
            },
        );
        resolve(&mut e, &m, 9, t3, true, false);
        assert_eq!(aborted(&m, AbortReason::Operator), 2);
        let ev = Event::CommitAcked {
            tx: t2,
            branch: 0,
            ack: Ok(CommitAck::Committed),
        };
        step(&mut e, &m, 90, ev);
        assert_eq!(m.committed.get(), 1);

        // A decided transaction stuck in phase two: a refusal and a resolution are counted
        // as resolutions, never as decisions.
        let t4 = begin(&mut e, &m, &["a", "b"]);
        step(
            &mut e,
            &m,
            10,
            Event::Commit {
                req: 11,
                tx: t4,
                answer_before_durable: false,
            },
        );
        for branch in [0, 1] {
            let ev = Event::Voted {
                tx: t4,
                branch,
                vote: Ok(Vote::Yes),
            };
            step(&mut e, &m, 20, ev);
        }
        step(&mut e, &m, 30, Event::LogDurable { tx: t4, lsn: 1 });
        assert_eq!(m.committed.get(), 2);
        resolve(&mut e, &m, 12, t4, true, false);
        assert!(e.tx(&t4).is_some(), "refused: still committing");
        resolve(&mut e, &m, 13, t4, false, false);
        assert!(e.tx(&t4).is_none(), "finished by the resolution");
        assert_eq!(m.committed.get(), 2);
        assert_eq!(resolutions(&m, true, "refused"), 1);
        assert_eq!(resolutions(&m, false, "accepted"), 2);
        assert_eq!(resolutions(&m, true, "accepted"), 2);
        assert_eq!(resolutions(&m, false, "contradicting"), 0);
        assert_eq!(
            AbortReason::ALL
                .iter()
                .map(|r| aborted(&m, *r))
                .sum::<u64>(),
            2,
            "no abort counted twice"
        );
        assert!(lock(&m.pending_audits).is_empty());
        assert!(lock(&m.phases).is_empty());
    }

    #[test]
    fn late_and_duplicate_answers_are_counted_as_ignored() {
        let m = Metrics::new(0);
        let mut e = engine();
        let t = begin(&mut e, &m, &["a", "b"]);
        step(
            &mut e,
            &m,
            1,
            Event::Commit {
                req: 2,
                tx: t,
                answer_before_durable: false,
            },
        );
        let yes = |branch| Event::Voted {
            tx: t,
            branch,
            vote: Ok(Vote::Yes),
        };
        step(&mut e, &m, 2, yes(0));
        assert_eq!(m.ignored[0].get(), 0, "a first vote is not ignored");
        step(&mut e, &m, 3, yes(0));
        assert_eq!(m.ignored[0].get(), 1, "a duplicate vote is ignored");
        let cmds = step(&mut e, &m, 4, yes(1));
        assert!(cmds.iter().any(|c| matches!(c, Command::ForceCommit(_))));
        assert_eq!(m.ignored[0].get(), 1);
        step(&mut e, &m, 5, Event::LogDurable { tx: t, lsn: 1 });
        assert_eq!(m.committed.get(), 1);
        assert_eq!(m.prepare_round.get_sample_count(), 1);
        assert_eq!(m.decision_force.get_sample_count(), 1);
        // Branch 0's commit fails and is retried by its timer.
        let ev = Event::CommitAcked {
            tx: t,
            branch: 0,
            ack: Err("unavailable".into()),
        };
        step(&mut e, &m, 6, ev);
        let ev = Event::Timer {
            tx: t,
            timer: Timer::Retry { branch: 0 },
        };
        step(&mut e, &m, 7, ev);
        assert_eq!(m.retries_commit.get(), 1);
        for branch in [0, 1] {
            let ev = Event::CommitAcked {
                tx: t,
                branch,
                ack: Ok(CommitAck::Committed),
            };
            step(&mut e, &m, 8, ev);
        }
        assert!(e.tx(&t).is_none(), "finished");
        assert_eq!(m.phase_two.get_sample_count(), 1);
        assert_eq!(m.commit_total.get_sample_count(), 1);
        // An answer for a transaction that is gone.
        let ev = Event::CommitAcked {
            tx: t,
            branch: 1,
            ack: Ok(CommitAck::Committed),
        };
        step(&mut e, &m, 9, ev);
        assert_eq!(m.ignored[1].get(), 1);
        assert_eq!(m.committed.get(), 1, "phase two is not a second decision");
        assert!(lock(&m.phases).is_empty(), "no timing entry left behind");

        m.refresh(&e, 10, LogStats::default(), false);
        assert_eq!(m.live.get(), 0);
        assert_eq!(m.in_doubt.get(), 0);
    }

    #[test]
    fn in_doubt_gauge_counts_live_transactions_past_commit() {
        let m = Metrics::new(0);
        let mut e = engine();
        let _active = begin(&mut e, &m, &["a", "b"]);
        let t = begin(&mut e, &m, &["a", "b"]);
        step(
            &mut e,
            &m,
            100,
            Event::Commit {
                req: 9,
                tx: t,
                answer_before_durable: false,
            },
        );
        let stats = LogStats {
            syncs: 2,
            decisions: 1,
            ..LogStats::default()
        };
        m.refresh(&e, 1_600, stats, true);
        assert_eq!(m.live.get(), 2);
        assert_eq!(m.in_doubt.get(), 1);
        assert_eq!(m.in_doubt_oldest.get(), 1.6);
        assert_eq!(m.syncs.get(), 2);
        assert_eq!(m.halted.get(), 1);
        m.refresh(&e, 1_700, stats, true);
        assert_eq!(m.syncs.get(), 2, "counters advance by deltas");
    }

    #[test]
    fn every_metric_is_registered_and_encodes() {
        let m = Metrics::new(0);
        m.durable_advanced(3);
        m.durable_advanced(3);
        m.durable_advanced(4);
        m.collection.collected(1024);
        m.collection.collected(6);
        m.collection.kept(42, 2_500);
        m.collection.forgotten_answered();
        let text = m.encode().expect("encode");
        for name in [
            "twopc_log_records_collected_total 1030",
            "twopc_log_records_kept 42",
            "twopc_log_record_oldest_kept_age_seconds 2.5",
            "twopc_forgotten_answers_total 1",
            "twopc_transactions_begun_total 0",
            "twopc_transactions_committed_total 0",
            "twopc_transactions_aborted_total{reason=\"vote_no\"} 0",
            "twopc_transactions_aborted_total{reason=\"recovery\"} 0",
            "twopc_phase_two_retries_total{message=\"commit\"} 0",
            "twopc_participant_answers_ignored_total{answer=\"vote\"} 0",
            "twopc_commit_seconds_count 0",
            "twopc_log_sync_batch_size_count 2",
            "twopc_log_sync_batch_size_sum 4",
            "twopc_recovery_remaining{kind=\"abort\"} 0",
            "twopc_halted 0",
            "twopc_transactions_aborted_total{reason=\"operator\"} 0",
            "twopc_heuristic_resolutions_total{decision=\"abort\",result=\"accepted\"} 0",
            "twopc_heuristic_resolutions_total{decision=\"commit\",result=\"refused\"} 0",
        ] {
            assert!(text.contains(name), "{name:?} missing from\n{text}");
        }
    }
}
