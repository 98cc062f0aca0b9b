//! A transaction id propagated over real gRPC lets a second service enlist its own
//! branches in the caller's transaction.
//!
//! Two services, each with its own [`TwoPc`] handle, data directory, PostgreSQL database
//! and RabbitMQ resource (with its own staging store), share one in-process coordinator:
//!
//! * **A, "orders"**: begins the transaction, inserts its order, publishes `OrderCreated`
//!   and calls B's `Inventory.Reserve` through a tonic client wrapped in
//!   [`TxInterceptor`], which stamps the transaction id into the `twopc-tx-id` metadata.
//! * **B, "inventory"**: a tonic server with the [`TxIdLayer`] layer; its `Reserve`
//!   handler reads the id ([`propagation::extract`]), joins the transaction
//!   ([`TwoPc::join`]), inserts a reservation (and takes the units off its stock) and
//!   publishes `StockReserved`.
//!
//! A's commit (or abort) then decides all four branches, A's and B's alike.
//!
//! Real systems: a private PostgreSQL cluster (testkit [`PgCluster`], one per test binary,
//! fresh databases per test), the system RabbitMQ at 127.0.0.1:5672 (guest/guest, unique
//! queue names per test, drained directly), the coordinator in-process on 127.0.0.1:0.
//! Every test is bounded, every RPC has a timeout, and asynchronous effects are awaited
//! by polling with a deadline ([`eventually`]), never by sleeping.
//!
//! [`PgCluster`]: twopc_testkit::PgCluster

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status};
use twopc_coordinator::config::ServeConfig;
use twopc_participant::propagation::{self, PropagatedTx, TxIdLayer, TxInterceptor};
use twopc_participant::{
    Broker, Error, PgResource, PublishOptions, RabbitResource, StagingStore, Transaction, TwoPc,
};
use twopc_proto::example::v1::inventory_client::InventoryClient;
use twopc_proto::example::v1::inventory_server::{Inventory, InventoryServer};
use twopc_proto::example::v1::{ReserveRequest, ReserveResponse};
use twopc_proto::v1 as pb;
use twopc_testkit::requests;
use twopc_testkit::unique_name;

mod support;
use support::{
    bounded, database, eventually, resource, staging, Coordinator, RabbitProbe, Wait, RABBIT_URL,
};

/// Overall bound of one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound of one wait for a condition, polled every 25 ms.
const WAIT: Wait = Wait {
    limit: Duration::from_secs(20),
    every: Duration::from_millis(25),
};
/// Bound of one RPC (A to B, either to the coordinator) and of one commit / abort.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the coordinator lets a commit wait for phase two before answering.
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// A's database.
const ORDERS_SQL: &str =
    "CREATE TABLE orders (id text PRIMARY KEY, item text NOT NULL, quantity int NOT NULL)";

/// B's database. The reservation's reference to the stock item is checked only at the
/// end of the transaction, i.e. by `PREPARE TRANSACTION`: a reservation of an unknown
/// item is accepted by the INSERT and refused at prepare.
const INVENTORY_SQL: &str = "
    CREATE TABLE stock (item text PRIMARY KEY, on_hand int NOT NULL);
    CREATE TABLE reservations (
        order_id text PRIMARY KEY,
        item text NOT NULL,
        quantity int NOT NULL,
        CONSTRAINT reservations_item_in_stock FOREIGN KEY (item) REFERENCES stock (item)
            DEFERRABLE INITIALLY DEFERRED
    );
    INSERT INTO stock VALUES ('book', 10);
";

// ---------------------------------------------------------------------------------------
// Harness: bounds
// ---------------------------------------------------------------------------------------

/// Awaits `fut` for at most [`RPC_TIMEOUT`]; panics naming `what` when it takes longer.
async fn timed<T>(what: &str, fut: impl Future<Output = T>) -> T {
    support::timed(RPC_TIMEOUT, what, fut).await
}

// ---------------------------------------------------------------------------------------
// Harness: PostgreSQL (test-side connections bounded by RPC_TIMEOUT, like every call)
// ---------------------------------------------------------------------------------------

/// A test-side connection to `url`, outside any branch.
async fn connect(url: &str) -> tokio_postgres::Client {
    support::connect_within(RPC_TIMEOUT, url).await
}

async fn count(url: &str, sql: &str) -> i64 {
    support::count_within(RPC_TIMEOUT, url, sql).await
}

/// Prepared transactions of any kind left in the database.
async fn prepared_gids(url: &str) -> i64 {
    count(url, support::PREPARED_GIDS_SQL).await
}

/// Sessions holding an open transaction block in the database (an open branch).
async fn open_transactions(url: &str) -> i64 {
    count(url, support::OPEN_TRANSACTIONS_SQL).await
}

async fn on_hand(url: &str, item: &str) -> i32 {
    connect(url)
        .await
        .query_one("SELECT on_hand FROM stock WHERE item = $1", &[&item])
        .await
        .expect("stock query")
        .get(0)
}

// ---------------------------------------------------------------------------------------
// Harness: RabbitMQ consumer side
// ---------------------------------------------------------------------------------------

/// One message as found in a queue: the event's view of it.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    message_id: String,
    payload: String,
    kind: Option<String>,
}

impl RabbitProbe {
    /// Takes every message currently in `queue`, as events (`kind` is the `type` header).
    async fn events(&self, queue: &str) -> Vec<Got> {
        self.drain(queue)
            .await
            .into_iter()
            .map(|m| Got {
                kind: m
                    .headers
                    .iter()
                    .find(|(k, _)| k == "type")
                    .map(|(_, v)| v.clone()),
                message_id: m.message_id,
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Harness: coordinator and the two services
// ---------------------------------------------------------------------------------------

/// An in-process coordinator with quick phase-two retries.
async fn coordinator() -> Coordinator {
    Coordinator::start(ServeConfig {
        retry_initial_ms: 20,
        retry_max_ms: 300,
        rpc_timeout_ms: 5_000,
        connect_timeout_ms: 500,
        commit_wait_ms: COMMIT_WAIT.as_millis() as u64,
        ..ServeConfig::default()
    })
    .await
}

/// One service process: its own SDK handle, data directory, database and broker.
struct Service {
    sdk: TwoPc,
    pg: Arc<PgResource>,
    rabbit: Arc<RabbitResource>,
    store: Arc<StagingStore>,
    db_url: String,
    /// Where this service's events go.
    queue: String,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts service `name` with a fresh database set up by `setup`. Its resources are
    /// `db` and `rabbit`, so its branch ids are `<name>:db` and `<name>:rabbit`.
    async fn start(coord: &Coordinator, name: &str, setup: &str) -> Service {
        let dir = tempfile::tempdir().expect("temp dir");
        let sdk = TwoPc::builder(coord.url.clone())
            .service(name)
            .data_dir(dir.path())
            .recovery_interval(Duration::from_secs(3600))
            .commit_wait(COMMIT_WAIT)
            .start()
            .await
            .expect("start the SDK");
        let store = staging(sdk.data_dir().expect("data dir configured"));
        let db_url = database(name, setup).await;
        let pg = sdk
            .register(resource("db", &db_url).await)
            .expect("register db");
        let rabbit = sdk
            .register(Arc::new(
                RabbitResource::connect("rabbit", RABBIT_URL, store.clone())
                    .await
                    .expect("connect to RabbitMQ"),
            ))
            .expect("register rabbit");
        Service {
            sdk,
            pg,
            rabbit,
            store,
            db_url,
            queue: unique_name(&format!("{name}_events")),
            _dir: dir,
        }
    }

    /// Nothing of any transaction is left open, prepared or staged in this service.
    async fn is_clean(&self) -> bool {
        self.rabbit.core().open_branches() == 0
            && self.store.is_empty()
            && prepared_gids(&self.db_url).await == 0
            && open_transactions(&self.db_url).await == 0
    }

    async fn stop(&self) {
        self.rabbit.close().await;
        self.sdk.shutdown().await;
    }
}

/// Publishes `kind` with a JSON payload through `service`'s broker, in `tx`.
async fn publish_event(service: &Service, tx: &Transaction, kind: &str, payload: &str) -> String {
    let options = PublishOptions {
        headers: vec![("type".into(), kind.into())],
        content_type: Some("application/json".into()),
    };
    tx.publish_with(
        &*service.rabbit,
        &service.queue,
        payload.as_bytes().to_vec(),
        options,
    )
    .await
    .expect("publish")
}

fn order_created(order_id: &str, item: &str, quantity: u32) -> String {
    format!(
        r#"{{"type":"OrderCreated","order_id":"{order_id}","item":"{item}","quantity":{quantity}}}"#
    )
}

fn stock_reserved(order_id: &str, item: &str, quantity: u32) -> String {
    format!(
        r#"{{"type":"StockReserved","order_id":"{order_id}","item":"{item}","quantity":{quantity}}}"#
    )
}

/// Service A's part of placing an order: its row and its event, in `tx`.
async fn place_order(orders: &Service, tx: &Transaction, order_id: &str, item: &str, qty: u32) {
    let branch = tx.postgres(&orders.pg).await.expect("orders branch");
    let n = branch
        .execute(
            "INSERT INTO orders (id, item, quantity) VALUES ($1, $2, $3)",
            &[&order_id, &item, &(qty as i32)],
        )
        .await
        .expect("insert the order");
    assert_eq!(n, 1);
    publish_event(
        orders,
        tx,
        "OrderCreated",
        &order_created(order_id, item, qty),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Service B's gRPC server
// ---------------------------------------------------------------------------------------

/// B's implementation of `twopc.example.v1.Inventory`.
struct InventoryService {
    sdk: TwoPc,
    pg: Arc<PgResource>,
    rabbit: Arc<RabbitResource>,
    queue: String,
    /// Requests whose transaction id the [`TxIdLayer`] had put in the extensions.
    ids_from_layer: Arc<AtomicUsize>,
}

/// An SDK error as the status the caller sees: the coordinator's own status when it
/// refused (e.g. the transaction is no longer active), INTERNAL otherwise.
fn to_status(e: Error) -> Status {
    match e {
        Error::Coordinator(s) => s,
        Error::Aborted(m) => Status::aborted(m),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        let tx_id = propagation::extract(&request)
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "Reserve runs inside the caller's transaction: the {} metadata is missing",
                    propagation::TX_ID_HEADER
                ))
            })?;
        if request.extensions().get::<PropagatedTx>().is_some() {
            self.ids_from_layer.fetch_add(1, Ordering::SeqCst);
        }
        let req = request.into_inner();
        if req.order_id.is_empty() || req.item.is_empty() {
            return Err(Status::invalid_argument("order_id and item are required"));
        }
        let quantity = i32::try_from(req.quantity)
            .ok()
            .filter(|q| *q >= 1)
            .ok_or_else(|| Status::invalid_argument("quantity must be 1 to 2^31-1"))?;

        let tx = self.sdk.join(tx_id);
        let db = tx.postgres(&self.pg).await.map_err(to_status)?;
        db.execute(
            "INSERT INTO reservations (order_id, item, quantity) VALUES ($1, $2, $3)",
            &[&req.order_id, &req.item, &quantity],
        )
        .await
        .map_err(to_status)?;
        db.execute(
            "UPDATE stock SET on_hand = on_hand - $2 WHERE item = $1",
            &[&req.item, &quantity],
        )
        .await
        .map_err(to_status)?;
        let options = PublishOptions {
            headers: vec![("type".into(), "StockReserved".into())],
            content_type: Some("application/json".into()),
        };
        let payload = stock_reserved(&req.order_id, &req.item, req.quantity);
        tx.publish_with(&*self.rabbit, &self.queue, payload.into_bytes(), options)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ReserveResponse {
            branch_ids: vec![db.branch_id().to_string(), tx.branch_id(&*self.rabbit)],
        }))
    }
}

/// B's `Inventory` server on 127.0.0.1:0, with the [`TxIdLayer`].
struct InventoryHost {
    url: String,
    ids_from_layer: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl InventoryHost {
    async fn start(inventory: &Service) -> InventoryHost {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind inventory");
        let addr = listener.local_addr().expect("local addr");
        let ids_from_layer = Arc::new(AtomicUsize::new(0));
        let service = InventoryService {
            sdk: inventory.sdk.clone(),
            pg: inventory.pg.clone(),
            rabbit: inventory.rabbit.clone(),
            queue: inventory.queue.clone(),
            ids_from_layer: ids_from_layer.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            Server::builder()
                .timeout(RPC_TIMEOUT)
                .layer(TxIdLayer)
                .add_service(InventoryServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stopped.await;
                })
                .await
                .expect("inventory server");
        });
        InventoryHost {
            url: format!("http://{addr}"),
            ids_from_layer,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url.clone())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(RPC_TIMEOUT)
            .connect()
            .await
            .expect("connect to the inventory service")
    }

    /// A client whose every request carries `tx`'s id (how A calls B).
    async fn client_in(
        &self,
        tx: &Transaction,
    ) -> InventoryClient<InterceptedService<Channel, TxInterceptor>> {
        InventoryClient::with_interceptor(self.channel().await, TxInterceptor::new(tx.id()))
    }

    /// A client that propagates nothing.
    async fn plain_client(&self) -> InventoryClient<Channel> {
        InventoryClient::new(self.channel().await)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Everything a test needs: the coordinator, A, B (serving `Inventory`), a queue probe.
struct World {
    coord: Coordinator,
    orders: Service,
    inventory: Service,
    host: InventoryHost,
    probe: RabbitProbe,
}

impl World {
    async fn start() -> World {
        let coord = coordinator().await;
        let orders = Service::start(&coord, "orders", ORDERS_SQL).await;
        let inventory = Service::start(&coord, "inventory", INVENTORY_SQL).await;
        let host = InventoryHost::start(&inventory).await;
        let probe = RabbitProbe::bounded(RPC_TIMEOUT).await;
        probe.declare(&orders.queue).await;
        probe.declare(&inventory.queue).await;
        assert_ne!(orders.sdk.endpoint(), inventory.sdk.endpoint());
        World {
            coord,
            orders,
            inventory,
            host,
            probe,
        }
    }

    /// The coordinator's view of `tx_id`.
    async fn get_transaction(&self, tx_id: &str) -> pb::GetTransactionResponse {
        timed(
            "GetTransaction",
            self.orders
                .sdk
                .coordinator()
                .get_transaction(requests::get(tx_id)),
        )
        .await
        .expect("GetTransaction")
        .into_inner()
    }

    /// The enlisted branches of `tx_id` as `(branch id, participant endpoint)`.
    async fn branches(&self, tx_id: &str) -> BTreeSet<(String, String)> {
        self.get_transaction(tx_id)
            .await
            .branches
            .into_iter()
            .map(|b| {
                let b = b.branch.expect("branch");
                (b.branch_id, b.participant_endpoint)
            })
            .collect()
    }

    /// Neither service holds anything of any transaction any more (polled).
    async fn wait_until_clean(&self) {
        eventually(WAIT, "A holds nothing open, prepared or staged", || {
            self.orders.is_clean()
        })
        .await;
        eventually(WAIT, "B holds nothing open, prepared or staged", || {
            self.inventory.is_clean()
        })
        .await;
    }

    /// Begins a transaction at A, places order `order_id` (`quantity` of `item`) in it
    /// and has B reserve it through a client that propagates the transaction id (`what`
    /// names the call should it fail); checks that B answered with its two branches.
    /// Returns the transaction, its id and the client.
    async fn order_reserved(
        &self,
        order_id: &str,
        item: &str,
        quantity: u32,
        what: &str,
    ) -> (
        Transaction,
        String,
        InventoryClient<InterceptedService<Channel, TxInterceptor>>,
    ) {
        let a = &self.orders;
        let tx = timed("Begin", a.sdk.begin()).await.expect("begin");
        let tx_id = tx.id().to_string();
        place_order(a, &tx, order_id, item, quantity).await;
        let mut client = self.host.client_in(&tx).await;
        let request = reserve(order_id, item, quantity);
        let resp = timed("Reserve", client.reserve(request))
            .await
            .expect(what)
            .into_inner();
        assert_eq!(resp.branch_ids, vec!["inventory:db", "inventory:rabbit"]);
        (tx, tx_id, client)
    }

    /// Nothing of the order is committed or delivered anywhere.
    async fn assert_nothing_committed(&self) {
        assert_eq!(
            count(&self.orders.db_url, "SELECT count(*) FROM orders").await,
            0
        );
        assert_eq!(
            count(&self.inventory.db_url, "SELECT count(*) FROM reservations").await,
            0
        );
        assert_eq!(
            on_hand(&self.inventory.db_url, "book").await,
            10,
            "stock untouched"
        );
        assert_eq!(
            self.probe.events(&self.orders.queue).await,
            Vec::<Got>::new()
        );
        assert_eq!(
            self.probe.events(&self.inventory.queue).await,
            Vec::<Got>::new()
        );
    }

    async fn stop(self) {
        self.host.stop().await;
        self.inventory.stop().await;
        self.orders.stop().await;
        self.probe.delete(&self.orders.queue).await;
        self.probe.delete(&self.inventory.queue).await;
        self.coord.stop().await;
    }
}

fn reserve(order_id: &str, item: &str, quantity: u32) -> ReserveRequest {
    ReserveRequest {
        order_id: order_id.into(),
        item: item.into(),
        quantity,
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_services_rows_and_events_commit_together() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start().await;
        let (a, b) = (&w.orders, &w.inventory);

        let (tx, tx_id, _client) = w.order_reserved("o-1", "book", 2, "Reserve").await;
        assert_eq!(
            w.host.ids_from_layer.load(Ordering::SeqCst),
            1,
            "the TxIdLayer put the id in the request's extensions"
        );

        // Before commit: the coordinator holds four branches of two participants...
        let (ep_a, ep_b) = (a.sdk.endpoint().to_string(), b.sdk.endpoint().to_string());
        let expected: BTreeSet<_> = [
            ("inventory:db", &ep_b),
            ("inventory:rabbit", &ep_b),
            ("orders:db", &ep_a),
            ("orders:rabbit", &ep_a),
        ]
        .into_iter()
        .map(|(id, ep)| (id.to_string(), ep.clone()))
        .collect();
        let view = w.get_transaction(&tx_id).await;
        assert_eq!(view.state, pb::TxState::Active as i32);
        assert!(
            view.branches
                .iter()
                .all(|s| s.state == pb::BranchState::Enlisted as i32),
            "{view:?}"
        );
        assert_eq!(w.branches(&tx_id).await, expected);
        let endpoints: BTreeSet<_> = expected.iter().map(|(_, ep)| ep).collect();
        assert_eq!(endpoints.len(), 2, "two distinct participant endpoints");
        // ...and nothing of either service is visible yet.
        assert_eq!(count(&a.db_url, "SELECT count(*) FROM orders").await, 0);
        assert_eq!(
            count(&b.db_url, "SELECT count(*) FROM reservations").await,
            0
        );
        assert_eq!(w.probe.events(&a.queue).await, Vec::<Got>::new());
        assert_eq!(w.probe.events(&b.queue).await, Vec::<Got>::new());

        let committed = timed("Commit", tx.commit()).await.expect("commit");
        assert!(
            committed.pending_branches.is_empty(),
            "phase two reached every branch: {committed:?}"
        );

        // Both rows...
        let row = connect(&a.db_url)
            .await
            .query_one("SELECT item, quantity FROM orders WHERE id = 'o-1'", &[])
            .await
            .expect("the order row");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i32>(1)),
            ("book".into(), 2)
        );
        let row = connect(&b.db_url)
            .await
            .query_one(
                "SELECT item, quantity FROM reservations WHERE order_id = 'o-1'",
                &[],
            )
            .await
            .expect("the reservation row");
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i32>(1)),
            ("book".into(), 2)
        );
        assert_eq!(on_hand(&b.db_url, "book").await, 8);
        // ...and both events, exactly once each (the publishes were confirmed before the
        // commit answered), with the transaction's deterministic message ids.
        assert_eq!(
            w.probe.events(&a.queue).await,
            vec![Got {
                message_id: format!("{tx_id}:orders:rabbit:0"),
                payload: order_created("o-1", "book", 2),
                kind: Some("OrderCreated".into()),
            }]
        );
        assert_eq!(
            w.probe.events(&b.queue).await,
            vec![Got {
                message_id: format!("{tx_id}:inventory:rabbit:0"),
                payload: stock_reserved("o-1", "book", 2),
                kind: Some("StockReserved".into()),
            }]
        );
        for service in [a, b] {
            assert_eq!(
                prepared_gids(&service.db_url).await,
                0,
                "no prepared gid left"
            );
            assert!(service.store.is_empty(), "staged copies removed");
            assert_eq!(service.rabbit.core().open_branches(), 0);
        }
        w.wait_until_clean().await;
        assert_eq!(
            w.get_transaction(&tx_id).await.outcome,
            pb::Outcome::Committed as i32
        );
        // Nothing more arrives later.
        assert_eq!(w.probe.events(&a.queue).await, Vec::<Got>::new());
        assert_eq!(w.probe.events(&b.queue).await, Vec::<Got>::new());

        w.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_by_the_caller_undoes_the_callees_branches_too() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start().await;
        let b = &w.inventory;

        let (tx, tx_id, mut client) = w.order_reserved("o-2", "book", 3, "Reserve").await;
        assert_eq!(w.branches(&tx_id).await.len(), 4);
        // B's branches are open: its database session holds the reservation, its broker
        // buffers the event.
        assert_eq!(open_transactions(&b.db_url).await, 1);
        assert_eq!(b.rabbit.core().open_branches(), 1);

        timed("Abort", tx.abort("payment declined"))
            .await
            .expect("abort");

        // The coordinator's aborts reach both services' open branches.
        w.wait_until_clean().await;
        w.assert_nothing_committed().await;
        let view = w.get_transaction(&tx_id).await;
        assert_eq!(view.outcome, pb::Outcome::Aborted as i32, "{view:?}");

        // The finished transaction's id cannot enlist anything any more.
        let err = timed("Reserve", client.reserve(reserve("o-2b", "book", 1)))
            .await
            .expect_err("the transaction is over");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(&tx_id), "{err:?}");
        w.wait_until_clean().await;
        w.assert_nothing_committed().await;

        w.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_branch_refusing_prepare_aborts_everything() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start().await;

        // No such stock item: the deferred foreign key lets the INSERT through, so B
        // answers OK; PREPARE TRANSACTION will check it.
        let (tx, tx_id, _client) = w
            .order_reserved("o-3", "unicorn", 1, "Reserve (the check is deferred)")
            .await;
        assert_eq!(w.branches(&tx_id).await.len(), 4);

        let err = timed("Commit", tx.commit())
            .await
            .expect_err("B's prepare is refused");
        let msg = err.to_string();
        assert!(matches!(err, Error::Aborted(_)), "{msg}");
        assert!(
            msg.contains("inventory:db")
                && msg.contains("reservations_item_in_stock")
                && msg.contains("23503"),
            "the message names B's branch and the database's reason: {msg}"
        );

        // A's branches (and B's broker branch) may have prepared in parallel: the abort
        // that follows rolls them back.
        w.wait_until_clean().await;
        w.assert_nothing_committed().await;
        let view = w.get_transaction(&tx_id).await;
        assert_eq!(view.outcome, pb::Outcome::Aborted as i32, "{view:?}");

        w.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_the_transaction_id_is_refused_and_enlists_nothing() {
    bounded(TEST_TIMEOUT, async {
        let w = World::start().await;
        let (a, b) = (&w.orders, &w.inventory);

        let tx = timed("Begin", a.sdk.begin()).await.expect("begin");
        let tx_id = tx.id().to_string();
        place_order(a, &tx, "o-4", "book", 1).await;

        let mut client = w.host.plain_client().await;
        let err = timed("Reserve", client.reserve(reserve("o-4", "book", 1)))
            .await
            .expect_err("no transaction id");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("twopc-tx-id"), "{err:?}");
        // An empty id is no better.
        let mut req = Request::new(reserve("o-4", "book", 1));
        propagation::inject(&mut req, "").expect("empty metadata value");
        let err = timed("Reserve", client.reserve(req))
            .await
            .expect_err("empty transaction id");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

        // Only A's own branches are in the transaction; B opened nothing.
        let ep_a = a.sdk.endpoint().to_string();
        assert_eq!(
            w.branches(&tx_id).await,
            BTreeSet::from([
                ("orders:db".to_string(), ep_a.clone()),
                ("orders:rabbit".to_string(), ep_a),
            ])
        );
        assert_eq!(w.host.ids_from_layer.load(Ordering::SeqCst), 0);
        assert!(b.is_clean().await);
        assert_eq!(
            count(&b.db_url, "SELECT count(*) FROM reservations").await,
            0
        );

        timed("Abort", tx.abort("inventory refused"))
            .await
            .expect("abort");
        w.wait_until_clean().await;
        w.assert_nothing_committed().await;

        w.stop().await;
    })
    .await;
}
