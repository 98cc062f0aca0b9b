//! Kills at every moment of a store's life: while it opens (sled writes a snapshot of its
//! page table at every open that finds new log entries, outside its crash-safe log),
//! while it writes under load, and while it shuts down. Both sled stores are covered,
//! the coordinator's decision log and the SDK's staging store, and then the real
//! `twopc serve` process on a data directory with history.
//!
//! The store tests run this test binary again as their child (`child_writer`, ignored
//! unless asked for): the child opens the store through the product's own code, writes
//! records as fast as it can and prints `acked <id>` once a record is durable (the
//! promise a COMMIT decision or a yes vote rests on). The parent SIGKILLs it at a random
//! moment (two kills in three within 20 ms of the spawn, the rest later, some after the
//! child finished and closed the store), and every few kills opens the store itself and
//! checks every acknowledged record, byte for byte. The decision log's child also marks
//! half of its decisions done and collects finished ones as it goes: such a record may be
//! gone, but then its id must be below the low-water mark (forgotten, not unknown). A
//! child that cannot open the store fails the test with its stderr.
//!
//! `TWOPC_KILLS=N` sets the kills per test (default 200); `TWOPC_KILL_SEED=S` replays a
//! run (the seed is printed).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{bare_serve_command, Coordinator};
use twopc_coordinator::log::conformance::{branches, commit, tx_of};
use twopc_coordinator::log::{DecisionLog, LazyRecord, SledLog, SledLogOptions};
use twopc_coordinator::types::TxId;
use twopc_participant::staging::{StagedMessage, StagingError, StagingStore};
use twopc_proto::v1 as pb;
use twopc_testkit::requests;

/// Tells the child which store to write (`decision-log` or `staging`).
const CHILD_ENV: &str = "TWOPC_KILL_TEST_CHILD";
/// The child's data directory.
const DIR_ENV: &str = "TWOPC_KILL_TEST_DIR";
/// Makes the child's record ids unique across runs on one store.
const RUN_ENV: &str = "TWOPC_KILL_TEST_RUN";
/// Records a child writes before it closes the store and exits.
const RECORDS_PER_CHILD: usize = 64;
/// Records a child writes at once (the stores share one sync between them).
const CONCURRENT: usize = 8;
/// The parent opens the store and checks every record after this many kills.
const CHECK_EVERY: usize = 20;
/// Budget of one child that is not killed.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

fn kills() -> usize {
    std::env::var("TWOPC_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn seeded_rng(test: &str) -> StdRng {
    let seed = std::env::var("TWOPC_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!(
        "{test}: seed {seed} (reproduce: TWOPC_KILL_SEED={seed} TWOPC_KILLS={} \
         cargo test --test kill_at_start {test})",
        kills()
    );
    StdRng::seed_from_u64(seed)
}

/// When a child is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after the spawn (the process starting, before the store is touched).
    AfterSpawn(Duration),
    /// This long after the child said it opens the store (inside the open: sled's
    /// snapshot, our repair, the syncs).
    InOpen(Duration),
    /// This long after the store is open (writes under load, then the close).
    AfterOpen(Duration),
    /// Not at all: the child writes its records, closes the store and exits.
    Never,
}

/// Draws a kill: half of them inside the open (most in its first half, where sled writes
/// its snapshot; the rest over `open`, the mean open so far, and a bit beyond), a quarter
/// within 20 ms of the spawn, the rest later or not at all.
fn draw_kill(rng: &mut StdRng, open: Duration) -> Kill {
    let open_us = u64::try_from(open.as_micros())
        .unwrap_or(u64::MAX)
        .max(1_000);
    match rng.random_range(0..20) {
        // sled writes its snapshot early in the open: most of these land there.
        0..=6 => Kill::InOpen(Duration::from_micros(rng.random_range(0..open_us / 2))),
        7..=9 => Kill::InOpen(Duration::from_micros(rng.random_range(0..open_us * 6 / 5))),
        10..=14 => Kill::AfterSpawn(Duration::from_micros(rng.random_range(0..20_000))),
        15..=17 => Kill::AfterOpen(Duration::from_micros(rng.random_range(0..100_000))),
        _ => Kill::Never,
    }
}

// ---------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------

/// The child process of the store tests (see the module docs); does nothing unless
/// started by one.
#[test]
#[ignore = "the child process of the kill tests; they start it"]
fn child_writer() {
    let (Ok(store), Ok(dir), Ok(run)) = (
        std::env::var(CHILD_ENV),
        std::env::var(DIR_ENV),
        std::env::var(RUN_ENV),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = PathBuf::from(dir);
    match store.as_str() {
        "decision-log" => rt.block_on(write_decisions(&dir)),
        "staging" => rt.block_on(stage_batches(&dir, &run)),
        other => panic!("unknown store {other}"),
    }
}

/// Prints `acked <id>` for each id, flushed line by line.
fn ack(ids: &[String]) {
    let mut out = std::io::stdout().lock();
    for id in ids {
        let _ = writeln!(out, "acked {id}");
    }
    let _ = out.flush();
}

/// Exits with the open error on stderr (the parent fails the test with it).
fn open_failed(e: impl std::fmt::Display) -> ! {
    eprintln!("OPEN FAILED: {e}");
    std::process::exit(3);
}

/// Opens a store with `open`, trying again for up to 5 s while `locked` says its directory
/// is locked: the parent's check may have just closed it while another test of this
/// process was starting a child, which holds a copy of the parent's descriptor of the
/// LOCK file (and with it the lock) until it executes its program.
fn open_unless_held<T, E: std::fmt::Display>(
    open: impl Fn() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match open() {
            Ok(store) => return store,
            Err(e) if locked(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => open_failed(e),
        }
    }
}

/// Prints a line at once (the parent times the open by them).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn write_decisions(dir: &Path) {
    say("opening");
    let log = open_unless_held(
        || SledLog::open(dir, SledLogOptions::default()),
        |e| matches!(e, twopc_coordinator::log::LogError::Locked { .. }),
    );
    say("opened");
    let epoch = log.epoch();
    for start in (1..=RECORDS_PER_CHILD).step_by(CONCURRENT) {
        let records: Vec<_> = (start..start + CONCURRENT)
            .map(|seq| decision(tx_of(&log, seq as u64)))
            .collect();
        let writes = records
            .iter()
            .map(|r| log.force_commit(epoch, r.clone()))
            .collect();
        for res in twopc_coordinator::log::conformance::join_all(writes).await {
            res.expect("force_commit");
        }
        ack(&records.iter().map(|r| r.tx.to_string()).collect::<Vec<_>>());
        // Phase two of the even ones finishes (their records move to the finished
        // ones), and the finished records of earlier batches are collected: kills land
        // in both too.
        for r in records.iter().filter(|r| collectable(&r.tx)) {
            log.record_lazy(epoch, LazyRecord::Done { tx: r.tx })
                .expect("Done");
        }
        log.collect(&tx_of(&log, start as u64), CONCURRENT)
            .expect("collect");
    }
}

/// Whether the child marks `tx`'s decision done, so collection may delete it.
fn collectable(tx: &TxId) -> bool {
    tx.seq.is_multiple_of(2)
}

/// The COMMIT record every child writes for `tx` (the parent checks it byte for byte).
fn decision(tx: TxId) -> twopc_coordinator::log::CommitRecord {
    commit(
        tx,
        branches(2, &format!("k{}", tx.seq % 5)),
        1_700_000_000_000 + tx.seq,
    )
}

async fn stage_batches(dir: &Path, run: &str) {
    say("opening");
    let store = open_unless_held(
        || StagingStore::open(dir),
        |e| matches!(e, StagingError::Locked { .. }),
    );
    say("opened");
    for start in (1..=RECORDS_PER_CHILD).step_by(CONCURRENT) {
        let ids: Vec<String> = (start..start + CONCURRENT)
            .map(|i| format!("{run}-{i}"))
            .collect();
        let stages = ids
            .iter()
            .map(|id| store.stage(id, "b", batch(id)))
            .collect();
        for res in twopc_coordinator::log::conformance::join_all(stages).await {
            res.expect("stage");
        }
        ack(&ids);
    }
}

/// The batch every child stages for `tx_id` (the parent checks it byte for byte).
fn batch(tx_id: &str) -> Vec<StagedMessage> {
    (0..2)
        .map(|i| StagedMessage {
            message_id: format!("{tx_id}:b:{i}"),
            destination: "orders".into(),
            payload: format!("{{\"order\":\"{tx_id}\",\"line\":{i}}}").into_bytes(),
            headers: vec![("kind".into(), "OrderCreated".into())],
            content_type: Some("application/json".into()),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The parent
// ---------------------------------------------------------------------------------------

/// What one child did.
struct ChildRun {
    /// The ids it acknowledged as durable.
    acked: Vec<String>,
    /// Whether the parent killed it (or it had exited by itself).
    killed: bool,
    /// How long its open took, if it got through it.
    open: Option<Duration>,
    output: Output,
}

/// Runs one child on `dir`, killed as `kill` says.
fn run_child(store: &str, dir: &Path, run: usize, kill: Kill) -> ChildRun {
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args(["child_writer", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads=1", "-q"])
        .env(CHILD_ENV, store)
        .env(DIR_ENV, dir)
        .env(RUN_ENV, run.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child writer");
    let spawned = Instant::now();
    // Lines as they come, with the moment they came.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<(Instant, String)> = Vec::new();
    // Waits for `line` (false if the child closed its stdout first).
    let wait_for = |line: &str, seen: &mut Vec<(Instant, String)>| -> bool {
        let deadline = spawned + CHILD_DEADLINE;
        loop {
            if seen.iter().any(|(_, l)| l == line) {
                return true;
            }
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(got) => seen.push(got),
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("a child writer did not say {line:?} within {CHILD_DEADLINE:?}")
                }
            }
        }
    };
    // The fault itself: a kill at a random moment, not a wait for a condition.
    let delay = match kill {
        Kill::AfterSpawn(d) => Some(d),
        Kill::InOpen(d) => wait_for("opening", &mut seen).then_some(d),
        Kill::AfterOpen(d) => wait_for("opened", &mut seen).then_some(d),
        Kill::Never => None,
    };
    let mut killed = false;
    if let Some(delay) = delay {
        std::thread::sleep(delay);
        killed = child.try_wait().expect("try_wait").is_none();
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("wait for the child");
    let _ = reader.join();
    seen.extend(lines.try_iter());
    let at = |line: &str| seen.iter().find(|(_, l)| l == line).map(|(t, _)| *t);
    let open = match (at("opening"), at("opened")) {
        (Some(a), Some(b)) => Some(b.duration_since(a)),
        _ => None,
    };
    let acked = seen
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("acked "))
        .map(str::to_string)
        .collect();
    ChildRun {
        acked,
        killed,
        open,
        output,
    }
}

/// Kills children writing `store` in a fresh data directory again and again; `check`
/// opens the store in that directory and asserts every acknowledged id.
fn kill_campaign(test: &str, store: &str, check: impl Fn(&Path, &[String])) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = &tmp.path().join("data");
    let mut rng = seeded_rng(test);
    let kills = kills();
    let mut acked: Vec<String> = Vec::new();
    let mut landed = 0;
    let mut opens_checked = 0;
    let mut in_open = 0;
    // The mean open so far: kills inside the open spread over it.
    let (mut open, mut opens) = (Duration::from_millis(10), 0u32);
    let started = Instant::now();
    for run in 0..kills {
        let kill = draw_kill(&mut rng, open);
        let child = run_child(store, dir, run, kill);
        if let Some(took) = child.open {
            opens += 1;
            open = (open * (opens - 1) + took) / opens;
        }
        in_open +=
            usize::from(child.killed && child.open.is_none() && matches!(kill, Kill::InOpen(_)));
        if !child.killed && !child.output.status.success() {
            panic!(
                "{test}: run {run} ({kill:?}) exited by itself with {:?}; stderr:\n{}",
                child.output.status,
                String::from_utf8_lossy(&child.output.stderr)
            );
        }
        landed += usize::from(child.killed);
        acked.extend(child.acked);
        if (run + 1) % CHECK_EVERY == 0 || run + 1 == kills {
            check(dir, &acked);
            opens_checked += 1;
        }
    }
    println!(
        "{test}: {kills} runs, {landed} killed ({in_open} inside the open, which took \
         {open:.1?} on average), {} records acknowledged and found intact ({opens_checked} checks) in {:.1?}",
        acked.len(),
        started.elapsed()
    );
    assert!(
        landed > kills / 2,
        "too few kills landed: {landed} of {kills}"
    );
    assert!(
        in_open > kills / 5,
        "too few kills inside the open: {in_open} of {kills}"
    );
    assert!(!acked.is_empty(), "no child acknowledged a record");
}

#[test]
fn decision_log_keeps_every_decision_across_kills_at_start_and_under_load() {
    kill_campaign(
        "decision_log_keeps_every_decision_across_kills_at_start_and_under_load",
        "decision-log",
        |dir, acked| {
            let log = SledLog::open(dir, SledLogOptions::default())
                .unwrap_or_else(|e| panic!("the parent cannot open the decision log: {e}"));
            for id in acked {
                let tx: TxId = id.parse().expect("tx id");
                let found = log.decision(&tx).expect("read a decision");
                // Collected (only ever a finished one): forgotten, never unknown.
                if found.is_none() && collectable(&tx) {
                    assert!(
                        log.collected(&tx).expect("collected()"),
                        "acknowledged decision {id} is gone but not below the low-water mark"
                    );
                    continue;
                }
                assert_eq!(
                    found.map(|d| d.record),
                    Some(decision(tx)),
                    "acknowledged decision {id}"
                );
            }
        },
    );
}

#[test]
fn staging_store_keeps_every_yes_vote_across_kills_at_start_and_under_load() {
    kill_campaign(
        "staging_store_keeps_every_yes_vote_across_kills_at_start_and_under_load",
        "staging",
        |dir, acked| {
            let store = StagingStore::open(dir)
                .unwrap_or_else(|e| panic!("the parent cannot open the staging store: {e}"));
            for id in acked {
                assert_eq!(
                    store.get(id, "b").expect("read a batch"),
                    Some(batch(id)),
                    "acknowledged batch {id}"
                );
            }
        },
    );
}

/// The real server: `twopc serve` killed at a random moment of its start (between the
/// spawn and a little after the time a full start takes to listen), again and again, on
/// a data directory holding COMMIT decisions; every few kills it must start and answer
/// every decision as COMMITTED, and at the end every decision is in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twopc_serve_killed_while_it_starts_always_starts_again() {
    let mut rng = seeded_rng("twopc_serve_killed_while_it_starts_always_starts_again");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    // History: decisions of an earlier run (branches on ports nothing listens on, so they
    // stay unfinished and are re-driven at every start).
    let decided: Vec<TxId> = {
        let log = SledLog::open(&dir, SledLogOptions::default()).expect("open");
        let mut decided = Vec::new();
        for seq in 1..=20 {
            let rec = decision(tx_of(&log, seq));
            log.force_commit(log.epoch(), rec.clone())
                .await
                .expect("force_commit");
            decided.push(rec.tx);
        }
        decided
    };
    let kills = kills() / 2;
    let mut full_starts = 0;
    // How long a full start takes to listen (the mean so far): the kills spread over it.
    let mut starts = 1u64;
    let mut start_us = {
        let started = Instant::now();
        let mut c = Coordinator::start_in(&dir, &[]).await;
        c.kill9();
        u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
    };
    for run in 0..kills {
        let delay = Duration::from_micros(rng.random_range(0..start_us * 6 / 5));
        let mut child = bare_serve_command(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twopc serve");
        std::thread::sleep(delay);
        let exited = child.try_wait().expect("try_wait");
        let _ = child.kill();
        let output = child.wait_with_output().expect("wait");
        if let Some(status) = exited {
            panic!(
                "run {run}: twopc serve exited by itself within {delay:?} ({status}); stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        if (run + 1) % CHECK_EVERY == 0 || run + 1 == kills {
            let started = Instant::now();
            let mut c = Coordinator::start_in(&dir, &[]).await;
            let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            starts += 1;
            start_us = (start_us * (starts - 1)).saturating_add(took) / starts;
            let mut client = c.client().await;
            for tx in &decided {
                let got = client
                    .get_transaction(requests::get(tx.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("GetTransaction {tx}: {e}; {}", c.stderr_log()))
                    .into_inner();
                assert_eq!(got.outcome(), pb::Outcome::Committed, "{tx}: {got:?}");
            }
            full_starts += 1;
            c.kill9();
        }
    }
    let log = SledLog::open(&dir, SledLogOptions::default()).expect("open at the end");
    for tx in &decided {
        assert_eq!(
            log.decision(tx).expect("read").map(|d| d.record),
            Some(decision(*tx)),
            "{tx}"
        );
    }
    println!(
        "twopc serve: {kills} kills within {:.1?} of the spawn, {} full starts, all {} \
         decisions intact",
        Duration::from_micros(start_us * 6 / 5),
        full_starts,
        decided.len()
    );
}
