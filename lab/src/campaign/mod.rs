//! `twopc-lab campaign`: a seeded, randomized fault campaign with a checker.
//!
//! Each cycle places a few orders (row + OrderCreated, through the SDK) while one random
//! fault strikes: the coordinator process killed with SIGKILL (during the load, or again
//! and again while it starts again) or paused with SIGSTOP, the coordinator↔participant
//! link blackholed, delayed or reset in either direction, PostgreSQL killed, the broker
//! cut off, the participant restarted (after the load, or during it while its replies are
//! lost), or a real `twopc-lab order-service` process of the same service, on the same data
//! directory, database and port, killed again and again while it starts, between two
//! lives of the participant. Every operation is recorded as invoked → ok /
//! aborted / unknown. Then faults stop, recovery gets a bounded time, and the checker reads
//! PostgreSQL and drains the broker directly to assert:
//!
//! - every OK order has its row and its event, and the event's payload equals the row;
//! - every ABORTED order has neither; an unknown one has both or neither;
//! - no event without a row, no row without an event (duplicates counted, removed by id);
//! - every event carries its transaction's message id (`<tx_id>:orders:events:0` for a
//!   broker-staged order, `<tx_id>:orders:orders-db:0` for a database-staged one);
//! - the coordinator's outcome for every transaction matches its branches;
//! - no prepared gid, no staged message and (after a bounded drain that gives the outbox
//!   sweep its time) no `twopc_outbox` row is left;
//! - `twopc_one_phase` holds no marker of a transaction whose owner got its Commit answer
//!   (the SDK drops it once a coordinator Barrier of the answer's epoch returned; a cycle
//!   that killed the coordinator, PostgreSQL or the participant may leave some, counted),
//!   and every marker left belongs to a committed, database-staged order of a one-phase
//!   cycle.
//!
//! Each order stages its event one of two ways, drawn from the seeded RNG (recorded per
//! transaction in the violations and in `transactions.log` of the work directory): a broker
//! branch of its own (`tx.publish`, always two-phase) or the PostgreSQL branch's outbox
//! table (`PgBranch::publish`: a single branch, committed in one phase while the
//! coordinator's one-phase optimisation is on, through `PREPARE TRANSACTION` while it is
//! off). `--one-phase alternate` (the default) switches the coordinator's optimisation on
//! and off every ten cycles (restarting it between two cycles), so both paths of the
//! database-staged order meet every fault.
//!
//! It prints the seed, a one-line reproduce command and a one-line JSON summary
//! `{"cycles":..,"faults":..,"transactions":..,"violations":..}`, and exits non-zero on any
//! violation (keeping its work directory then). `--broken` runs the coordinator with a
//! deliberately unsafe test-only switch (commits sent before the decision is durable) to
//! show the checker catches it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twopc_participant::postgres::PgResource;
use twopc_participant::rabbitmq::RabbitResource;
use twopc_participant::staging::StagingStore;
use twopc_participant::{Error, OutboxOptions, TwoPc};
use twopc_proto::v1 as pb;
use twopc_testkit::proxy::{Direction, Fault, FaultProxy};
use twopc_testkit::PgCluster;

mod check;
mod faults;
mod processes;

use check::{check, coordinator_answers, marker_gids, settle};
pub use faults::FaultKind;
use faults::ALL_FAULTS;
pub(crate) use processes::twopc_binary;
use processes::{kill_order_service_while_starting, CoordinatorProc};

use crate::check_range;
use crate::order_service::{
    EventStaging, Order, OrderCreated, BROKER_RESOURCE, DB_RESOURCE, ORDER_SCHEMA,
};

/// The service name of the in-process order service (prefixes its branch ids); the same
/// resources as `twopc-lab order-service`, so a real process of it is the same participant.
const SERVICE: &str = "orders";
/// A fault that kills a process while it starts kills it this many times in a row at
/// most (at least once).
const START_KILLS_MAX: u32 = 4;
/// With `--one-phase alternate`, the coordinator's one-phase optimisation is on for this
/// many cycles, then off for as many, and so on.
const ONE_PHASE_BLOCK: u32 = 10;

/// Flags of `twopc-lab campaign`.
#[derive(Clone, Debug, clap::Args)]
pub struct CampaignArgs {
    /// Fault cycles to run.
    #[arg(long, env = "TWOPC_CAMPAIGN_CYCLES", default_value_t = 100)]
    pub cycles: u32,
    /// Seed of the random choices (default: random, printed).
    #[arg(long, env = "TWOPC_CAMPAIGN_SEED")]
    pub seed: Option<u64>,
    /// Concurrent orders per cycle.
    #[arg(long, default_value_t = 4)]
    pub orders_per_cycle: usize,
    /// Only these fault kinds (comma-separated), default all.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub faults: Vec<FaultKind>,
    /// RabbitMQ URL (the campaign puts its own fault proxy in front of it).
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        env = "TWOPC_DEMO_AMQP_URL"
    )]
    pub amqp_url: String,
    /// Run the coordinator with the unsafe test-only switch that sends commits before the
    /// decision is durable: the checker must report violations.
    #[arg(long)]
    pub broken: bool,
    /// Keep the work directory (coordinator log, staging store, transactions.log) here.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where orders stage their event, drawn per transaction from these (comma-separated):
    /// `broker` (a broker branch) and/or `database` (the PostgreSQL branch's outbox table).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_values_t = [EventStaging::Broker, EventStaging::Database]
    )]
    pub stage_events: Vec<EventStaging>,
    /// The coordinator's one-phase optimisation: `alternate` switches it on and off every
    /// ten cycles (restarting the coordinator between two cycles), starting with on.
    #[arg(long, value_enum, default_value_t = OnePhaseMode::Alternate)]
    pub one_phase: OnePhaseMode,
    /// The `twopc` binary the campaign runs as its coordinator (`twopc serve`); default:
    /// the `twopc` next to this binary (both are built into the same target directory).
    #[arg(long, env = "TWOPC_BIN", value_name = "PATH")]
    pub twopc_bin: Option<PathBuf>,
    /// `--decision-retention-ms` of the coordinator: short, so that finished records are
    /// collected (and the coordinator killed while it collects) within the run.
    #[arg(long, default_value_t = 1_500)]
    pub decision_retention_ms: u64,
}

/// How the coordinator's one-phase optimisation is set during the campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnePhaseMode {
    /// On for ten cycles, off for ten, and so on.
    Alternate,
    /// Always on.
    On,
    /// Always off.
    Off,
}

impl OnePhaseMode {
    /// Whether one-phase is on during `cycle`.
    fn on_in(self, cycle: u32) -> bool {
        match self {
            OnePhaseMode::Alternate => (cycle / ONE_PHASE_BLOCK).is_multiple_of(2),
            OnePhaseMode::On => true,
            OnePhaseMode::Off => false,
        }
    }
}

/// What the client saw of one order.
#[derive(Clone, Debug)]
struct Op {
    order: Order,
    tx_id: Option<String>,
    result: OpResult,
    /// The cycle that placed it, and the cycle's fault.
    cycle: u32,
    fault: FaultKind,
    /// Where its event was staged.
    staging: EventStaging,
    /// Whether the coordinator's one-phase optimisation was on during its cycle.
    one_phase: bool,
}

impl Op {
    /// The message id its event must carry, once its transaction id is known.
    fn expected_message_id(&self) -> Option<String> {
        self.tx_id
            .as_ref()
            .map(|tx| format!("{tx}:{SERVICE}:{}:0", staging_resource(self.staging)))
    }

    /// The gid of its database branch (and of its one-phase marker).
    fn db_gid(&self) -> Option<String> {
        self.tx_id
            .as_ref()
            .map(|tx| format!("twopc:{tx}:{SERVICE}:{DB_RESOURCE}"))
    }

    /// How violations name it: order, transaction, staging, one-phase setting.
    fn label(&self) -> String {
        format!(
            "{} (tx {}, cycle {}, {} staging, one-phase {})",
            self.order.id,
            self.tx_id.as_deref().unwrap_or("-"),
            self.cycle,
            staging_name(self.staging),
            if self.one_phase { "on" } else { "off" }
        )
    }
}

/// The resource whose branch id the event's message id carries.
fn staging_resource(staging: EventStaging) -> &'static str {
    match staging {
        EventStaging::Broker => BROKER_RESOURCE,
        EventStaging::Database => DB_RESOURCE,
    }
}

fn staging_name(staging: EventStaging) -> &'static str {
    match staging {
        EventStaging::Broker => "broker",
        EventStaging::Database => "database",
    }
}

impl OpResult {
    fn name(&self) -> &'static str {
        match self {
            OpResult::Ok => "ok",
            OpResult::Aborted(_) => "aborted",
            OpResult::Unknown(_) => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum OpResult {
    Ok,
    Aborted(String),
    Unknown(String),
}

/// The in-process order service: SDK handle, resources (the database's outbox enabled for
/// the broker), staging store.
struct Participant {
    sdk: TwoPc,
    db: Arc<PgResource>,
    broker: Arc<RabbitResource>,
    staging: Arc<StagingStore>,
}

struct Env {
    coordinator_url: String,
    participant_addr: SocketAddr,
    participant_proxy: FaultProxy,
    broker_url: String,
    data_dir: PathBuf,
    pool: deadpool_postgres::Pool,
    queue: String,
    /// The orders database, for a real `twopc-lab order-service` process.
    db_url: String,
    /// This binary (it runs `order-service`).
    exe: PathBuf,
    /// Where the stderr of the real order-service processes goes.
    order_service_log: PathBuf,
}

/// Starts the order service: a new SDK handle on the fixed port and data directory, new
/// resources, the outbox enabled. `staging` reuses an open staging store (a restart while
/// the previous handle's in-flight orders still hold theirs); otherwise it is reopened.
async fn start_participant(
    env: &Env,
    staging: Option<Arc<StagingStore>>,
) -> anyhow::Result<Participant> {
    let sdk = TwoPc::builder(&env.coordinator_url)
        .service(SERVICE)
        .listen(env.participant_addr)
        .advertise(env.participant_proxy.url())
        .data_dir(&env.data_dir)
        .recovery_interval(Duration::from_millis(300))
        .commit_wait(Duration::from_millis(500))
        .start()
        .await?;
    let db = sdk.register(PgResource::new(DB_RESOURCE, env.pool.clone()).await?)?;
    let staging = match staging {
        Some(s) => s,
        None => {
            // A restarted participant reopens the store the previous handle just released.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match StagingStore::open(&env.data_dir) {
                    Ok(s) => break Arc::new(s),
                    Err(e) if Instant::now() > deadline => return Err(e.into()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    };
    let broker = sdk.register(Arc::new(RabbitResource::connect_lazy(
        BROKER_RESOURCE,
        &env.broker_url,
        staging.clone(),
    )?))?;
    // Database-staged events: short sweep settings, so that rows a fault left behind are
    // published within about a second; commits wait less for a full publish window than
    // the coordinator's 1 s RPC timeout.
    db.enable_outbox(
        broker.clone(),
        OutboxOptions {
            sweep_interval: Duration::from_millis(200),
            sweep_after: Duration::from_millis(500),
            publish_wait: Duration::from_millis(500),
            ..OutboxOptions::default()
        },
    )
    .await
    .context("enable the outbox")?;
    Ok(Participant {
        sdk,
        db,
        broker,
        staging,
    })
}

/// Places one order (row + event, the event staged as `staging` says) and records what
/// the client saw.
async fn place(
    p: &Participant,
    queue: &str,
    order: Order,
    staging: EventStaging,
    cycle: u32,
    fault: FaultKind,
    one_phase: bool,
) -> Op {
    let mut op = Op {
        order: order.clone(),
        tx_id: None,
        result: OpResult::Unknown(String::new()),
        cycle,
        fault,
        staging,
        one_phase,
    };
    let attempt = async {
        let tx = p.sdk.begin().await?;
        op.tx_id = Some(tx.id().to_string());
        let db = tx.postgres(&p.db).await?;
        if let Err(e) = db
            .execute(
                "INSERT INTO orders (id, customer, item, quantity) VALUES ($1, $2, $3, $4)",
                &[&order.id, &order.customer, &order.item, &order.quantity],
            )
            .await
        {
            let why = format!("insert refused: {e}");
            tx.abort(why.clone()).await?;
            return Ok::<_, Error>(OpResult::Aborted(why));
        }
        let event = OrderCreated {
            kind: "OrderCreated".into(),
            order: order.clone(),
        };
        let payload = serde_json::to_vec(&event).map_err(|e| Error::Usage(e.to_string()))?;
        match staging {
            EventStaging::Broker => tx.publish(&*p.broker, queue, payload).await?,
            EventStaging::Database => db.publish(&*p.broker, queue, payload).await?,
        };
        match tx.commit().await {
            Ok(_) => Ok(OpResult::Ok),
            Err(Error::Aborted(why)) => Ok(OpResult::Aborted(why)),
            Err(e) => Err(e),
        }
    };
    op.result = match tokio::time::timeout(Duration::from_secs(15), attempt).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => OpResult::Unknown(e.to_string()),
        Err(_) => OpResult::Unknown("no answer within 15 s".into()),
    };
    op
}

/// How a value of a `clap::ValueEnum` is spelled on the command line.
fn flag_value<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// A comma-separated list of such values.
fn flag_values<T: clap::ValueEnum>(values: &[T]) -> String {
    values.iter().map(flag_value).collect::<Vec<_>>().join(",")
}

/// Runs the campaign; prints the summary; errors if any invariant broke.
pub async fn run(args: CampaignArgs) -> anyhow::Result<()> {
    check_range("--cycles", args.cycles, 1..=1_000_000)?;
    check_range("--orders-per-cycle", args.orders_per_cycle, 1..=64)?;
    anyhow::ensure!(
        !args.stage_events.is_empty(),
        "--stage-events needs broker, database or both"
    );
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let faults: Vec<FaultKind> = if args.faults.is_empty() {
        ALL_FAULTS.to_vec()
    } else {
        args.faults.clone()
    };
    println!("seed {seed}");
    println!(
        "reproduce: cargo build --features failpoints,lab --bins && target/debug/twopc-lab campaign --seed {seed} --cycles {} --orders-per-cycle {} --faults {} --stage-events {} --one-phase {}{}",
        args.cycles,
        args.orders_per_cycle,
        flag_values(&faults),
        flag_values(&args.stage_events),
        flag_value(&args.one_phase),
        if args.broken { " --broken" } else { "" }
    );

    let tmp = tempfile::tempdir().context("temp dir")?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    // One line per transaction: cycle, fault, one-phase setting, order, tx id, staging,
    // result (what a failure's reproduction compares against).
    let tx_log_path = work.join("transactions.log");
    let mut tx_log = std::io::BufWriter::new(
        std::fs::File::create(&tx_log_path)
            .with_context(|| format!("create {}", tx_log_path.display()))?,
    );
    println!(
        "transactions log: {} (kept with --work-dir or after a violation)",
        tx_log_path.display()
    );
    let tag = format!(
        "{}_{}",
        std::process::id(),
        crate::demo::chrono_like_stamp()
    );

    let cluster = PgCluster::start()
        .await
        .context("start a private PostgreSQL cluster")?;
    let db_name = format!("campaign_{tag}");
    cluster.create_database(&db_name).await?;
    let db_url = cluster.url(&db_name);
    let pool = crate::demo::pool(&db_url, 16)?;
    {
        let c = pool.get().await?;
        c.batch_execute(ORDER_SCHEMA).await?;
        c.batch_execute(
            "INSERT INTO customers (id) VALUES ('alice'), ('bob') ON CONFLICT DO NOTHING",
        )
        .await?;
    }

    // RabbitMQ behind a proxy the campaign can cut.
    let amqp: lapin::uri::AMQPUri = args
        .amqp_url
        .parse()
        .map_err(|e| anyhow::anyhow!("--amqp-url: {e}"))?;
    let rabbit_addr: SocketAddr = format!("{}:{}", amqp.authority.host, amqp.authority.port)
        .parse()
        .or_else(|_| format!("127.0.0.1:{}", amqp.authority.port).parse())
        .context("--amqp-url host")?;
    let broker_proxy = FaultProxy::start(rabbit_addr).await?;
    let broker_url = format!(
        "amqp://{}:{}@{}/{}",
        amqp.authority.userinfo.username,
        amqp.authority.userinfo.password,
        broker_proxy.listen_addr(),
        urlencode_vhost(&amqp.vhost)
    );
    let queue = format!("twopc-campaign-{tag}");

    let exe = twopc_binary(args.twopc_bin.as_ref())?;
    let coordinator_addr: SocketAddr =
        format!("127.0.0.1:{}", twopc_testkit::free_port()).parse()?;
    let mut coordinator = CoordinatorProc {
        exe,
        addr: coordinator_addr,
        data_dir: work.join("coordinator"),
        log: work.join("coordinator.log"),
        broken: args.broken,
        one_phase: args.one_phase.on_in(0),
        retention_ms: args.decision_retention_ms,
        arm: None,
        child: None,
        start_took: Duration::ZERO,
    };
    coordinator.start()?;
    let participant_addr: SocketAddr =
        format!("127.0.0.1:{}", twopc_testkit::free_port()).parse()?;
    let participant_proxy = FaultProxy::start(participant_addr).await?;
    let env = Env {
        coordinator_url: format!("http://{coordinator_addr}"),
        participant_addr,
        participant_proxy,
        broker_url,
        data_dir: work.join("order-service"),
        pool: pool.clone(),
        queue: queue.clone(),
        db_url: db_url.clone(),
        exe: std::env::current_exe().context("locate the twopc-lab binary")?,
        order_service_log: work.join("order-service.log"),
    };
    let mut participant = start_participant(&env, None).await?;
    declare_queue(&args.amqp_url, &queue).await?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut ops: Vec<Op> = Vec::new();
    let mut fault_counts: BTreeMap<FaultKind, u64> = BTreeMap::new();
    let mut violations: Vec<String> = Vec::new();
    let mut order_seq = 0u64;
    let mut one_phase_cycles = 0u32;
    // When the coordinator was SIGKILLed, and the cycles in which it exited by itself.
    // One-phase markers of commits whose answer was lost when the participant restarted.
    let mut markers_at_restart = 0usize;
    // Kills of a process while it started that struck before it was ready.
    let (mut coordinator_start_kills, mut order_service_start_kills) = (0usize, 0usize);
    // Restarts armed to die in a collection, and those that died there.
    let (mut collection_kills_armed, mut collection_kills) = (0usize, 0usize);
    let mut order_service_start: Option<Duration> = None;
    let started = Instant::now();
    for cycle in 0..args.cycles {
        let fault = faults[rng.random_range(0..faults.len())];
        *fault_counts.entry(fault).or_default() += 1;
        let one_phase = coordinator.one_phase;
        if one_phase {
            one_phase_cycles += 1;
        }
        tracing::info!(cycle, ?fault, one_phase, "campaign cycle");
        let delay_ms: u64 = rng.random_range(0..40);
        let hold_ms: u64 = rng.random_range(100..900);
        // For the faults that kill a process while it starts: when, as fractions of the
        // time a full start takes (a little beyond it too).
        let start_kill_at: Vec<f64> = (0..rng.random_range(1..=START_KILLS_MAX))
            .map(|_| rng.random_range(0.0..1.2))
            .collect();
        let orders: Vec<(Order, EventStaging)> = (0..args.orders_per_cycle)
            .map(|_| {
                order_seq += 1;
                let order = Order {
                    id: format!("c{cycle}-o{order_seq}"),
                    // One in eight is refused at PREPARE (deferred FK): aborts happen without faults too.
                    customer: if rng.random_range(0..8) == 0 {
                        "mallory".into()
                    } else {
                        "alice".into()
                    },
                    item: format!("sku-{}", order_seq % 7),
                    quantity: (order_seq % 5) as i32 + 1,
                };
                let staging = args.stage_events[rng.random_range(0..args.stage_events.len())];
                (order, staging)
            })
            .collect();

        // Load and fault, concurrently.
        let load = futures::future::join_all(orders.into_iter().map(|(o, staging)| {
            place(
                &participant,
                &env.queue,
                o,
                staging,
                cycle,
                fault,
                one_phase,
            )
        }));
        let inject = async {
            let markers_before = if fault == FaultKind::RestartParticipantMidLoad {
                marker_gids(&env.pool).await.unwrap_or_default()
            } else {
                Vec::new()
            };
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            match fault {
                FaultKind::None => {}
                FaultKind::KillCoordinator => coordinator.kill9(),
                FaultKind::KillCoordinatorAtStart => {
                    coordinator.kill9();
                    coordinator_start_kills +=
                        coordinator.kill_while_starting(&start_kill_at).await?;
                }
                FaultKind::KillCoordinatorInCollection => {
                    collection_kills_armed += 1;
                    let within = Duration::from_millis(args.decision_retention_ms * 3 + 5_000);
                    if coordinator.kill_in_collection(within).await? {
                        collection_kills += 1;
                    }
                }
                FaultKind::PauseCoordinator => {
                    coordinator.signal(libc::SIGSTOP);
                    tokio::time::sleep(Duration::from_millis(hold_ms + 1000)).await;
                    coordinator.signal(libc::SIGCONT);
                }
                FaultKind::DropRequests => {
                    env.participant_proxy
                        .set(Direction::ClientToServer, Fault::Drop);
                    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                    env.participant_proxy.restore();
                }
                FaultKind::DropReplies => {
                    env.participant_proxy
                        .set(Direction::ServerToClient, Fault::Drop);
                    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                    env.participant_proxy.restore();
                }
                FaultKind::Delay => {
                    env.participant_proxy
                        .set_both(Fault::Delay(Duration::from_millis(hold_ms / 4)));
                    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                    env.participant_proxy.restore();
                }
                FaultKind::Reset => {
                    env.participant_proxy.set_both(Fault::Reset);
                    tokio::time::sleep(Duration::from_millis(hold_ms / 3)).await;
                    env.participant_proxy.restore();
                }
                FaultKind::KillPostgres => {
                    let _ = cluster.kill9();
                    tokio::time::sleep(Duration::from_millis(hold_ms / 3)).await;
                    let _ = cluster.start_again();
                }
                FaultKind::CutBroker => {
                    broker_proxy.cut();
                    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                    broker_proxy.restore();
                }
                FaultKind::RestartParticipant | FaultKind::KillOrderServiceAtStart => {}
                FaultKind::RestartParticipantMidLoad => {
                    // Phase-one / one-phase answers get lost; the participant restarts
                    // before the coordinator's retries get through. The orders in flight
                    // keep the old handle (and its staging store, which the new handle
                    // shares: both cannot hold it open).
                    env.participant_proxy
                        .set(Direction::ServerToClient, Fault::Drop);
                    tokio::time::sleep(Duration::from_millis(hold_ms / 3)).await;
                    // The process "dies": its connections go (a graceful shutdown would
                    // wait for the blackholed ones), then the new one takes the port.
                    env.participant_proxy.cut();
                    participant.sdk.shutdown().await;
                    // A dead process does nothing more; the old handle still lives (the
                    // orders in flight hold it), so let the work its server had started
                    // (a COMMIT in a detached task) end before the coordinator can reach
                    // the new one.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let restarted =
                        start_participant(&env, Some(participant.staging.clone())).await;
                    // One-phase commits of this cycle that happened but whose answer was
                    // lost: the coordinator must learn them from their marker.
                    markers_at_restart += marker_gids(&env.pool)
                        .await
                        .unwrap_or_default()
                        .iter()
                        .filter(|g| !markers_before.contains(g))
                        .count();
                    env.participant_proxy.restore();
                    return restarted.map(Some);
                }
            }
            Ok::<_, anyhow::Error>(None)
        };
        let (results, restarted) = tokio::join!(load, inject);
        for op in &results {
            writeln!(
                tx_log,
                "cycle={cycle} fault={fault:?} one_phase={} order={} tx={} staging={} result={}",
                if op.one_phase { "on" } else { "off" },
                op.order.id,
                op.tx_id.as_deref().unwrap_or("-"),
                staging_name(op.staging),
                op.result.name(),
            )?;
        }
        tx_log.flush()?;
        ops.extend(results);
        match restarted {
            Ok(Some(p)) => participant = p,
            Ok(None) => {}
            Err(e) => {
                violations.push(format!(
                    "cycle {cycle} ({fault:?}): the participant did not restart: {e:#}"
                ));
                break;
            }
        }
        if fault == FaultKind::RestartParticipant {
            participant.sdk.shutdown().await;
            drop(participant);
            participant = start_participant(&env, None).await?;
        }
        if fault == FaultKind::KillOrderServiceAtStart {
            participant.sdk.shutdown().await;
            drop(participant);
            let killed =
                kill_order_service_while_starting(&env, &mut order_service_start, &start_kill_at)
                    .await;
            match killed {
                Ok(n) => order_service_start_kills += n,
                Err(e) => violations.push(format!("cycle {cycle} ({fault:?}): {e:#}")),
            }
            participant = start_participant(&env, None).await?;
        }

        // Faults stop; recovery gets a bounded time.
        env.participant_proxy.restore();
        broker_proxy.restore();
        coordinator.signal(libc::SIGCONT);
        let killed_it = matches!(
            fault,
            FaultKind::KillCoordinator
                | FaultKind::KillCoordinatorAtStart
                | FaultKind::KillCoordinatorInCollection
        );
        if coordinator.ensure_running()? && !killed_it {
            eprintln!("campaign: cycle {cycle} ({fault:?}): the coordinator had exited by itself; restarted");
        }
        if !cluster.is_running() {
            cluster.start_again()?;
        }
        if let Err(e) = settle(&participant, &env, Duration::from_secs(30)).await {
            let e = e.to_string();
            let orders: Vec<String> = ops
                .iter()
                .filter(|op| {
                    op.tx_id
                        .as_ref()
                        .is_some_and(|tx| e.contains(&format!("tx {tx} ")))
                })
                .map(|op| format!("{} ({})", op.label(), op.result.name()))
                .collect();
            violations.push(format!(
                "cycle {cycle} ({fault:?}): not settled: {e}{}{}",
                if orders.is_empty() { "" } else { "; orders: " },
                orders.join(", ")
            ));
            break;
        }
        // The next cycle's one-phase setting: a coordinator restart while nothing is live.
        let next_one_phase = args.one_phase.on_in(cycle + 1);
        if cycle + 1 < args.cycles && next_one_phase != coordinator.one_phase {
            coordinator.stop();
            coordinator.one_phase = next_one_phase;
            coordinator.start()?;
            if let Err(e) = coordinator_answers(&participant, Duration::from_secs(20)).await {
                violations.push(format!(
                    "cycle {cycle}: the coordinator restarted with --one-phase {next_one_phase} does not answer: {e}"
                ));
                break;
            }
        }
        if (cycle + 1) % 10 == 0 {
            eprintln!(
                "campaign: {} / {} cycles, {:.0} s",
                cycle + 1,
                args.cycles,
                started.elapsed().as_secs_f64()
            );
        }
    }

    let check = check(&ops, &env, &participant, &args.amqp_url).await?;
    violations.extend(check.violations);
    participant.sdk.shutdown().await;

    let faults_injected: u64 = fault_counts
        .iter()
        .filter(|(k, _)| **k != FaultKind::None)
        .map(|(_, v)| v)
        .sum();
    let count = |f: fn(&OpResult) -> bool| ops.iter().filter(|o| f(&o.result)).count();
    let staged = |staging: EventStaging, one_phase: Option<bool>, ok: bool| {
        ops.iter()
            .filter(|o| o.staging == staging)
            .filter(|o| one_phase.is_none_or(|on| o.one_phase == on))
            .filter(|o| !ok || o.result == OpResult::Ok)
            .count()
    };
    let staging_counts = |staging: EventStaging| {
        serde_json::json!({
            "transactions": staged(staging, None, false),
            "ok": staged(staging, None, true),
            "one_phase_on": staged(staging, Some(true), false),
            "one_phase_on_ok": staged(staging, Some(true), true),
            "one_phase_off": staged(staging, Some(false), false),
            "one_phase_off_ok": staged(staging, Some(false), true),
        })
    };
    for v in violations.iter().take(50) {
        println!("VIOLATION: {v}");
    }
    let summary = serde_json::json!({
        "cycles": args.cycles,
        "faults": faults_injected,
        "transactions": ops.len(),
        "violations": violations.len(),
        "ok": count(|r| matches!(r, OpResult::Ok)),
        "aborted": count(|r| matches!(r, OpResult::Aborted(_))),
        "unknown": count(|r| matches!(r, OpResult::Unknown(_))),
        "duplicates_removed": check.duplicates,
        "staging": {
            "broker": staging_counts(EventStaging::Broker),
            "database": staging_counts(EventStaging::Database),
        },
        "one_phase_cycles": one_phase_cycles,
        "one_phase_markers_at_restart": markers_at_restart,
        "one_phase_markers_left": check.markers_left,
        "one_phase_markers_leaked": check.markers_leaked,
        "forgotten_at_check": check.forgotten,
        "kills_while_starting": {
            "coordinator": coordinator_start_kills,
            "order_service": order_service_start_kills,
        },
        "kills_in_collection": {
            "armed": collection_kills_armed,
            "landed": collection_kills,
        },
        "seed": seed,
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "fault_counts": fault_counts.iter().map(|(k, v)| (format!("{k:?}"), *v)).collect::<BTreeMap<_, _>>(),
    });
    println!("{summary}");
    drop(coordinator);
    if !violations.is_empty() {
        // Keep the evidence: coordinator.log, transactions.log, the staging store.
        let kept = if args.work_dir.is_some() {
            work.clone()
        } else {
            tmp.keep()
        };
        println!(
            "work directory kept (coordinator.log, transactions.log): {}",
            kept.display()
        );
        bail!(
            "{} violation(s); reproduce with --seed {seed}",
            violations.len()
        );
    }
    Ok(())
}

async fn declare_queue(amqp_url: &str, queue: &str) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| crate::demo::rabbit_hint(amqp_url))?;
    let ch = conn.create_channel().await?;
    twopc_testkit::amqp::declare_durable(&ch, queue).await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok(())
}

fn urlencode_vhost(vhost: &str) -> String {
    if vhost == "/" {
        "%2f".into()
    } else {
        vhost.replace('/', "%2f")
    }
}
