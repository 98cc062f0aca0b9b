//! `twopc-lab bench coordinator`: the coordinator alone, measured end to end.
//!
//! Real gRPC (client → coordinator → participants), the real sled decision log with real
//! syncs, and two in-process null participants per transaction that vote yes at once, so
//! every transaction goes through prepare, a forced decision and phase two. The one-phase
//! path (one branch, no prepare) is measured separately, the way the participant SDK uses
//! it: the intent is synced from Begin on, the Commit asks for an early answer, and one
//! task calls Barrier back to back, as the SDK's forgetter does. In the same run, a tight loop
//! of write + `fdatasync` with the same group-commit batching measures the disk's ceiling,
//! so the coordinator's rate can be read as a fraction of the physical limit.
//!
//! Clients share one `Pipeline` stream and the coordinator reaches the participants over
//! their batched `ParticipantExchange` streams, as with the participant SDK; `--unary`
//! measures one unary RPC per message instead.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Status;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::log::{DecisionLog, SledLog, DEFAULT_GROUP_COMMIT_DELAY_US};
use twopc_coordinator::server;
use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{AlwaysYes, Services, TestParticipant};

use crate::check_range;

/// Flags of `twopc-lab bench coordinator`.
#[derive(Clone, Debug, clap::Args)]
pub struct CoordinatorBench {
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds per measured mode.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Where the decision log and the disk-ceiling file go (default: a temp dir on the
    /// current directory's file system, so the disk measured is the one you run on).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Print one JSON object per mode instead of a table.
    #[arg(long)]
    pub json: bool,
    /// One unary RPC per message, as before the batched streams: clients call Begin and
    /// Commit as unary RPCs, and the null participants do not serve the batched
    /// `ParticipantExchange` stream (so the coordinator falls back to unary calls).
    #[arg(long)]
    pub unary: bool,
    /// The coordinator's group-commit delay (µs; see `twopc serve --group-commit-delay-us`);
    /// 0 compares against a log that syncs every batch at once.
    #[arg(long, default_value_t = DEFAULT_GROUP_COMMIT_DELAY_US)]
    pub group_commit_delay_us: u64,
}

/// One mode's numbers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModeResult {
    /// What was measured.
    pub mode: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Completed transactions in the measured interval.
    pub transactions: u64,
    /// Completed transactions (or syncs-backed appends, for the disk ceiling) per second.
    pub tx_per_s: f64,
    /// Latency percentiles of one transaction as the client sees it, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
    /// fdatasync calls per forced decision (group commit makes this < 1).
    pub syncs_per_decision: Option<f64>,
    /// Mean decisions per group-commit batch.
    pub batch_mean: Option<f64>,
    /// Largest batch.
    pub batch_max: Option<u64>,
    /// This mode's rate divided by the disk ceiling measured in the same run.
    pub ratio_to_disk_ceiling: Option<f64>,
    /// CPU time (user + system) of this whole process per transaction, µs: clients,
    /// coordinator and participants together, so it measures the cost of a transaction
    /// on the machine independently of how busy other tenants keep it.
    pub cpu_us_per_tx: Option<f64>,
}

/// CPU time (user + system) this process has used so far, all threads.
pub(crate) fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct, RUSAGE_SELF.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `cpu` spent over `transactions`, in µs each (`None` when nothing completed).
pub(crate) fn cpu_per_tx(cpu: Duration, transactions: u64) -> Option<f64> {
    (transactions > 0).then(|| cpu.as_secs_f64() * 1e6 / transactions as f64)
}

/// CPU time every process of the machine has spent so far (the busy fields of the `cpu`
/// line of `/proc/stat`: user, nice, system, irq, softirq, steal); `None` where that file
/// cannot be read (not Linux).
pub(crate) fn machine_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(busy as f64 / hz as f64))
}

/// A coordinator in this process on `127.0.0.1:<free port>`, its sled log in `dir` (the
/// benchmarks read the log's counters directly).
pub(crate) struct LocalCoordinator {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its decision log.
    pub log: Arc<SledLog>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), server::ServeError>>,
}

impl LocalCoordinator {
    /// Opens the log in `dir` and starts serving with the default configuration, apart
    /// from the log's group-commit delay (µs).
    pub async fn start(
        dir: &std::path::Path,
        group_commit_delay_us: u64,
    ) -> anyhow::Result<LocalCoordinator> {
        LocalCoordinator::start_with(ServeConfig {
            data_dir: dir.to_path_buf(),
            group_commit_delay_us,
            ..ServeConfig::default()
        })
        .await
    }

    /// Opens the log in `cfg.data_dir` and starts serving with `cfg` (its `listen` is
    /// not used: the port is a free one of 127.0.0.1).
    pub async fn start_with(cfg: ServeConfig) -> anyhow::Result<LocalCoordinator> {
        cfg.validate()?;
        let dir = cfg.data_dir.clone();
        let log = Arc::new(SledLog::open(&dir, cfg.log_options())?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::run_with_log(cfg, log.clone(), listener, async {
            let _ = stopped.await;
        }));
        Ok(LocalCoordinator {
            url,
            log,
            stop,
            server,
        })
    }

    /// Shuts it down gracefully and returns how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: CoordinatorBench) -> anyhow::Result<()> {
    check_range("--clients", args.clients, 1..=4096)?;
    check_range("--seconds", args.seconds, 1..=3600)?;
    let base = match &args.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir_in("."),
    }
    .context("cannot create the benchmark directory (--dir)")?;
    let duration = Duration::from_secs(args.seconds);

    let mut results = Vec::new();
    let ceiling = disk_ceiling(base.path(), args.clients, duration, !args.json)?;
    results.push(ceiling.clone());

    let coordinator =
        LocalCoordinator::start(&base.path().join("coordinator"), args.group_commit_delay_us)
            .await?;
    let log = coordinator.log.clone();
    // Two participants that answer everything at once.
    let services = if args.unary {
        Services::UnaryOnly
    } else {
        Services::UnaryAndStream
    };
    let participants = [
        TestParticipant::start(Arc::new(AlwaysYes), services).await?,
        TestParticipant::start(Arc::new(AlwaysYes), services).await?,
    ];
    let endpoints = participants.each_ref().map(|p| p.endpoint.clone());
    let channel = tonic::transport::Endpoint::from_shared(coordinator.url.clone())?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect to the in-process coordinator")?;
    let client = Client::new(channel, !args.unary);

    for (mode, branches) in [("coordinator-2pc", 2usize), ("coordinator-1pc", 1usize)] {
        let before = log.stats();
        let mut r = drive(
            &client,
            &endpoints[..branches],
            args.clients,
            duration,
            mode,
            !args.json,
        )
        .await?;
        let after = log.stats();
        let decisions = after.decisions - before.decisions;
        let syncs = after.syncs - before.syncs;
        if branches > 1 {
            r.syncs_per_decision = Some(if decisions == 0 {
                0.0
            } else {
                syncs as f64 / decisions as f64
            });
            let batches = after.batches - before.batches;
            r.batch_mean = Some(if batches == 0 {
                0.0
            } else {
                decisions as f64 / batches as f64
            });
            r.batch_max = Some(after.max_batch);
        } else {
            // One-phase commits sync their intent; the Barrier calls sync their outcomes
            // (shared syncs).
            r.syncs_per_decision = Some(syncs as f64 / r.transactions.max(1) as f64);
        }
        r.ratio_to_disk_ceiling = Some(r.tx_per_s / ceiling.tx_per_s.max(1e-9));
        results.push(r);
    }
    for p in participants {
        p.stop().await;
    }
    coordinator.stop().await?;

    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_table(&results);
    }
    Ok(())
}

fn progress(enabled: bool, label: &str, duration: Duration) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(duration.as_secs());
    pb.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len}s")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(label.to_string());
    pb
}

/// The client API as the bench calls it: over one `Pipeline` stream shared by every
/// client task (what the participant SDK does), or unary RPCs with `--unary`.
#[derive(Clone)]
pub(crate) struct Client {
    unary: CoordinatorClient<Channel>,
    pipeline: Option<Arc<mux::Pipeline>>,
}

impl Client {
    pub(crate) fn new(channel: Channel, batched: bool) -> Self {
        let pipeline = batched.then(|| {
            let ch = channel.clone();
            let open: mux::Opener<pb::PipelineRequest, pb::PipelineResponse> =
                Arc::new(move |outbound| {
                    let mut c = CoordinatorClient::new(ch.clone());
                    Box::pin(async move { c.pipeline(outbound).await })
                });
            Arc::new(mux::Pipeline::new(open, Duration::from_secs(30)))
        });
        Client {
            unary: CoordinatorClient::new(channel),
            pipeline,
        }
    }

    async fn begin(&mut self, req: pb::BeginRequest) -> Result<pb::BeginResponse, Status> {
        match &self.pipeline {
            Some(p) => p.begin(req).await.map_err(Status::from),
            None => Ok(self.unary.begin(req).await?.into_inner()),
        }
    }

    async fn commit(&mut self, req: pb::CommitRequest) -> Result<pb::CommitResponse, Status> {
        match &self.pipeline {
            Some(p) => p.commit(req).await.map_err(Status::from),
            None => Ok(self.unary.commit(req).await?.into_inner()),
        }
    }
}

/// C clients run Begin (with the branches) + Commit in a loop for `duration`. With one
/// branch the Commit asks for an early answer and a Barrier task runs alongside (what the
/// participant SDK does).
pub(crate) async fn drive(
    client: &Client,
    endpoints: &[String],
    clients: usize,
    duration: Duration,
    mode: &str,
    show: bool,
) -> anyhow::Result<ModeResult> {
    let branches: Vec<pb::Branch> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| pb::Branch {
            branch_id: format!("null-{i}"),
            participant_endpoint: e.clone(),
            commit_order: 0,
            kind: pb::BranchKind::Other as i32,
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let answer_before_durable = branches.len() == 1;
    let mut tasks = Vec::new();
    let started = Instant::now();
    let cpu_before = process_cpu();
    let barriers = answer_before_durable.then(|| {
        let mut unary = client.unary.clone();
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let now = done.load(Ordering::Relaxed);
                if now == seen {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                seen = now;
                unary.barrier(pb::BarrierRequest {}).await?;
            }
            Ok::<_, tonic::Status>(())
        })
    });
    for _ in 0..clients {
        let mut client = client.clone();
        let branches = branches.clone();
        let stop = stop.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let begin = client
                    .begin(pb::BeginRequest {
                        timeout_ms: 0,
                        branches: branches.clone(),
                    })
                    .await?;
                let tx_id = begin.tx_id;
                client
                    .commit(pb::CommitRequest {
                        tx_id,
                        phase_two_wait_ms: None,
                        branches: Vec::new(),
                        answer_before_durable,
                    })
                    .await?;
                lat.push(t0.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let pb = progress(show, mode, duration);
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pb.set_position(started.elapsed().as_secs().min(duration.as_secs()));
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(
            t.await?
                .map_err(|s| anyhow::anyhow!("{mode}: a transaction failed: {s}"))?,
        );
    }
    if let Some(b) = barriers {
        b.await?
            .map_err(|s| anyhow::anyhow!("{mode}: a Barrier failed: {s}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = process_cpu().saturating_sub(cpu_before);
    pb.finish_and_clear();
    let mut r = summarize(mode, clients, &mut lat, elapsed);
    r.cpu_us_per_tx = cpu_per_tx(cpu, r.transactions);
    Ok(r)
}

fn summarize(mode: &str, clients: usize, lat_us: &mut [u64], elapsed_s: f64) -> ModeResult {
    lat_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_us.is_empty() {
            return 0.0;
        }
        let i = ((lat_us.len() as f64 - 1.0) * p).round() as usize;
        lat_us[i] as f64 / 1000.0
    };
    ModeResult {
        mode: mode.to_string(),
        clients,
        transactions: lat_us.len() as u64,
        tx_per_s: lat_us.len() as f64 / elapsed_s,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: lat_us.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
        syncs_per_decision: None,
        batch_mean: None,
        batch_max: None,
        ratio_to_disk_ceiling: None,
        cpu_us_per_tx: None,
    }
}

/// The disk's ceiling: `clients` submitters each append a 128-byte record and wait for its
/// sync; one writer thread drains everything queued, writes it, `fdatasync`s once and
/// wakes them (the same group commit as the sled log, without sled).
fn disk_ceiling(
    dir: &std::path::Path,
    clients: usize,
    duration: Duration,
    show: bool,
) -> anyhow::Result<ModeResult> {
    let path = dir.join("disk-ceiling.bin");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .context("open the disk-ceiling file")?;
    let (tx, rx) = mpsc::channel::<mpsc::Sender<()>>();
    let syncs = Arc::new(AtomicU64::new(0));
    let writer_syncs = syncs.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let record = [7u8; 128];
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            for _ in &batch {
                file.write_all(&record)?;
            }
            file.sync_data()?;
            writer_syncs.fetch_add(1, Ordering::Relaxed);
            for w in batch {
                let _ = w.send(());
            }
        }
        Ok(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..clients {
        let tx = tx.clone();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            let (done_tx, done_rx) = mpsc::channel();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                if tx.send(done_tx.clone()).is_err() || done_rx.recv().is_err() {
                    break;
                }
                lat.push(t0.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    drop(tx);
    let pb = progress(show, "disk-ceiling", duration);
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(200));
        pb.set_position(started.elapsed().as_secs().min(duration.as_secs()));
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in threads {
        lat.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a disk-ceiling thread panicked"))?,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the disk-ceiling writer panicked"))??;
    pb.finish_and_clear();
    let mut r = summarize("disk-ceiling", clients, &mut lat, elapsed);
    let n = lat.len() as f64;
    let s = syncs.load(Ordering::Relaxed) as f64;
    r.syncs_per_decision = Some(if n == 0.0 { 0.0 } else { s / n });
    r.batch_mean = Some(if s == 0.0 { 0.0 } else { n / s });
    Ok(r)
}

/// `v` with `prec` decimals, or `-` for none (a table cell).
pub(crate) fn or_dash(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_table(results: &[ModeResult]) {
    println!(
        "{:<18} {:>7} {:>10} {:>8} {:>8} {:>8} {:>12} {:>10} {:>9} {:>10}",
        "mode",
        "clients",
        "tx/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "syncs/dec",
        "batch",
        "x ceiling",
        "cpu us/tx"
    );
    for r in results {
        println!(
            "{:<18} {:>7} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>12} {:>10} {:>9} {:>10}",
            r.mode,
            r.clients,
            r.tx_per_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            or_dash(r.syncs_per_decision, 3),
            or_dash(r.batch_mean, 1),
            or_dash(r.ratio_to_disk_ceiling, 2),
            or_dash(r.cpu_us_per_tx, 1),
        );
    }
}
