//! The seed scenario: an Order Service that saves an order row and publishes
//! `OrderCreated`, atomically, and an Inventory consumer that counts the events.
//!
//! [`OrderService::place`] is the whole dual write:
//!
//! ```text
//! let tx = sdk.begin().await?;                       // a coordinator transaction
//! tx.postgres(&db).await?.defer(INSERT order)        // branch 1: PostgreSQL (sent with prepare)
//! tx.publish(&broker, queue, OrderCreated)           // branch 2: staged, published at commit
//! tx.commit().await?                                 // both or neither
//! ```
//!
//! The Inventory consumer ([`apply_event`]) reads the events straight from the broker and, in one database
//! transaction of its own, records the message id (deduplication) and the event; it
//! acknowledges the delivery only after that transaction committed.
//!
//! [`run_process`] is `twopc-lab order-service`: the order service as a process of its own,
//! on a fixed participant address and data directory, so that it can be killed and
//! restarted and finish (`--recover`) what it left in doubt.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use twopc_coordinator::config::Secret;
use twopc_participant::broker::Broker;
use twopc_participant::postgres::PgResource;
use twopc_participant::rabbitmq::RabbitResource;
use twopc_participant::staging::StagingStore;
use twopc_participant::{Error, OutboxOptions, Resource, TwoPc, TwoPcBuilder};
use twopc_proto::v1 as pb;

use crate::check_range;

/// Tables of the order service's database (kept in `order_schema.sql`, so the process
/// tests can create them too).
pub const ORDER_SCHEMA: &str = include_str!("order_schema.sql");

/// Tables of the inventory consumer's database.
pub const INVENTORY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inventory_events (
    order_id   text PRIMARY KEY,
    message_id text NOT NULL,
    payload    jsonb NOT NULL
);";

/// An order, as stored and as published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Order id (primary key).
    pub id: String,
    /// Must exist in `customers`.
    pub customer: String,
    /// What was ordered.
    pub item: String,
    /// How many (> 0).
    pub quantity: i32,
}

/// The event published for every committed order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Always "OrderCreated".
    #[serde(rename = "type")]
    pub kind: String,
    /// The order.
    #[serde(flatten)]
    pub order: Order,
}

/// What happened to one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Row and event committed.
    Committed,
    /// Aborted (insert failed, prepare refused, or the service changed its mind); the
    /// message says why.
    Aborted(String),
}

/// Where the service stages OrderCreated until the transaction commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EventStaging {
    /// A broker branch of its own (`tx.publish`): staged in the participant's staging
    /// store at prepare, published at phase two; two branches, so always two-phase.
    #[default]
    Broker,
    /// In the database branch's transaction (`PgBranch::publish`, the `twopc_outbox`
    /// table): one branch, so one-phase when the coordinator allows it; published by the
    /// resource's relay once the row committed.
    Database,
}

/// The order service: owns a PostgreSQL resource and a broker resource.
pub struct OrderService<B: Broker> {
    /// The SDK handle (coordinator connection + participant server).
    pub sdk: TwoPc,
    /// The orders database.
    pub db: Arc<PgResource>,
    /// Where OrderCreated goes.
    pub broker: Arc<B>,
    /// The queue / subject of OrderCreated.
    pub destination: String,
    /// Where OrderCreated waits for the commit. [`EventStaging::Database`] needs
    /// [`PgResource::enable_outbox`] for `broker`.
    pub staging: EventStaging,
}

/// Where the time of one [`OrderService::place_timed`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// Begin: a transaction id (from the pool of ids begun ahead, or a Begin call).
    pub begin: Duration,
    /// Opening the database branch, queueing the INSERT ([`PgBranch::defer`]: it is sent
    /// with the commit or the prepare) and staging the event.
    ///
    /// [`PgBranch::defer`]: twopc_participant::PgBranch::defer
    pub statements: Duration,
    /// Commit: the database commit with the INSERT (and, past the relay's window, the wait
    /// for the broker), or the coordinator's two phases.
    pub commit: Duration,
}

impl<B: Broker> OrderService<B> {
    /// Places one order: the row and the event, both or neither. `reject_after_write`
    /// simulates a business check that fails after both writes were made (the service
    /// aborts: neither may appear).
    pub async fn place(&self, order: &Order, reject_after_write: bool) -> anyhow::Result<Placed> {
        self.place_timed(order, reject_after_write, &mut Phases::default())
            .await
    }

    /// [`OrderService::place`], recording in `phases` how long each of its steps took
    /// (a step not reached stays zero).
    pub async fn place_timed(
        &self,
        order: &Order,
        reject_after_write: bool,
        phases: &mut Phases,
    ) -> anyhow::Result<Placed> {
        let started = Instant::now();
        // Every branch the order will have is enlisted by Begin itself (one coordinator
        // call less per branch; with the event in the broker branch the coordinator knows
        // from the start that this is a two-phase commit). With the event staged in the
        // database the order is one branch, committed here in one phase (no coordinator
        // round trip at commit).
        let db: &dyn Resource = &*self.db;
        let broker: &dyn Resource = &*self.broker;
        let tx = match self.staging {
            EventStaging::Broker => self.sdk.begin_with(&[db, broker]).await,
            EventStaging::Database => self.sdk.begin_local(db).await,
        }
        .with_context(|| format!("begin (coordinator {})", self.sdk.coordinator_url()))?;
        phases.begin = started.elapsed();
        let writing = Instant::now();
        let db = tx
            .postgres(&self.db)
            .await
            .context("open the database branch")?;
        // The row goes out with the commit (with the event staged in the database: one
        // round trip for the whole local transaction) or in front of the prepare; a row the
        // database refuses (a duplicate id, an unknown customer) aborts the order there.
        db.defer(
            "INSERT INTO orders (id, customer, item, quantity) VALUES ($1, $2, $3, $4)",
            vec![
                Box::new(order.id.clone()),
                Box::new(order.customer.clone()),
                Box::new(order.item.clone()),
                Box::new(order.quantity),
            ],
        )
        .await
        .context("queue the order's INSERT")?;
        let event = OrderCreated {
            kind: "OrderCreated".into(),
            order: order.clone(),
        };
        let payload = serde_json::to_vec(&event)?;
        match self.staging {
            EventStaging::Broker => tx.publish(&*self.broker, &self.destination, payload).await,
            EventStaging::Database => db.publish(&*self.broker, &self.destination, payload).await,
        }
        .context("publish")?;
        if reject_after_write {
            let why = "fraud check failed after the writes".to_string();
            tx.abort(why.clone()).await.context("abort")?;
            return Ok(Placed::Aborted(why));
        }
        phases.statements = writing.elapsed();
        let committing = Instant::now();
        let committed = tx.commit().await;
        phases.commit = committing.elapsed();
        match committed {
            Ok(_) => Ok(Placed::Committed),
            Err(Error::Aborted(why)) => Ok(Placed::Aborted(why)),
            Err(e) => Err(e).context("commit"),
        }
    }
}

/// Counters of the inventory consumer.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Deliveries received from the broker (including redeliveries).
    pub deliveries: AtomicU64,
    /// Deliveries whose message id had been processed already (dropped by dedup).
    pub duplicates_removed: AtomicU64,
    /// Events applied for the first time.
    pub applied: AtomicU64,
}

/// Applies one delivered OrderCreated in the consumer's own database transaction,
/// deduplicated by message id. Returns whether it was new.
pub async fn apply_event(
    client: &mut tokio_postgres::Client,
    consumer: &str,
    message_id: &str,
    payload: &[u8],
    stats: &ConsumerStats,
) -> anyhow::Result<bool> {
    stats.deliveries.fetch_add(1, Ordering::Relaxed);
    let event: OrderCreated =
        serde_json::from_slice(payload).context("OrderCreated payload is not valid JSON")?;
    let json: serde_json::Value = serde_json::from_slice(payload)?;
    let tx = client.transaction().await?;
    let new = twopc_participant::dedup::first_time(&tx, consumer, message_id).await?;
    if new {
        tx.execute(
            "INSERT INTO inventory_events (order_id, message_id, payload) VALUES ($1, $2, $3)",
            &[&event.order.id, &message_id, &json],
        )
        .await?;
    }
    tx.commit().await?;
    if new {
        stats.applied.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.duplicates_removed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(new)
}

// ---------------------------------------------------------------------------------------
// `twopc-lab order-service`: the order service as a process of its own
// ---------------------------------------------------------------------------------------

/// Name of the PostgreSQL resource (branch id `<service>:orders-db`).
pub const DB_RESOURCE: &str = "orders-db";
/// Name of the RabbitMQ resource (branch id `<service>:events`).
pub const BROKER_RESOURCE: &str = "events";

/// Flags of `twopc-lab order-service`.
///
/// The process connects to the coordinator, PostgreSQL and RabbitMQ, starts its
/// participant server on `--listen` and prints `order-service ready on ADDR`. Then:
/// with `--recover`, it finishes every branch of this service left in doubt by an earlier
/// run (prints `in doubt TX BRANCH` for each one found at start, `committed in one phase,
/// not reported TX BRANCH` for each local commit the coordinator has not heard of, then
/// `recovered N`, counting both);
/// with `--place`, it places one order (prints `placed ID committed` or
/// `placed ID aborted: REASON`); with both, recovery runs first; with neither, it serves
/// the coordinator (and recovers periodically) until SIGTERM or Ctrl-C.
#[derive(Clone, Debug, clap::Args)]
pub struct OrderServiceArgs {
    /// The coordinator's gRPC URL.
    #[arg(
        long,
        value_name = "URL",
        env = "TWOPC_ORDERS_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    pub coordinator: String,
    /// Where the participant server listens. Keep it fixed across restarts: the
    /// coordinator finishes the branches of an earlier run at this address.
    #[arg(
        long,
        value_name = "ADDR",
        env = "TWOPC_ORDERS_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    pub listen: SocketAddr,
    /// Participant state (the broker staging store, in DIR/staging). Keep it across
    /// restarts: staged events of prepared transactions live there.
    #[arg(
        long,
        value_name = "DIR",
        env = "TWOPC_ORDERS_DATA_DIR",
        default_value = "twopc-order-service"
    )]
    pub data_dir: PathBuf,
    /// The orders database (libpq key=value or URL); needs max_prepared_transactions > 0
    /// and the tables of the order schema.
    #[arg(
        long,
        value_name = "URL",
        env = "TWOPC_ORDERS_POSTGRES_URL",
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=orders"
    )]
    pub postgres_url: String,
    /// RabbitMQ URL (connected on first use, so recovery of the database works while the
    /// broker is down).
    #[arg(
        long,
        value_name = "URL",
        env = "TWOPC_ORDERS_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The queue OrderCreated is published to (declared durable if missing).
    #[arg(
        long,
        value_name = "NAME",
        env = "TWOPC_ORDERS_QUEUE",
        default_value = "orders"
    )]
    pub queue: String,
    /// Service name: prefixes the branch ids (`<service>:orders-db`, `<service>:events`).
    /// Keep it across restarts.
    #[arg(
        long,
        value_name = "NAME",
        env = "TWOPC_ORDERS_SERVICE",
        default_value = "orders"
    )]
    pub service: String,
    /// Place one order with this id, then exit.
    #[arg(long, value_name = "ORDER_ID", env = "TWOPC_ORDERS_PLACE")]
    pub place: Option<String>,
    /// Customer of the order placed by --place (must exist in `customers`).
    #[arg(
        long,
        value_name = "ID",
        env = "TWOPC_ORDERS_CUSTOMER",
        default_value = "alice"
    )]
    pub customer: String,
    /// Item of the order placed by --place.
    #[arg(
        long,
        value_name = "SKU",
        env = "TWOPC_ORDERS_ITEM",
        default_value = "sku-1"
    )]
    pub item: String,
    /// Quantity of the order placed by --place (> 0).
    #[arg(
        long,
        value_name = "N",
        env = "TWOPC_ORDERS_QUANTITY",
        default_value_t = 1
    )]
    pub quantity: i32,
    /// Finish every branch of this service left in doubt by an earlier run (asking the
    /// coordinator for each outcome), then exit (or go on with --place).
    #[arg(long, env = "TWOPC_ORDERS_RECOVER")]
    pub recover: bool,
    /// Bound on --recover, and on waiting for phase two to reach this service after
    /// --place, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        env = "TWOPC_ORDERS_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub timeout_ms: u64,
    /// How often the background recovery asks the coordinator about in-doubt branches,
    /// in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        env = "TWOPC_ORDERS_RECOVERY_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub recovery_interval_ms: u64,
    /// The longest a call to the coordinator waits for its answer, in milliseconds (a
    /// commit waits for phase two on top); a paused or unreachable coordinator then fails
    /// the order with DEADLINE_EXCEEDED instead of holding it.
    #[arg(
        long,
        value_name = "MS",
        env = "TWOPC_ORDERS_CALL_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub call_timeout_ms: u64,
    /// Bearer token sent with every call to the coordinator (its `--client-token`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TWOPC_CLIENT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<Secret>,
    /// CA certificate (PEM) of the coordinator's TLS certificate: dial it over TLS (an
    /// `http://` --coordinator is then dialed as `https://`).
    #[arg(long, value_name = "FILE", env = "TWOPC_ORDERS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires one (mutual TLS).
    #[arg(long, value_name = "FILE", env = "TWOPC_ORDERS_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, value_name = "FILE", env = "TWOPC_ORDERS_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Certificate (PEM) of the participant server: serve it over TLS (the coordinator
    /// then needs --participant-ca).
    #[arg(long, value_name = "FILE", env = "TWOPC_ORDERS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", env = "TWOPC_ORDERS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) the coordinator's client certificate must be signed by (mutual TLS on the
    /// participant server; the coordinator's --participant-cert). Needs --tls-cert.
    #[arg(long, value_name = "FILE", env = "TWOPC_ORDERS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Where OrderCreated is staged until the commit: `broker` (a broker branch and the
    /// staging store in --data-dir) or `database` (the `twopc_outbox` table, in the same
    /// transaction as the order row; published by a relay right after the commit).
    #[arg(
        long,
        value_enum,
        value_name = "WHERE",
        env = "TWOPC_ORDERS_STAGE_EVENTS",
        default_value_t = EventStaging::Broker
    )]
    pub stage_events: EventStaging,
    /// With --stage-events database: how often the relay sweeps the outbox table for
    /// events a crash left unpublished, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        env = "TWOPC_ORDERS_OUTBOX_SWEEP_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub outbox_sweep_interval_ms: u64,
    /// With --stage-events database: how old an outbox row must be before the sweep
    /// publishes it, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        env = "TWOPC_ORDERS_OUTBOX_SWEEP_AFTER_MS",
        default_value_t = 10_000
    )]
    pub outbox_sweep_after_ms: u64,
}

/// Reads a file named by `flag`.
fn read_file(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

/// The builder with the TLS and token flags applied. Errors name the flag.
fn secure(args: &OrderServiceArgs, mut b: TwoPcBuilder) -> anyhow::Result<TwoPcBuilder> {
    if let Some(token) = &args.token {
        b = b.token(token.expose());
    }
    match (&args.ca_cert, &args.client_cert, &args.client_key) {
        (Some(ca), cert, key) => {
            b = b.coordinator_ca(read_file("--ca-cert", ca)?);
            match (cert, key) {
                (Some(c), Some(k)) => {
                    b = b.coordinator_identity(
                        read_file("--client-cert", c)?,
                        read_file("--client-key", k)?,
                    )
                }
                (None, None) => {}
                _ => anyhow::bail!("--client-cert and --client-key go together"),
            }
        }
        (None, None, None) => {}
        (None, _, _) => anyhow::bail!("--client-cert and --client-key need --ca-cert"),
    }
    match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            b = b.participant_tls(read_file("--tls-cert", c)?, read_file("--tls-key", k)?);
            if let Some(ca) = &args.tls_client_ca {
                b = b.participant_client_ca(read_file("--tls-client-ca", ca)?);
            }
        }
        (None, None) => anyhow::ensure!(
            args.tls_client_ca.is_none(),
            "--tls-client-ca needs --tls-cert and --tls-key"
        ),
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
    Ok(b)
}

/// Runs `twopc-lab order-service` (see [`OrderServiceArgs`]).
pub async fn run_process(args: OrderServiceArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let timeout = Duration::from_millis(args.timeout_ms);

    // The resources first, and what an earlier run left in doubt, before the participant
    // server can take calls: the coordinator's retries may finish branches at once.
    let data_dir = args.data_dir.clone();
    let staging = tokio::task::spawn_blocking(move || StagingStore::open(&data_dir))
        .await
        .context("the staging store task failed")?
        .with_context(|| format!("--data-dir {} is not usable", args.data_dir.display()))?;
    let staging = Arc::new(staging);
    let pg_config: tokio_postgres::Config = args
        .postgres_url
        .parse()
        .context("--postgres-url is not a valid PostgreSQL connection string")?;
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        pg_config,
        tokio_postgres::NoTls,
    ))
    .max_size(8)
    .build()
    .context("cannot build the PostgreSQL pool (--postgres-url)")?;
    let db = PgResource::new(DB_RESOURCE, pool)
        .await
        .context("the orders database is not usable (--postgres-url)")?;
    let broker = Arc::new(
        RabbitResource::connect_lazy(BROKER_RESOURCE, &args.amqp_url, staging.clone())
            .context("--amqp-url")?,
    );
    broker
        .check_destination(&args.queue)
        .map_err(|e| anyhow::anyhow!("--queue {:?}: {e}", args.queue))?;
    let at_start = if args.recover {
        in_doubt(&args.service, &db, &*broker)
            .await
            .context("cannot list the branches left in doubt")?
    } else {
        Vec::new()
    };

    let builder = TwoPc::builder(&args.coordinator)
        .service(&args.service)
        .listen(args.listen)
        .data_dir(&args.data_dir)
        .recovery_interval(Duration::from_millis(args.recovery_interval_ms))
        .call_timeout(Duration::from_millis(args.call_timeout_ms));
    let sdk = secure(&args, builder)?.start().await.with_context(|| {
        format!(
            "cannot start the participant server (--listen {}, --coordinator {})",
            args.listen, args.coordinator
        )
    })?;
    let result = async {
        let db = sdk.register(db)?;
        let broker = sdk.register(broker)?;
        if args.stage_events == EventStaging::Database {
            let options = OutboxOptions {
                sweep_interval: Duration::from_millis(args.outbox_sweep_interval_ms),
                sweep_after: Duration::from_millis(args.outbox_sweep_after_ms),
                ..OutboxOptions::default()
            };
            db.enable_outbox(broker.clone(), options)
                .await
                .context("cannot set up the outbox table (--stage-events database)")?;
        }
        let endpoint = sdk.endpoint();
        println!(
            "order-service ready on {}",
            endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"))
                .unwrap_or(endpoint)
        );
        if args.recover {
            let n = recover(&sdk, &args.service, &db, &*broker, at_start, timeout).await?;
            println!("recovered {n}");
        }
        if let Some(id) = &args.place {
            let order = Order {
                id: id.clone(),
                customer: args.customer.clone(),
                item: args.item.clone(),
                quantity: args.quantity,
            };
            let before: BTreeSet<_> = in_doubt(&args.service, &db, &*broker)
                .await
                .unwrap_or_default()
                .into_iter()
                .collect();
            let service = OrderService {
                sdk: sdk.clone(),
                db: db.clone(),
                broker: broker.clone(),
                destination: args.queue.clone(),
                staging: args.stage_events,
            };
            match service.place(&order, false).await? {
                Placed::Committed => {
                    println!("placed {id} committed");
                    // Phase two may still be on its way to this process: let it land
                    // before exiting, so nothing is left prepared or staged.
                    wait_for_phase_two(&args.service, &db, &*broker, &before, timeout).await;
                }
                Placed::Aborted(why) => println!("placed {id} aborted: {why}"),
            }
        }
        if !args.recover && args.place.is_none() {
            twopc_coordinator::signal::shutdown_signal().await;
        }
        if args.stage_events == EventStaging::Database {
            // Leave no committed event unpublished behind (bounded: a broker that stays
            // down leaves them to the next run's sweep).
            wait_for_outbox(&db, timeout).await;
        }
        broker.close().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    sdk.shutdown().await;
    result
}

/// Waits (at most `timeout`) until the outbox table is empty.
async fn wait_for_outbox(db: &PgResource, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match db.outbox_backlog().await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot count the outbox rows"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("events still wait in the outbox table; the next run's sweep publishes them");
}

fn validate(args: &OrderServiceArgs) -> anyhow::Result<()> {
    tonic::transport::Endpoint::from_shared(args.coordinator.clone()).map_err(|e| {
        anyhow::anyhow!(
            "--coordinator {:?} is not a valid URL: {e}",
            args.coordinator
        )
    })?;
    let service_ok = !args.service.is_empty()
        && args.service.len() <= 32
        && args
            .service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    anyhow::ensure!(
        service_ok,
        "--service {:?} must be 1-32 characters of A-Z a-z 0-9 . _ -",
        args.service
    );
    check_range("--timeout-ms", args.timeout_ms, 1..=3_600_000)?;
    check_range(
        "--recovery-interval-ms",
        args.recovery_interval_ms,
        10..=3_600_000,
    )?;
    check_range("--call-timeout-ms", args.call_timeout_ms, 1..=3_600_000)?;
    check_range(
        "--outbox-sweep-interval-ms",
        args.outbox_sweep_interval_ms,
        10..=3_600_000,
    )?;
    check_range(
        "--outbox-sweep-after-ms",
        args.outbox_sweep_after_ms,
        1..=3_600_000,
    )?;
    if let Some(id) = &args.place {
        anyhow::ensure!(!id.is_empty(), "--place needs an order id");
        anyhow::ensure!(args.quantity > 0, "--quantity must be greater than 0");
    }
    Ok(())
}

/// Branches of `service` that voted yes and are not finished, from durable state
/// (prepared gids in PostgreSQL, staged batches), sorted.
async fn in_doubt(
    service: &str,
    db: &PgResource,
    broker: &dyn Resource,
) -> anyhow::Result<Vec<(String, String)>> {
    let prefix = format!("{service}:");
    let mut all = Resource::in_doubt(db)
        .await
        .map_err(|e| anyhow::anyhow!("{DB_RESOURCE}: {e}"))?;
    all.extend(
        broker
            .in_doubt()
            .await
            .map_err(|e| anyhow::anyhow!("{BROKER_RESOURCE}: {e}"))?,
    );
    all.retain(|(_, branch)| branch.starts_with(&prefix));
    all.sort();
    all.dedup();
    Ok(all)
}

/// Recovery passes until no branch of `service` is in doubt (bounded by `timeout`), then
/// waits (same bound) until the coordinator has finished their transactions. Returns how
/// many branches were finished (by these passes or by the coordinator's retries), one-phase
/// commits that an earlier run never reported included.
async fn recover(
    sdk: &TwoPc,
    service: &str,
    db: &PgResource,
    broker: &dyn Resource,
    at_start: Vec<(String, String)>,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    for (tx_id, branch_id) in &at_start {
        println!("in doubt {tx_id} {branch_id}");
    }
    let mut seen: BTreeSet<(String, String)> = at_start.into_iter().collect();
    // One-phase commits of an earlier run that never reached the coordinator: the pass
    // below reports them, and they count as recovered.
    let prefix = format!("{service}:");
    for (tx_id, branch_id) in Resource::remembered_commits(db, Duration::ZERO).await {
        if branch_id.starts_with(&prefix) {
            println!("committed in one phase, not reported {tx_id} {branch_id}");
            seen.insert((tx_id, branch_id));
        }
    }
    // One pass even when nothing is in doubt: it reports the one-phase commits the
    // database remembers (a process that died before reporting its local commit).
    sdk.recover_now().await;
    loop {
        let now = match in_doubt(service, db, broker).await {
            Ok(list) => list,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %format!("{e:#}"), "recovery: cannot list in-doubt branches; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e.context("cannot list the branches in doubt")),
        };
        if now.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = now.iter().map(|(t, b)| format!("{t} {b}")).collect();
            anyhow::bail!(
                "{} branch(es) still in doubt after {timeout:?} (--timeout-ms): {} (has the coordinator decided? is it reachable?)",
                now.len(),
                list.join(", ")
            );
        }
        seen.extend(now);
        sdk.recover_now().await;
        if !in_doubt(service, db, broker)
            .await
            .map(|l| l.is_empty())
            .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The branches are finished here; the coordinator learns it from its next retry
    // (or already did). Waiting for that keeps it from retrying a process that is gone.
    let txs: BTreeSet<String> = seen.iter().map(|(t, _)| t.clone()).collect();
    let mut coordinator = sdk.coordinator();
    for tx_id in txs {
        loop {
            let req = pb::GetTransactionRequest {
                tx_id: tx_id.clone(),
            };
            let finished = match coordinator.get_transaction(req).await {
                Ok(resp) => matches!(
                    pb::TxState::try_from(resp.into_inner().state),
                    Ok(pb::TxState::Committed | pb::TxState::Aborted | pb::TxState::Forgotten)
                ),
                // Not the coordinator's transaction (anymore): nothing to wait for.
                Err(s) if s.code() == tonic::Code::NotFound => true,
                Err(_) => false,
            };
            if finished {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    tx_id,
                    "recovery: this service's branches are finished, but the coordinator has not finished the \
                     transaction yet (it keeps retrying; the next start of this service answers it)"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(seen.len())
}

/// Waits (at most `timeout`) until no branch of `service` other than those in `before`
/// is in doubt: phase two reached this process.
async fn wait_for_phase_two(
    service: &str,
    db: &PgResource,
    broker: &dyn Resource,
    before: &BTreeSet<(String, String)>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = match in_doubt(service, db, broker).await {
            Ok(list) => list.into_iter().filter(|b| !before.contains(b)).count(),
            Err(_) => 1,
        };
        if pending == 0 {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                pending,
                "phase two has not reached every branch of the order yet; the coordinator keeps retrying (and \
                 recovery finishes them at the next start)"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
