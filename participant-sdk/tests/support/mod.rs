//! Set-up shared by the participant SDK's integration tests (`brokers`, `client_deadline`,
//! `conformance`, `outbox`, `postgres`, `propagation`; each includes it with `mod support;`):
//!
//! * bounds and polling: [`bounded`], [`timed`], [`eventually`] (each test binary passes
//!   its own limits, so their values stay with the tests);
//! * an in-process [`Coordinator`] (with [`quick_retries`]), participant SDK handles
//!   ([`sdk`], [`sdk_of`]) and a [`Rig`] of the three with a staging store;
//! * PostgreSQL: the binary's private cluster ([`cluster`]), fresh databases
//!   ([`database`]), test-side queries ([`connect`], [`count`], [`prepared_gids`]), the
//!   [`resource`] over a database, a statement in a transaction's branch ([`execute_in`])
//!   and a participant that crashes after prepare ([`CrashesAfterPrepare`],
//!   [`crashing_a_beside_b`]);
//! * brokers: staging stores ([`staging`], [`reopen_staging`]), the RabbitMQ consumer side
//!   ([`RabbitProbe`], [`ids_and_payloads`]), a NATS resource on its own stream
//!   ([`nats_on`]) and the NATS JetStream consumer side ([`stream_messages`],
//!   [`delete_stream`]);
//! * [`conformance`]: the suite every [`Resource`] adapter runs (the `conformance` test
//!   binary stamps its checks for each adapter).
//!
//! The real services are the ones the tests name: the system RabbitMQ at
//! [`RABBIT_URL`], the system NATS at [`NATS_URL`] and a private PostgreSQL cluster
//! started by the test binary itself (testkit [`PgCluster`]).

// Every test binary compiles its own copy of this module and uses only part of it; what
// one binary leaves unused would be a dead-code warning there (an error under
// `clippy -D warnings`).
#![allow(dead_code)]

pub mod conformance;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::server::run;
use twopc_participant::{
    AbortOutcome, NatsResource, OnePhase, PgBranch, PgResource, RabbitResource, Resource, Retry,
    StagingError, StagingStore, Transaction, TwoPc, Vote,
};
use twopc_proto::v1 as pb;
use twopc_testkit::requests;
use twopc_testkit::{unique_name, PgCluster};

/// The system RabbitMQ (guest/guest, default vhost).
pub const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The system NATS server (with JetStream).
pub const NATS_URL: &str = "nats://127.0.0.1:4222";

// ---------------------------------------------------------------------------------------
// Bounds and polling
// ---------------------------------------------------------------------------------------

/// Runs a test body; panics if it takes longer than `limit`.
pub async fn bounded<F: Future<Output = ()>>(limit: Duration, body: F) {
    if tokio::time::timeout(limit, body).await.is_err() {
        panic!("test did not finish within {limit:?}");
    }
}

/// Awaits `fut` for at most `limit`; panics naming `what` when it takes longer.
pub async fn timed<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not answer within {limit:?}"),
    }
}

pub use twopc_testkit::wait::{eventually, Wait};

// ---------------------------------------------------------------------------------------
// Coordinator and SDK
// ---------------------------------------------------------------------------------------

/// An in-process coordinator on 127.0.0.1:0 with its own (temporary) data directory.
/// Stopped by [`Coordinator::stop`], or signalled to stop when dropped.
pub struct Coordinator {
    /// Its gRPC URL, `http://127.0.0.1:<port>`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts a coordinator with the settings of `cfg`; its `listen` address and
    /// `data_dir` are replaced by the bound port and a fresh temporary directory.
    pub async fn start(cfg: ServeConfig) -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind coordinator");
        let addr = listener.local_addr().expect("local addr");
        let cfg = ServeConfig {
            listen: addr,
            data_dir: dir.path().join("coordinator"),
            ..cfg
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = run(cfg, listener, async move {
                let _ = stopped.await;
            })
            .await
            {
                panic!("coordinator failed: {e}");
            }
        });
        Coordinator {
            url: format!("http://{addr}"),
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the coordinator and waits (up to 10 s) for it to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Coordinator settings with quick phase-two retries (20 ms doubling to 300 ms) and a
/// 500 ms connect timeout; each test binary adds what it needs.
pub fn quick_retries() -> ServeConfig {
    ServeConfig {
        retry_initial_ms: 20,
        retry_max_ms: 300,
        connect_timeout_ms: 500,
        ..Default::default()
    }
}

/// A participant SDK handle of service `service` on `coord`, with no data directory and
/// recovery only when asked (every hour); `commit_wait` if given.
pub async fn sdk_of(coord: &Coordinator, service: &str, commit_wait: Option<Duration>) -> TwoPc {
    let mut b = TwoPc::builder(coord.url.clone())
        .service(service)
        .recovery_interval(Duration::from_secs(3600));
    if let Some(w) = commit_wait {
        b = b.commit_wait(w);
    }
    b.start().await.expect("start the SDK")
}

/// A participant SDK handle of service "svc" (recovery only when asked).
pub async fn sdk(coord: &Coordinator, commit_wait: Duration) -> TwoPc {
    sdk_of(coord, "svc", Some(commit_wait)).await
}

/// The set-up most broker tests share: a coordinator, a staging store in a temporary
/// directory and an SDK handle of service "svc" on the coordinator.
///
/// The fields are declared in the reverse order of their creation, so that they are
/// dropped as the locals of a test would be.
pub struct Rig {
    pub sdk: TwoPc,
    pub store: Arc<StagingStore>,
    pub dir: tempfile::TempDir,
    pub coord: Coordinator,
}

impl Rig {
    /// Starts an SDK handle (with `commit_wait`) on `coord`, staging in a fresh directory.
    pub async fn start(coord: Coordinator, commit_wait: Duration) -> Rig {
        Rig::start_with(coord, commit_wait, staging).await
    }

    /// [`Rig::start`] with the staging store that `open` opens in the fresh directory.
    pub async fn start_with(
        coord: Coordinator,
        commit_wait: Duration,
        open: impl FnOnce(&Path) -> Arc<StagingStore>,
    ) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path());
        let sdk = sdk(&coord, commit_wait).await;
        Rig {
            sdk,
            store,
            dir,
            coord,
        }
    }

    /// A RabbitMQ resource named `name` at `url`, staging in the rig's store and
    /// registered with its SDK.
    pub async fn register_rabbit(&self, name: &str, url: &str) -> Arc<RabbitResource> {
        let rabbit = RabbitResource::connect(name, url, self.store.clone())
            .await
            .expect("connect to RabbitMQ");
        self.sdk
            .register(Arc::new(rabbit))
            .expect("register rabbit")
    }

    /// [`nats_on`] `stream`, staging in the rig's store and registered with its SDK.
    pub async fn register_nats(&self, stream: &str) -> Arc<NatsResource> {
        let nats = nats_on(stream, &self.store).await;
        self.sdk.register(Arc::new(nats)).expect("register nats")
    }

    /// Shuts the SDK down and stops the coordinator.
    pub async fn stop(self) {
        self.sdk.shutdown().await;
        self.coord.stop().await;
    }
}

/// The coordinator's view of `tx_id` (`GetTransaction`).
pub async fn get_tx(sdk: &TwoPc, tx_id: &str) -> pb::GetTransactionResponse {
    sdk.coordinator()
        .get_transaction(requests::get(tx_id))
        .await
        .expect("GetTransaction")
        .into_inner()
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/// The `orders` table most PostgreSQL tests work on.
pub const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, item text NOT NULL)";

/// Bound of a test-side connection made by [`connect`] (and so [`count`] and
/// [`prepared_gids`]).
pub const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();

/// The binary's shared private cluster (started on first use; its watchdog cleans it up
/// when the test process exits).
pub fn cluster() -> &'static PgCluster {
    match CLUSTER.get_or_init(|| PgCluster::start_blocking().map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(e) => panic!("cannot start a private PostgreSQL cluster: {e}"),
    }
}

/// A fresh database (named uniquely after `prefix`) on `pg` with `setup` run in it
/// (unless empty); returns its URL.
pub async fn database_on(pg: &PgCluster, prefix: &str, setup: &str) -> String {
    let name = unique_name(prefix);
    pg.create_database(&name).await.expect("create database");
    if !setup.is_empty() {
        let c = pg.connect(&name).await.expect("connect");
        c.batch_execute(setup).await.expect("set-up SQL");
    }
    pg.url(&name)
}

/// A fresh database on the binary's [`cluster`]; see [`database_on`].
pub async fn database(prefix: &str, setup: &str) -> String {
    database_on(cluster(), prefix, setup).await
}

/// A test-side connection to `url` (checks and writes outside any branch), bounded by
/// `limit`.
pub async fn connect_within(limit: Duration, url: &str) -> tokio_postgres::Client {
    let (client, conn) = timed(
        limit,
        "connecting to PostgreSQL",
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// [`connect_within`] [`PG_CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> tokio_postgres::Client {
    connect_within(PG_CONNECT_TIMEOUT, url).await
}

/// The single `bigint` that `sql` (a `SELECT count(*) ...`) returns, on a new
/// connection bounded by `limit`.
pub async fn count_within(limit: Duration, url: &str, sql: &str) -> i64 {
    connect_within(limit, url)
        .await
        .query_one(sql, &[])
        .await
        .expect("count query")
        .get(0)
}

/// [`count_within`] [`PG_CONNECT_TIMEOUT`].
pub async fn count(url: &str, sql: &str) -> i64 {
    count_within(PG_CONNECT_TIMEOUT, url, sql).await
}

/// Counts the sessions holding an open transaction block in the database (an open
/// branch: `BEGIN` sent, `COMMIT` not yet). The outbox sweep's own short block (its
/// `FOR UPDATE SKIP LOCKED` select, then the `DELETE` of what it published) is not
/// counted: it opens and closes on the sweep's schedule, not the branch's.
pub const OPEN_TRANSACTIONS_SQL: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND state LIKE 'idle in transaction%' \
     AND query NOT LIKE '%FOR UPDATE SKIP LOCKED%' \
     AND query NOT LIKE 'DELETE FROM twopc\\_outbox WHERE id = ANY%'";

/// Counts the prepared transactions (of any kind) left in the database.
pub const PREPARED_GIDS_SQL: &str =
    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()";

/// Prepared transactions of any kind left in the database at `url`.
pub async fn prepared_gids(url: &str) -> i64 {
    count(url, PREPARED_GIDS_SQL).await
}

/// A [`PgResource`] called `name` over `url` (a pool of 4 connections).
pub async fn resource(name: &str, url: &str) -> Arc<PgResource> {
    PgResource::from_url(name, url, 4)
        .await
        .expect("PgResource")
}

/// Opens the branch of `tx` on `pg` and runs `sql` in it; returns the branch.
pub async fn execute_in(tx: &Transaction, pg: &PgResource, sql: &str) -> PgBranch {
    let branch = tx.postgres(pg).await.expect("branch");
    branch.execute(sql, &[]).await.expect("statement in branch");
    branch
}

/// Registers with `sdk` the resource `a` wrapped as a participant that crashes after
/// prepare ([`CrashesAfterPrepare`]) and a resource "db-b" over `url_b`; returns the
/// latter.
pub async fn crashing_a_beside_b(sdk: &TwoPc, a: &Arc<PgResource>, url_b: &str) -> Arc<PgResource> {
    sdk.register(Arc::new(CrashesAfterPrepare(a.clone())))
        .expect("register crashing a");
    sdk.register(resource("db-b", url_b).await)
        .expect("register b")
}

/// A stand-in for a participant that prepares and then "crashes": it votes through the
/// real resource, but never finishes phase two and reports nothing in doubt.
pub struct CrashesAfterPrepare(pub Arc<PgResource>);

#[tonic::async_trait]
impl Resource for CrashesAfterPrepare {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn kind(&self) -> pb::BranchKind {
        self.0.kind()
    }
    async fn prepare(&self, tx_id: &str, branch_id: &str) -> Vote {
        self.0.prepare(tx_id, branch_id).await
    }
    async fn commit(&self, _: &str, _: &str) -> Result<(), Retry> {
        Err(Retry("participant crashed before phase two".into()))
    }
    async fn commit_one_phase(&self, _: &str, _: &str) -> Result<OnePhase, Retry> {
        Err(Retry("participant crashed before phase two".into()))
    }
    async fn abort(&self, _: &str, _: &str) -> Result<AbortOutcome, Retry> {
        Err(Retry("participant crashed before phase two".into()))
    }
    async fn in_doubt(&self) -> Result<Vec<(String, String)>, Retry> {
        Ok(Vec::new())
    }
}

// ---------------------------------------------------------------------------------------
// Brokers: staging and the RabbitMQ consumer side
// ---------------------------------------------------------------------------------------

/// Opens the staging store in `dir`.
pub fn staging(dir: &Path) -> Arc<StagingStore> {
    Arc::new(StagingStore::open(dir).expect("open the staging store"))
}

/// Opens the store in `dir` again, as a restarted process would, waiting (at most `limit`)
/// while an earlier open of it is still being dropped.
pub async fn reopen_staging(dir: &Path, limit: Duration) -> Arc<StagingStore> {
    let deadline = Instant::now() + limit;
    loop {
        match StagingStore::open(dir) {
            Ok(s) => return Arc::new(s),
            Err(StagingError::Locked { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen the staging store: {e}"),
        }
    }
}

/// One message as found in a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    /// The `message_id` property (empty if unset).
    pub message_id: String,
    /// The body.
    pub payload: Vec<u8>,
    /// Whether it was published persistent (delivery mode 2).
    pub persistent: bool,
    /// The `content_type` property.
    pub content_type: Option<String>,
    /// The headers; string values as such, others in their `Debug` form.
    pub headers: Vec<(String, String)>,
}

/// `(message_id, payload)` of each message of `got`, in order.
pub fn ids_and_payloads(got: Vec<Got>) -> Vec<(String, Vec<u8>)> {
    got.into_iter().map(|g| (g.message_id, g.payload)).collect()
}

/// A test-side RabbitMQ connection that declares, drains and deletes queues directly.
pub struct RabbitProbe {
    _conn: Connection,
    ch: Channel,
    /// Bound of connecting and of each `basic.get`, if any.
    limit: Option<Duration>,
}

impl RabbitProbe {
    /// Connects to [`RABBIT_URL`]; its operations are bounded only by the test's.
    pub async fn new() -> RabbitProbe {
        RabbitProbe::connect(None).await
    }

    /// Connects to [`RABBIT_URL`]; connecting and each `basic.get` are bounded by `limit`.
    pub async fn bounded(limit: Duration) -> RabbitProbe {
        RabbitProbe::connect(Some(limit)).await
    }

    async fn connect(limit: Option<Duration>) -> RabbitProbe {
        let conn = bound(
            limit,
            "connecting to RabbitMQ",
            Connection::connect(RABBIT_URL, ConnectionProperties::default()),
        )
        .await
        .expect("connect to RabbitMQ at 127.0.0.1:5672");
        let ch = conn.create_channel().await.expect("channel");
        RabbitProbe {
            _conn: conn,
            ch,
            limit,
        }
    }

    /// Declares `queue` durable (as the resource does), so it can be drained (or
    /// counted) even when nothing was ever published to it.
    pub async fn declare(&self, queue: &str) {
        twopc_testkit::amqp::declare_durable(&self.ch, queue)
            .await
            .expect("declare queue");
    }

    /// Takes every message currently in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut out = Vec::new();
        while let Some(m) = bound(
            self.limit,
            "basic.get",
            self.ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        {
            let p = &m.delivery.properties;
            let headers = p
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                AMQPValue::LongString(s) => s.to_string(),
                                other => format!("{other:?}"),
                            };
                            (k.to_string(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Got {
                message_id: p
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                payload: m.delivery.data.clone(),
                persistent: *p.delivery_mode() == Some(2),
                content_type: p.content_type().as_ref().map(|s| s.to_string()),
                headers,
            });
        }
        out
    }

    /// Deletes `queue` (errors ignored: clean-up only).
    pub async fn delete(&self, queue: &str) {
        let _ = self
            .ch
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
}

/// [`timed`] when there is a `limit`, a plain await otherwise.
async fn bound<T>(limit: Option<Duration>, what: &str, fut: impl Future<Output = T>) -> T {
    match limit {
        Some(limit) => timed(limit, what, fut).await,
        None => fut.await,
    }
}

// ---------------------------------------------------------------------------------------
// Brokers: the NATS JetStream consumer side
// ---------------------------------------------------------------------------------------

/// One message as stored in a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The subject it was published to.
    pub subject: String,
    /// Its `Nats-Msg-Id` header (empty if unset).
    pub message_id: String,
    /// The body.
    pub payload: Vec<u8>,
    /// Its `kind` header.
    pub kind_header: Option<String>,
    /// Its `Content-Type` header.
    pub content_type: Option<String>,
}

/// A JetStream context on the NATS server at `url`.
pub async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    async_nats::jetstream::new(client)
}

/// Every message in `stream` of the NATS server at `url`, in sequence order.
pub async fn stream_messages(url: &str, stream: &str) -> Vec<Stored> {
    let js = jetstream(url).await;
    let mut s = js.get_stream(stream).await.expect("get stream");
    let state = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if state.messages > 0 {
        for seq in state.first_sequence..=state.last_sequence {
            let m = s.get_raw_message(seq).await.expect("get message");
            let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
            out.push(Stored {
                subject: m.subject.to_string(),
                message_id: header("Nats-Msg-Id").unwrap_or_default(),
                payload: m.payload.to_vec(),
                kind_header: header("kind"),
                content_type: header("Content-Type"),
            });
        }
    }
    out
}

/// A NATS resource named "nats" on the system server ([`NATS_URL`]) with its own `stream`
/// (subjects `<stream>.>`, created if missing), staging in `store`.
pub async fn nats_on(stream: &str, store: &Arc<StagingStore>) -> NatsResource {
    NatsResource::connect(
        "nats",
        NATS_URL,
        stream.to_string(),
        vec![format!("{stream}.>")],
        store.clone(),
    )
    .await
    .expect("connect to NATS")
}

/// Deletes `stream` of the NATS server at `url` (errors ignored: clean-up only).
pub async fn delete_stream(url: &str, stream: &str) {
    if let Ok(client) = async_nats::connect(url).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(stream)
            .await;
    }
}
