//! The order service's world, for the tests that kill `twopc-lab order-service`: a
//! PostgreSQL database with the order schema (in a cluster the test binary shares, or in
//! a private one with its own settings), a RabbitMQ queue, a coordinator process, and
//! runs of the order service on one fixed port and data directory. Every run's stderr is
//! kept in a file and printed (with the private cluster's log) when the test fails.
//!
//! What the world reads from the outside: prepared gids, the order row, the outbox table,
//! the queue, the staging store and the coordinator's view of a transaction.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::Connection;
use twopc_participant::staging::StagingStore;
use twopc_proto::v1 as pb;
use twopc_testkit::amqp::take_all;
use twopc_testkit::requests;
use twopc_testkit::{free_port, unique_name, PgCluster, PgClusterOptions};

use super::{
    clean_command, declare_durable, rabbitmq, read_log, show_logs, wait_for_exit, wait_tx_state,
    wait_view, Coordinator, AMQP_URL,
};

/// The order service's tables, exactly as `twopc-lab order-service` expects them.
pub const ORDER_SCHEMA: &str = include_str!("../../lab/src/order_schema.sql");
/// Branch ids of the order service (`--service orders`).
pub const DB_BRANCH: &str = "orders:orders-db";
pub const EVENTS_BRANCH: &str = "orders:events";

/// Where the world's database lives.
pub enum Postgres<'a> {
    /// A new database in a cluster shared by the test binary.
    Shared(&'static PgCluster),
    /// A private cluster of the world, with these server settings.
    Private(&'a [(&'a str, &'a str)]),
}

/// How a world is made.
pub struct Settings<'a> {
    /// Names the coordinator and prefixes the database's name.
    pub name: &'a str,
    pub postgres: Postgres<'a>,
    /// Coordinator flags after `--prepare-timeout-ms 5000 --commit-wait-ms 1000`.
    pub coordinator_flags: &'a [(&'a str, &'a str)],
    /// The order service's `--timeout-ms`.
    pub service_timeout_ms: u64,
    /// The order service's `--recovery-interval-ms`.
    pub recovery_interval_ms: u64,
    /// How long a run of the order service may take to exit, and a wait for the
    /// coordinator.
    pub wait: Duration,
}

/// A private cluster with `settings` (and a 20 s start budget).
pub async fn private_cluster(settings: &[(&str, &str)]) -> PgCluster {
    PgCluster::start_with(PgClusterOptions {
        settings: settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        start_timeout: Duration::from_secs(20),
        ..PgClusterOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("private PostgreSQL: {e}"))
}

/// One finished run of `twopc-lab order-service`.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Run {
    /// The run exited 0.
    #[track_caller]
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} failed ({:?}); stdout {:?}; stderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }

    /// The run (a `--recover`) listed exactly one branch, as `{prefix}{tx_id} {branch}`,
    /// and ended with `recovered 1`; returns that `tx_id`.
    #[track_caller]
    pub fn recovered_one(&self, prefix: &str, branch: &str) -> String {
        let listed: Vec<&String> = self
            .stdout
            .iter()
            .filter(|l| l.starts_with(prefix))
            .collect();
        assert_eq!(listed.len(), 1, "one {prefix:?} line: {:?}", self.stdout);
        let tx_id = listed[0]
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(&format!(" {branch}")))
            .unwrap_or_else(|| panic!("unexpected line {:?}", listed[0]))
            .to_string();
        assert_eq!(self.stdout.last().map(String::as_str), Some("recovered 1"));
        tx_id
    }

    /// The run died of SIGABRT at `failpoint` (its stderr says so); no outcome line
    /// (`placed ...`) was printed.
    #[track_caller]
    pub fn assert_aborted_by_failpoint(&self, failpoint: &str) {
        self.assert_died_at(failpoint);
        assert!(
            !self.stdout.iter().any(|l| l.starts_with("placed ")),
            "no outcome can be printed by a killed process: {:?}",
            self.stdout
        );
    }

    /// The run died of SIGABRT at `failpoint` (its stderr says so).
    #[track_caller]
    pub fn assert_died_at(&self, failpoint: &str) {
        assert_eq!(
            self.status.signal(),
            Some(libc::SIGABRT),
            "the order service should die of SIGABRT at {failpoint}, got {:?}; stdout {:?} (if \
             it exited normally: was target/debug/twopc-lab relinked without --features \
             failpoints by a concurrent cargo run?); stderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr
                .contains(&format!("failpoint {failpoint} hit: aborting the process")),
            "stderr does not show {failpoint}:\n{}",
            self.stderr
        );
    }
}

/// The cluster of a world's database.
enum Cluster {
    Shared(&'static PgCluster),
    Private(Box<PgCluster>),
}

impl Cluster {
    fn get(&self) -> &PgCluster {
        match self {
            Cluster::Shared(c) => c,
            Cluster::Private(c) => c,
        }
    }
}

/// See the module docs.
pub struct OrderWorld {
    pub coord: Coordinator,
    pub db: tokio_postgres::Client,
    db_url: String,
    amqp: Connection,
    channel: lapin::Channel,
    pub queue: String,
    root: tempfile::TempDir,
    port: u16,
    service_timeout_ms: String,
    recovery_interval_ms: String,
    wait: Duration,
    /// stderr of every order-service run, in order.
    logs: Vec<PathBuf>,
    cluster: Cluster,
}

impl OrderWorld {
    /// A new database with the order schema and customer `alice`, a coordinator, a queue,
    /// and a port and data directory for the order service.
    pub async fn start(settings: Settings<'_>) -> OrderWorld {
        let cluster = match settings.postgres {
            Postgres::Shared(c) => Cluster::Shared(c),
            Postgres::Private(pg) => Cluster::Private(Box::new(private_cluster(pg).await)),
        };
        let db_name = unique_name(&format!("orders_{}", settings.name));
        cluster
            .get()
            .create_database(&db_name)
            .await
            .unwrap_or_else(|e| panic!("create database {db_name}: {e}"));
        let db = cluster
            .get()
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
        flags.extend_from_slice(settings.coordinator_flags);
        let coord = Coordinator::start_named(settings.name, "", &flags).await;
        let (amqp, channel) = rabbitmq().await;
        OrderWorld {
            coord,
            db,
            db_url: cluster.get().url(&db_name),
            amqp,
            channel,
            queue: unique_name("twopc_orders"),
            root: tempfile::Builder::new()
                .prefix("twopc-order-service-")
                .tempdir()
                .expect("create temp dir"),
            port: free_port(),
            service_timeout_ms: settings.service_timeout_ms.to_string(),
            recovery_interval_ms: settings.recovery_interval_ms.to_string(),
            wait: settings.wait,
            logs: Vec::new(),
            cluster,
        }
    }

    /// The order service's data directory (the same for every run).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn listen(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `twopc-lab order-service ARGS` with `FAILPOINTS=failpoints`, on the world's fixed
    /// port and data directory, its stderr going to a new log file (returned).
    fn command(&mut self, args: &[&str], failpoints: &str) -> (Command, PathBuf) {
        let log_path = self
            .root
            .path()
            .join(format!("order-service-{}.stderr.log", self.logs.len() + 1));
        let log = File::create(&log_path).expect("create log file");
        self.logs.push(log_path.clone());
        let mut cmd = clean_command(env!("CARGO_BIN_EXE_twopc-lab"), failpoints);
        cmd.env("RUST_LOG", "info,twopc_participant=debug")
            .arg("order-service")
            .args(["--coordinator", &self.coord.url()])
            .args(["--listen", &self.listen()])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--postgres-url", &self.db_url])
            .args(["--amqp-url", AMQP_URL])
            .args(["--queue", &self.queue])
            .args(["--service", "orders"])
            .args(["--timeout-ms", &self.service_timeout_ms])
            .args(["--recovery-interval-ms", &self.recovery_interval_ms])
            .args(args)
            .stderr(Stdio::from(log));
        (cmd, log_path)
    }

    /// Starts `twopc-lab order-service ARGS` serving (no `--place`, no `--recover`) until
    /// the returned process is stopped.
    pub fn serve(&mut self, args: &[&str]) -> Child {
        let (mut cmd, _) = self.command(args, "");
        cmd.stdout(Stdio::null())
            .spawn()
            .expect("spawn twopc-lab order-service")
    }

    /// Runs `twopc-lab order-service ARGS` with `FAILPOINTS=failpoints` (none if empty)
    /// until it exits on its own (bounded), and checks that it announced itself on its
    /// fixed port.
    pub async fn run(&mut self, args: &[&str], failpoints: &str) -> Run {
        let run = self.run_unchecked(args, failpoints).await;
        assert_eq!(
            run.stdout.first().map(String::as_str),
            Some(format!("order-service ready on {}", self.listen()).as_str()),
            "first stdout line of twopc-lab order-service {args:?} (status {:?}); stdout {:?}; \
             stderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        run
    }

    /// [`OrderWorld::run`] without the check of the ready line (for runs that must fail
    /// before they get that far).
    pub async fn run_unchecked(&mut self, args: &[&str], failpoints: &str) -> Run {
        let (mut cmd, log_path) = self.command(args, failpoints);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn twopc-lab order-service");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let what = format!("twopc-lab order-service {args:?}");
        let status = wait_for_exit(&mut child, self.wait, &what, || {
            let lines: Vec<String> = rx.try_iter().collect();
            format!("stdout {lines:?}; stderr:\n{}", read_log(&log_path))
        })
        .await;
        let _ = reader.join();
        Run {
            status,
            stdout: rx.try_iter().collect(),
            stderr: read_log(&log_path),
        }
    }

    /// Gids prepared in the world's database.
    pub async fn prepared_gids(&self) -> Vec<String> {
        prepared_gids(&self.db).await
    }

    /// The transaction id of the order's one prepared database branch.
    pub async fn prepared_tx(&self) -> String {
        let gids = self.prepared_gids().await;
        assert_eq!(gids.len(), 1, "one prepared gid expected: {gids:?}");
        tx_of_gid(&gids[0])
    }

    /// The order row `id`: customer, item, quantity.
    pub async fn order_row(&self, id: &str) -> Option<(String, String, i32)> {
        self.db
            .query_opt(
                "SELECT customer, item, quantity FROM orders WHERE id = $1",
                &[&id],
            )
            .await
            .expect("select order")
            .map(|r| (r.get(0), r.get(1), r.get(2)))
    }

    /// Whether the order service created the outbox table in the world's database.
    pub async fn outbox_table_exists(&self) -> bool {
        self.value("SELECT to_regclass('twopc_outbox') IS NOT NULL")
            .await
    }

    /// The committed rows of the outbox table, as `(gid, message id)`, oldest first.
    pub async fn outbox(&self) -> Vec<(String, String)> {
        self.db
            .query("SELECT gid, message_id FROM twopc_outbox ORDER BY id", &[])
            .await
            .expect("select twopc_outbox")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// How many committed rows the outbox table holds.
    pub async fn outbox_rows(&self) -> i64 {
        self.value("SELECT count(*) FROM twopc_outbox").await
    }

    /// The one value `sql` selects in the world's database.
    async fn value<T>(&self, sql: &str) -> T
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.db.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// Declares the queue (durable, as the SDK does) and returns how many messages it
    /// holds.
    pub async fn queue_len(&self) -> u32 {
        declare_durable(&self.channel, &self.queue).await
    }

    /// Takes every message in the queue, as `(message id, payload)`.
    pub async fn drain(&self) -> Vec<(String, Vec<u8>)> {
        self.queue_len().await;
        take_all(&self.channel, &self.queue)
            .await
            .expect("basic.get")
            .into_iter()
            .map(|m| (m.message_id, m.payload))
            .collect()
    }

    /// Staged batches in the order service's data directory, as `(tx id, branch id)`
    /// (only while no order-service process runs: the store is exclusively locked).
    pub async fn staged(&self) -> Vec<(String, String)> {
        let dir = self.data_dir();
        tokio::task::spawn_blocking(move || {
            StagingStore::open(&dir)
                .and_then(|s| s.list())
                .unwrap_or_else(|e| panic!("the staging store in {}: {e}", dir.display()))
        })
        .await
        .expect("staging task")
    }

    /// The coordinator's view of `tx_id`.
    pub async fn tx(&self, tx_id: &str) -> pb::GetTransactionResponse {
        self.coord
            .client()
            .await
            .get_transaction(requests::get(tx_id))
            .await
            .unwrap_or_else(|s| panic!("GetTransaction {tx_id}: {s:?}"))
            .into_inner()
    }

    /// Waits until the coordinator's view of `tx_id` satisfies `cond` (described by
    /// `what`); returns that view.
    pub async fn wait_for(
        &self,
        tx_id: &str,
        what: &str,
        cond: impl Fn(&pb::GetTransactionResponse) -> bool,
    ) -> pb::GetTransactionResponse {
        let client = self.coord.client().await;
        wait_view(&client, self.wait, tx_id, what, cond).await
    }

    /// Waits until the coordinator reports `state` for `tx_id`.
    pub async fn wait_for_state(
        &self,
        tx_id: &str,
        state: pb::TxState,
    ) -> pb::GetTransactionResponse {
        let client = self.coord.client().await;
        wait_tx_state(&client, self.wait, tx_id, state).await
    }

    /// Nothing of order `id` is left: no prepared gid (other than `kept`), no row, no
    /// event in the queue, nothing staged.
    pub async fn assert_nothing_left(&self, id: &str, kept: &[String]) {
        assert_eq!(self.prepared_gids().await, kept, "no prepared gid of {id}");
        assert_eq!(self.order_row(id).await, None, "no row");
        assert_eq!(self.drain().await, vec![], "no event");
        assert_eq!(self.staged().await, vec![], "nothing staged");
    }

    /// Deletes the queue and closes the broker connection.
    pub async fn cleanup(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.amqp.close(200, "test done".into()).await;
    }
}

impl Drop for OrderWorld {
    fn drop(&mut self) {
        if show_logs() {
            for (i, p) in self.logs.iter().enumerate() {
                eprintln!(
                    "----- order-service run #{} ({}) -----\n{}",
                    i + 1,
                    p.display(),
                    read_log(p)
                );
            }
            if let Cluster::Private(c) = &self.cluster {
                eprintln!("----- postgres log -----\n{}", c.log_tail(8_000));
            }
        }
    }
}

/// Gids prepared in `db`'s database, sorted.
pub async fn prepared_gids(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
        &[],
    )
    .await
    .expect("pg_prepared_xacts")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The transaction id in the gid `twopc:<tx_id>:<DB_BRANCH>` of the database branch.
#[track_caller]
pub fn tx_of_gid(gid: &str) -> String {
    gid.strip_prefix("twopc:")
        .and_then(|rest| rest.strip_suffix(&format!(":{DB_BRANCH}")))
        .unwrap_or_else(|| panic!("unexpected gid {gid:?}"))
        .to_string()
}
