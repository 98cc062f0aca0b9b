//! The database-staged outbox ([`twopc_participant::outbox`]): messages published with
//! `PgBranch::publish` / `publish_with` are rows of `twopc_outbox`, written inside the
//! PostgreSQL branch's transaction, and reach the broker only once that branch commits.
//!
//! Everything is real: a private PostgreSQL cluster with prepared transactions (testkit
//! [`PgCluster`], one per test binary, a fresh database per test), RabbitMQ at
//! 127.0.0.1:5672 (a unique queue per test), NATS JetStream at 127.0.0.1:4222 (a unique
//! stream per test) and an in-process coordinator (one per test, `one_phase` on).
//!
//! Covered:
//! * one-phase commit of a transaction whose only branch is the PostgreSQL branch, over
//!   RabbitMQ and over NATS: the messages arrive once, in order, with the message ids
//!   `<tx>:<branch>:<index>`, payloads, headers and content type; no broker branch is
//!   enlisted; the coordinator saw one branch; the table is emptied;
//! * abort and a failed statement: nothing is published, by the relay or by later sweeps;
//! * two-phase commit with a second database or a broker branch: the outbox rows ride in
//!   the prepared transaction and are published exactly once after `COMMIT PREPARED`;
//! * recovery after a participant "crash" with a prepared branch: its rows are not
//!   published while prepared, and are swept at once when recovery commits the gid;
//! * rows a crashed process left behind are published by the sweep of a new resource
//!   with their stored ids and deleted; rows of a broker not attached here are left alone;
//! * a message the broker refuses stays in the table (counted by `outbox_backlog`) and is
//!   published by a later sweep once the broker accepts it;
//! * the sweep takes only rows older than `sweep_after` (and at once when a broker is
//!   attached);
//! * usage errors (broker not attached, conflicting or zero options, publishing in a
//!   finished branch) leave no row behind.
//!
//! * an abort says whether the branch had committed in one phase (also after a
//!   "restart", from the commit's marker, and through the participant server); a
//!   transaction committed by its owner loses its marker once a `Barrier` confirmed it.
//!
//! * the publish window: within it a commit answers before its message is published,
//!   beyond it only once its message was confirmed, waiting at most `publish_wait`;
//!
//! * a message rolled back to a savepoint is not published; a statement cancelled by
//!   the application (its future dropped) makes the one-phase commit check the block;
//!   an unreadable row does not hold back the sweep of the rows after it.
//!
//! Every test runs under an overall timeout ([`bounded`]); waits are bounded polls
//! ([`eventually`]). "Nothing arrives" is checked after a sweep is *proven* to have run
//! (a control row committed later is published), not just after a sleep.
//!
//! [`PgCluster`]: twopc_testkit::PgCluster

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use twopc_coordinator::config::ServeConfig;
use twopc_participant::{
    AbortOutcome, Broker, BrokerOptions, Error, NatsResource, OnePhase, OutboxOptions, PgBranch,
    PgResource, PublishOptions, RabbitResource, Resource, StagingStore, Transaction, TwoPc, Vote,
};
use twopc_proto::v1 as pb;
use twopc_proto::v1::participant_client::ParticipantClient;
use twopc_proto::v1::participant_exchange_client::ParticipantExchangeClient;
use twopc_testkit::unique_name;

mod support;
use support::{
    bounded, connect, count, crashing_a_beside_b, database, delete_stream, eventually, execute_in,
    get_tx, ids_and_payloads, jetstream, prepared_gids, quick_retries, resource, sdk, staging,
    stream_messages, Coordinator, Got, RabbitProbe, Rig, Stored, Wait, NATS_URL, ORDERS,
    RABBIT_URL,
};

/// Overall bound of one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of one wait for a condition, polled every 25 ms.
const WAIT: Wait = Wait {
    limit: Duration::from_secs(20),
    every: Duration::from_millis(25),
};
/// Options under which only the relay (never the periodic sweep) can publish during a
/// test.
fn slow_sweep() -> OutboxOptions {
    sweep(Duration::from_secs(3600), Duration::from_secs(3600))
}

/// Options under which the sweep runs every 100 ms and takes rows 100 ms old.
fn fast_sweep() -> OutboxOptions {
    sweep(Duration::from_millis(100), Duration::from_millis(100))
}

fn sweep(sweep_interval: Duration, sweep_after: Duration) -> OutboxOptions {
    OutboxOptions {
        sweep_interval,
        sweep_after,
        ..OutboxOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// Checks `check` every 25 ms for `period`; panics as soon as it does not hold.
async fn stays<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + period;
    while Instant::now() < end {
        assert!(check().await, "no longer true: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The one-phase markers (not fences) in the database at `url`.
async fn unfenced_markers(url: &str) -> i64 {
    count(url, "SELECT count(*) FROM twopc_one_phase WHERE NOT fenced").await
}

async fn outbox_rows(url: &str) -> i64 {
    count(url, "SELECT count(*) FROM twopc_outbox").await
}

/// Commits an outbox row with plain SQL, as an earlier process would have left it.
#[allow(clippy::too_many_arguments)]
async fn insert_row(
    url: &str,
    broker: &str,
    gid: &str,
    message_id: &str,
    destination: &str,
    payload: &[u8],
    headers: Option<&str>,
    content_type: Option<&str>,
) {
    connect(url)
        .await
        .execute(
            "INSERT INTO twopc_outbox \
             (broker, gid, message_id, destination, payload, headers, content_type) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &broker,
                &gid,
                &message_id,
                &destination,
                &payload,
                &headers,
                &content_type,
            ],
        )
        .await
        .expect("insert an outbox row by hand");
}

/// Coordinator settings with quick phase-two retries and one-phase commit on.
fn one_phase_on() -> ServeConfig {
    ServeConfig {
        one_phase: true,
        ..quick_retries()
    }
}

/// An in-process coordinator with quick phase-two retries and one-phase commit on.
async fn coordinator() -> Coordinator {
    Coordinator::start(one_phase_on()).await
}

/// A [`Rig`] on a [`coordinator`], its SDK handle waiting 5 s for commits.
async fn rig() -> Rig {
    Rig::start(coordinator().await, Duration::from_secs(5)).await
}

/// An SDK handle on `coord` and a fresh database (named after `prefix`, with the
/// `orders` table) registered with it as "db": the handle, the URL and the resource.
async fn handle_and_db(coord: &Coordinator, prefix: &str) -> (TwoPc, String, Arc<PgResource>) {
    let sdk = sdk(coord, Duration::from_secs(5)).await;
    let url = database(prefix, ORDERS).await;
    let db = sdk.register(resource("db", &url).await).expect("register");
    (sdk, url, db)
}

/// Two fresh databases with the `orders` table, named after `prefix`: their URLs.
async fn two_order_databases(prefix: &str) -> (String, String) {
    (
        database(&format!("{prefix}a"), ORDERS).await,
        database(&format!("{prefix}b"), ORDERS).await,
    )
}

/// A probe and a queue (named after `prefix`) declared through it.
async fn probe_and_queue(prefix: &str) -> (RabbitProbe, String) {
    let queue = unique_name(prefix);
    let probe = RabbitProbe::new().await;
    probe.declare(&queue).await;
    (probe, queue)
}

/// `(branch_id, kind)` of every branch the coordinator holds for `tx_id`.
async fn coordinator_branches(sdk: &TwoPc, tx_id: &str) -> Vec<(String, i32)> {
    get_tx(sdk, tx_id)
        .await
        .branches
        .into_iter()
        .map(|b| {
            let b = b.branch.expect("branch");
            (b.branch_id, b.kind)
        })
        .collect()
}

/// Generous publish timeout: a confirmation slower than this leaves the row to the sweep
/// (and the message possibly published twice), which a loaded machine must not cause.
fn broker_options() -> BrokerOptions {
    BrokerOptions {
        publish_timeout: Duration::from_secs(15),
        ..BrokerOptions::default()
    }
}

/// A RabbitMQ resource named `name` (with [`broker_options`]), staging in `store`.
async fn rabbit(name: &str, store: Arc<StagingStore>) -> Arc<RabbitResource> {
    Arc::new(
        RabbitResource::connect(name, RABBIT_URL, store)
            .await
            .expect("connect to RabbitMQ")
            .with_options(broker_options()),
    )
}

/// A NATS resource named "nats" (with [`broker_options`]) on `stream` of the system
/// server, configured for the subjects `<stream>.>`, staging in `store`.
async fn nats(stream: &str, store: Arc<StagingStore>) -> Arc<NatsResource> {
    let nats = NatsResource::connect(
        "nats",
        NATS_URL,
        stream.to_string(),
        vec![format!("{stream}.>")],
        store,
    )
    .await
    .expect("connect to NATS");
    Arc::new(nats.with_options(broker_options()))
}

/// A fresh database (named after `prefix`) and a RabbitMQ resource "rabbit" staging in
/// `dir`, as an earlier process left them: its resource "db" created the outbox table
/// (its sweep takes rows an hour old). Returns the URL and both resources.
async fn table_of_an_earlier_process(
    dir: &tempfile::TempDir,
    prefix: &str,
) -> (String, Arc<RabbitResource>, Arc<PgResource>) {
    let url = database(prefix, "").await;
    let rabbit = rabbit("rabbit", staging(dir.path())).await;
    let old = resource("db", &url).await;
    old.enable_outbox(rabbit.clone(), slow_sweep())
        .await
        .expect("enable_outbox");
    (url, rabbit, old)
}

/// The set-up most tests share: a coordinator, a staging directory, an SDK handle, a
/// declared queue (named after `queue_prefix`), a database (after `db_prefix`, set up
/// with `setup`) registered as "db", and a RabbitMQ resource "rabbit" attached to it
/// as its outbox broker with `options`.
///
/// Tests keep it whole (`w.sdk`, `w.db`, ...) for their whole run, so the temporary
/// directory lives until the end of the test. The fields are declared in the reverse
/// order of their creation: they are dropped in declaration order, as the locals of a
/// test are in reverse order of theirs.
struct World {
    db: Arc<PgResource>,
    rabbit: Arc<RabbitResource>,
    url: String,
    probe: RabbitProbe,
    queue: String,
    sdk: TwoPc,
    store: Arc<StagingStore>,
    _dir: tempfile::TempDir,
    coord: Coordinator,
}

impl World {
    /// Starts the pieces in the order the tests rely on; the broker is registered with
    /// the SDK (before the database) only if `register_broker`.
    async fn start(
        queue_prefix: &str,
        db_prefix: &str,
        setup: &str,
        options: OutboxOptions,
        register_broker: bool,
    ) -> World {
        let coord = coordinator().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = staging(dir.path());
        let sdk = sdk(&coord, Duration::from_secs(5)).await;
        let (probe, queue) = probe_and_queue(queue_prefix).await;
        let url = database(db_prefix, setup).await;
        let rabbit = rabbit("rabbit", store.clone()).await;
        let rabbit = if register_broker {
            sdk.register(rabbit).expect("register rabbit")
        } else {
            rabbit
        };
        let db = sdk
            .register(resource("db", &url).await)
            .expect("register db");
        db.enable_outbox(rabbit.clone(), options)
            .await
            .expect("enable_outbox");
        World {
            coord,
            _dir: dir,
            store,
            sdk,
            queue,
            probe,
            url,
            rabbit,
            db,
        }
    }

    /// Deletes the test's queue, shuts the SDK down and stops the coordinator.
    async fn stop(self) {
        self.probe.delete(&self.queue).await;
        self.sdk.shutdown().await;
        self.coord.stop().await;
    }

    /// Opens the branch of `tx` on the database, runs `insert` in it and publishes
    /// `payload` to `destination`; returns the branch.
    async fn branch_with(
        &self,
        tx: &Transaction,
        insert: &str,
        destination: &str,
        payload: &[u8],
    ) -> PgBranch {
        let pg = tx.postgres(&self.db).await.expect("branch");
        pg.execute(insert, &[]).await.expect("insert");
        pg.publish(&*self.rabbit, destination, payload.to_vec())
            .await
            .expect("publish");
        pg
    }

    /// A second process's SDK handle on the same coordinator, its periodic recovery pass
    /// every `recovery_interval`.
    async fn next_process(&self, recovery_interval: Duration) -> TwoPc {
        TwoPc::builder(self.coord.url.clone())
            .service("svc")
            .recovery_interval(recovery_interval)
            .start()
            .await
            .expect("start the second SDK")
    }

    /// A resource `name` over `url` registered with `sdk`, its outbox on the world's
    /// broker (as [`World::restarted`]).
    async fn register_with_outbox(&self, sdk: &TwoPc, name: &str, url: &str) -> Arc<PgResource> {
        let db = sdk
            .register(resource(name, url).await)
            .expect("register with the next process");
        db.enable_outbox(self.rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox in the next process");
        db
    }

    /// The one-phase markers (not fences) in the world's database.
    async fn markers(&self) -> i64 {
        unfenced_markers(&self.url).await
    }

    /// The rows of `orders`.
    async fn orders(&self) -> i64 {
        count(&self.url, "SELECT count(*) FROM orders").await
    }

    /// A "restarted" resource "db" on the same database (it knows none of the branches
    /// of `self.db`), its outbox on the same broker.
    async fn restarted(&self) -> Arc<PgResource> {
        let again = resource("db", &self.url).await;
        again
            .enable_outbox(self.rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox");
        again
    }

    /// Proves that a sweep ran after what the test rolled back and published nothing of
    /// it (`what`): a control row committed now (to the declared queue `control`) is
    /// published, the test's queue stays empty meanwhile and for 500 ms more, and the
    /// control row is deleted.
    async fn sweep_publishes_only_a_control_row(&self, control: &str, what: &str) {
        insert_row(
            &self.url,
            "rabbit",
            "control",
            "control-0",
            control,
            b"c",
            None,
            None,
        )
        .await;
        let got = self.probe.take(control, 1).await;
        assert_eq!(got[0].message_id, "control-0");
        stays(what, Duration::from_millis(500), || async {
            self.probe.drain(&self.queue).await.is_empty()
        })
        .await;
        eventually(WAIT, "the control row is deleted", || async {
            outbox_rows(&self.url).await == 0
                && self.db.outbox_backlog().await.expect("backlog") == 0
        })
        .await;
    }

    /// Order 1 with one staged event, committed in one phase the way the participant
    /// server runs the coordinator's call; returns the transaction (still open at the
    /// coordinator), its id and the branch id.
    async fn order_committed_in_one_phase(&self) -> (Transaction, String, String) {
        let tx = self.sdk.begin().await.expect("begin");
        let pg = self
            .branch_with(
                &tx,
                "INSERT INTO orders VALUES (1, 'one')",
                &self.queue,
                b"one",
            )
            .await;
        let (tx_id, branch_id) = (tx.id().to_string(), pg.branch_id().to_string());
        assert_eq!(
            self.db.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Committed)
        );
        (tx, tx_id, branch_id)
    }
}

fn usage(err: Error) -> String {
    match err {
        Error::Usage(m) => m,
        other => panic!("expected a usage error, got {other:?}"),
    }
}

// --- RabbitMQ consumer side ------------------------------------------------------------

impl RabbitProbe {
    /// Drains `queue` until `n` messages were taken (bounded by [`WAIT`]); returns them.
    async fn take(&self, queue: &str, n: usize) -> Vec<Got> {
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT.limit;
        while got.len() < n {
            got.extend(self.drain(queue).await);
            if got.len() >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} messages arrived in {queue} within {:?}: {got:?}",
                got.len(),
                WAIT.limit
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        got
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Test 1: a transaction whose only branch is the PostgreSQL branch commits in one
/// phase, and the relay publishes its two staged messages to RabbitMQ after the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_one_phase_commit_publishes_staged_messages_once_in_order() {
    bounded(TEST_TIMEOUT, async {
        // The broker is registered too, so that an enlistment of a broker branch would
        // be possible (and visible to the coordinator).
        let w = World::start("outbox_1p", "ob1p", ORDERS, slow_sweep(), true).await;
        assert_eq!(w.db.outbox_backlog().await.expect("backlog"), 0);

        let tx = w.sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let pg = tx.postgres(&w.db).await.expect("branch");
        // A temporary table cannot be prepared: committing it proves no PREPARE ran.
        pg.execute("CREATE TEMP TABLE scratch (v int) ON COMMIT DROP", &[])
            .await
            .expect("temp table");
        pg.execute("INSERT INTO orders VALUES (1, 'book')", &[])
            .await
            .expect("insert");
        let id0 = pg
            .publish(&*w.rabbit, &w.queue, b"{\"order\":1}".to_vec())
            .await
            .expect("publish");
        let opts = PublishOptions {
            headers: vec![
                ("kind".into(), "OrderCreated".into()),
                ("tenant".into(), "t-7".into()),
            ],
            content_type: Some("application/json".into()),
        };
        let id1 = pg
            .publish_with(
                &*w.rabbit,
                &w.queue,
                b"{\"order\":1,\"v\":2}".to_vec(),
                opts,
            )
            .await
            .expect("publish_with");
        assert_eq!(id0, format!("{tx_id}:svc:db:0"));
        assert_eq!(id1, format!("{tx_id}:svc:db:1"));

        // The messages are rows of the open transaction: invisible outside it, nothing
        // buffered in the broker resource, and the coordinator knows one branch only.
        let rows: Vec<_> = pg
            .query(
                "SELECT broker, gid, message_id, destination, payload, headers, content_type \
                 FROM twopc_outbox ORDER BY id",
                &[],
            )
            .await
            .expect("rows in branch")
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, Vec<u8>>(4),
                    r.get::<_, Option<String>>(5),
                    r.get::<_, Option<String>>(6),
                )
            })
            .collect();
        // What the sweep would publish after a crash: the same message, headers included.
        let gid = pg.gid().to_string();
        assert_eq!(
            rows,
            vec![
                (
                    "rabbit".to_string(),
                    gid.clone(),
                    id0.clone(),
                    w.queue.clone(),
                    b"{\"order\":1}".to_vec(),
                    None,
                    None
                ),
                (
                    "rabbit".to_string(),
                    gid,
                    id1.clone(),
                    w.queue.clone(),
                    b"{\"order\":1,\"v\":2}".to_vec(),
                    Some(r#"[["kind","OrderCreated"],["tenant","t-7"]]"#.to_string()),
                    Some("application/json".to_string())
                ),
            ]
        );
        assert_eq!(outbox_rows(&w.url).await, 0);
        assert_eq!(w.db.outbox_backlog().await.expect("backlog"), 0);
        assert_eq!(w.rabbit.core().buffered(&tx_id, "svc:rabbit"), 0);
        assert_eq!(w.rabbit.core().open_branches(), 0);
        assert_eq!(
            coordinator_branches(&w.sdk, &tx_id).await,
            vec![("svc:db".to_string(), pb::BranchKind::Database as i32)]
        );
        assert!(
            w.probe.drain(&w.queue).await.is_empty(),
            "nothing before commit"
        );

        let committed = tx.commit().await.expect("one-phase commit");
        assert!(committed.pending_branches.is_empty(), "{committed:?}");
        // A one-phase commit leaves nothing in the coordinator's memory: the branch list
        // of the finished transaction is empty (one branch was checked before commit).
        let after = get_tx(&w.sdk, &tx_id).await;
        assert_eq!(after.outcome, pb::Outcome::Committed as i32, "{after:?}");
        assert_eq!(after.state, pb::TxState::Committed as i32, "{after:?}");
        assert!(
            after
                .branches
                .iter()
                .all(|b| b.branch.as_ref().is_some_and(|b| b.branch_id == "svc:db")),
            "{after:?}"
        );
        assert_eq!(w.orders().await, 1);
        assert_eq!(prepared_gids(&w.url).await, 0);

        let got = w.probe.take(&w.queue, 2).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].message_id, id0);
        assert_eq!(got[0].payload, b"{\"order\":1}");
        assert!(got[0].persistent);
        assert_eq!(got[0].content_type, None);
        assert!(got[0].headers.is_empty(), "{:?}", got[0].headers);
        assert_eq!(got[1].message_id, id1);
        assert_eq!(got[1].payload, b"{\"order\":1,\"v\":2}");
        assert!(got[1].persistent);
        assert_eq!(got[1].content_type.as_deref(), Some("application/json"));
        let mut headers = got[1].headers.clone();
        headers.sort();
        assert_eq!(
            headers,
            vec![
                ("kind".to_string(), "OrderCreated".to_string()),
                ("tenant".to_string(), "t-7".to_string())
            ]
        );

        eventually(WAIT, "the relay deleted the published rows", || async {
            w.db.outbox_backlog().await.expect("backlog") == 0 && outbox_rows(&w.url).await == 0
        })
        .await;
        // No broker branch was ever opened or staged.
        assert_eq!(w.rabbit.core().open_branches(), 0);
        assert!(w.store.is_empty(), "{:?}", w.store.list());
        // And nothing more arrives.
        stays("no duplicate", Duration::from_millis(300), || async {
            w.probe.drain(&w.queue).await.is_empty()
        })
        .await;
        // The branch is finished.
        let err = pg
            .publish(&*w.rabbit, &w.queue, b"late".to_vec())
            .await
            .expect_err("committed");
        assert!(usage(err).contains("committed"));

        w.stop().await;
    })
    .await;
}

/// Test 2a: an aborted transaction publishes nothing, not even through later sweeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_publishes_nothing() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_abort", "obab", ORDERS, fast_sweep(), false).await;
        let control = unique_name("outbox_ctl");
        w.probe.declare(&control).await;

        let tx = w.sdk.begin().await.expect("begin");
        let insert = "INSERT INTO orders VALUES (1, 'book')";
        let pg = w.branch_with(&tx, insert, &w.queue, b"never 0").await;
        pg.publish(&*w.rabbit, &w.queue, b"never 1".to_vec())
            .await
            .expect("publish");
        tx.abort("changed my mind").await.expect("abort");
        eventually(WAIT, "the branch is rolled back", || async {
            let answer = pg.execute("SELECT 1", &[]).await;
            matches!(answer, Err(Error::Usage(ref m)) if m.contains("aborted"))
        })
        .await;

        assert_eq!(w.orders().await, 0);
        assert_eq!(outbox_rows(&w.url).await, 0);
        assert_eq!(w.db.outbox_backlog().await.expect("backlog"), 0);
        // A row committed after the abort is swept: a sweep ran after the abort, and it
        // would have taken the aborted rows (older, lower ids) had they been committed.
        w.sweep_publishes_only_a_control_row(&control, "the aborted messages never arrive")
            .await;
        assert_eq!(w.db.outbox_backlog().await.expect("backlog"), 0);

        w.probe.delete(&control).await;
        w.stop().await;
    })
    .await;
}

/// Test 2b: a failing statement after `publish` makes the one-phase commit abort; the
/// staged messages are rolled back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_after_publish_aborts_and_publishes_nothing() {
    bounded(TEST_TIMEOUT, async {
        let setup = format!("{ORDERS}; INSERT INTO orders VALUES (1, 'existing')");
        let w = World::start("outbox_fail", "obfail", &setup, fast_sweep(), false).await;
        let control = unique_name("outbox_ctl");
        w.probe.declare(&control).await;

        let tx = w.sdk.begin().await.expect("begin");
        let insert = "INSERT INTO orders VALUES (2, 'new')";
        let pg = w.branch_with(&tx, insert, &w.queue, b"never").await;
        let err = pg
            .execute("INSERT INTO orders VALUES (1, 'duplicate')", &[])
            .await
            .expect_err("duplicate key");
        assert!(err.to_string().contains("23505"), "{err}");

        let err = tx.commit().await.expect_err("aborted");
        let msg = err.to_string();
        assert!(matches!(err, Error::Aborted(_)), "{msg}");
        assert!(msg.contains("23505"), "{msg}");

        assert_eq!(w.orders().await, 1);
        assert_eq!(outbox_rows(&w.url).await, 0);
        assert_eq!(w.db.outbox_backlog().await.expect("backlog"), 0);
        w.sweep_publishes_only_a_control_row(&control, "the rolled-back message never arrives")
            .await;

        w.probe.delete(&control).await;
        w.stop().await;
    })
    .await;
}

/// Test 3a: with a second database in the transaction, both branches are prepared; each
/// database's outbox rows ride in its prepared transaction and are published once after
/// COMMIT PREPARED, by that resource's relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_commit_in_two_phases_and_each_relay_publishes_once() {
    bounded(TEST_TIMEOUT, async {
        let r = rig().await;
        let sdk = &r.sdk;
        let (probe, queue) = probe_and_queue("outbox_2pc").await;
        let (url_a, url_b) = two_order_databases("ob2").await;
        let rabbit = rabbit("rabbit", r.store.clone()).await;
        let a = sdk
            .register(resource("db-a", &url_a).await)
            .expect("register a");
        let b = sdk
            .register(resource("db-b", &url_b).await)
            .expect("register b");
        a.enable_outbox(rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox a");
        b.enable_outbox(rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox b");

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let branch_a = tx.postgres(&a).await.expect("branch a");
        branch_a
            .execute("INSERT INTO orders VALUES (1, 'a')", &[])
            .await
            .expect("insert a");
        let a0 = branch_a
            .publish(&*rabbit, &queue, b"a0".to_vec())
            .await
            .expect("publish a0");
        let a1 = branch_a
            .publish(&*rabbit, &queue, b"a1".to_vec())
            .await
            .expect("publish a1");
        let branch_b = b.begin(&tx).await.expect("branch b");
        branch_b
            .execute("INSERT INTO orders VALUES (1, 'b')", &[])
            .await
            .expect("insert b");
        let b0 = branch_b
            .publish(&*rabbit, &queue, b"b0".to_vec())
            .await
            .expect("publish b0");
        assert_eq!(
            vec![a0.clone(), a1.clone(), b0.clone()],
            vec![
                format!("{tx_id}:svc:db-a:0"),
                format!("{tx_id}:svc:db-a:1"),
                format!("{tx_id}:svc:db-b:0")
            ]
        );
        let mut branches = coordinator_branches(sdk, &tx_id).await;
        branches.sort();
        let db_kind = pb::BranchKind::Database as i32;
        assert_eq!(
            branches,
            vec![
                ("svc:db-a".to_string(), db_kind),
                ("svc:db-b".to_string(), db_kind)
            ]
        );

        let committed = tx.commit().await.expect("commit");
        assert!(committed.pending_branches.is_empty(), "{committed:?}");
        for url in [&url_a, &url_b] {
            assert_eq!(count(url, "SELECT count(*) FROM orders").await, 1);
            assert_eq!(prepared_gids(url).await, 0);
        }

        let got = probe.take(&queue, 3).await;
        let from_a: Vec<_> = got
            .iter()
            .filter(|g| g.message_id.contains(":svc:db-a:"))
            .map(|g| (g.message_id.clone(), g.payload.clone()))
            .collect();
        let from_b: Vec<_> = got
            .iter()
            .filter(|g| g.message_id.contains(":svc:db-b:"))
            .map(|g| (g.message_id.clone(), g.payload.clone()))
            .collect();
        assert_eq!(
            from_a,
            vec![(a0, b"a0".to_vec()), (a1, b"a1".to_vec())],
            "{got:?}"
        );
        assert_eq!(from_b, vec![(b0, b"b0".to_vec())], "{got:?}");
        eventually(WAIT, "both relays deleted their rows", || async {
            a.outbox_backlog().await.expect("backlog a") == 0
                && b.outbox_backlog().await.expect("backlog b") == 0
        })
        .await;
        stays("no duplicate", Duration::from_millis(300), || async {
            probe.drain(&queue).await.is_empty()
        })
        .await;

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

/// Test 3b: a PostgreSQL branch with outbox messages beside a broker branch
/// (`Transaction::publish`): two phases, each message published exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_broker_branch_the_outbox_rides_in_the_prepared_transaction() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_mixed", "obmix", ORDERS, slow_sweep(), true).await;

        let tx = w.sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let pg = tx.postgres(&w.db).await.expect("branch");
        pg.execute("INSERT INTO orders VALUES (1, 'book')", &[])
            .await
            .expect("insert");
        let from_db = pg
            .publish(&*w.rabbit, &w.queue, b"from the database".to_vec())
            .await
            .expect("pg publish");
        let from_broker = tx
            .publish(&*w.rabbit, &w.queue, b"from the broker branch".to_vec())
            .await
            .expect("tx publish");
        assert_eq!(from_db, format!("{tx_id}:svc:db:0"));
        assert_eq!(from_broker, format!("{tx_id}:svc:rabbit:0"));
        let mut branches = coordinator_branches(&w.sdk, &tx_id).await;
        branches.sort();
        assert_eq!(
            branches,
            vec![
                ("svc:db".to_string(), pb::BranchKind::Database as i32),
                ("svc:rabbit".to_string(), pb::BranchKind::Broker as i32)
            ]
        );

        let committed = tx.commit().await.expect("commit");
        assert!(committed.pending_branches.is_empty(), "{committed:?}");
        assert_eq!(w.orders().await, 1);
        assert_eq!(prepared_gids(&w.url).await, 0);

        let mut got = ids_and_payloads(w.probe.take(&w.queue, 2).await);
        got.sort();
        let mut want = vec![
            (from_db, b"from the database".to_vec()),
            (from_broker, b"from the broker branch".to_vec()),
        ];
        want.sort();
        assert_eq!(got, want);
        eventually(WAIT, "the relay deleted the row", || async {
            w.db.outbox_backlog().await.expect("backlog") == 0
        })
        .await;
        stays("no duplicate", Duration::from_millis(300), || async {
            w.probe.drain(&w.queue).await.is_empty()
        })
        .await;
        assert!(w.store.is_empty(), "{:?}", w.store.list());

        w.stop().await;
    })
    .await;
}

/// Recovery: a participant prepares its branch (with outbox rows) and "crashes" before
/// phase two. While prepared, nothing is published and the rows are not counted. A new
/// process commits the gid through recovery, and its rows are swept at once (the periodic
/// sweep could not take them for an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_commit_of_a_prepared_branch_sweeps_its_rows_at_once() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (probe, queue) = probe_and_queue("outbox_rec").await;
        let (url_a, url_b) = two_order_databases("obr").await;
        let rabbit = rabbit("rabbit", staging(dir.path())).await;

        let sdk1 = sdk(&coord, Duration::from_millis(300)).await;
        let a = resource("db-a", &url_a).await;
        a.enable_outbox(rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox");
        let b = crashing_a_beside_b(&sdk1, &a, &url_b).await;

        let tx = sdk1.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let branch_a = tx.postgres(&a).await.expect("branch a");
        branch_a
            .execute("INSERT INTO orders VALUES (1, 'x')", &[])
            .await
            .expect("insert a");
        let m0 = branch_a
            .publish(&*rabbit, &queue, b"after recovery".to_vec())
            .await
            .expect("publish");
        execute_in(&tx, &b, "INSERT INTO orders VALUES (1, 'x')").await;
        let committed = tx.commit().await.expect("decided to commit");
        assert_eq!(committed.pending_branches, vec!["svc:db-a".to_string()]);
        assert_eq!(prepared_gids(&url_a).await, 1);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 1);
        // Prepared, not committed: the rows are invisible and nothing is published.
        assert_eq!(a.outbox_backlog().await.expect("backlog"), 0);
        stays(
            "nothing is published while prepared",
            Duration::from_millis(300),
            || async { probe.drain(&queue).await.is_empty() },
        )
        .await;

        // The participant process "dies".
        sdk1.shutdown().await;
        drop((sdk1, a, branch_a));

        let sdk2 = sdk(&coord, Duration::from_secs(5)).await;
        let a2 = sdk2
            .register(resource("db-a", &url_a).await)
            .expect("register a again");
        a2.enable_outbox(rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox again");
        assert_eq!(sdk2.recover_now().await, 1);
        assert_eq!(prepared_gids(&url_a).await, 0);
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 1);

        let got = probe.take(&queue, 1).await;
        assert_eq!(got[0].message_id, m0);
        assert_eq!(m0, format!("{tx_id}:svc:db-a:0"));
        assert_eq!(got[0].payload, b"after recovery");
        eventually(WAIT, "the swept row is deleted", || async {
            a2.outbox_backlog().await.expect("backlog") == 0
        })
        .await;
        stays("no duplicate", Duration::from_millis(300), || async {
            probe.drain(&queue).await.is_empty()
        })
        .await;

        probe.delete(&queue).await;
        sdk2.shutdown().await;
        coord.stop().await;
    })
    .await;
}

/// Test 4: rows a crashed process committed but never published are published by the
/// sweep of a new resource on the same database, with exactly their stored message ids,
/// headers and content types, then deleted. A row of a broker not attached here stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_publishes_rows_a_crash_left_behind_and_skips_foreign_brokers() {
    bounded(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let (probe, q1) = probe_and_queue("outbox_left").await;
        let q2 = unique_name("outbox_left");
        probe.declare(&q2).await;
        // An earlier process created the table...
        let (url, rabbit, old) = table_of_an_earlier_process(&dir, "obleft").await;
        // ... and committed these rows before it died (the last one two hours ago).
        let kind = Some(r#"[["kind","OrderCreated"]]"#);
        let json = Some("application/json");
        for (broker, gid, message_id, queue, payload, headers, content_type) in [
            (
                "rabbit",
                "twopc:t1:svc:db",
                "t1:svc:db:0",
                &q1,
                "left 0",
                None,
                None,
            ),
            (
                "rabbit",
                "twopc:t1:svc:db",
                "t1:svc:db:1",
                &q1,
                "left 1",
                kind,
                json,
            ),
            (
                "rabbit",
                "twopc:t2:svc:db",
                "t2:svc:db:0",
                &q2,
                "left 2",
                None,
                None,
            ),
            (
                "elsewhere",
                "twopc:t3:svc:db",
                "t3:svc:db:0",
                &q1,
                "not mine",
                None,
                None,
            ),
            (
                "rabbit",
                "twopc:t0:svc:db",
                "t0:svc:db:0",
                &q1,
                "ancient",
                None,
                None,
            ),
        ] {
            let payload = payload.as_bytes();
            insert_row(
                &url,
                broker,
                gid,
                message_id,
                queue,
                payload,
                headers,
                content_type,
            )
            .await;
        }
        connect(&url)
            .await
            .execute(
                "UPDATE twopc_outbox SET staged_at = now() - interval '2 hours' \
                 WHERE message_id = 't0:svc:db:0'",
                &[],
            )
            .await
            .expect("age the row");
        assert_eq!(outbox_rows(&url).await, 5);
        // Attaching (again, same options) sweeps at once, and only what is older than
        // `sweep_after`: the ancient row goes, the young ones stay.
        old.enable_outbox(rabbit.clone(), slow_sweep())
            .await
            .expect("enable_outbox again");
        let got = probe.take(&q1, 1).await;
        assert_eq!(
            got.iter()
                .map(|g| (g.message_id.as_str(), g.payload.as_slice()))
                .collect::<Vec<_>>(),
            vec![("t0:svc:db:0", b"ancient".as_slice())]
        );
        eventually(WAIT, "the ancient row is deleted", || async {
            outbox_rows(&url).await == 4
        })
        .await;
        stays(
            "the young rows stay",
            Duration::from_millis(300),
            || async { probe.drain(&q1).await.is_empty() && probe.drain(&q2).await.is_empty() },
        )
        .await;
        assert_eq!(outbox_rows(&url).await, 4);
        // The process dies.
        drop(old);

        let db = resource("db", &url).await;
        db.enable_outbox(
            rabbit.clone(),
            sweep(Duration::from_millis(100), Duration::from_millis(200)),
        )
        .await
        .expect("enable_outbox");
        let got1 = probe.take(&q1, 2).await;
        let got2 = probe.take(&q2, 1).await;
        assert_eq!(
            got1.iter()
                .map(|g| (g.message_id.as_str(), g.payload.as_slice()))
                .collect::<Vec<_>>(),
            vec![
                ("t1:svc:db:0", b"left 0".as_slice()),
                ("t1:svc:db:1", b"left 1".as_slice())
            ]
        );
        assert_eq!(got1[0].content_type, None);
        assert!(got1[0].headers.is_empty());
        assert_eq!(got1[1].content_type.as_deref(), Some("application/json"));
        assert_eq!(
            got1[1].headers,
            vec![("kind".to_string(), "OrderCreated".to_string())]
        );
        assert!(got1.iter().all(|g| g.persistent));
        assert_eq!(got2[0].message_id, "t2:svc:db:0");
        assert_eq!(got2[0].payload, b"left 2");

        eventually(WAIT, "the published rows are deleted", || async {
            outbox_rows(&url).await == 1
        })
        .await;
        // The foreign broker's row stays (and counts as backlog), sweep after sweep.
        stays(
            "the row of the other broker stays",
            Duration::from_millis(500),
            || async {
                count(
                    &url,
                    "SELECT count(*) FROM twopc_outbox WHERE broker = 'elsewhere'",
                )
                .await
                    == 1
            },
        )
        .await;
        assert_eq!(db.outbox_backlog().await.expect("backlog"), 1);
        assert!(probe.drain(&q1).await.is_empty());
        assert!(probe.drain(&q2).await.is_empty());

        probe.delete(&q1).await;
        probe.delete(&q2).await;
    })
    .await;
}

/// Test 5: a message the broker refuses (a subject the resource's configuration
/// accepts, but the server's stream does not capture) stays in the table, counted by
/// the backlog; once the stream captures it, the next sweep publishes it with its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_stays_in_the_table_until_a_sweep_can_publish_it() {
    bounded(TEST_TIMEOUT, async {
        let r = rig().await;
        let sdk = &r.sdk;
        let stream = unique_name("OBREF");
        let url = database("obref", ORDERS).await;

        // The server's stream captures `<stream>.a` only; the resource is configured for
        // `<stream>.>` (an existing stream is used as it is).
        let js = jetstream(NATS_URL).await;
        let mut config = async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{stream}.a")],
            ..Default::default()
        };
        js.create_stream(config.clone())
            .await
            .expect("create the stream");
        let nats = nats(&stream, r.store.clone()).await;
        let db = sdk
            .register(resource("db", &url).await)
            .expect("register db");
        db.enable_outbox(nats.clone(), fast_sweep())
            .await
            .expect("enable_outbox");

        let subject = format!("{stream}.b");
        let tx = sdk.begin().await.expect("begin");
        let pg = tx.postgres(&db).await.expect("branch");
        pg.execute("INSERT INTO orders VALUES (1, 'x')", &[])
            .await
            .expect("insert");
        let options = PublishOptions {
            headers: vec![("kind".into(), "OrderCreated".into())],
            content_type: Some("application/json".into()),
        };
        let id = pg
            .publish_with(&*nats, &subject, b"refused at first".to_vec(), options)
            .await
            .expect("publish (accepted by the resource's configuration)");
        tx.commit().await.expect("commit");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);

        // The relay and several sweeps try and fail: the row stays.
        stays(
            "the refused message stays in the table",
            Duration::from_millis(1500),
            || async { db.outbox_backlog().await.expect("backlog") == 1 },
        )
        .await;
        assert!(stream_messages(NATS_URL, &stream).await.is_empty());

        config.subjects.push(subject.clone());
        js.update_stream(config).await.expect("update the stream");
        eventually(WAIT, "a sweep publishes the message", || async {
            db.outbox_backlog().await.expect("backlog") == 0
        })
        .await;
        let msgs = stream_messages(NATS_URL, &stream).await;
        // Published by the sweep, from the row: the headers made the round trip.
        assert_eq!(
            msgs,
            vec![Stored {
                subject: subject.clone(),
                message_id: id,
                payload: b"refused at first".to_vec(),
                kind_header: Some("OrderCreated".into()),
                content_type: Some("application/json".into()),
            }]
        );

        delete_stream(NATS_URL, &stream).await;
        r.stop().await;
    })
    .await;
}

/// Test 6: test 1 over NATS JetStream: one phase, the message id in `Nats-Msg-Id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_one_phase_commit_publishes_staged_messages_with_their_ids() {
    bounded(TEST_TIMEOUT, async {
        let r = rig().await;
        let (sdk, store) = (&r.sdk, &r.store);
        let stream = unique_name("OBNATS");
        let subject = format!("{stream}.order.created");
        let url = database("obnats", ORDERS).await;
        let nats = sdk
            .register(nats(&stream, store.clone()).await)
            .expect("register nats");
        let db = sdk
            .register(resource("db", &url).await)
            .expect("register db");
        db.enable_outbox(nats.clone(), slow_sweep())
            .await
            .expect("enable_outbox");

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let pg = tx.postgres(&db).await.expect("branch");
        pg.execute("CREATE TEMP TABLE scratch (v int) ON COMMIT DROP", &[])
            .await
            .expect("temp table (cannot be prepared)");
        pg.execute("INSERT INTO orders VALUES (1, 'book')", &[])
            .await
            .expect("insert");
        let id0 = pg
            .publish(&*nats, &subject, b"n0".to_vec())
            .await
            .expect("publish");
        let id1 = pg
            .publish_with(
                &*nats,
                &subject,
                b"n1".to_vec(),
                PublishOptions {
                    headers: vec![("kind".into(), "OrderCreated".into())],
                    content_type: Some("application/json".into()),
                },
            )
            .await
            .expect("publish_with");
        assert_eq!(id0, format!("{tx_id}:svc:db:0"));
        assert_eq!(id1, format!("{tx_id}:svc:db:1"));
        // A subject outside the stream is refused at once, and the branch goes on.
        let err = pg
            .publish(&*nats, "elsewhere.x", b"x".to_vec())
            .await
            .expect_err("not captured");
        assert!(
            matches!(err, Error::Resource { .. }) && err.to_string().contains("not captured"),
            "{err}"
        );
        assert_eq!(
            coordinator_branches(sdk, &tx_id).await,
            vec![("svc:db".to_string(), pb::BranchKind::Database as i32)]
        );
        assert_eq!(nats.core().open_branches(), 0);

        tx.commit().await.expect("one-phase commit");
        assert_eq!(
            get_tx(sdk, &tx_id).await.outcome,
            pb::Outcome::Committed as i32
        );
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);
        eventually(WAIT, "both messages are in the stream", || async {
            stream_messages(NATS_URL, &stream).await.len() >= 2
        })
        .await;
        eventually(WAIT, "the relay deleted the rows", || async {
            db.outbox_backlog().await.expect("backlog") == 0
        })
        .await;
        let msgs = stream_messages(NATS_URL, &stream).await;
        assert_eq!(
            msgs,
            vec![
                Stored {
                    subject: subject.clone(),
                    message_id: id0,
                    payload: b"n0".to_vec(),
                    kind_header: None,
                    content_type: None,
                },
                Stored {
                    subject: subject.clone(),
                    message_id: id1,
                    payload: b"n1".to_vec(),
                    kind_header: Some("OrderCreated".into()),
                    content_type: Some("application/json".into()),
                },
            ]
        );
        assert_eq!(nats.core().open_branches(), 0);
        assert!(store.is_empty(), "{:?}", store.list());

        delete_stream(NATS_URL, &stream).await;
        r.stop().await;
    })
    .await;
}

/// Test 7: usage errors, none of which leaves a row behind or breaks the branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_are_refused_without_leaving_rows() {
    bounded(TEST_TIMEOUT, async {
        let r = rig().await;
        let (sdk, store) = (&r.sdk, &r.store);
        let (probe, queue) = probe_and_queue("outbox_usage").await;
        let url = database("obuse", ORDERS).await;
        let attached = rabbit("rabbit", store.clone()).await;
        let stranger = rabbit("rabbit-b", store.clone()).await;
        let db = sdk
            .register(resource("db", &url).await)
            .expect("register db");

        // No outbox at all yet.
        let tx = sdk.begin().await.expect("begin");
        let pg = tx.postgres(&db).await.expect("branch");
        let m = usage(
            pg.publish(&*attached, &queue, b"x".to_vec())
                .await
                .expect_err("no outbox"),
        );
        assert!(m.contains("rabbit") && m.contains("enable_outbox"), "{m}");
        tx.abort("done").await.expect("abort");

        // Zero durations.
        for options in [
            OutboxOptions {
                sweep_interval: Duration::ZERO,
                ..OutboxOptions::default()
            },
            OutboxOptions {
                sweep_after: Duration::ZERO,
                ..OutboxOptions::default()
            },
        ] {
            let m = usage(
                db.enable_outbox(attached.clone(), options)
                    .await
                    .expect_err("zero duration"),
            );
            assert!(m.contains("greater than zero"), "{m}");
        }
        // A linger beyond a second.
        let m = usage(
            db.enable_outbox(
                attached.clone(),
                OutboxOptions {
                    publish_linger: Duration::from_millis(1001),
                    ..OutboxOptions::default()
                },
            )
            .await
            .expect_err("a linger over a second"),
        );
        assert!(m.contains("publish_linger"), "{m}");

        db.enable_outbox(attached.clone(), fast_sweep())
            .await
            .expect("enable_outbox");
        // Again with the same options: fine. With others: refused.
        db.enable_outbox(attached.clone(), fast_sweep())
            .await
            .expect("same options again");
        let m = usage(
            db.enable_outbox(attached.clone(), slow_sweep())
                .await
                .expect_err("other options"),
        );
        assert!(m.contains("already runs"), "{m}");

        let tx = sdk.begin().await.expect("begin");
        let pg = tx.postgres(&db).await.expect("branch");
        pg.execute("INSERT INTO orders VALUES (1, 'x')", &[])
            .await
            .expect("insert");
        // A broker that was never attached.
        let m = usage(
            pg.publish(&*stranger, &queue, b"x".to_vec())
                .await
                .expect_err("not attached"),
        );
        assert!(m.contains("rabbit-b") && m.contains("enable_outbox"), "{m}");
        // An invalid destination is refused before anything is written.
        let err = pg
            .publish(&*attached, "", b"x".to_vec())
            .await
            .expect_err("empty queue name");
        assert!(matches!(err, Error::Resource { .. }), "{err}");
        // The branch is intact: nothing of it failed in PostgreSQL.
        let n: i64 = pg
            .query_one("SELECT count(*) FROM twopc_outbox", &[])
            .await
            .expect("count in branch")
            .get(0);
        assert_eq!(n, 0);
        tx.commit().await.expect("commit");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);

        // Publishing in a finished branch.
        let m = usage(
            pg.publish(&*attached, &queue, b"late".to_vec())
                .await
                .expect_err("committed"),
        );
        assert!(m.contains("committed"), "{m}");
        let tx = sdk.begin().await.expect("begin");
        let pg = tx.postgres(&db).await.expect("branch");
        tx.abort("done").await.expect("abort");
        eventually(
            WAIT,
            "publishing in an aborted branch is refused",
            || async {
                matches!(
                    pg.publish(&*attached, &queue, b"late".to_vec()).await,
                    Err(Error::Usage(ref m)) if m.contains("aborted")
                )
            },
        )
        .await;

        assert_eq!(outbox_rows(&url).await, 0);
        assert_eq!(db.outbox_backlog().await.expect("backlog"), 0);
        assert!(probe.drain(&queue).await.is_empty());

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Defects found in review, fixed (each test failed before its fix)
// ---------------------------------------------------------------------------------------

/// A message published after a `SAVEPOINT` and rolled back with `ROLLBACK TO SAVEPOINT`
/// must not be published: its row is gone (before the fix, the branch published every
/// message it had staged in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_rolled_back_to_a_savepoint_is_not_published() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_savepoint", "obsave", ORDERS, slow_sweep(), false).await;

        let tx = w.sdk.begin().await.expect("begin");
        let pg = tx.postgres(&w.db).await.expect("branch");
        pg.execute("SAVEPOINT s", &[]).await.expect("savepoint");
        pg.publish(&*w.rabbit, &w.queue, b"rolled back".to_vec())
            .await
            .expect("publish");
        pg.execute("ROLLBACK TO SAVEPOINT s", &[])
            .await
            .expect("rollback to savepoint");
        let kept = pg
            .publish(&*w.rabbit, &w.queue, b"kept".to_vec())
            .await
            .expect("publish");
        let n: i64 = pg
            .query_one("SELECT count(*) FROM twopc_outbox", &[])
            .await
            .expect("count in branch")
            .get(0);
        assert_eq!(n, 1, "one row is left in the transaction");
        tx.commit().await.expect("commit");

        let mut got = w.probe.take(&w.queue, 1).await;
        eventually(WAIT, "the relay deleted the row", || async {
            w.db.outbox_backlog().await.expect("backlog") == 0
        })
        .await;
        got.extend(w.probe.drain(&w.queue).await);
        assert_eq!(ids_and_payloads(got), vec![(kept, b"kept".to_vec())]);

        w.stop().await;
    })
    .await;
}

/// One row whose `headers` column cannot be decoded must not keep the other rows of the
/// same sweep from being published (before the fix, the whole batch failed, every time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_unreadable_headers_does_not_block_the_others() {
    bounded(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let (probe, queue) = probe_and_queue("outbox_poison").await;
        let (url, rabbit, old) = table_of_an_earlier_process(&dir, "obpoison").await;
        drop(old);
        for (message_id, payload, headers) in [
            ("bad-0", b"bad".as_slice(), Some("not json")),
            ("good-0", b"good", None),
        ] {
            insert_row(
                &url, "rabbit", "g", message_id, &queue, payload, headers, None,
            )
            .await;
        }

        let db = resource("db", &url).await;
        db.enable_outbox(rabbit.clone(), fast_sweep())
            .await
            .expect("enable_outbox");
        let got = probe.take(&queue, 1).await;
        assert_eq!(got[0].message_id, "good-0");

        probe.delete(&queue).await;
    })
    .await;
}

/// A statement whose future the application dropped (a timeout around it) can still fail
/// in PostgreSQL and leave the transaction block aborted, with no error seen by the
/// branch. A one-phase commit must then be refused: PostgreSQL answers `COMMIT` in an
/// aborted block with a silent `ROLLBACK`. (Before the fix, once `publish` had learned the
/// transaction id, the one-phase commit skipped the check and reported "committed".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_aborted_by_a_cancelled_statement_is_not_committed_after_publish() {
    bounded(TEST_TIMEOUT, async {
        let setup = format!("{ORDERS}; INSERT INTO orders VALUES (1, 'existing')");
        let w = World::start("outbox_cancel", "obcancel", &setup, slow_sweep(), false).await;

        let tx = w.sdk.begin().await.expect("begin");
        let insert = "INSERT INTO orders VALUES (2, 'new')";
        let pg = w
            .branch_with(&tx, insert, &w.queue, b"must not be published")
            .await;
        // Sleeps 0.5 s, then violates the primary key; the caller gives up after 0.1 s.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(100),
            pg.execute("INSERT INTO orders SELECT 1, 'dup' FROM pg_sleep(0.5)", &[]),
        )
        .await;
        assert!(cancelled.is_err(), "the statement is still running");

        let outcome = tx.commit().await;
        let rows = w.orders().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = w.probe.drain(&w.queue).await;
        w.probe.delete(&w.queue).await;
        assert_eq!(rows, 1, "the block was rolled back by PostgreSQL");
        assert!(
            matches!(outcome, Err(Error::Aborted(_))),
            "the commit must be refused, got {outcome:?}; published: {got:?}"
        );
        assert!(got.is_empty(), "{got:?}");
        w.sdk.shutdown().await;
        w.coord.stop().await;
    })
    .await;
}

/// `publish` writes its row with the branch's next statement, or with the commit or the
/// prepare (no round trip of its own). A row that cannot be written (here a CHECK the
/// test adds to the outbox table) therefore fails that statement with the insert's error,
/// refuses the one-phase commit, or makes the prepare vote no; nothing is committed or
/// published, and a message published beside it in a good transaction still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_row_cannot_be_written_fails_the_next_statement_or_the_commit() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_unwritable", "obunw", ORDERS, slow_sweep(), false).await;
        let poison = format!("{}-poison", w.queue);
        connect(&w.url)
            .await
            .batch_execute(&format!(
                "ALTER TABLE twopc_outbox ADD CONSTRAINT no_poison CHECK (destination <> '{poison}')"
            ))
            .await
            .expect("constraint");
        w.probe.declare(&poison).await;

        // Written with the commit (a local transaction: one-phase, xid learned at BEGIN).
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        // Publishing stages without a round trip.
        w.branch_with(&tx, "INSERT INTO orders VALUES (1, 'one')", &poison, b"never")
            .await;
        let err = tx.commit().await.expect_err("the row cannot be written");
        assert!(matches!(err, Error::Aborted(_)), "{err}");
        assert!(err.to_string().contains("23514"), "{err}");

        // Written with the next statement, which fails with the insert's error.
        let tx = w.sdk.begin().await.expect("begin");
        let pg = tx.postgres(&w.db).await.expect("branch");
        pg.publish(&*w.rabbit, &poison, b"never".to_vec())
            .await
            .expect("publish");
        let err = pg
            .execute("INSERT INTO orders VALUES (2, 'two')", &[])
            .await
            .expect_err("the row goes out in front of the statement");
        assert!(err.to_string().contains("23514"), "{err}");
        let err = tx.commit().await.expect_err("aborted");
        assert!(err.to_string().contains("23514"), "{err}");

        // Written with the prepare, which votes no.
        let tx = w.sdk.begin().await.expect("begin");
        let insert = "INSERT INTO orders VALUES (3, 'three')";
        let pg = w.branch_with(&tx, insert, &poison, b"never").await;
        match w.db.prepare(tx.id(), pg.branch_id()).await {
            Vote::No(why) => assert!(why.contains("23514"), "{why}"),
            other => panic!("the prepare must vote no, got {other:?}"),
        }
        let _ = tx.abort("test").await;

        // A good message still goes, published with the commit's round trip.
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        w.branch_with(&tx, "INSERT INTO orders VALUES (4, 'four')", &w.queue, b"good")
            .await;
        tx.commit().await.expect("commit");
        let got = w.probe.take(&w.queue, 1).await;
        assert_eq!(got[0].payload, b"good".to_vec());
        assert_eq!(w.orders().await, 1, "only the good order");
        eventually(WAIT, "the good message's row is deleted", || async {
            outbox_rows(&w.url).await == 0
        })
        .await;
        let stray = w.probe.drain(&poison).await;
        w.probe.delete(&poison).await;
        w.probe.delete(&w.queue).await;
        assert!(stray.is_empty(), "{stray:?}");
        w.sdk.shutdown().await;
        w.coord.stop().await;
    })
    .await;
}

/// The marker's INSERT runs in front of `COMMIT`, in the same round trip. If it fails, the
/// transaction must not commit (PostgreSQL would end the aborted block with a silent
/// rollback): the one-phase commit is refused, nothing committed, nothing published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_whose_marker_fails_is_refused_and_rolled_back() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_markfail", "obmarkfail", ORDERS, slow_sweep(), false).await;
        let tx = w.sdk.begin().await.expect("begin");
        let insert = "INSERT INTO orders VALUES (1, 'one')";
        let pg = w
            .branch_with(&tx, insert, &w.queue, b"must not be published")
            .await;
        let (tx_id, branch_id) = (tx.id().to_string(), pg.branch_id().to_string());
        // A marker under this branch's gid already exists: the commit's INSERT conflicts.
        connect(&w.url)
            .await
            .execute(
                "INSERT INTO twopc_one_phase (gid) VALUES ($1)",
                &[&pg.gid()],
            )
            .await
            .expect("conflicting marker");

        match w.db.commit_one_phase(&tx_id, &branch_id).await {
            Ok(OnePhase::Refused(why)) => assert!(why.contains("23505"), "{why}"),
            other => panic!("the commit must be refused, got {other:?}"),
        }
        assert_eq!(w.orders().await, 0);
        assert_eq!(outbox_rows(&w.url).await, 0);
        // The branch remembers its answer; no event was published.
        assert!(matches!(
            w.db.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Refused(_))
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = w.probe.drain(&w.queue).await;
        w.probe.delete(&w.queue).await;
        assert!(got.is_empty(), "{got:?}");
        let _ = tx.abort("test").await;
        w.sdk.shutdown().await;
        w.coord.stop().await;
    })
    .await;
}

/// Queues order `id` (`item`) on `pg` with `PgBranch::defer`.
async fn defer_order(pg: &PgBranch, id: i32, item: &str) {
    pg.defer(
        "INSERT INTO orders VALUES ($1, $2)",
        vec![Box::new(id), Box::new(item.to_string())],
    )
    .await
    .expect("defer");
}

/// `PgBranch::defer`: nothing reaches PostgreSQL before the commit (no block is open),
/// then the deferred rows, the event's row, the marker and `COMMIT` go out together and
/// commit; a statement run after a deferred one sees its row (deferred statements go out
/// in front of the next statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_writes_go_out_with_the_commit_and_commit() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_defer", "obdefer", ORDERS, slow_sweep(), false).await;
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let pg = tx.postgres(&w.db).await.expect("branch");
        for (id, item) in [(1, "one"), (2, "two")] {
            defer_order(&pg, id, item).await;
        }
        pg.publish(&*w.rabbit, &w.queue, b"deferred".to_vec())
            .await
            .expect("publish");
        assert_eq!(
            count(&w.url, support::OPEN_TRANSACTIONS_SQL).await,
            0,
            "nothing may be sent before the commit"
        );
        tx.commit().await.expect("commit");
        assert_eq!(w.orders().await, 2);
        let got = w.probe.take(&w.queue, 1).await;
        assert_eq!(got[0].payload, b"deferred".to_vec());

        // A deferred row is there for the next statement of the same branch.
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let pg = tx.postgres(&w.db).await.expect("branch");
        defer_order(&pg, 3, "three").await;
        let seen: i64 = pg
            .query_one("SELECT count(*) FROM orders WHERE id = 3", &[])
            .await
            .expect("select")
            .get(0);
        assert_eq!(
            seen, 1,
            "the deferred INSERT runs in front of the next statement"
        );
        tx.commit().await.expect("commit");
        assert_eq!(w.orders().await, 3);
        w.stop().await;
    })
    .await;
}

/// A deferred statement the database refuses refuses the commit it went out with (one
/// phase) or makes the prepare vote no (two phases): nothing committed, nothing
/// published, and the reason names the deferred statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_statement_that_fails_refuses_the_commit_or_the_prepare() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start(
            "outbox_deferfail",
            "obdeferfail",
            ORDERS,
            slow_sweep(),
            false,
        )
        .await;
        // One phase: the local transaction's commit is refused.
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let pg = tx.postgres(&w.db).await.expect("branch");
        for _ in 0..2 {
            defer_order(&pg, 7, "dup").await;
        }
        pg.publish(&*w.rabbit, &w.queue, b"must not be published".to_vec())
            .await
            .expect("publish");
        match tx.commit().await {
            Err(Error::Aborted(why)) => {
                assert!(
                    why.contains("deferred statement") && why.contains("23505"),
                    "{why}"
                )
            }
            other => panic!("the commit must be refused, got {other:?}"),
        }

        // Two phases: the prepare votes no.
        let tx = w.sdk.begin().await.expect("begin");
        let pg = tx.postgres(&w.db).await.expect("branch");
        for _ in 0..2 {
            defer_order(&pg, 8, "dup").await;
        }
        pg.publish(&*w.rabbit, &w.queue, b"must not be published".to_vec())
            .await
            .expect("publish");
        let (tx_id, branch_id) = (tx.id().to_string(), pg.branch_id().to_string());
        match w.db.prepare(&tx_id, &branch_id).await {
            Vote::No(why) => {
                assert!(
                    why.contains("deferred statement") && why.contains("23505"),
                    "{why}"
                )
            }
            other => panic!("the prepare must vote no, got {other:?}"),
        }
        let _ = tx.abort("test").await;

        assert_eq!(w.orders().await, 0);
        assert_eq!(outbox_rows(&w.url).await, 0);
        assert_eq!(prepared_gids(&w.url).await, 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = w.probe.drain(&w.queue).await;
        assert!(got.is_empty(), "{got:?}");
        w.stop().await;
    })
    .await;
}

/// Deferred statements and a two-phase commit: they go out in front of `PREPARE
/// TRANSACTION` and commit with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_writes_go_out_before_prepare_and_commit_in_phase_two() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_defer2pc", "obdefer2pc", ORDERS, slow_sweep(), false).await;
        let tx = w.sdk.begin().await.expect("begin");
        let pg = tx.postgres(&w.db).await.expect("branch");
        defer_order(&pg, 1, "one").await;
        let (tx_id, branch_id) = (tx.id().to_string(), pg.branch_id().to_string());
        assert_eq!(w.db.prepare(&tx_id, &branch_id).await, Vote::Yes);
        assert_eq!(prepared_gids(&w.url).await, 1);
        w.db.commit(&tx_id, &branch_id)
            .await
            .expect("commit prepared");
        assert_eq!(w.orders().await, 1);
        let _ = tx.abort("test").await;
        w.stop().await;
    })
    .await;
}

/// The fence that settles a one-phase commit whose answer was lost. A commit that
/// inserted its marker but has not ended holds the gid: settling waits for it and answers
/// from its end (committed: "committed"; rolled back: "refused", and the fence stays). A
/// commit that comes after the fence fails on it: nothing committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_waits_for_a_commit_in_flight_and_stops_a_late_one() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_fence", "obfence", ORDERS, slow_sweep(), false).await;
        // "Restarted": a resource that knows none of the branches below.
        let again = w.restarted().await;
        let fence_of = |gid: String| {
            let url = w.url.clone();
            async move {
                count(
                    &url,
                    &format!("SELECT count(*) FROM twopc_one_phase WHERE fenced AND gid = '{gid}'"),
                )
                .await
            }
        };
        for (n, ends_with) in [(1, "COMMIT"), (2, "ROLLBACK")] {
            let (tx_id, branch_id) = (format!("feedbeef-{n}-1"), "svc:db".to_string());
            let gid = format!("twopc:{tx_id}:{branch_id}");
            // A commit in flight: its marker inserted, its block not ended yet.
            let inflight = connect(&w.url).await;
            inflight.batch_execute("BEGIN").await.expect("begin");
            inflight
                .execute("INSERT INTO twopc_one_phase (gid) VALUES ($1)", &[&gid])
                .await
                .expect("marker");
            let settle = {
                let again = again.clone();
                let (tx_id, branch_id) = (tx_id.clone(), branch_id.clone());
                tokio::spawn(async move { again.commit_one_phase(&tx_id, &branch_id).await })
            };
            eventually(WAIT, "the settling waits on the marker's gid", || async {
                count(
                    &w.url,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock'",
                )
                .await
                    == 1
            })
            .await;
            assert!(
                !settle.is_finished(),
                "it must wait for the commit in flight"
            );
            inflight.batch_execute(ends_with).await.expect("end");
            let answer = settle.await.expect("join");
            if ends_with == "COMMIT" {
                assert_eq!(answer, Ok(OnePhase::Committed));
                assert_eq!(fence_of(gid.clone()).await, 0);
            } else {
                assert!(matches!(answer, Ok(OnePhase::Refused(_))), "{answer:?}");
                assert_eq!(fence_of(gid.clone()).await, 1, "the fence stays");
            }
        }

        // A commit that comes after its fence fails on it.
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let pg = tx.postgres(&w.db).await.expect("branch");
        defer_order(&pg, 1, "late").await;
        let (tx_id, branch_id) = (tx.id().to_string(), pg.branch_id().to_string());
        assert!(matches!(
            again.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Refused(_))
        ));
        assert_eq!(fence_of(pg.gid().to_string()).await, 1);
        assert!(matches!(tx.commit().await, Err(Error::Aborted(_))));
        assert_eq!(w.orders().await, 0);
        w.stop().await;
    })
    .await;
}

/// A one-phase commit whose answer was lost, repeated by the coordinator after the
/// participant restarted: the commit's marker says it happened (before the marker, the
/// unknown branch was refused and the coordinator recorded the committed transaction as
/// aborted). Once the owner's Commit returned (the coordinator knows the outcome), the
/// marker goes; an unknown branch without a marker is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_one_phase_commit_after_a_restart_finds_its_marker() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_marker", "obmark", ORDERS, slow_sweep(), false).await;

        // The coordinator's one-phase commit, as the participant server would run it.
        let (tx, tx_id, branch_id) = w.order_committed_in_one_phase().await;
        let marker_sql =
            format!("SELECT count(*) FROM twopc_one_phase WHERE NOT fenced AND gid = 'twopc:{tx_id}:{branch_id}'");
        let marked = || count(&w.url, &marker_sql);
        assert_eq!(marked().await, 1, "the commit left its marker");

        // "Restarted": a new resource on the same database knows nothing of the branch.
        let again = w.restarted().await;
        assert_eq!(
            again.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Committed),
            "the repeated one-phase commit must learn that the first one happened"
        );
        match again.commit_one_phase("feedbeef-1-9", &branch_id).await {
            Ok(OnePhase::Refused(why)) => assert!(why.contains("unknown branch"), "{why}"),
            other => panic!("an unknown branch without a marker is refused, got {other:?}"),
        }

        // The owner learns the outcome: the marker goes (and a later repeat is refused).
        w.db.outcome_known(&tx_id, &branch_id);
        eventually(WAIT, "the marker is deleted", || async {
            marked().await == 0
        })
        .await;
        assert!(matches!(
            again.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Refused(_))
        ));
        assert_eq!(
            w.orders().await,
            1,
            "the row is committed once"
        );
        tx.abort("the test committed the branch itself").await.ok();
        w.coord.stop().await;
    })
    .await;
}

/// A transaction committed through the SDK leaves no marker behind: its owner's Commit
/// returned and the handle's forgetter got a `Barrier` of the same coordinator epoch, so
/// the coordinator holds the outcome durably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committed_by_its_owner_leaves_no_marker() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_nomark", "obnomark", ORDERS, slow_sweep(), false).await;
        // The coordinator reports an epoch, so the commits below are answered before
        // durable and their markers go through the forgetter's Barrier (not at once).
        let epoch = w
            .sdk
            .coordinator()
            .barrier(pb::BarrierRequest {})
            .await
            .expect("Barrier")
            .into_inner()
            .epoch;
        assert_ne!(epoch, 0, "the coordinator reports its epoch");
        for i in 0..5 {
            let tx = w.sdk.begin().await.expect("begin");
            let insert = format!("INSERT INTO orders VALUES ({i}, 'x')");
            w.branch_with(&tx, &insert, &w.queue, b"x").await;
            tx.commit().await.expect("commit");
        }
        eventually(WAIT, "every marker is deleted", || async {
            w.markers().await == 0
        })
        .await;
        assert_eq!(w.orders().await, 5);
        w.coord.stop().await;
    })
    .await;
}

/// The answer of an abort for one branch through the participant server, unary or over
/// the `Exchange` stream: its `AbortResult`, or the status it failed with.
async fn abort_via_server(
    endpoint: &str,
    tx_id: &str,
    branch_id: &str,
    streamed: bool,
) -> Result<i32, tonic::Status> {
    let req = pb::AbortBranchRequest {
        tx_id: tx_id.to_string(),
        branch_id: branch_id.to_string(),
    };
    if !streamed {
        let mut c = ParticipantClient::connect(endpoint.to_string())
            .await
            .expect("connect to the participant server");
        return c.abort(req).await.map(|r| r.into_inner().result);
    }
    let mut c = ParticipantExchangeClient::connect(endpoint.to_string())
        .await
        .expect("connect to the participant server");
    let (calls, rx) = tokio::sync::mpsc::channel(1);
    calls
        .send(pb::ExchangeRequest {
            calls: vec![pb::ParticipantCall {
                call_id: 7,
                call: Some(pb::participant_call::Call::Abort(req)),
            }],
        })
        .await
        .expect("queue the call");
    let mut answers = c
        .exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Exchange")
        .into_inner();
    let frame = answers
        .message()
        .await
        .expect("an answer frame")
        .expect("the stream is open");
    drop(calls);
    let result = frame
        .results
        .into_iter()
        .find(|r| r.call_id == 7)
        .and_then(|r| r.result);
    match result {
        Some(pb::participant_result::Result::Abort(a)) => Ok(a.result),
        Some(pb::participant_result::Result::Error(e)) => {
            Err(tonic::Status::new(tonic::Code::from(e.code), e.message))
        }
        other => panic!("expected an abort answer, got {other:?}"),
    }
}

/// An abort answers what became of the branch: a restarted coordinator settles a
/// one-phase commit whose outcome record it lost with an abort, and trusts the answer.
/// With the outbox, a branch committed in one phase is `AlreadyCommitted` (nothing is
/// undone) also after the participant "restarted" (a new resource: no slot, but the
/// commit's marker), through the resource and through the participant server (unary and
/// `Exchange`); an open branch is `Aborted` and rolled back, messages included; a
/// prepared branch after the restart and an unknown branch are `Aborted`; the abort of a
/// branch of a resource not registered (yet) fails, never a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_reports_a_one_phase_commit_committed_also_after_a_restart() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_abres", "obabres", ORDERS, slow_sweep(), false).await;

        // Committed in one phase, as the participant server runs the coordinator's call.
        let (tx, tx_id, branch_id) = w.order_committed_in_one_phase().await;
        assert_eq!(
            w.db.abort(&tx_id, &branch_id).await,
            Ok(AbortOutcome::AlreadyCommitted)
        );
        let ok = pb::AbortResult::AlreadyCommitted as i32;
        assert_eq!(
            abort_via_server(w.sdk.endpoint(), &tx_id, &branch_id, false)
                .await
                .expect("abort"),
            ok
        );
        assert_eq!(
            abort_via_server(w.sdk.endpoint(), &tx_id, &branch_id, true)
                .await
                .expect("abort"),
            ok
        );

        // A branch opened, then prepared, before the "restart".
        let tx2 = w.sdk.begin().await.expect("begin");
        let prepared = tx2.postgres(&w.db).await.expect("branch");
        prepared
            .execute("INSERT INTO orders VALUES (2, 'two')", &[])
            .await
            .expect("insert");
        assert_eq!(
            w.db.prepare(tx2.id(), prepared.branch_id()).await,
            Vote::Yes
        );

        // "Restarted": a new resource on the same database knows nothing of the branches.
        let again = w.restarted().await;
        for _ in 0..2 {
            assert_eq!(
                again.abort(&tx_id, &branch_id).await,
                Ok(AbortOutcome::AlreadyCommitted),
                "the marker tells that the one-phase commit happened"
            );
        }
        assert_eq!(
            again.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Committed),
            "the abort undid nothing"
        );
        assert_eq!(
            again.abort(tx2.id(), prepared.branch_id()).await,
            Ok(AbortOutcome::Aborted),
            "a prepared branch is rolled back"
        );
        assert_eq!(prepared_gids(&w.url).await, 0);
        assert_eq!(
            again.abort("0000feed-1-1", &branch_id).await,
            Ok(AbortOutcome::Aborted),
            "an unknown branch without a marker"
        );

        // An open branch: rolled back with its staged message.
        let tx3 = w.sdk.begin().await.expect("begin");
        let insert = "INSERT INTO orders VALUES (3, 'three')";
        let open = w.branch_with(&tx3, insert, &w.queue, b"three").await;
        assert_eq!(
            w.db.abort(tx3.id(), open.branch_id()).await,
            Ok(AbortOutcome::Aborted)
        );
        assert!(matches!(
            open.execute("SELECT 1", &[]).await,
            Err(Error::Usage(ref m)) if m.contains("aborted")
        ));

        // Through the server: an unknown branch of a registered resource is aborted; the
        // abort of a resource not registered here fails (UNAVAILABLE, to be asked again)
        // rather than claim anything.
        assert_eq!(
            abort_via_server(w.sdk.endpoint(), "0000feed-1-2", &branch_id, false)
                .await
                .expect("abort"),
            pb::AbortResult::Aborted as i32
        );
        for streamed in [false, true] {
            let e = abort_via_server(w.sdk.endpoint(), "0000feed-1-3", "svc:nope", streamed)
                .await
                .expect_err("a resource not registered here");
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(e.message().contains("\"nope\""), "{e:?}");
        }

        assert_eq!(
            w.orders().await,
            1,
            "only the one-phase commit's row is there"
        );
        let got = w.probe.take(&w.queue, 1).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"one".to_vec());
        assert_eq!(
            outbox_rows(&w.url).await,
            0,
            "nothing of the aborts is staged"
        );
        for t in [tx, tx2, tx3] {
            t.abort("the test finished the branches itself").await.ok();
        }
        w.coord.stop().await;
    })
    .await;
}

/// The coordinator's outcome of `tx_id` (OUTCOME_* as i32).
async fn outcome(sdk: &TwoPc, tx_id: &str) -> i32 {
    get_tx(sdk, tx_id).await.outcome
}

/// Test: a transaction begun with `begin_local` is committed by this process (no
/// coordinator round trip at commit), its event published once, and the coordinator
/// learns the outcome from the background report; the marker goes after a Barrier. Its
/// abort, a commit the database refuses, and a transaction left alone past its timeout
/// all end ABORTED at the coordinator with nothing in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_transaction_commits_here_and_the_coordinator_learns_it() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_local", "oblc", ORDERS, fast_sweep(), false).await;

        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let tx_id = tx.id().to_string();
        assert_eq!(
            coordinator_branches(&w.sdk, &tx_id).await,
            vec![(tx.branch_id(&*w.db), pb::BranchKind::Database as i32)],
            "the branch is enlisted by the Begin call"
        );
        assert_eq!(
            get_tx(&w.sdk, &tx_id).await.state,
            pb::TxState::Preparing as i32,
            "in its participant's hands from the start"
        );
        w.branch_with(
            &tx,
            "INSERT INTO orders VALUES (1, 'local')",
            &w.queue,
            b"local",
        )
        .await;
        // No second branch can join.
        let err = tx.enlist(&*w.rabbit).await.expect_err("a second branch");
        assert!(usage(err).contains("begin_local"));
        tx.commit().await.expect("local commit");
        assert_eq!(w.orders().await, 1);
        let got = w.probe.take(&w.queue, 1).await;
        assert_eq!(got[0].payload, b"local".to_vec());
        eventually(WAIT, "the coordinator records COMMITTED", || async {
            outcome(&w.sdk, &tx_id).await == pb::Outcome::Committed as i32
        })
        .await;
        eventually(WAIT, "the marker is forgotten after a Barrier", || async {
            w.markers().await == 0
        })
        .await;

        // Aborted by its owner: rolled back, ABORTED at once.
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let tx_id = tx.id().to_string();
        let pg = tx.postgres(&w.db).await.expect("branch");
        pg.execute("INSERT INTO orders VALUES (2, 'aborted')", &[])
            .await
            .expect("insert");
        tx.abort("changed my mind").await.expect("abort");
        assert_eq!(outcome(&w.sdk, &tx_id).await, pb::Outcome::Aborted as i32);
        assert_eq!(w.orders().await, 1);

        // A commit the database refuses: ABORTED here and, from the background abort, at
        // the coordinator.
        let tx = w.sdk.begin_local(&*w.db).await.expect("begin_local");
        let tx_id = tx.id().to_string();
        let pg = tx.postgres(&w.db).await.expect("branch");
        let _ = pg
            .execute("INSERT INTO orders VALUES (1, 'duplicate')", &[])
            .await
            .expect_err("duplicate key");
        let err = tx.commit().await.expect_err("refused");
        assert!(matches!(err, Error::Aborted(_)), "{err}");
        eventually(WAIT, "the coordinator records ABORTED", || async {
            outcome(&w.sdk, &tx_id).await == pb::Outcome::Aborted as i32
                && get_tx(&w.sdk, &tx_id).await.state != pb::TxState::Preparing as i32
        })
        .await;
        assert_eq!(w.orders().await, 1);

        w.stop().await;
    })
    .await;
}

/// Test: a process commits a local transaction (row, event and marker in one database
/// commit) and dies before reporting it. A new process on the same database reports it
/// from its first periodic recovery pass over the database, registered after the handle
/// started and before its outbox is enabled (the order a service sets up in), instead of
/// waiting until the marker is a minute old. The coordinator then records COMMITTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_commit_its_process_never_reported_is_reported_by_the_next_process() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_unreported", "obunrep", ORDERS, slow_sweep(), false).await;
        let (tx_id, keep) = unreported_local_commit(&w.sdk, &w.db, 1).await;
        // The process "dies".
        w.sdk.shutdown().await;
        drop(keep);
        assert_eq!(
            get_tx(&w.sdk, &tx_id).await.state,
            pb::TxState::Preparing as i32,
            "the coordinator has not heard of the commit"
        );

        let sdk2 = w.next_process(Duration::from_millis(200)).await;
        let _db2 = w.register_with_outbox(&sdk2, "db", &w.url).await;
        eventually(WAIT, "the coordinator records COMMITTED", || async {
            outcome(&sdk2, &tx_id).await == pb::Outcome::Committed as i32
        })
        .await;
        assert_eq!(w.orders().await, 1);

        w.probe.delete(&w.queue).await;
        sdk2.shutdown().await;
        w.coord.stop().await;
    })
    .await;
}

/// Test: the first periodic recovery pass over a resource reports the one-phase commits
/// an earlier process left unreported, but not those of this process (its reporter's,
/// which may be on their way: a pass that reported them too raced it, and forgot the
/// marker under a report about to be sent). Resource "a" (visited first) holds a commit
/// of this process made before the pass; "db" holds an earlier process's: once that one
/// is COMMITTED the pass has been over "a", and this process's commit is still
/// unreported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_periodic_pass_reports_only_an_earlier_processs_local_commits() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start("outbox_ownfirst", "obownfirst", ORDERS, slow_sweep(), false).await;
        // The earlier process: commits locally on "db", never reports, dies.
        let (earlier, _) = unreported_local_commit(&w.sdk, &w.db, 1).await;
        w.sdk.shutdown().await;

        // This process: a first periodic pass 2 s after start (the pass at start runs
        // before anything is registered).
        let sdk2 = w.next_process(Duration::from_secs(2)).await;
        let url_a = database("obownfirst_a", ORDERS).await;
        let a = w.register_with_outbox(&sdk2, "a", &url_a).await;
        let _db2 = w.register_with_outbox(&sdk2, "db", &w.url).await;
        let (own, _keep) = unreported_local_commit(&sdk2, &a, 2).await;

        eventually(WAIT, "the earlier process's commit is reported", || async {
            outcome(&sdk2, &earlier).await == pb::Outcome::Committed as i32
        })
        .await;
        assert_eq!(
            get_tx(&sdk2, &own).await.state,
            pb::TxState::Preparing as i32,
            "the pass reported a commit of this process"
        );
        assert_eq!(
            unfenced_markers(&url_a).await,
            1,
            "this process's marker stays for its reporter"
        );

        w.probe.delete(&w.queue).await;
        sdk2.shutdown().await;
        w.coord.stop().await;
    })
    .await;
}

/// Commits order `id` locally on `db` (row and marker in one database commit) the way
/// `Transaction::commit` does, without its report to the coordinator. Returns the
/// transaction id and what must live as long as the commit is to stay unreported.
async fn unreported_local_commit(
    sdk: &TwoPc,
    db: &Arc<PgResource>,
    id: i32,
) -> (String, (PgBranch, Transaction)) {
    let tx = sdk.begin_local(&**db).await.expect("begin_local");
    let tx_id = tx.id().to_string();
    let pg = tx.postgres(db).await.expect("branch");
    pg.execute("INSERT INTO orders VALUES ($1, 'unreported')", &[&id])
        .await
        .expect("insert");
    let branch_id = pg.branch_id().to_string();
    assert_eq!(
        db.commit_one_phase(&tx_id, &branch_id).await,
        Ok(OnePhase::Committed)
    );
    (tx_id, (pg, tx))
}

/// Test: a resource lists its database's one-phase markers whether or not this process
/// has enabled its outbox yet (an earlier process's markers are reported by the first
/// recovery pass, which may run before `enable_outbox`), only those of its own name, and
/// none, without an error, on a database that never had the marker table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_commits_are_listed_before_the_outbox_is_enabled() {
    bounded(TEST_TIMEOUT, async {
        let bare = resource("db", &database("obnotable", ORDERS).await).await;
        assert_eq!(bare.remembered_commits(Duration::ZERO).await, vec![]);

        let setup = format!(
            "{ORDERS}; CREATE TABLE twopc_one_phase (gid text PRIMARY KEY, \
             committed_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
             INSERT INTO twopc_one_phase (gid) VALUES \
             ('twopc:0000beef-1-7:svc:db'), ('twopc:0000beef-1-8:svc:other')"
        );
        let db = resource("db", &database("obmarked", &setup).await).await;
        assert_eq!(
            db.remembered_commits(Duration::ZERO).await,
            vec![("0000beef-1-7".to_string(), "svc:db".to_string())]
        );
        assert_eq!(
            db.remembered_commits(Duration::from_secs(60)).await,
            vec![],
            "not a minute old yet"
        );
    })
    .await;
}

/// Test: a local transaction its application never finishes is aborted at the
/// transaction timeout by asking its participant, which rolls it back; a late commit is
/// then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_transaction_left_open_is_aborted_at_its_timeout() {
    bounded(TEST_TIMEOUT, async {
        let coord = Coordinator::start(ServeConfig {
            tx_timeout_ms: 1_000,
            ..one_phase_on()
        })
        .await;
        let (sdk, url, db) = handle_and_db(&coord, "obto").await;
        let tx = sdk.begin_local(&*db).await.expect("begin_local");
        let tx_id = tx.id().to_string();
        let pg = tx.postgres(&db).await.expect("branch");
        pg.execute("INSERT INTO orders VALUES (1, 'forgotten')", &[])
            .await
            .expect("insert");
        eventually(WAIT, "the coordinator aborts it at its timeout", || async {
            outcome(&sdk, &tx_id).await == pb::Outcome::Aborted as i32
        })
        .await;
        let err = tx.commit().await.expect_err("too late");
        assert!(matches!(err, Error::Aborted(_)), "{err}");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 0);
        sdk.shutdown().await;
        coord.stop().await;
    })
    .await;
}

/// Test: against a coordinator with one-phase commits off, `begin_local` begins an
/// ordinary transaction and the commit goes through the coordinator (two phases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_local_falls_back_to_the_coordinator_without_one_phase_commits() {
    bounded(TEST_TIMEOUT, async {
        let coord = Coordinator::start(ServeConfig {
            one_phase: false,
            ..quick_retries()
        })
        .await;
        let (sdk, url, db) = handle_and_db(&coord, "obfb").await;
        let tx = sdk.begin_local(&*db).await.expect("begin_local");
        let tx_id = tx.id().to_string();
        assert_eq!(
            get_tx(&sdk, &tx_id).await.state,
            pb::TxState::Active as i32,
            "an ordinary transaction"
        );
        let pg = tx.postgres(&db).await.expect("branch");
        pg.execute("INSERT INTO orders VALUES (1, 'two phases')", &[])
            .await
            .expect("insert");
        tx.commit().await.expect("commit through the coordinator");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(outcome(&sdk, &tx_id).await, pb::Outcome::Committed as i32);
        sdk.shutdown().await;
        coord.stop().await;
    })
    .await;
}

/// Test: under load, `begin_local` takes ids begun ahead (one Begin for many
/// transactions); every transaction still gets an id of its own and commits, and the ids
/// left over go back at shutdown, so the coordinator holds nothing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_transactions_under_load_are_begun_ahead_and_leftovers_go_back() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let (sdk, url, db) = handle_and_db(&coord, "obahead").await;
        let next = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let saw_ahead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..8).map(|_| {
            let (sdk, db, next, saw) = (sdk.clone(), db.clone(), next.clone(), saw_ahead.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                // Until ids were seen waiting in the pool (at most 600 orders a worker).
                for _ in 0..600 {
                    if saw.load(std::sync::atomic::Ordering::SeqCst) && ids.len() >= 50 {
                        break;
                    }
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let tx = sdk.begin_local(&*db).await.expect("begin_local");
                    ids.push(tx.id().to_string());
                    let pg = tx.postgres(&db).await.expect("branch");
                    pg.execute("INSERT INTO orders VALUES ($1, 'ahead')", &[&n])
                        .await
                        .expect("insert");
                    tx.commit().await.expect("local commit");
                    if sdk.begun_ahead() > 0 {
                        saw.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                ids
            })
        });
        let mut ids = Vec::new();
        for w in workers {
            ids.extend(w.await.expect("worker"));
        }
        assert!(
            saw_ahead.load(std::sync::atomic::Ordering::SeqCst),
            "no id was ever begun ahead in {} transactions",
            ids.len()
        );
        let committed = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(
            ids.len(),
            committed,
            "every transaction has an id of its own"
        );
        assert_eq!(
            count(&url, "SELECT count(*) FROM orders").await,
            committed as i64
        );
        eventually(
            WAIT,
            "the coordinator records every local commit",
            || async {
                for id in &ids {
                    if outcome(&sdk, id).await != pb::Outcome::Committed as i32 {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        sdk.shutdown().await;
        // The ids still pooled at shutdown went back (asked and answered before the
        // participant server stopped): nothing is left waiting for a timeout.
        let live = sdk
            .coordinator()
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .transactions;
        assert!(live.is_empty(), "{live:?}");
        coord.stop().await;
    })
    .await;
}

/// Commits order `n` with one staged event through the owner's `commit`; returns how
/// long the commit took.
async fn timed_order(w: &World, n: i32) -> Duration {
    let tx = w.sdk.begin().await.expect("begin");
    let pg = tx.postgres(&w.db).await.expect("branch");
    pg.execute("INSERT INTO orders VALUES ($1, 'window')", &[&n])
        .await
        .expect("insert");
    pg.publish(&*w.rabbit, &w.queue, format!("order {n}").into_bytes())
        .await
        .expect("publish");
    let started = Instant::now();
    tx.commit().await.expect("commit");
    started.elapsed()
}

/// The bodies of `got`, in order.
fn bodies(got: &[Got]) -> Vec<&[u8]> {
    got.iter().map(|g| g.payload.as_slice()).collect()
}

/// Options with a window of one committed branch and a publisher that lingers 1 s before
/// each batch, so the first commit's message is still unpublished for a second.
fn window_of_one(publish_wait: Duration) -> OutboxOptions {
    OutboxOptions {
        publish_window: 1,
        publish_linger: Duration::from_secs(1),
        publish_wait,
        ..slow_sweep()
    }
}

/// The publish window keeps a slow broker from falling ever further behind: within the
/// window a commit answers as soon as the database committed (its message is published
/// later); beyond it, the commit answers only once the broker confirmed its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_publish_window_a_commit_waits_for_its_messages() {
    bounded(TEST_TIMEOUT, async {
        let options = window_of_one(Duration::from_secs(10));
        let w = World::start("outbox_window", "obwindow", ORDERS, options, false).await;
        let first = timed_order(&w, 1).await;
        assert!(
            w.probe.drain(&w.queue).await.is_empty(),
            "the first commit answered before its message was published"
        );
        assert!(
            first < Duration::from_millis(900),
            "first commit took {first:?}"
        );
        // The window is full until the first message is confirmed: the second commit
        // waits for that and for its own message's confirmation.
        let second = timed_order(&w, 2).await;
        let got = w.probe.drain(&w.queue).await;
        assert_eq!(
            bodies(&got),
            [b"order 1".as_slice(), b"order 2"],
            "after {second:?}"
        );
        assert!(
            second >= Duration::from_millis(900),
            "second commit took {second:?}"
        );
        w.stop().await;
    })
    .await;
}

/// A commit beyond the window waits at most `publish_wait`; its message is published
/// all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_beyond_the_window_waits_at_most_publish_wait() {
    bounded(TEST_TIMEOUT, async {
        let options = window_of_one(Duration::from_millis(200));
        let w = World::start("outbox_waitcap", "obwaitcap", ORDERS, options, false).await;
        timed_order(&w, 1).await;
        let second = timed_order(&w, 2).await;
        assert!(
            (Duration::from_millis(150)..Duration::from_millis(900)).contains(&second),
            "second commit took {second:?}"
        );
        let got = w.probe.take(&w.queue, 2).await;
        assert_eq!(bodies(&got), [b"order 1".as_slice(), b"order 2"]);
        assert_eq!(w.orders().await, 2);
        w.stop().await;
    })
    .await;
}

/// Markers and fences (rows that settle a lost one-phase answer as "not committed") both
/// go once older than `marker_retention`, and not before: the table does not grow with
/// every answer ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_and_markers_expire_after_marker_retention() {
    bounded(TEST_TIMEOUT, async {
        let options = OutboxOptions {
            marker_retention: Duration::from_secs(30),
            ..fast_sweep()
        };
        let w = World::start("outbox_expire", "obexp", ORDERS, options, false).await;
        let c = connect(&w.url).await;
        for (gid, fenced, age_s) in [
            ("twopc:00000001-1-1:svc:db", true, 60.0),
            ("twopc:00000001-1-2:svc:db", false, 60.0),
            ("twopc:00000001-1-3:svc:db", true, 0.0),
            ("twopc:00000001-1-4:svc:db", false, 0.0),
        ] {
            c.execute(
                "INSERT INTO twopc_one_phase (gid, fenced, committed_at) \
                 VALUES ($1, $2, clock_timestamp() - make_interval(secs => $3))",
                &[&gid, &fenced, &age_s],
            )
            .await
            .expect("insert a marker or fence by hand");
        }
        let left = || async {
            let rows = c
                .query("SELECT gid FROM twopc_one_phase ORDER BY gid", &[])
                .await
                .expect("list");
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        };
        eventually(WAIT, "the old fence and marker expire", || async {
            left().await.len() == 2
        })
        .await;
        assert_eq!(
            left().await,
            vec![
                "twopc:00000001-1-3:svc:db".to_string(),
                "twopc:00000001-1-4:svc:db".to_string()
            ],
            "only rows older than marker_retention go"
        );
        w.stop().await;
    })
    .await;
}
