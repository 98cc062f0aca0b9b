//! The order-service PROCESS killed in the middle of a transaction finishes it after it
//! restarts: real `twopc serve` and `twopc-lab order-service` processes, a private PostgreSQL
//! cluster (prepared transactions on) and the machine's RabbitMQ (127.0.0.1:5672).
//!
//! The order service is killed by the participant SDK's fail points (`return(abort)`:
//! SIGABRT on the spot, nothing cleaned up), so this file needs the `failpoints` feature
//! (`cargo test --features failpoints,lab --test order_service_crash`); without it, it is
//! empty.
//!
//! Every scenario has its own coordinator, database, queue, participant port and data
//! directory, bounded waits, and prints the stderr of every process it started when it
//! fails.
#![cfg(feature = "failpoints")]

mod support;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use lapin::Connection;
use support::{declare_durable, eventually, rabbitmq, with_deadline, Coordinator, AMQP_URL};
use twopc_participant::staging::StagingStore;
use twopc_proto::v1 as pb;
use twopc_testkit::amqp::take_all;
use twopc_testkit::{free_port, unique_name, PgCluster};

/// The order service's tables, exactly as `twopc-lab order-service` expects them.
const ORDER_SCHEMA: &str = include_str!("../lab/src/order_schema.sql");
/// Branch ids of the order service (`--service orders`).
const DB_BRANCH: &str = "orders:orders-db";
const EVENTS_BRANCH: &str = "orders:events";

/// Overall budget of one scenario.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// Budget of one wait for a process or for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(30);

/// One PostgreSQL cluster for the whole binary (each scenario has its own database).
static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

async fn cluster() -> &'static PgCluster {
    tokio::task::spawn_blocking(|| {
        CLUSTER.get_or_init(|| {
            PgCluster::start_blocking().unwrap_or_else(|e| panic!("private PostgreSQL: {e}"))
        })
    })
    .await
    .expect("starting the PostgreSQL cluster panicked")
}

// ---------------------------------------------------------------------------------------
// The order-service process
// ---------------------------------------------------------------------------------------

/// Runs of `twopc-lab order-service` of one scenario, all on one port and data directory;
/// their stderr is kept in files and printed if the scenario fails.
struct OrderService {
    root: tempfile::TempDir,
    port: u16,
    coordinator: String,
    postgres_url: String,
    queue: String,
    logs: Vec<PathBuf>,
}

/// One finished run.
struct Run {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl OrderService {
    fn new(coordinator: String, postgres_url: String, queue: String) -> OrderService {
        OrderService {
            root: tempfile::Builder::new()
                .prefix("twopc-order-service-")
                .tempdir()
                .expect("create temp dir"),
            port: free_port(),
            coordinator,
            postgres_url,
            queue,
            logs: Vec::new(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Runs `twopc-lab order-service ARGS` with `failpoints` in FAILPOINTS (none if empty)
    /// and waits (bounded) until it exits on its own. Checks that it announced itself
    /// on the fixed port.
    async fn run(&mut self, args: &[&str], failpoints: &str) -> Run {
        let run = self.run_unchecked(args, failpoints).await;
        let listen = format!("127.0.0.1:{}", self.port);
        assert_eq!(
            run.stdout.first().map(String::as_str),
            Some(format!("order-service ready on {listen}").as_str()),
            "first stdout line of twopc-lab order-service {args:?} (status {:?}); stdout {:?}; stderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        run
    }

    /// [`OrderService::run`] without the check of the ready line (for runs that must
    /// fail before they get that far).
    async fn run_unchecked(&mut self, args: &[&str], failpoints: &str) -> Run {
        let log_path = self
            .root
            .path()
            .join(format!("order-service-{}.stderr.log", self.logs.len() + 1));
        let log = File::create(&log_path).expect("create log file");
        self.logs.push(log_path.clone());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twopc-lab"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TWOPC_") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("FAILPOINTS");
        if !failpoints.is_empty() {
            cmd.env("FAILPOINTS", failpoints);
        }
        let listen = format!("127.0.0.1:{}", self.port);
        let data_dir = self.data_dir();
        cmd.env("RUST_LOG", "info,twopc_participant=debug")
            .env("NO_COLOR", "1")
            .arg("order-service")
            .args(["--coordinator", &self.coordinator])
            .args(["--listen", &listen])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--postgres-url", &self.postgres_url])
            .args(["--amqp-url", AMQP_URL])
            .args(["--queue", &self.queue])
            .args(["--service", "orders"])
            .args(["--timeout-ms", "20000"])
            .args(["--recovery-interval-ms", "500"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // SAFETY: setrlimit(2) is async-signal-safe; no core dump of the aborted child
        // lands in the working directory.
        unsafe {
            cmd.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let mut child: Child = cmd.spawn().expect("spawn twopc-lab order-service");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if started.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                let lines: Vec<String> = rx.try_iter().collect();
                panic!(
                    "twopc-lab order-service {args:?} did not exit within {WAIT:?}; stdout {lines:?}; stderr:\n{}",
                    read(&log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = reader.join();
        let stdout: Vec<String> = rx.try_iter().collect();
        Run {
            status,
            stdout,
            stderr: read(&log_path),
        }
    }
}

impl Drop for OrderService {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("TWOPC_TEST_SHOW_LOGS").is_some() {
            for (i, p) in self.logs.iter().enumerate() {
                eprintln!(
                    "----- order-service run #{} ({}) -----\n{}",
                    i + 1,
                    p.display(),
                    read(p)
                );
            }
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("<unreadable: {e}>"))
}

#[track_caller]
fn assert_aborted_by_failpoint(run: &Run, failpoint: &str) {
    assert_eq!(
        run.status.signal(),
        Some(libc::SIGABRT),
        "the order service should die of SIGABRT at {failpoint}, got {:?}; stdout {:?}; stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("failpoint {failpoint} hit: aborting the process")),
        "stderr does not show {failpoint}:\n{}",
        run.stderr
    );
    assert!(
        !run.stdout.iter().any(|l| l.starts_with("placed ")),
        "no outcome can be printed by a killed process: {:?}",
        run.stdout
    );
}

/// Checks a successful `--recover` run: it exited 0 and found exactly both branches of
/// `tx_id` in doubt.
#[track_caller]
fn assert_recovered_both(run: &Run, tx_id: &str) {
    assert!(
        run.status.success(),
        "--recover failed ({:?}); stdout {:?}; stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    // After the ready line (checked by `run`): the branches found at start, sorted.
    let expected = [
        format!("in doubt {tx_id} {EVENTS_BRANCH}"),
        format!("in doubt {tx_id} {DB_BRANCH}"),
        "recovered 2".to_string(),
    ];
    assert_eq!(run.stdout[1..], expected[..], "stderr:\n{}", run.stderr);
}

/// Like [`assert_aborted_by_failpoint`], for fail points past the point where the
/// branch committed: the commit's answer may have reached the process before it died,
/// so `placed ORDER_ID committed` may have been printed (and no other outcome).
#[track_caller]
fn assert_aborted_by_failpoint_after_commit(run: &Run, failpoint: &str, order_id: &str) {
    assert_eq!(
        run.status.signal(),
        Some(libc::SIGABRT),
        "the order service should die of SIGABRT at {failpoint}, got {:?}; stdout {:?}; stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("failpoint {failpoint} hit: aborting the process")),
        "stderr does not show {failpoint}:\n{}",
        run.stderr
    );
    let committed = format!("placed {order_id} committed");
    assert!(
        run.stdout
            .iter()
            .filter(|l| l.starts_with("placed "))
            .all(|l| *l == committed),
        "the only outcome this process can have printed is {committed:?}: {:?}",
        run.stdout
    );
}

/// Checks a successful `--recover` run of a service that stages its events in the
/// database: it exited 0 and found exactly the database branch of `tx_id` in doubt.
#[track_caller]
fn assert_recovered_db_branch(run: &Run, tx_id: &str) {
    assert!(
        run.status.success(),
        "--recover failed ({:?}); stdout {:?}; stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    let expected = [
        format!("in doubt {tx_id} {DB_BRANCH}"),
        "recovered 1".to_string(),
    ];
    assert_eq!(run.stdout[1..], expected[..], "stderr:\n{}", run.stderr);
}

/// Checks a successful `--recover` run that found nothing in doubt.
#[track_caller]
fn assert_recovered_nothing(run: &Run) {
    assert!(
        run.status.success(),
        "--recover failed ({:?}); stdout {:?}; stderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.stdout[1..],
        ["recovered 0".to_string()],
        "stderr:\n{}",
        run.stderr
    );
}

/// The flags of every run of the `--stage-events database` scenarios, then `extra`.
fn database_staging<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    database_staging_swept_after("300", extra)
}

/// [`database_staging`] with the sweep taking rows `sweep_after_ms` old.
fn database_staging_swept_after<'a>(sweep_after_ms: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--stage-events",
        "database",
        "--outbox-sweep-interval-ms",
        "200",
        "--outbox-sweep-after-ms",
        sweep_after_ms,
    ];
    args.extend_from_slice(extra);
    args
}

/// The transaction id in the gid `twopc:<tx_id>:<DB_BRANCH>` of the database branch.
#[track_caller]
fn tx_of_gid(gid: &str) -> String {
    gid.strip_prefix("twopc:")
        .and_then(|rest| rest.strip_suffix(&format!(":{DB_BRANCH}")))
        .unwrap_or_else(|| panic!("unexpected gid {gid:?}"))
        .to_string()
}

/// Checks one delivered OrderCreated of order `o1` staged in the database branch of
/// `tx_id`: the message id of its first outbox message, and the payload.
#[track_caller]
fn assert_order_created_from_outbox(event: &(String, Vec<u8>), tx_id: &str) {
    let (message_id, payload) = event;
    assert_eq!(message_id, &format!("{tx_id}:{DB_BRANCH}:0"), "message id");
    let event: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    assert_eq!(
        event,
        serde_json::json!({
            "type": "OrderCreated", "id": "o1", "customer": "alice", "item": "sku-1", "quantity": 1
        })
    );
}

// ---------------------------------------------------------------------------------------
// Outside views: PostgreSQL, RabbitMQ, the staging store, the coordinator
// ---------------------------------------------------------------------------------------

/// A scenario's world: coordinator, database, queue.
struct World {
    coord: Coordinator,
    db: tokio_postgres::Client,
    amqp: Connection,
    channel: lapin::Channel,
    queue: String,
    service: OrderService,
}

impl World {
    /// Coordinator with `--one-phase false`: even a single branch is prepared.
    async fn start() -> World {
        World::start_with(&[("--one-phase", "false")]).await
    }

    /// Coordinator with `--prepare-timeout-ms 5000 --commit-wait-ms 1000` and
    /// `coordinator_flags` (its own default, one-phase on, unless they say otherwise).
    async fn start_with(coordinator_flags: &[(&str, &str)]) -> World {
        let cluster = cluster().await;
        let db_name = unique_name("order_crash");
        cluster
            .create_database(&db_name)
            .await
            .unwrap_or_else(|e| panic!("create database {db_name}: {e}"));
        let db = cluster
            .connect(&db_name)
            .await
            .unwrap_or_else(|e| panic!("connect to {db_name}: {e}"));
        db.batch_execute(ORDER_SCHEMA).await.expect("order schema");
        db.batch_execute("INSERT INTO customers (id) VALUES ('alice')")
            .await
            .expect("customer");
        let mut flags = vec![
            ("--prepare-timeout-ms", "5000"),
            ("--commit-wait-ms", "1000"),
        ];
        flags.extend_from_slice(coordinator_flags);
        let coord = Coordinator::start(&flags).await;
        let (amqp, channel) = rabbitmq().await;
        let queue = unique_name("twopc_crash_orders");
        let service = OrderService::new(coord.url(), cluster.url(&db_name), queue.clone());
        World {
            coord,
            db,
            amqp,
            channel,
            queue,
            service,
        }
    }

    /// Gids prepared in this scenario's database.
    async fn prepared_gids(&self) -> Vec<String> {
        self.db
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
                &[],
            )
            .await
            .expect("pg_prepared_xacts")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The transaction id of the order's one prepared database branch.
    async fn prepared_tx(&self) -> String {
        let gids = self.prepared_gids().await;
        assert_eq!(gids.len(), 1, "one prepared gid expected: {gids:?}");
        let tx_id = gids[0]
            .strip_prefix("twopc:")
            .and_then(|rest| rest.strip_suffix(&format!(":{DB_BRANCH}")))
            .unwrap_or_else(|| panic!("unexpected gid {:?}", gids[0]));
        tx_id.to_string()
    }

    async fn order_row(&self, id: &str) -> Option<(String, String, i32)> {
        self.db
            .query_opt(
                "SELECT customer, item, quantity FROM orders WHERE id = $1",
                &[&id],
            )
            .await
            .expect("select order")
            .map(|r| (r.get(0), r.get(1), r.get(2)))
    }

    /// Whether the order service created the outbox table in this scenario's database.
    async fn outbox_table_exists(&self) -> bool {
        self.db
            .query_one("SELECT to_regclass('twopc_outbox') IS NOT NULL", &[])
            .await
            .expect("to_regclass")
            .get(0)
    }

    /// The committed rows of the outbox table, as `(gid, message id)`, oldest first.
    async fn outbox(&self) -> Vec<(String, String)> {
        self.db
            .query("SELECT gid, message_id FROM twopc_outbox ORDER BY id", &[])
            .await
            .expect("select twopc_outbox")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// How many committed rows the outbox table holds.
    async fn outbox_rows(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM twopc_outbox", &[])
            .await
            .expect("count twopc_outbox")
            .get(0)
    }

    /// Declares the queue (durable, as the SDK does) and returns how many messages it
    /// holds.
    async fn queue_len(&self) -> u32 {
        declare_durable(&self.channel, &self.queue).await
    }

    /// Takes every message in the queue, as `(message id, payload)`.
    async fn drain(&self) -> Vec<(String, Vec<u8>)> {
        self.queue_len().await;
        take_all(&self.channel, &self.queue)
            .await
            .expect("basic.get")
            .into_iter()
            .map(|m| (m.message_id, m.payload))
            .collect()
    }

    /// Staged batches left in the order service's data directory (run it only while no
    /// order-service process is running).
    async fn staged(&self) -> usize {
        let dir = self.service.data_dir();
        tokio::task::spawn_blocking(move || {
            let store = StagingStore::open(&dir)
                .unwrap_or_else(|e| panic!("open the staging store in {}: {e}", dir.display()));
            store.len()
        })
        .await
        .expect("staging task")
    }

    async fn tx(&self, tx_id: &str) -> pb::GetTransactionResponse {
        self.coord
            .client()
            .await
            .get_transaction(pb::GetTransactionRequest {
                tx_id: tx_id.to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetTransaction {tx_id}: {s:?}"))
            .into_inner()
    }

    /// Waits until the coordinator reports `state` for `tx_id`.
    async fn wait_for_state(&self, tx_id: &str, state: pb::TxState) -> pb::GetTransactionResponse {
        let client = self.coord.client().await;
        let what = format!("transaction {tx_id} is {state:?}");
        eventually(WAIT, &what, || {
            let mut client = client.clone();
            let tx_id = tx_id.to_string();
            async move {
                client
                    .get_transaction(pb::GetTransactionRequest { tx_id })
                    .await
                    .map(|r| pb::TxState::try_from(r.into_inner().state) == Ok(state))
                    .unwrap_or(false)
            }
        })
        .await;
        self.tx(tx_id).await
    }

    /// Waits until the coordinator has finished `tx_id` (Committed or Aborted), so that a
    /// wrong outcome fails at once, with the coordinator's whole answer.
    async fn wait_until_finished(&self, tx_id: &str) -> pb::GetTransactionResponse {
        let client = self.coord.client().await;
        let what = format!("transaction {tx_id} is finished");
        eventually(WAIT, &what, || {
            let mut client = client.clone();
            let tx_id = tx_id.to_string();
            async move {
                client
                    .get_transaction(pb::GetTransactionRequest { tx_id })
                    .await
                    .map(|r| {
                        matches!(
                            pb::TxState::try_from(r.into_inner().state),
                            Ok(pb::TxState::Committed | pb::TxState::Aborted)
                        )
                    })
                    .unwrap_or(false)
            }
        })
        .await;
        self.tx(tx_id).await
    }

    /// Runs `--place o1` of the `--stage-events database` service with `failpoint` set
    /// to abort the process. Its sweep takes no row younger than a minute: only the
    /// relay publishes the order's event (on a loaded machine, connecting to the broker
    /// can outlast a short sweep age, and the sweep would publish it as well — at least
    /// once, but not the single publish these scenarios count).
    async fn place_killed_at(&mut self, failpoint: &str) -> Run {
        self.service
            .run(
                &database_staging_swept_after("60000", &["--place", "o1"]),
                &format!("{failpoint}=return(abort)"),
            )
            .await
    }

    /// [`World::place_killed_at`] for a fail point past the commit of the order's only
    /// branch: checks the process died there, nothing is prepared, the row is committed
    /// and one outbox row waits; returns the transaction id and the row's message id.
    async fn killed_after_commit(&mut self, failpoint: &str) -> (String, String) {
        let run = self.place_killed_at(failpoint).await;
        assert_aborted_by_failpoint_after_commit(&run, failpoint, "o1");
        assert_eq!(
            self.prepared_gids().await,
            Vec::<String>::new(),
            "the branch committed: nothing is prepared"
        );
        assert_eq!(
            self.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1)),
            "the row committed before the kill"
        );
        let outbox = self.outbox().await;
        assert_eq!(outbox.len(), 1, "one outbox row is left: {outbox:?}");
        (tx_of_gid(&outbox[0].0), outbox[0].1.clone())
    }

    /// Runs `--recover` of the `--stage-events database` service.
    async fn recover_database_staged(&mut self) -> Run {
        self.service
            .run(&database_staging(&["--recover"]), "")
            .await
    }

    /// The outbox is empty and the queue held exactly one OrderCreated of `tx_id`.
    async fn assert_published_once(&self, tx_id: &str) {
        assert_eq!(
            self.outbox_rows().await,
            0,
            "published and deleted before the exit"
        );
        let events = self.drain().await;
        assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
        assert_order_created_from_outbox(&events[0], tx_id);
    }

    async fn cleanup(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.amqp.close(200, "test done".into()).await;
    }
}

fn outcome(r: &pb::GetTransactionResponse) -> pb::Outcome {
    pb::Outcome::try_from(r.outcome).unwrap_or(pb::Outcome::Unspecified)
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Killed after preparing, before its vote reached the coordinator: the coordinator
/// aborts (a vote is missing); the restarted service rolls the prepared gid back and
/// drops the staged event.
///
/// The prepares of the two branches run in parallel; `1*off->return(abort)` lets the
/// first yes vote out and kills the process at the second, so that BOTH branches are
/// durably prepared (a PostgreSQL gid and a staged batch) when it dies and exactly one
/// vote never reaches the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_prepare_before_its_vote_the_restarted_service_rolls_back() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::after_prepare_before_reply";

        let run = w
            .service
            .run(
                &["--place", "o1"],
                &format!("{failpoint}=1*off->return(abort)"),
            )
            .await;
        assert_aborted_by_failpoint(&run, failpoint);
        let tx_id = w.prepared_tx().await;

        // The vote never arrived: the coordinator aborts and keeps sending aborts to the
        // dead participant.
        let r = w.wait_for_state(&tx_id, pb::TxState::Aborting).await;
        assert_eq!(outcome(&r), pb::Outcome::Aborted, "{r:?}");
        assert_eq!(
            w.prepared_gids().await.len(),
            1,
            "nothing rolled the gid back yet"
        );
        assert_eq!(
            w.order_row("o1").await,
            None,
            "a prepared row is not visible"
        );

        // Restarted on the same port and data directory, without the fail point.
        let run = w.service.run(&["--recover"], "").await;
        assert_recovered_both(&run, &tx_id);

        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "gid rolled back"
        );
        assert_eq!(w.order_row("o1").await, None, "no row");
        assert_eq!(w.drain().await, vec![], "no event");
        assert_eq!(w.staged().await, 0, "nothing staged");
        let r = w.wait_for_state(&tx_id, pb::TxState::Aborted).await;
        assert_eq!(outcome(&r), pb::Outcome::Aborted, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// Killed on the commit after the decision (both branches voted yes, COMMIT is durable,
/// nothing is committed yet): the coordinator keeps retrying; the restarted service
/// commits the row and publishes exactly one OrderCreated with the branch's message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_commit_the_restarted_service_commits_row_and_event() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::before_commit";

        let run = w
            .service
            .run(&["--place", "o1"], &format!("{failpoint}=return(abort)"))
            .await;
        assert_aborted_by_failpoint(&run, failpoint);
        let tx_id = w.prepared_tx().await;
        let r = w.tx(&tx_id).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "decided before the kill: {r:?}");
        assert_eq!(
            pb::TxState::try_from(r.state),
            Ok(pb::TxState::Committing),
            "phase two cannot have finished: {r:?}"
        );
        assert_eq!(w.order_row("o1").await, None, "not committed before the kill");
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

        let run = w.service.run(&["--recover"], "").await;
        assert_recovered_both(&run, &tx_id);

        assert_eq!(
            w.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1)),
            "the row is committed"
        );
        assert_eq!(w.prepared_gids().await, Vec::<String>::new(), "no prepared gid left");
        let events = w.drain().await;
        assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
        let (message_id, payload) = &events[0];
        assert_eq!(message_id, &format!("{tx_id}:{EVENTS_BRANCH}:0"));
        let event: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
        assert_eq!(
            event,
            serde_json::json!({
                "type": "OrderCreated", "id": "o1", "customer": "alice", "item": "sku-1", "quantity": 1
            })
        );
        assert_eq!(w.staged().await, 0, "nothing staged");
        let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// Killed after PostgreSQL committed, before the acknowledgement: after the restart the
/// retried commit finds the gid gone ("already committed") and the event goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_commit_before_ack_the_restarted_service_publishes_once() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::after_commit_before_ack";

        let run = w
            .service
            .run(&["--place", "o1"], &format!("{failpoint}=return(abort)"))
            .await;
        assert_aborted_by_failpoint(&run, failpoint);
        // The database tier committed before the kill; the broker tier never started.
        assert_eq!(w.prepared_gids().await, Vec::<String>::new());
        assert_eq!(
            w.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1))
        );
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

        let run = w.service.run(&["--recover"], "").await;
        assert!(run.status.success(), "stderr:\n{}", run.stderr);
        let in_doubt: Vec<&String> = run
            .stdout
            .iter()
            .filter(|l| l.starts_with("in doubt "))
            .collect();
        assert_eq!(in_doubt.len(), 1, "only the staged event: {:?}", run.stdout);
        let tx_id = in_doubt[0]
            .strip_prefix("in doubt ")
            .and_then(|rest| rest.strip_suffix(&format!(" {EVENTS_BRANCH}")))
            .unwrap_or_else(|| panic!("unexpected line {:?}", in_doubt[0]))
            .to_string();
        assert_eq!(run.stdout.last().map(String::as_str), Some("recovered 1"));

        let events = w.drain().await;
        assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
        assert_eq!(events[0].0, format!("{tx_id}:{EVENTS_BRANCH}:0"));
        assert_eq!(w.staged().await, 0, "nothing staged");
        let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Scenarios: OrderCreated staged in the database branch (`--stage-events database`)
// ---------------------------------------------------------------------------------------

/// Killed after preparing its only branch, before the vote reached the coordinator: the
/// coordinator aborts; the restarted service rolls the gid back, and the outbox row
/// staged in it goes with the order row: no row, no event, nothing left in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_after_prepare_before_its_vote_rolls_back_row_and_event() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::after_prepare_before_reply";

        let run = w.place_killed_at(failpoint).await;
        assert_aborted_by_failpoint(&run, failpoint);
        let tx_id = w.prepared_tx().await;

        let r = w.wait_for_state(&tx_id, pb::TxState::Aborting).await;
        assert_eq!(outcome(&r), pb::Outcome::Aborted, "{r:?}");
        assert_eq!(
            w.prepared_gids().await.len(),
            1,
            "nothing rolled the gid back yet"
        );
        assert_eq!(
            w.order_row("o1").await,
            None,
            "a prepared row is not visible"
        );
        assert_eq!(
            w.outbox_rows().await,
            0,
            "a prepared outbox row is not visible"
        );
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

        let run = w.recover_database_staged().await;
        assert_recovered_db_branch(&run, &tx_id);

        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "gid rolled back"
        );
        assert_eq!(w.order_row("o1").await, None, "no row");
        assert_eq!(w.outbox_rows().await, 0, "no outbox row");
        assert_eq!(w.drain().await, vec![], "no event");
        assert_eq!(
            w.staged().await,
            0,
            "nothing staged in the broker's store either"
        );
        let r = w.wait_for_state(&tx_id, pb::TxState::Aborted).await;
        assert_eq!(outcome(&r), pb::Outcome::Aborted, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// Killed on the commit after the decision (COMMIT durable, the gid with the order row
/// and its outbox row still prepared): the restarted service commits the gid, and the
/// recovery's sweep of that gid publishes the event at once, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_before_commit_recovery_commits_and_publishes_once() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::before_commit";

        let run = w.place_killed_at(failpoint).await;
        assert_aborted_by_failpoint(&run, failpoint);
        let tx_id = w.prepared_tx().await;
        let r = w.tx(&tx_id).await;
        assert_eq!(
            outcome(&r),
            pb::Outcome::Committed,
            "decided before the kill: {r:?}"
        );
        assert_eq!(
            pb::TxState::try_from(r.state),
            Ok(pb::TxState::Committing),
            "phase two cannot have finished: {r:?}"
        );
        assert_eq!(
            w.order_row("o1").await,
            None,
            "not committed before the kill"
        );
        assert_eq!(w.outbox_rows().await, 0, "the outbox row is still prepared");
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

        let run = w.recover_database_staged().await;
        assert_recovered_db_branch(&run, &tx_id);

        assert_eq!(
            w.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1)),
            "the row is committed"
        );
        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "no prepared gid left"
        );
        w.assert_published_once(&tx_id).await;
        let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// Killed after the branch committed, before the relay sent its event: the order row and
/// the outbox row are committed, the queue is empty; a plain `--recover` run (nothing in
/// doubt) has its sweep publish the event, once, and delete the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_before_the_relay_publishes_the_sweep_publishes_once() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::outbox::before_publish";

        let (tx_id, message_id) = w.killed_after_commit(failpoint).await;
        assert_eq!(message_id, format!("{tx_id}:{DB_BRANCH}:0"));
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");
        let r = w.tx(&tx_id).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");

        let run = w.recover_database_staged().await;
        assert_recovered_nothing(&run);

        w.assert_published_once(&tx_id).await;
        assert_eq!(w.prepared_gids().await, Vec::<String>::new());
        w.cleanup().await;
    })
    .await;
}

/// Killed after the broker confirmed the event, before its outbox row was deleted: the
/// event is delivered once and the row stays; the restarted service's sweep publishes
/// it again, with the same message id and payload (at least once: consumers dedupe by
/// id), and deletes the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_after_publish_before_delete_the_sweep_republishes_same_id() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;
        let failpoint = "participant::outbox::after_publish_before_delete";

        let (tx_id, _) = w.killed_after_commit(failpoint).await;
        assert_eq!(
            w.queue_len().await,
            1,
            "the broker confirmed the event before the kill"
        );

        let run = w.recover_database_staged().await;
        assert_recovered_nothing(&run);

        assert_eq!(w.outbox_rows().await, 0, "deleted after the second publish");
        let events = w.drain().await;
        assert_eq!(
            events.len(),
            2,
            "published once before the kill, once by the sweep: {events:?}"
        );
        assert_order_created_from_outbox(&events[0], &tx_id);
        assert_eq!(
            events[1], events[0],
            "the same message id and payload again"
        );
        let r = w.tx(&tx_id).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// With one-phase commits on, the single database branch commits in one phase (nothing
/// is ever prepared); killed before the relay sent the event, the restarted service's
/// sweep publishes it exactly once and deletes the row, and the coordinator ends the
/// transaction Committed: if the one-phase answer was lost with the process, the
/// coordinator's repeated one-phase commit finds the commit's marker after the restart
/// (before the marker existed, the unknown branch was answered "refused" and the
/// transaction recorded Aborted although its row and event were committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_one_phase_killed_before_the_relay_publishes_ends_committed_and_publishes_once(
) {
    with_deadline(
        TEST_DEADLINE,
        one_phase_killed_after_commit("participant::outbox::before_publish"),
    )
    .await;
}

/// Like the test above, killed right after the database commit and before the service
/// reported it to the coordinator (which holds the transaction in its participant's
/// hands): `--recover` reports the commit its one-phase marker remembers, so the
/// coordinator ends it Committed (the relay's kill above may come before or after that
/// report; this one always comes before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_one_phase_killed_before_reporting_the_commit_recover_reports_it() {
    with_deadline(
        TEST_DEADLINE,
        one_phase_killed_after_commit("participant::after_local_commit_before_report"),
    )
    .await;
}

/// The scenario of the two tests above: the service dies at `failpoint`, after its
/// one-phase commit and before its event is published.
async fn one_phase_killed_after_commit(failpoint: &str) {
    let mut w = World::start_with(&[]).await;

    let (tx_id, _) = w.killed_after_commit(failpoint).await;
    let reported_by_the_dead_service = failpoint != "participant::after_local_commit_before_report";
    assert_eq!(w.queue_len().await, 0, "nothing published before the kill");
    // One phase: the commit is still in the dead participant's hands (Preparing), or its
    // answer made it out (Committed); a two-phase commit would be Committing here.
    let r = w.tx(&tx_id).await;
    assert!(
        matches!(
            pb::TxState::try_from(r.state),
            Ok(pb::TxState::Preparing | pb::TxState::Committed)
        ),
        "a one-phase commit: {r:?}"
    );

    let run = w.recover_database_staged().await;
    // The commit is recovered (reported from its marker, and counted) unless the dead
    // service had reported it already (the relay's kill may come after the report).
    let recovered = [
        format!("committed in one phase, not reported {tx_id} {DB_BRANCH}"),
        "recovered 1".to_string(),
    ];
    assert!(
        run.status.success(),
        "--recover failed; stderr:\n{}",
        run.stderr
    );
    if reported_by_the_dead_service && run.stdout[1..] == ["recovered 0".to_string()] {
        // Reported before the kill: nothing left to recover.
    } else {
        assert_eq!(run.stdout[1..], recovered, "stderr:\n{}", run.stderr);
    }

    w.assert_published_once(&tx_id).await;
    assert_eq!(w.prepared_gids().await, Vec::<String>::new());
    // The row and its event are committed: so must the transaction be.
    let r = w.wait_until_finished(&tx_id).await;
    assert_eq!(
        (pb::TxState::try_from(r.state), outcome(&r)),
        (Ok(pb::TxState::Committed), pb::Outcome::Committed),
        "the coordinator's record contradicts the committed row and event: {r:?}"
    );
    w.cleanup().await;
}

/// No crash: the order commits, its event is published once by the relay, and the
/// process leaves nothing behind (no outbox row, no prepared gid, nothing staged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_order_commits_and_publishes_once_without_a_crash() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;

        let run = w
            .service
            .run(&database_staging(&["--place", "o1"]), "")
            .await;
        assert!(
            run.status.success(),
            "--place failed ({:?}); stdout {:?}; stderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        assert_eq!(
            run.stdout[1..],
            ["placed o1 committed".to_string()],
            "stderr:\n{}",
            run.stderr
        );

        assert_eq!(
            w.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1)),
            "the row is committed"
        );
        assert_eq!(
            w.outbox_rows().await,
            0,
            "published and deleted before the exit"
        );
        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "nothing prepared"
        );
        assert_eq!(w.staged().await, 0, "nothing staged in the broker's store");
        let events = w.drain().await;
        assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
        let tx_id = events[0]
            .0
            .strip_suffix(&format!(":{DB_BRANCH}:0"))
            .unwrap_or_else(|| panic!("unexpected message id {:?}", events[0].0))
            .to_string();
        assert_order_created_from_outbox(&events[0], &tx_id);
        let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// A bad outbox flag is refused before anything is touched: non-zero exit, an error that
/// names the flag, no ready line, no data directory, no outbox table, no row, no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_zero_sweep_age_is_refused_before_touching_anything() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = World::start().await;

        let args = database_staging(&["--place", "o1", "--outbox-sweep-after-ms", "0"]);
        let run = w.service.run_unchecked(&args, "").await;
        assert!(
            !run.status.success() && run.status.code().is_some(),
            "a bad flag must make the process exit non-zero, got {:?}; stdout {:?}; stderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains("--outbox-sweep-after-ms"),
            "the error names the flag:\n{}",
            run.stderr
        );
        assert_eq!(
            run.stdout,
            Vec::<String>::new(),
            "not even ready: {:?}",
            run.stdout
        );

        assert!(!w.service.data_dir().exists(), "no data directory created");
        assert!(!w.outbox_table_exists().await, "no outbox table created");
        assert_eq!(w.order_row("o1").await, None, "no row");
        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "nothing prepared"
        );
        assert_eq!(w.drain().await, vec![], "no event");
        w.cleanup().await;
    })
    .await;
}
