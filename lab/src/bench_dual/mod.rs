//! `twopc-lab bench dual-write`: the order-service workload four ways, side by side.
//!
//! - **naive**: `INSERT` (autocommit), then publish with a broker confirmation. Fast and
//!   wrong: a crash between the two leaves a row without its event.
//! - **outbox**: the row and an outbox row in one local transaction; a relay polls the
//!   outbox every `--relay-interval-ms`, publishes (with confirmations) and deletes.
//! - **twopc**: the SDK, as a service whose event goes with its database writes should
//!   use it: the event is staged in the PostgreSQL branch's own transaction
//!   (`PgBranch::publish`, the `twopc_outbox` table), so the transaction has one branch
//!   and the coordinator (in-process, real sled log) commits it in one phase; the
//!   resource's relay publishes the event as soon as the row committed.
//! - **twopc-2pc**: the SDK with a broker branch of its own (`Transaction::publish`): two
//!   branches, so prepare (`PREPARE TRANSACTION` and a synced staging store), a forced
//!   decision and phase two.
//!
//! The modes run interleaved (`--rounds` slices each, in rotation) against the same
//! PostgreSQL and broker, so they share the machine's conditions. After each slice the
//! benchmark waits until that slice's events have arrived before the next mode starts, so
//! work a mode defers (the outbox relay's backlog) is not done in another mode's measured
//! time; that wait is reported per mode (`drain_ms`). Per mode it reports
//! transactions/s (of the slices alone, and sustained: of the slices and their drains,
//! the rate at which orders commit *and* their events arrive), the client-visible
//! latency, and the event-delivery latency: from the moment the order's database commit
//! is issued (naive: after the INSERT; outbox: when COMMIT is sent; twopc: when Commit is
//! called) to the consumer's receipt.
//!
//! It also reports the CPU time per order, of this process (clients, SDK, the in-process
//! coordinator, the relays) and of the whole machine (PostgreSQL and the broker too),
//! over the mode's slices and drains: where every core is busy, the machine's CPU per
//! order is what bounds the throughput, and it shows which mode costs what.
//!
//! For the twopc modes it also splits the client-visible latency into its steps (Begin,
//! the statements, Commit; see [`crate::order_service::Phases`]), p50 and p99 each: where
//! a tail comes from is the first question when the p99 is off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bench::{self, LocalCoordinator};
use crate::check_range;
use anyhow::Context;
use twopc_coordinator::log::{DecisionLog, SledLog, DEFAULT_GROUP_COMMIT_DELAY_US};
use twopc_participant::broker::Broker;
use twopc_participant::nats::NatsResource;
use twopc_participant::postgres::PgResource;
use twopc_participant::rabbitmq::RabbitResource;
use twopc_participant::staging::StagingStore;
use twopc_participant::{OutboxOptions, TwoPc};

use crate::demo::{self, BrokerKind, ServiceUrls};
use crate::order_service::{EventStaging, Order, OrderService, Phases, Placed, ORDER_SCHEMA};

mod delivery;

use delivery::{
    outbox_relay, spawn_nats_consumer, spawn_rabbit_consumer, wait_delivered, SLICE_DRAIN_LIMIT,
};

/// Flags of `twopc-lab bench dual-write`.
#[derive(Clone, Debug, clap::Args)]
pub struct DualWriteBench {
    /// Concurrent clients per mode.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Measured seconds per mode (split over the rounds).
    #[arg(long, default_value_t = 9)]
    pub seconds: u64,
    /// Slices per mode; modes rotate between slices.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// The coordinator's group-commit delay (µs; see `twopc serve --group-commit-delay-us`);
    /// 0 compares against a log that syncs every batch at once.
    #[arg(long, default_value_t = DEFAULT_GROUP_COMMIT_DELAY_US)]
    pub group_commit_delay_us: u64,
    /// Which broker carries the events.
    #[arg(long, value_enum, default_value_t = BrokerKind::Rabbitmq)]
    pub broker: BrokerKind,
    /// How often the outbox relay polls (ms).
    #[arg(long, default_value_t = 100)]
    pub relay_interval_ms: u64,
    /// twopc mode: how long a commit waits for the broker's confirmation of the event
    /// staged in the database branch (ms; 0: answer at once, publish in the background).
    #[arg(long, default_value_t = 1000)]
    pub publish_wait_ms: u64,
    /// The modes to run (comma-separated; they always run and are reported in the order
    /// naive, outbox, twopc, twopc-2pc). One mode alone is what a profiler should watch.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = MODES)]
    pub modes: Vec<Mode>,
    /// Connections of the pool every mode shares (default: two per client and four for the
    /// relays). Fewer than the clients bounds how many orders PostgreSQL works on at once;
    /// the others wait for a connection.
    #[arg(long)]
    pub db_connections: Option<usize>,
    /// PostgreSQL and the brokers.
    #[command(flatten)]
    pub services: ServiceUrls,
    /// Print one JSON object per mode instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One mode's numbers (the JSON line).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DualResult {
    /// naive | outbox | twopc | twopc-2pc.
    pub mode: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Orders completed per second.
    pub tx_per_s: f64,
    /// Client-visible latency p50 (ms).
    pub p50_ms: f64,
    /// Client-visible latency p99 (ms).
    pub p99_ms: f64,
    /// Commit-to-receipt latency p50 (ms).
    pub delivery_p50_ms: f64,
    /// Commit-to-receipt latency p99 (ms).
    pub delivery_p99_ms: f64,
    /// Decision-log syncs per committed transaction (twopc modes only; a one-phase commit
    /// waits for two syncs, its intent and its outcome, shared with other transactions).
    pub syncs_per_decision: Option<f64>,
    /// Orders whose event never arrived within the drain deadline.
    pub undelivered: u64,
    /// Mean time (ms) from the end of one of this mode's slices until every event of the
    /// slice had arrived: the work the mode left behind (the outbox relay's backlog, the
    /// twopc relay's window). The next slice starts only after it, so no mode's deferred
    /// work runs in another mode's measured time.
    pub drain_ms: f64,
    /// twopc throughput / this mode's (set on the naive and outbox lines).
    pub twopc_throughput_ratio: Option<f64>,
    /// Orders per second of the mode's slices *plus* the drains after them: the rate at
    /// which the mode commits orders and delivers their events. A mode whose events fall
    /// behind its commits (the outbox relay, once its polls cannot carry what commits
    /// meanwhile) does the rest of its work in the drain; `tx_per_s` leaves that time
    /// out, this rate does not.
    pub sustained_tx_per_s: f64,
    /// twopc sustained rate / this mode's (set where `twopc_throughput_ratio` is).
    pub twopc_sustained_ratio: Option<f64>,
    /// CPU time of the benchmark process (clients, SDK, in-process coordinator and
    /// relays) per order (µs), over the mode's slices and the drains after them.
    pub cpu_us_per_tx: Option<f64>,
    /// CPU time of the whole machine per order (µs): the benchmark process, PostgreSQL
    /// and the broker (and anything else running), over the same time. On a machine
    /// whose cores are all busy, this is what bounds the throughput.
    pub machine_cpu_us_per_tx: Option<f64>,
    /// twopc modes: where the client-visible latency went, step by step (see
    /// [`crate::order_service::Phases`]): Begin p50 (ms).
    pub begin_p50_ms: Option<f64>,
    /// Begin p99 (ms).
    pub begin_p99_ms: Option<f64>,
    /// Opening the branch, the INSERT and staging the event: p50 (ms).
    pub statements_p50_ms: Option<f64>,
    /// The same, p99 (ms).
    pub statements_p99_ms: Option<f64>,
    /// Commit p50 (ms).
    pub commit_p50_ms: Option<f64>,
    /// Commit p99 (ms).
    pub commit_p99_ms: Option<f64>,
}

/// One way of doing the dual write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Mode {
    /// INSERT (autocommit), then publish.
    Naive,
    /// Row and outbox row in one transaction; a polling relay publishes.
    Outbox,
    /// The SDK, the event staged in the database branch (one-phase commit).
    Twopc,
    /// The SDK with a broker branch (two-phase commit).
    #[value(name = "twopc-2pc")]
    TwopcBroker,
}

/// Every mode, in the order they run and are reported.
pub const MODES: [Mode; 4] = [Mode::Naive, Mode::Outbox, Mode::Twopc, Mode::TwopcBroker];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Naive => "naive",
            Mode::Outbox => "outbox",
            Mode::Twopc => "twopc",
            Mode::TwopcBroker => "twopc-2pc",
        }
    }
}

/// Per-mode measurements, shared by the clients and the consumer.
#[derive(Default)]
struct Samples {
    /// Client latency per completed order (µs).
    client_us: Mutex<Vec<u64>>,
    /// twopc modes: begin, statements and commit of each committed order (µs).
    phases_us: Mutex<Vec<[u64; 3]>>,
    /// When each order's commit was issued, until its event arrives.
    committed_at: Mutex<HashMap<String, Instant>>,
    /// Commit-to-receipt latency per event (µs).
    delivery_us: Mutex<Vec<u64>>,
    /// Orders expected to produce an event.
    expected: AtomicU64,
    /// Events received (first time).
    received: AtomicU64,
    /// Measured time (µs) summed over slices.
    busy_us: AtomicU64,
    /// CPU time (µs) of this process over the mode's slices and their drains.
    cpu_us: AtomicU64,
    /// CPU time (µs) of the whole machine (PostgreSQL and the broker too) over the
    /// mode's slices and their drains (0 where it cannot be read).
    machine_cpu_us: AtomicU64,
    /// Decision-log syncs during this mode's slices.
    syncs: AtomicU64,
    /// Time (µs) summed over slices from a slice's end until its last event arrived.
    drain_us: AtomicU64,
}

/// Plain publishing for the naive and outbox modes (the twopc mode goes through the SDK).
#[derive(Clone)]
enum Publisher {
    Rabbit(lapin::Channel),
    Nats(async_nats::jetstream::Context),
}

impl Publisher {
    async fn publish(
        &self,
        destination: &str,
        message_id: &str,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        match self {
            Publisher::Rabbit(ch) => {
                let props = lapin::BasicProperties::default()
                    .with_message_id(message_id.into())
                    .with_delivery_mode(2);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        destination.into(),
                        lapin::options::BasicPublishOptions::default(),
                        &payload,
                        props,
                    )
                    .await?
                    .await?;
                anyhow::ensure!(!confirm.is_nack(), "broker nacked {message_id}");
            }
            Publisher::Nats(js) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", message_id);
                js.publish_with_headers(destination.to_string(), headers, payload.into())
                    .await?
                    .await?;
            }
        }
        Ok(())
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: DualWriteBench) -> anyhow::Result<()> {
    check_range("--clients", args.clients, 1..=1024)?;
    check_range("--seconds", args.seconds, 1..=3600)?;
    check_range("--rounds", args.rounds, 1..=100)?;
    check_range("--relay-interval-ms", args.relay_interval_ms, 1..=60_000)?;
    anyhow::ensure!(
        args.publish_wait_ms <= 60_000,
        "--publish-wait-ms must be at most 60000"
    );
    let connections = args.db_connections.unwrap_or(2 * args.clients + 4);
    anyhow::ensure!(
        (2..=4096).contains(&connections),
        "--db-connections must be between 2 and 4096 (the clients and the relays share the pool), got {connections}"
    );
    let mut modes = args.modes.clone();
    modes.sort_unstable();
    modes.dedup();
    anyhow::ensure!(!modes.is_empty(), "--modes names no mode");
    let tmp = tempfile::tempdir_in(".").context("cannot create the benchmark directory")?;
    let tag = format!("{}_{}", std::process::id(), demo::chrono_like_stamp());

    // A private cluster syncs its writes like the servers users run (the test clusters
    // do not), so no mode looks cheaper than it is.
    let durable = twopc_testkit::PgClusterOptions {
        settings: vec![("fsync".into(), "on".into())],
        ..Default::default()
    };
    let (pg_url, cluster) = demo::postgres_for_demo(&args.services.postgres_url, durable).await?;
    let db_name = format!("twopc_bench_{tag}");
    demo::create_database(&pg_url, &db_name).await?;
    let db_url = demo::with_dbname(&pg_url, &db_name);
    // Every client may hold a connection for a whole transaction (a twopc branch keeps
    // its own until the commit), and the relays need one besides.
    let pool = demo::pool(&db_url, connections)?;
    {
        let c = pool.get().await?;
        c.batch_execute(ORDER_SCHEMA).await?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS outbox (id bigserial PRIMARY KEY, message_id text NOT NULL, payload bytea NOT NULL);
             INSERT INTO customers (id) VALUES ('alice') ON CONFLICT DO NOTHING;",
        )
        .await?;
    }

    // Coordinator in-process, real sled log.
    let coordinator =
        LocalCoordinator::start(&tmp.path().join("coordinator"), args.group_commit_delay_us)
            .await?;
    let log = coordinator.log.clone();
    let sdk = TwoPc::builder(&coordinator.url)
        .service("bench")
        .data_dir(tmp.path().join("svc"))
        .start()
        .await?;
    let db = sdk.register(PgResource::new("db", pool.clone()).await?)?;
    let staging = Arc::new(StagingStore::open(tmp.path().join("svc"))?);

    let dest = |mode: Mode| match args.broker {
        BrokerKind::Rabbitmq => format!("twopc-bench-{tag}-{}", mode.name()),
        BrokerKind::Nats => format!("twopc-bench.{tag}.{}", mode.name()),
    };
    let stream = format!("TWOPC_BENCH_{tag}");
    let samples: HashMap<Mode, Arc<Samples>> = modes
        .iter()
        .copied()
        .map(|m| (m, Arc::new(Samples::default())))
        .collect();

    let results = match args.broker {
        BrokerKind::Rabbitmq => {
            let broker = sdk.register(Arc::new(
                RabbitResource::connect("events", &args.services.amqp_url, staging.clone())
                    .await
                    .with_context(|| demo::rabbit_hint(&args.services.amqp_url))?,
            ))?;
            let conn = lapin::Connection::connect(
                &args.services.amqp_url,
                lapin::ConnectionProperties::default(),
            )
            .await?;
            for mode in samples.keys() {
                let ch = conn.create_channel().await?;
                twopc_testkit::amqp::declare_durable(&ch, &dest(*mode)).await?;
                spawn_rabbit_consumer(ch, dest(*mode), samples[mode].clone()).await?;
            }
            let make = || async {
                let ch = conn.create_channel().await?;
                ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, anyhow::Error>(Publisher::Rabbit(ch))
            };
            let publishers =
                futures::future::try_join_all((0..args.clients + 1).map(|_| make())).await?;
            let services = services(&args, &sdk, &db, broker, &dest).await?;
            let results = measure(
                &args, &modes, &pool, services, publishers, &dest, &samples, &log,
            )
            .await;
            // The benchmark's queues go with it (best effort: a failure only leaves them).
            if let Ok(ch) = conn.create_channel().await {
                for &mode in &modes {
                    let _ = ch
                        .queue_delete(
                            dest(mode).as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
            }
            results?
        }
        BrokerKind::Nats => {
            let subjects = modes.iter().map(|m| dest(*m)).collect();
            let broker = sdk.register(Arc::new(
                NatsResource::connect(
                    "events",
                    &args.services.nats_url,
                    &stream,
                    subjects,
                    staging.clone(),
                )
                .await
                .with_context(|| demo::nats_hint(&args.services.nats_url))?,
            ))?;
            let client = async_nats::connect(&args.services.nats_url).await?;
            let js = async_nats::jetstream::new(client);
            for mode in samples.keys() {
                spawn_nats_consumer(
                    &js,
                    &stream,
                    mode.name(),
                    dest(*mode),
                    samples[mode].clone(),
                )
                .await?;
            }
            let publishers = (0..args.clients + 1)
                .map(|_| Publisher::Nats(js.clone()))
                .collect();
            let services = services(&args, &sdk, &db, broker, &dest).await?;
            let results = measure(
                &args, &modes, &pool, services, publishers, &dest, &samples, &log,
            )
            .await;
            // The benchmark's stream goes with it (best effort).
            let _ = js.delete_stream(&stream).await;
            results?
        }
    };

    sdk.shutdown().await;
    coordinator.stop().await?;
    // The benchmark's database goes with it (a private cluster goes as a whole).
    drop((db, pool));
    if cluster.is_none() {
        demo::drop_database(&pg_url, &db_name).await;
    }
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_table(&results);
    }
    Ok(())
}

/// The order services of the two twopc modes: events staged in the database (`twopc`) and
/// in a broker branch (`twopc-2pc`).
async fn services<B: Broker>(
    args: &DualWriteBench,
    sdk: &TwoPc,
    db: &Arc<PgResource>,
    broker: Arc<B>,
    dest: &dyn Fn(Mode) -> String,
) -> anyhow::Result<Arc<[OrderService<B>; 2]>> {
    let options = OutboxOptions {
        publish_wait: Duration::from_millis(args.publish_wait_ms),
        ..OutboxOptions::default()
    };
    db.enable_outbox(broker.clone(), options).await?;
    let service = |mode: Mode, staging: EventStaging| OrderService {
        sdk: sdk.clone(),
        db: db.clone(),
        broker: broker.clone(),
        destination: dest(mode),
        staging,
    };
    Ok(Arc::new([
        service(Mode::Twopc, EventStaging::Database),
        service(Mode::TwopcBroker, EventStaging::Broker),
    ]))
}

#[allow(clippy::too_many_arguments)]
async fn measure<B: Broker>(
    args: &DualWriteBench,
    modes: &[Mode],
    pool: &deadpool_postgres::Pool,
    services: Arc<[OrderService<B>; 2]>,
    mut publishers: Vec<Publisher>,
    dest: &dyn Fn(Mode) -> String,
    samples: &HashMap<Mode, Arc<Samples>>,
    log: &SledLog,
) -> anyhow::Result<Vec<DualResult>> {
    // The outbox relay runs for the whole benchmark, like a real one would.
    let relay_stop = Arc::new(AtomicBool::new(false));
    let relay = tokio::spawn(outbox_relay(
        pool.clone(),
        publishers.pop().context("a publisher for the relay")?,
        dest(Mode::Outbox),
        Duration::from_millis(args.relay_interval_ms),
        relay_stop.clone(),
    ));
    let slice = Duration::from_secs_f64(args.seconds as f64 / args.rounds as f64);
    let total = modes.len() as u64 * args.rounds as u64;
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} slices")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let seq = Arc::new(AtomicU64::new(0));
    for _round in 0..args.rounds {
        for &mode in modes {
            let which = match mode {
                Mode::TwopcBroker => 1,
                _ => 0,
            };
            let syncs_before = log.stats().syncs;
            let (cpu_before, machine_before) = (bench::process_cpu(), bench::machine_cpu());
            bar.set_message(mode.name());
            let s = samples[&mode].clone();
            let started = Instant::now();
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for publisher in publishers.iter().take(args.clients) {
                let (s, stop, seq, pool) = (s.clone(), stop.clone(), seq.clone(), pool.clone());
                let publisher = publisher.clone();
                let destination = dest(mode);
                let services = services.clone();
                // Each client is a task of its own, as each request is in a service.
                tasks.push(tokio::spawn(async move {
                    let service = &services[which];
                    while !stop.load(Ordering::Relaxed) {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        let order = Order {
                            id: format!("{}-{n}", mode.name()),
                            customer: "alice".into(),
                            item: format!("sku-{}", n % 7),
                            quantity: (n % 5) as i32 + 1,
                        };
                        let t0 = Instant::now();
                        one_order(mode, &order, &pool, &publisher, &destination, service, &s)
                            .await?;
                        s.client_us
                            .lock()
                            .map_err(|_| anyhow::anyhow!("lock"))?
                            .push(t0.elapsed().as_micros() as u64);
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            let timer = async {
                tokio::time::sleep(slice).await;
                stop.store(true, Ordering::Relaxed);
            };
            let (_, results) = tokio::join!(timer, futures::future::join_all(tasks));
            for r in results {
                r.with_context(|| format!("{} client panicked", mode.name()))?
                    .with_context(|| format!("{} client failed", mode.name()))?;
            }
            s.busy_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            s.syncs
                .fetch_add(log.stats().syncs - syncs_before, Ordering::Relaxed);
            // Wait for this slice's events before the next mode runs, so its leftover
            // work is not done in (and billed to) another mode's slice.
            let drained = Instant::now();
            wait_delivered(&s, SLICE_DRAIN_LIMIT).await;
            s.drain_us
                .fetch_add(drained.elapsed().as_micros() as u64, Ordering::Relaxed);
            let cpu = bench::process_cpu().saturating_sub(cpu_before);
            s.cpu_us
                .fetch_add(cpu.as_micros() as u64, Ordering::Relaxed);
            if let (Some(before), Some(after)) = (machine_before, bench::machine_cpu()) {
                s.machine_cpu_us.fetch_add(
                    after.saturating_sub(before).as_micros() as u64,
                    Ordering::Relaxed,
                );
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    // Anything a slice's drain gave up on gets one more bounded wait.
    for s in samples.values() {
        wait_delivered(s, SLICE_DRAIN_LIMIT).await;
    }
    relay_stop.store(true, Ordering::Relaxed);
    relay.await??;

    let mut out = Vec::new();
    for &mode in modes {
        let s = &samples[&mode];
        let mut client = s
            .client_us
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .clone();
        let mut delivery = s
            .delivery_us
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .clone();
        let secs = s.busy_us.load(Ordering::Relaxed) as f64 / 1e6;
        let mut r = DualResult {
            mode: mode.name().into(),
            clients: args.clients,
            tx_per_s: client.len() as f64 / secs.max(1e-9),
            sustained_tx_per_s: client.len() as f64
                / (secs + s.drain_us.load(Ordering::Relaxed) as f64 / 1e6).max(1e-9),
            p50_ms: pct(&mut client, 0.50),
            p99_ms: pct(&mut client, 0.99),
            delivery_p50_ms: pct(&mut delivery, 0.50),
            delivery_p99_ms: pct(&mut delivery, 0.99),
            drain_ms: s.drain_us.load(Ordering::Relaxed) as f64 / 1e3 / args.rounds as f64,
            undelivered: s
                .expected
                .load(Ordering::Relaxed)
                .saturating_sub(s.received.load(Ordering::Relaxed)),
            ..Default::default()
        };
        let orders = client.len() as u64;
        r.cpu_us_per_tx = bench::cpu_per_tx(
            Duration::from_micros(s.cpu_us.load(Ordering::Relaxed)),
            orders,
        );
        // None where the machine's CPU time cannot be read at all (not Linux).
        r.machine_cpu_us_per_tx = bench::machine_cpu().and_then(|_| {
            bench::cpu_per_tx(
                Duration::from_micros(s.machine_cpu_us.load(Ordering::Relaxed)),
                orders,
            )
        });
        if matches!(mode, Mode::Twopc | Mode::TwopcBroker) {
            let syncs = s.syncs.load(Ordering::Relaxed);
            r.syncs_per_decision = Some(syncs as f64 / (client.len().max(1)) as f64);
            let phases = s
                .phases_us
                .lock()
                .map_err(|_| anyhow::anyhow!("lock"))?
                .clone();
            let step = |i: usize| -> (Option<f64>, Option<f64>) {
                let mut v: Vec<u64> = phases.iter().map(|p| p[i]).collect();
                match v.is_empty() {
                    true => (None, None),
                    false => (Some(pct(&mut v, 0.50)), Some(pct(&mut v, 0.99))),
                }
            };
            (r.begin_p50_ms, r.begin_p99_ms) = step(0);
            (r.statements_p50_ms, r.statements_p99_ms) = step(1);
            (r.commit_p50_ms, r.commit_p99_ms) = step(2);
        }
        out.push(r);
    }
    let twopc = out.iter().find(|r| r.mode == "twopc");
    if let Some((rate, sustained)) = twopc.map(|r| (r.tx_per_s, r.sustained_tx_per_s)) {
        for r in out.iter_mut().filter(|r| r.mode != "twopc") {
            r.twopc_throughput_ratio = Some(rate / r.tx_per_s.max(1e-9));
            r.twopc_sustained_ratio = Some(sustained / r.sustained_tx_per_s.max(1e-9));
        }
    }
    Ok(out)
}

async fn one_order<B: Broker>(
    mode: Mode,
    order: &Order,
    pool: &deadpool_postgres::Pool,
    publisher: &Publisher,
    destination: &str,
    service: &OrderService<B>,
    s: &Samples,
) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(order)?;
    let mark = |s: &Samples| -> anyhow::Result<()> {
        s.expected.fetch_add(1, Ordering::Relaxed);
        s.committed_at
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .insert(order.id.clone(), Instant::now());
        Ok(())
    };
    match mode {
        Mode::Naive => {
            // The connection goes back to the pool before the publish, as a service would.
            pool.get()
                .await?
                .execute(
                    "INSERT INTO orders (id, customer, item, quantity) VALUES ($1, $2, $3, $4)",
                    &[&order.id, &order.customer, &order.item, &order.quantity],
                )
                .await?;
            mark(s)?;
            publisher.publish(destination, &order.id, payload).await?;
        }
        Mode::Outbox => {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO orders (id, customer, item, quantity) VALUES ($1, $2, $3, $4)",
                &[&order.id, &order.customer, &order.item, &order.quantity],
            )
            .await?;
            tx.execute(
                "INSERT INTO outbox (message_id, payload) VALUES ($1, $2)",
                &[&order.id, &payload],
            )
            .await?;
            // Marked before COMMIT: the relay may publish the row, and the consumer
            // receive it, before this task runs again (receipts of unmarked orders are
            // not counted, so the order would wait for its event until the drain's limit).
            mark(s)?;
            if let Err(e) = tx.commit().await {
                s.expected.fetch_sub(1, Ordering::Relaxed);
                return Err(e.into());
            }
        }
        Mode::Twopc | Mode::TwopcBroker => {
            // Marked before commit: the event may arrive before Commit returns.
            mark(s)?;
            let mut phases = Phases::default();
            match service.place_timed(order, false, &mut phases).await? {
                Placed::Committed => {
                    let us = |d: Duration| d.as_micros() as u64;
                    s.phases_us
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .push([us(phases.begin), us(phases.statements), us(phases.commit)]);
                }
                Placed::Aborted(why) => {
                    s.expected.fetch_sub(1, Ordering::Relaxed);
                    anyhow::bail!("order {} aborted: {why}", order.id);
                }
            }
        }
    }
    Ok(())
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

fn print_table(results: &[DualResult]) {
    println!(
        "{:<9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>12} {:>12} {:>10} {:>9} {:>11} {:>9} {:>10}",
        "mode",
        "clients",
        "tx/s",
        "sustained",
        "p50 ms",
        "p99 ms",
        "deliv p50",
        "deliv p99",
        "syncs/dec",
        "drain ms",
        "undelivered",
        "cpu us/tx",
        "machine us"
    );
    for r in results {
        println!(
            "{:<9} {:>7} {:>9.0} {:>9.0} {:>8.2} {:>8.2} {:>12.2} {:>12.2} {:>10} {:>9.0} {:>11} {:>9} {:>10}",
            r.mode,
            r.clients,
            r.tx_per_s,
            r.sustained_tx_per_s,
            r.p50_ms,
            r.p99_ms,
            r.delivery_p50_ms,
            r.delivery_p99_ms,
            bench::or_dash(r.syncs_per_decision, 3),
            r.drain_ms,
            r.undelivered,
            bench::or_dash(r.cpu_us_per_tx, 0),
            bench::or_dash(r.machine_cpu_us_per_tx, 0),
        );
    }
    for r in results {
        if let (Some(b50), Some(b99), Some(s50), Some(s99), Some(c50), Some(c99)) = (
            r.begin_p50_ms,
            r.begin_p99_ms,
            r.statements_p50_ms,
            r.statements_p99_ms,
            r.commit_p50_ms,
            r.commit_p99_ms,
        ) {
            println!(
                "{} steps, p50 / p99 ms: begin {b50:.2} / {b99:.2}, statements {s50:.2} / {s99:.2}, \
                 commit {c50:.2} / {c99:.2}",
                r.mode
            );
        }
    }
    let find = |name: &str| results.iter().find(|r| r.mode == name);
    if let (Some(naive), Some(outbox), Some(twopc)) = (find("naive"), find("outbox"), find("twopc"))
    {
        println!(
            "twopc/naive throughput {:.2}x, twopc/outbox throughput {:.2}x (sustained, events \
             delivered: {:.2}x / {:.2}x), twopc/naive p99 {:.2}x, \
             twopc delivery p99 {:.1} ms vs outbox delivery p50 {:.1} ms",
            twopc.tx_per_s / naive.tx_per_s.max(1e-9),
            twopc.tx_per_s / outbox.tx_per_s.max(1e-9),
            twopc.sustained_tx_per_s / naive.sustained_tx_per_s.max(1e-9),
            twopc.sustained_tx_per_s / outbox.sustained_tx_per_s.max(1e-9),
            twopc.p99_ms / naive.p99_ms.max(1e-9),
            twopc.delivery_p99_ms,
            outbox.delivery_p50_ms
        );
    }
}
