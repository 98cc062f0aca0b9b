//! `twopc-lab bench collection`: what collecting finished decision records buys and what it
//! costs, in four measurements.
//!
//! 1. **Throughput**: two-phase decisions/s of the in-process coordinator (real gRPC, real
//!    sled log, two null participants per transaction) with collection off and on (a
//!    one-second retention, so it runs through the slice), alternating, same run.
//! 2. **History**: `--transactions` two-phase transactions through a coordinator with
//!    `--retention-ms`; then, a retention later, the data directory's size.
//! 3. **Restart**: a `twopc serve` process on that directory, timed from its spawn to its
//!    first answer, and its resident memory then, beside a fresh coordinator's.
//! 4. **In doubt**: `--in-doubt` transactions left unfinished in a decision log (half with a
//!    durable COMMIT, half preparing), each with two branches on live participants; a
//!    `twopc serve` process is started on it and timed until it holds none of them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tonic::transport::Channel;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::log::{CommitRecord, DecisionLog, LazyRecord, SledLog, SledLogOptions};
use twopc_coordinator::types::{BranchKind, BranchSpec, TxId};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{AlwaysYes, Services, TestParticipant};

use crate::bench::{drive, Client, LocalCoordinator};

/// Flags of `twopc-lab bench collection`.
#[derive(Clone, Debug, clap::Args)]
pub struct CollectionBench {
    /// Two-phase transactions of the history measurement.
    #[arg(long, default_value_t = 10_000_000)]
    pub transactions: u64,
    /// `--decision-retention-ms` of the history measurement.
    #[arg(long, default_value_t = 10_000)]
    pub retention_ms: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds of each throughput slice (two with collection off, two with it on).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Transactions left in doubt for the last measurement.
    #[arg(long, default_value_t = 10_000)]
    pub in_doubt: u64,
    /// Where the data directories go (default: a temp dir in the current directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The `twopc` binary restarted on the data (default: the one next to this binary).
    #[arg(long, env = "TWOPC_BIN", value_name = "PATH")]
    pub twopc_bin: Option<PathBuf>,
}

/// Runs the four measurements and prints what each found.
pub async fn run(args: CollectionBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=4096).contains(&args.clients),
        "--clients must be between 1 and 4096"
    );
    anyhow::ensure!(
        (1..=3600).contains(&args.seconds),
        "--seconds must be between 1 and 3600"
    );
    anyhow::ensure!(
        (1..=86_400_000).contains(&args.retention_ms),
        "--retention-ms must be between 1 and 86400000"
    );
    anyhow::ensure!(
        (2..=1_000_000).contains(&args.in_doubt),
        "--in-doubt must be between 2 and 1000000"
    );
    let exe = crate::campaign::twopc_binary(args.twopc_bin.as_ref())?;
    let base = match &args.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir_in("."),
    }
    .context("cannot create the benchmark directory (--dir)")?;
    let participants = [
        TestParticipant::start(Arc::new(AlwaysYes), Services::UnaryAndStream).await?,
        TestParticipant::start(Arc::new(AlwaysYes), Services::UnaryAndStream).await?,
    ];
    let endpoints: Vec<String> = participants.iter().map(|p| p.endpoint.clone()).collect();

    throughput(&args, base.path(), &endpoints).await?;
    let history = base.path().join("history");
    fill_history(&args, &history, &endpoints).await?;
    restart(&exe, &history, &base.path().join("fresh")).await?;
    in_doubt(&args, &exe, &base.path().join("in-doubt"), &endpoints).await?;
    for p in participants {
        p.stop().await;
    }
    Ok(())
}

/// The coordinator's configuration for a data directory and a retention (0: off).
fn config(dir: &Path, retention_ms: u64) -> ServeConfig {
    ServeConfig {
        data_dir: dir.to_path_buf(),
        decision_retention_ms: retention_ms,
        ..ServeConfig::default()
    }
}

async fn client_of(coordinator: &LocalCoordinator) -> anyhow::Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(coordinator.url.clone())?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect to the in-process coordinator")?;
    Ok(Client::new(channel, true))
}

/// Measurement 1: decisions/s with collection off and on, alternating.
async fn throughput(
    args: &CollectionBench,
    base: &Path,
    endpoints: &[String],
) -> anyhow::Result<()> {
    println!(
        "throughput: two-phase decisions/s, {} clients, {} s slices",
        args.clients, args.seconds
    );
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..2 {
        for (i, (label, retention_ms)) in [("collection off", 0u64), ("collection on", 1_000)]
            .into_iter()
            .enumerate()
        {
            let dir = base.join(format!("throughput-{round}-{i}"));
            let coordinator = LocalCoordinator::start_with(config(&dir, retention_ms)).await?;
            let client = client_of(&coordinator).await?;
            let r = drive(
                &client,
                endpoints,
                args.clients,
                Duration::from_secs(args.seconds),
                label,
                false,
            )
            .await?;
            let kept = coordinator.log.kept()?.records;
            coordinator.stop().await?;
            println!(
                "  {label:<15} {:>9.0} decisions/s  cpu {:>6.1} us/tx  records kept at the end {kept}",
                r.tx_per_s,
                r.cpu_us_per_tx.unwrap_or(0.0)
            );
            rates[i].push(r.tx_per_s);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (off, on) = (mean(&rates[0]), mean(&rates[1]));
    println!(
        "  mean: off {off:.0}/s, on {on:.0}/s: collection on = {:.1}% of off",
        100.0 * on / off.max(1e-9)
    );
    Ok(())
}

/// Measurement 2: `--transactions` through a coordinator with the retention, then the
/// directory's size a retention later.
async fn fill_history(
    args: &CollectionBench,
    dir: &Path,
    endpoints: &[String],
) -> anyhow::Result<()> {
    let coordinator = LocalCoordinator::start_with(config(dir, args.retention_ms)).await?;
    let client = client_of(&coordinator).await?;
    let started = Instant::now();
    let mut done = 0u64;
    let mut largest = 0u64;
    while done < args.transactions {
        let r = drive(
            &client,
            endpoints,
            args.clients,
            Duration::from_secs(10),
            "history",
            false,
        )
        .await?;
        done += r.transactions;
        largest = largest.max(dir_size(dir)?);
        eprintln!(
            "history: {done} / {} transactions, {:.0}/s, data directory {:.1} MB",
            args.transactions,
            done as f64 / started.elapsed().as_secs_f64(),
            mb(dir_size(dir)?)
        );
    }
    let took = started.elapsed();
    // A retention (and two ticks) later everything finished is collectable.
    tokio::time::sleep(Duration::from_millis(args.retention_ms) + Duration::from_secs(2)).await;
    let kept = coordinator.log.kept()?;
    coordinator.stop().await?;
    println!(
        "history: {done} two-phase transactions in {:.0} s ({:.0}/s), retention {} ms: data \
         directory {:.1} MB after a retention (largest seen {:.1} MB), {} records kept",
        took.as_secs_f64(),
        done as f64 / took.as_secs_f64(),
        args.retention_ms,
        mb(dir_size(dir)?),
        mb(largest),
        kept.records
    );
    Ok(())
}

/// Measurement 3: a restart on the history's directory against a fresh start.
async fn restart(exe: &Path, history: &Path, fresh: &Path) -> anyhow::Result<()> {
    for (label, dir) in [("fresh", fresh), ("after the history", history)] {
        let (mut child, serving, _) = spawn_serving(exe, dir).await?;
        // Idle a moment, as an operator would look at it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kb(child.id())?;
        stop(&mut child);
        println!(
            "restart ({label}): serving {:.2} s after the spawn, resident memory {:.1} MB",
            serving.as_secs_f64(),
            rss as f64 / 1024.0
        );
    }
    Ok(())
}

/// Measurement 4: a start with `--in-doubt` unfinished transactions, timed until none is
/// held.
async fn in_doubt(
    args: &CollectionBench,
    exe: &Path,
    dir: &Path,
    endpoints: &[String],
) -> anyhow::Result<()> {
    let branches: Vec<BranchSpec> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| BranchSpec {
            branch_id: format!("null-{i}"),
            endpoint: e.clone(),
            commit_order: 0,
            kind: BranchKind::Other,
        })
        .collect();
    {
        let log = SledLog::open(dir, SledLogOptions::default())?;
        let epoch = log.epoch();
        let tx = |seq: u64| TxId {
            node: log.node_id(),
            epoch,
            seq,
        };
        let commits = args.in_doubt / 2;
        for chunk in (1..=commits).collect::<Vec<_>>().chunks(512) {
            let writes = chunk.iter().map(|seq| {
                log.force_commit(
                    epoch,
                    CommitRecord {
                        tx: tx(*seq),
                        branches: branches.clone(),
                        decided_at_ms: 1,
                    },
                )
            });
            for r in futures::future::join_all(writes).await {
                r?;
            }
        }
        for seq in commits + 1..=args.in_doubt {
            log.record_lazy(
                epoch,
                LazyRecord::Preparing {
                    tx: tx(seq),
                    branches: branches.clone(),
                },
            )?;
        }
        log.sync(epoch).await?;
        let found = log.recover()?;
        anyhow::ensure!(
            found.commits.len() as u64 == commits
                && found.undecided.len() as u64 == args.in_doubt - commits,
            "the log does not hold what was written"
        );
    }
    let spawned = Instant::now();
    let (mut child, serving, mut client) = spawn_serving(exe, dir).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let resolved = loop {
        let live = client
            .list_transactions(pb::ListTransactionsRequest {
                state: 0,
                min_age_ms: 0,
                limit: 10_000,
            })
            .await?
            .into_inner()
            .transactions
            .len();
        if live == 0 {
            break spawned.elapsed();
        }
        if Instant::now() > deadline {
            stop(&mut child);
            bail!("{live} transactions still held 300 s after the start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop(&mut child);
    println!(
        "in doubt: {} transactions ({} decided COMMIT, {} undecided), two branches each: \
         serving {:.2} s and all resolved {:.2} s after the spawn",
        args.in_doubt,
        args.in_doubt / 2,
        args.in_doubt - args.in_doubt / 2,
        serving.as_secs_f64(),
        resolved.as_secs_f64()
    );
    Ok(())
}

/// Spawns `twopc serve` on `dir` (a free port) and waits until it answers a call: returns
/// the process, how long after the spawn that was, and a client.
async fn spawn_serving(
    exe: &Path,
    dir: &Path,
) -> anyhow::Result<(Child, Duration, CoordinatorClient<Channel>)> {
    let port = twopc_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let spawned = Instant::now();
    let mut child = Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {} serve", exe.display()))?;
    let deadline = spawned + Duration::from_secs(120);
    loop {
        if let Ok(mut c) = CoordinatorClient::connect(url.clone()).await {
            let probe = c
                .get_transaction(pb::GetTransactionRequest {
                    tx_id: "1-1-1".into(),
                })
                .await;
            // Any answer from the service (NOT_FOUND included) means it serves.
            let serves = match &probe {
                Ok(_) => true,
                Err(s) => s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown,
            };
            if serves {
                return Ok((child, spawned.elapsed(), c));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("twopc serve exited with {status} before serving");
        }
        if Instant::now() > deadline {
            stop(&mut child);
            bail!("twopc serve did not answer within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Resident memory of process `pid`, KiB.
fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Bytes of every file below `dir`.
fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}
