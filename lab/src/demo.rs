//! `twopc-lab demo`: the seed scenario end to end on this machine.
//!
//! Starts the coordinator in-process on its embedded sled store, the order service (a
//! PostgreSQL branch + a broker branch per order) and the inventory consumer, places N
//! orders of which some are designed to fail, then checks from the outside — reading
//! PostgreSQL and the consumer's own tables — that every committed order has its row and
//! exactly one applied event, that no aborted order left anything behind, and that no
//! prepared transaction or staged message is left. It prints a table and exits non-zero if
//! any check fails.
//!
//! If the PostgreSQL at `--postgres-url` has prepared transactions disabled
//! (`max_prepared_transactions = 0`, the Debian default) or is not reachable, the demo
//! starts a private throwaway cluster with them enabled, so nobody has to edit
//! postgresql.conf to see it work.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::server;
use twopc_participant::broker::Broker;
use twopc_participant::nats::NatsResource;
use twopc_participant::postgres::PgResource;
use twopc_participant::rabbitmq::RabbitResource;
use twopc_participant::staging::StagingStore;
use twopc_participant::{OutboxOptions, TwoPc};
use twopc_testkit::{PgCluster, PgClusterOptions};

use crate::check_range;
use crate::order_service::{
    apply_event, ConsumerStats, EventStaging, Order, OrderService, Placed, INVENTORY_SCHEMA,
    ORDER_SCHEMA,
};

/// Which broker carries OrderCreated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// RabbitMQ (durable queue, persistent messages, publisher confirms).
    Rabbitmq,
    /// NATS JetStream (file-backed stream, Nats-Msg-Id deduplication).
    Nats,
}

/// Where the demo and `bench dual-write` find PostgreSQL and the brokers.
#[derive(Clone, Debug, clap::Args)]
pub struct ServiceUrls {
    /// PostgreSQL to use (libpq key=value or URL). Needs max_prepared_transactions > 0;
    /// otherwise a private cluster is started.
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        env = "TWOPC_DEMO_POSTGRES_URL"
    )]
    pub postgres_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "TWOPC_DEMO_AMQP_URL"
    )]
    pub amqp_url: String,
    /// NATS URL (JetStream enabled).
    #[arg(
        long,
        default_value = "nats://127.0.0.1:4222",
        env = "TWOPC_DEMO_NATS_URL"
    )]
    pub nats_url: String,
}

/// Flags of `twopc-lab demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// How many orders to place (every few is designed to fail).
    #[arg(long, default_value_t = 20)]
    pub orders: usize,
    /// Which broker to publish OrderCreated to.
    #[arg(long, value_enum, default_value_t = BrokerKind::Rabbitmq, env = "TWOPC_DEMO_BROKER")]
    pub broker: BrokerKind,
    /// PostgreSQL and the brokers.
    #[command(flatten)]
    pub services: ServiceUrls,
    /// Keep the coordinator's and the participant's data here (default: a temp dir).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Where OrderCreated waits for the commit: `broker` (a broker branch of its own:
    /// two branches, two-phase commit) or `database` (the `twopc_outbox` table in the
    /// order's own transaction: one branch, one-phase commit, published right after).
    #[arg(
        long,
        value_enum,
        default_value_t = EventStaging::Broker,
        env = "TWOPC_DEMO_STAGE_EVENTS"
    )]
    pub stage_events: EventStaging,
}

/// The demo's findings.
#[derive(Debug, Default)]
pub struct Report {
    /// Orders attempted.
    pub placed: usize,
    /// Orders the coordinator committed.
    pub committed: usize,
    /// Orders aborted.
    pub aborted: usize,
    /// Rows in `orders`.
    pub rows: i64,
    /// Distinct events applied by the consumer.
    pub events_applied: u64,
    /// Deliveries the consumer received (including redeliveries).
    pub deliveries: u64,
    /// Redeliveries dropped by message-id deduplication.
    pub duplicates_removed: u64,
    /// Aborted orders with neither row nor event.
    pub aborted_clean: usize,
    /// Prepared transactions left in the database.
    pub prepared_left: i64,
    /// Staged messages left in the participant's store.
    pub staged_left: usize,
    /// Rows left in the `twopc_outbox` table (database staging).
    pub outbox_left: i64,
    /// Broken invariants, in words.
    pub violations: Vec<String>,
}

/// Runs the demo and prints its table.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    check_range("--orders", args.orders, 1..=100_000)?;
    let tmp = tempfile::tempdir().context("cannot create a temp dir")?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let tag = format!("{}_{}", std::process::id(), chrono_like_stamp());

    // PostgreSQL: the given one if it can prepare transactions, else a private cluster.
    let (pg_url, _cluster) =
        postgres_for_demo(&args.services.postgres_url, PgClusterOptions::default()).await?;
    let db_name = format!("twopc_demo_{tag}");
    create_database(&pg_url, &db_name).await?;
    let db_url = with_dbname(&pg_url, &db_name);

    // The coordinator, in-process, on its embedded sled store.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let coordinator_url = format!("http://{}", listener.local_addr()?);
    let (stop_coordinator, stopped) = oneshot::channel::<()>();
    let cfg = ServeConfig {
        data_dir: data_dir.join("coordinator"),
        retry_initial_ms: 20,
        retry_max_ms: 500,
        ..ServeConfig::default()
    };
    let coordinator = tokio::spawn(async move {
        server::run(cfg, listener, async {
            let _ = stopped.await;
        })
        .await
    });
    println!(
        "coordinator    {coordinator_url} (decision log in {})",
        data_dir.join("coordinator").display()
    );

    let sdk = TwoPc::builder(&coordinator_url)
        .service("orders")
        .data_dir(data_dir.join("order-service"))
        .recovery_interval(Duration::from_secs(1))
        .start()
        .await?;
    let pool = pool(&db_url, 16)?;
    {
        let client = pool.get().await.context("connect to the demo database")?;
        client.batch_execute(ORDER_SCHEMA).await?;
        client.batch_execute(INVENTORY_SCHEMA).await?;
        twopc_participant::dedup::ensure_table(&client).await?;
        client
            .batch_execute("INSERT INTO customers (id) VALUES ('alice'), ('bob'), ('carol') ON CONFLICT DO NOTHING")
            .await?;
    }
    let db = sdk.register(PgResource::new("orders-db", pool.clone()).await?)?;
    let staging = Arc::new(StagingStore::open(data_dir.join("order-service"))?);

    let report = match args.broker {
        BrokerKind::Rabbitmq => {
            let queue = format!("twopc-demo-orders-{tag}");
            let broker =
                RabbitResource::connect("events", &args.services.amqp_url, staging.clone())
                    .await
                    .with_context(|| rabbit_hint(&args.services.amqp_url))?;
            let broker = sdk.register(Arc::new(broker))?;
            stage_in(&args, &db, &broker).await?;
            println!(
                "broker         RabbitMQ {} queue {queue}",
                redact(&args.services.amqp_url)
            );
            let consumer = spawn_rabbit_consumer(&args.services.amqp_url, &queue, &db_url).await?;
            let service = OrderService {
                sdk: sdk.clone(),
                db: db.clone(),
                broker,
                destination: queue,
                staging: args.stage_events,
            };
            drive(&args, &service, &db_url, &staging, consumer).await?
        }
        BrokerKind::Nats => {
            let stream = format!("TWOPC_DEMO_{tag}");
            let subject = format!("twopc-demo.{tag}.orders");
            let broker = NatsResource::connect(
                "events",
                &args.services.nats_url,
                &stream,
                vec![subject.clone()],
                staging.clone(),
            )
            .await
            .with_context(|| nats_hint(&args.services.nats_url))?;
            let broker = sdk.register(Arc::new(broker))?;
            stage_in(&args, &db, &broker).await?;
            println!(
                "broker         NATS JetStream {} stream {stream}",
                args.services.nats_url
            );
            let consumer = spawn_nats_consumer(&args.services.nats_url, &stream, &db_url).await?;
            let service = OrderService {
                sdk: sdk.clone(),
                db: db.clone(),
                broker,
                destination: subject,
                staging: args.stage_events,
            };
            drive(&args, &service, &db_url, &staging, consumer).await?
        }
    };
    println!("postgres       {} database {db_name}", redact(&pg_url));
    print_report(&report);

    sdk.shutdown().await;
    let _ = stop_coordinator.send(());
    coordinator.await??;
    if !report.violations.is_empty() {
        bail!("{} invariant(s) broken", report.violations.len());
    }
    Ok(())
}

/// With `--stage-events database`, attaches the broker to the database's outbox.
async fn stage_in<B: Broker>(
    args: &DemoArgs,
    db: &PgResource,
    broker: &Arc<B>,
) -> anyhow::Result<()> {
    if args.stage_events == EventStaging::Database {
        db.enable_outbox(broker.clone(), OutboxOptions::default())
            .await
            .context("cannot set up the outbox table")?;
        println!("events         staged in the orders database (twopc_outbox), one-phase commits");
    }
    Ok(())
}

/// A running consumer: its counters and a way to stop it.
struct Consumer {
    stats: Arc<ConsumerStats>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Places the orders, waits for the events, and checks every invariant.
async fn drive<B: Broker>(
    args: &DemoArgs,
    service: &OrderService<B>,
    db_url: &str,
    staging: &StagingStore,
    consumer: Consumer,
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut committed = Vec::new();
    let mut aborted = Vec::new();
    let started = Instant::now();
    for i in 0..args.orders {
        let customers = ["alice", "bob", "carol"];
        let mut order = Order {
            id: format!("order-{i:05}"),
            customer: customers[i % 3].to_string(),
            item: format!("sku-{}", i % 7),
            quantity: (i % 5) as i32 + 1,
        };
        // Designed failures, one of each kind in every ten orders.
        let reject = i % 10 == 8;
        match i % 10 {
            3 if i > 0 => order.id = format!("order-{:05}", i - 1), // duplicate key: insert fails
            6 => order.customer = "mallory".into(), // unknown customer: PREPARE refuses (deferred FK)
            _ => {}
        }
        let outcome = service.place(&order, reject).await?;
        report.placed += 1;
        match outcome {
            Placed::Committed => committed.push(order),
            Placed::Aborted(why) => {
                println!("  aborted {:<12} {why}", order.id);
                // A duplicate-id order shares its id with a committed one: track it by index.
                aborted.push((i, order));
            }
        }
    }
    let elapsed = started.elapsed();
    report.committed = committed.len();
    report.aborted = aborted.len();

    // Wait (bounded) until the consumer applied an event for every committed order.
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.stats.applied.load(Ordering::Relaxed) < committed.len() as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give in-flight redeliveries a moment to be seen and dropped.
    let quiet = Instant::now() + Duration::from_millis(500);
    while Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.task.abort();
    report.deliveries = consumer.stats.deliveries.load(Ordering::Relaxed);
    report.duplicates_removed = consumer.stats.duplicates_removed.load(Ordering::Relaxed);

    let (client, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    report.rows = client
        .query_one("SELECT count(*) FROM orders", &[])
        .await?
        .get(0);
    report.events_applied = client
        .query_one("SELECT count(*) FROM inventory_events", &[])
        .await?
        .get::<_, i64>(0) as u64;
    report.prepared_left = client
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await?
        .get(0);
    report.staged_left = staging.len();
    if args.stage_events == EventStaging::Database {
        // The relay deletes a row once the broker confirmed its message (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            report.outbox_left = client
                .query_one("SELECT count(*) FROM twopc_outbox", &[])
                .await?
                .get(0);
            if report.outbox_left == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Every committed order: its row and exactly one applied event, equal to the row.
    for o in &committed {
        let row = order_row(
            &client,
            "SELECT customer, item, quantity FROM orders WHERE id = $1",
            &o.id,
        )
        .await?;
        let event = order_row(
            &client,
            "SELECT payload::text FROM inventory_events WHERE order_id = $1",
            &o.id,
        )
        .await?;
        match (row, event) {
            (Some(r), Some(e)) => {
                let stored = Order {
                    id: o.id.clone(),
                    customer: r.get(0),
                    item: r.get(1),
                    quantity: r.get(2),
                };
                let ev: crate::order_service::OrderCreated =
                    serde_json::from_str(&e.get::<_, String>(0))?;
                if ev.order != stored || stored != *o {
                    report.violations.push(format!(
                        "{}: event {:?} differs from row {:?}",
                        o.id, ev.order, stored
                    ));
                }
            }
            (None, _) => report
                .violations
                .push(format!("{}: committed but no row", o.id)),
            (_, None) => report
                .violations
                .push(format!("{}: committed but no event", o.id)),
        }
    }
    // Every aborted order: neither row nor event of its own.
    for (i, o) in &aborted {
        let own_row = committed.iter().all(|c| c.id != o.id);
        let row = order_row(&client, "SELECT 1 FROM orders WHERE id = $1", &o.id).await?;
        let event = order_row(
            &client,
            "SELECT 1 FROM inventory_events WHERE order_id = $1",
            &o.id,
        )
        .await?;
        // A duplicate-id order's id belongs to a committed order: that row is not its own.
        let clean = if own_row {
            row.is_none() && event.is_none()
        } else {
            true
        };
        if clean {
            report.aborted_clean += 1;
        } else {
            report.violations.push(format!(
                "order #{i} ({}) aborted but left a row or an event",
                o.id
            ));
        }
    }
    if report.rows != committed.len() as i64 {
        report.violations.push(format!(
            "{} rows for {} committed orders",
            report.rows,
            committed.len()
        ));
    }
    if report.events_applied != committed.len() as u64 {
        report.violations.push(format!(
            "{} events for {} committed orders",
            report.events_applied,
            committed.len()
        ));
    }
    let ghosts: i64 = client
        .query_one("SELECT count(*) FROM inventory_events e LEFT JOIN orders o ON o.id = e.order_id WHERE o.id IS NULL", &[])
        .await?
        .get(0);
    if ghosts > 0 {
        report
            .violations
            .push(format!("{ghosts} event(s) without a row"));
    }
    if report.prepared_left != 0 {
        report.violations.push(format!(
            "{} prepared transaction(s) left",
            report.prepared_left
        ));
    }
    if report.outbox_left != 0 {
        report.violations.push(format!(
            "{} outbox row(s) left unpublished",
            report.outbox_left
        ));
    }
    if report.staged_left != 0 {
        report.violations.push(format!(
            "{} staged message batch(es) left",
            report.staged_left
        ));
    }
    println!(
        "placed {} orders in {:.2} s ({:.0} orders/s)",
        report.placed,
        elapsed.as_secs_f64(),
        report.placed as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    Ok(report)
}

fn print_report(r: &Report) {
    let rows = [
        ("orders placed", r.placed.to_string()),
        (
            "orders committed",
            format!("{} (rows in orders: {})", r.committed, r.rows),
        ),
        (
            "events delivered",
            format!("{} applied ({} deliveries)", r.events_applied, r.deliveries),
        ),
        ("duplicates removed", r.duplicates_removed.to_string()),
        (
            "aborted orders",
            format!(
                "{} ({} with neither row nor event)",
                r.aborted, r.aborted_clean
            ),
        ),
        ("prepared transactions left", r.prepared_left.to_string()),
        ("staged messages left", r.staged_left.to_string()),
        ("outbox rows left", r.outbox_left.to_string()),
    ];
    println!();
    println!("+-{:-<28}-+-{:-<44}-+", "", "");
    for (k, v) in rows {
        println!("| {k:<28} | {v:<44} |");
    }
    println!("+-{:-<28}-+-{:-<44}-+", "", "");
    if r.violations.is_empty() {
        println!("all invariants hold: every committed order has its row and one event; nothing else is anywhere");
    } else {
        for v in &r.violations {
            println!("VIOLATION: {v}");
        }
    }
}

/// The PostgreSQL URL to use, and the private cluster backing it (kept alive by the
/// caller) when the given one cannot prepare transactions.
/// The PostgreSQL at `url` if it has prepared transactions enabled, else a private
/// throwaway cluster started with `options` (and the private cluster, kept alive by the
/// caller).
pub(crate) async fn postgres_for_demo(
    url: &str,
    options: PgClusterOptions,
) -> anyhow::Result<(String, Option<PgCluster>)> {
    match twopc_testkit::prepared_transactions_enabled(url).await {
        Ok(true) => return Ok((url.to_string(), None)),
        Ok(false) => eprintln!(
            "note: the PostgreSQL at {} has max_prepared_transactions = 0; starting a private cluster with it enabled",
            redact(url)
        ),
        Err(e) => eprintln!("note: PostgreSQL at {} is not usable ({e}); starting a private cluster", redact(url)),
    }
    let cluster = PgCluster::start_with(options).await.context(
        "could not start a private PostgreSQL cluster: install PostgreSQL (Debian: apt-get install postgresql) \
         or pass --postgres-url of a server with max_prepared_transactions > 0",
    )?;
    let url = cluster.url("postgres");
    Ok((url, Some(cluster)))
}

pub(crate) async fn create_database(url: &str, name: &str) -> anyhow::Result<()> {
    execute(url, &format!("CREATE DATABASE {name}")).await
}

/// Drops database `name` (closing what is still connected to it), best effort: a failure
/// is reported on stderr and leaves only the database behind.
pub(crate) async fn drop_database(url: &str, name: &str) {
    if let Err(e) = execute(url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await {
        eprintln!("note: could not drop the database {name} ({e:#}); drop it by hand");
    }
}

/// Runs `sql` on a connection of its own to `url`.
async fn execute(url: &str, sql: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
    tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .with_context(|| sql.to_string())
}

pub(crate) fn with_dbname(url: &str, db: &str) -> String {
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|kv| !kv.starts_with("dbname="))
        .collect();
    format!("{} dbname={db}", kept.join(" "))
}

pub(crate) fn pool(url: &str, max_size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .context("--postgres-url is not a valid PostgreSQL connection string")?;
    let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
    Ok(deadpool_postgres::Pool::builder(mgr)
        .max_size(max_size)
        .build()?)
}

/// Hides a password in a URL for printing.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub(crate) fn rabbit_hint(url: &str) -> String {
    format!(
        "RabbitMQ is not reachable at {}: start it (rabbitmq-server -detached) or install it \
         (apt-get install rabbitmq-server), or pass --amqp-url, or use --broker nats",
        redact(url)
    )
}

pub(crate) fn nats_hint(url: &str) -> String {
    format!(
        "NATS JetStream is not reachable at {url}: start it (nats-server -js) or install it \
         (apt-get install nats-server), or pass --nats-url, or use --broker rabbitmq"
    )
}

/// Seconds since the epoch, as a short unique-enough tag for names.
pub(crate) fn chrono_like_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Consumes the RabbitMQ queue: dedup + apply in the consumer's database transaction,
/// then ack. The very first delivery is nacked (requeued) after it was applied, like a
/// consumer that crashed before its ack: the redelivery is caught by deduplication.
async fn spawn_rabbit_consumer(
    amqp_url: &str,
    queue: &str,
    db_url: &str,
) -> anyhow::Result<Consumer> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions};
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| rabbit_hint(amqp_url))?;
    let channel = conn.create_channel().await?;
    twopc_testkit::amqp::declare_durable(&channel, queue).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "inventory".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (mut client, pg) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(pg);
    let stats = Arc::new(ConsumerStats::default());
    let s = stats.clone();
    let task = tokio::spawn(async move {
        let _conn = conn;
        let mut first = true;
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery?;
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default();
            apply_event(&mut client, "inventory", &message_id, &delivery.data, &s).await?;
            if std::mem::take(&mut first) {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            } else {
                delivery.ack(BasicAckOptions::default()).await?;
            }
        }
        Ok(())
    });
    Ok(Consumer { stats, task })
}

/// Consumes the JetStream stream with a durable pull consumer; same dedup/apply/ack
/// discipline, with the first delivery nak'ed to show a redelivery being dropped.
async fn spawn_nats_consumer(
    nats_url: &str,
    stream: &str,
    db_url: &str,
) -> anyhow::Result<Consumer> {
    use async_nats::jetstream::{self, consumer::pull, AckKind};
    let client = async_nats::connect(nats_url)
        .await
        .with_context(|| nats_hint(nats_url))?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(stream)
        .await
        .context("the order stream should exist once the broker resource connected")?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("inventory".into()),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let (mut pg, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let stats = Arc::new(ConsumerStats::default());
    let s = stats.clone();
    let task = tokio::spawn(async move {
        let mut first = true;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
            let message_id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            apply_event(&mut pg, "inventory", &message_id, &msg.payload, &s).await?;
            let kind = if std::mem::take(&mut first) {
                AckKind::Nak(None)
            } else {
                AckKind::Ack
            };
            msg.ack_with(kind)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    });
    Ok(Consumer { stats, task })
}

/// The row `sql` finds for the order `id` (its `$1`), if any.
async fn order_row(
    client: &tokio_postgres::Client,
    sql: &str,
    id: &str,
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    client.query_opt(sql, &[&id]).await
}
