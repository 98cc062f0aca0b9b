//! `twopc campaign`: a seeded, randomized fault campaign with a checker.
//!
//! Each cycle places a few orders (row + OrderCreated, through the SDK) while one random
//! fault strikes: the coordinator process killed with SIGKILL (during the load, or again
//! and again while it starts again) or paused with SIGSTOP, the coordinator↔participant
//! link blackholed, delayed or reset in either direction, PostgreSQL killed, the broker
//! cut off, the participant restarted (after the load, or during it while its replies are
//! lost), or a real `twopc order-service` process of the same service, on the same data
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

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

use crate::order_service::{
    EventStaging, Order, OrderCreated, BROKER_RESOURCE, DB_RESOURCE, ORDER_SCHEMA,
};

/// The service name of the in-process order service (prefixes its branch ids); the same
/// resources as `twopc order-service`, so a real process of it is the same participant.
const SERVICE: &str = "orders";
/// A fault that kills a process while it starts kills it this many times in a row at
/// most (at least once).
const START_KILLS_MAX: u32 = 4;
/// With `--one-phase alternate`, the coordinator's one-phase optimisation is on for this
/// many cycles, then off for as many, and so on.
const ONE_PHASE_BLOCK: u32 = 10;

/// Flags of `twopc campaign`.
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

/// The faults a cycle can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// No fault (a control cycle).
    None,
    /// SIGKILL the coordinator during the load; restart it afterwards.
    KillCoordinator,
    /// SIGKILL the coordinator during the load, then start it and SIGKILL it at a random
    /// moment of its start, one to four times (its decision log opening, recovering);
    /// restart it afterwards.
    KillCoordinatorAtStart,
    /// SIGSTOP the coordinator past its timeouts, then SIGCONT.
    PauseCoordinator,
    /// Blackhole coordinator → participant.
    DropRequests,
    /// Blackhole participant → coordinator (replies lost).
    DropReplies,
    /// Delay both directions.
    Delay,
    /// Reset the coordinator ↔ participant connections.
    Reset,
    /// SIGKILL PostgreSQL during the load; restart it afterwards.
    KillPostgres,
    /// Cut the participant off the broker.
    CutBroker,
    /// Restart the participant (new SDK handle, same port and data directory).
    RestartParticipant,
    /// Blackhole the participant's replies during the load and restart it while they are
    /// lost: the coordinator asks the restarted participant again (for a one-phase commit
    /// that happened, the `twopc_one_phase` marker must answer "committed").
    RestartParticipantMidLoad,
    /// After the load, stop the participant, start a real `twopc order-service` process
    /// of the same service (data directory, database, broker, port) and SIGKILL it at a
    /// random moment of its start (its staging store opening, its recovery), one to four
    /// times; then the participant starts again.
    KillOrderServiceAtStart,
}

const ALL_FAULTS: [FaultKind; 13] = [
    FaultKind::None,
    FaultKind::KillCoordinator,
    FaultKind::KillCoordinatorAtStart,
    FaultKind::PauseCoordinator,
    FaultKind::DropRequests,
    FaultKind::DropReplies,
    FaultKind::Delay,
    FaultKind::Reset,
    FaultKind::KillPostgres,
    FaultKind::CutBroker,
    FaultKind::RestartParticipant,
    FaultKind::RestartParticipantMidLoad,
    FaultKind::KillOrderServiceAtStart,
];

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

/// The coordinator as a child process on a fixed port and data directory.
struct CoordinatorProc {
    exe: PathBuf,
    addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    broken: bool,
    /// `--one-phase` of the next start.
    one_phase: bool,
    child: Option<Child>,
    /// How long the last full start took to listen (kills while it starts spread over it).
    start_took: Duration,
}

impl CoordinatorProc {
    /// Starts it and waits until it listens.
    fn start(&mut self) -> anyhow::Result<()> {
        let spawned = Instant::now();
        self.spawn()?;
        // Ready when the port answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not listen on {} within 20 s (see {})",
                    self.addr,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.start_took = spawned.elapsed();
        Ok(())
    }

    /// Starts it and SIGKILLs it after each of `at` (fractions of a full start's time),
    /// leaving it dead. Returns the kills that struck before it listened.
    async fn kill_while_starting(&mut self, at: &[f64]) -> anyhow::Result<usize> {
        let mut landed = 0;
        for fraction in at {
            self.kill9();
            self.spawn()?;
            tokio::time::sleep(self.start_took.mul_f64(*fraction)).await;
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(1)).is_err() {
                landed += 1;
            }
            self.kill9();
        }
        Ok(landed)
    }

    /// Starts the process (without waiting for it to listen).
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["serve", "--listen", &self.addr.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--prepare-timeout-ms",
                "1500",
                "--tx-timeout-ms",
                "5000",
                "--rpc-timeout-ms",
                "1000",
            ])
            .args([
                "--connect-timeout-ms",
                "500",
                "--retry-initial-ms",
                "20",
                "--retry-max-ms",
                "200",
            ])
            .args(["--commit-wait-ms", "1000"])
            .args(["--one-phase", if self.one_phase { "true" } else { "false" }])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.broken {
            cmd.env("TWOPC_UNSAFE_COMMIT_BEFORE_DURABLE", "1");
        }
        self.child = Some(cmd.spawn().context("spawn twopc serve")?);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with the pid of our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Restarts it if it is not running; returns whether it had exited (or was killed).
    fn ensure_running(&mut self) -> anyhow::Result<bool> {
        let alive = match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        };
        if !alive {
            self.kill9();
            self.start()?;
        }
        Ok(!alive)
    }

    /// A clean stop (SIGTERM: the decision log is flushed and synced, lazy records
    /// included); SIGKILL if it has not exited within 10 s.
    fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if let Some(c) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill9();
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
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
    /// The orders database, for a real `twopc order-service` process.
    db_url: String,
    /// This binary (it runs `order-service`).
    exe: PathBuf,
    /// Where the stderr of the real order-service processes goes.
    order_service_log: PathBuf,
}

/// Kills a real `twopc order-service` process of the campaign's participant (same service,
/// data directory, database, broker and port) while it starts, once after each of `at`
/// (fractions of a full start's time). The first call makes one full start (until it says
/// it is ready) to learn that time. The participant must be stopped. Returns the kills
/// that struck before the process was ready; fails if a process exits by itself (it
/// could not start: a store a kill bricked, say).
async fn kill_order_service_while_starting(
    env: &Env,
    start_took: &mut Option<Duration>,
    at: &[f64],
) -> anyhow::Result<usize> {
    // The participant just let go of its staging store; the process needs its lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match StagingStore::open(&env.data_dir) {
            Ok(store) => break drop(store),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let spawn = || -> anyhow::Result<(Child, std::sync::mpsc::Receiver<String>)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&env.order_service_log)?;
        let mut child = Command::new(&env.exe)
            .arg("order-service")
            .args(["--coordinator", &env.coordinator_url])
            .args(["--listen", &env.participant_addr.to_string()])
            .arg("--data-dir")
            .arg(&env.data_dir)
            .args(["--postgres-url", &env.db_url])
            .args(["--amqp-url", &env.broker_url])
            .args(["--queue", &env.queue, "--service", SERVICE])
            .args([
                "--stage-events",
                "database",
                "--recovery-interval-ms",
                "300",
            ])
            .args(["--outbox-sweep-interval-ms", "200"])
            .args(["--outbox-sweep-after-ms", "500"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn twopc order-service")?;
        let stdout = child.stdout.take().context("order-service stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok((child, lines))
    };
    let kill = |mut child: Child| -> anyhow::Result<()> {
        let exited = child.try_wait()?;
        let _ = child.kill();
        let _ = child.wait();
        match exited {
            Some(status) => bail!(
                "twopc order-service exited by itself while it started ({status}; see {})",
                env.order_service_log.display()
            ),
            None => Ok(()),
        }
    };
    let full_start = match *start_took {
        Some(took) => took,
        None => {
            let spawned = Instant::now();
            let (child, lines) = spawn()?;
            let ready = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while let Ok(line) =
                    lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    if line.starts_with("order-service ready") {
                        return true;
                    }
                }
                false
            })
            .await?;
            let took = spawned.elapsed();
            kill(child)?;
            if !ready {
                bail!(
                    "twopc order-service did not say it was ready within 20 s (see {})",
                    env.order_service_log.display()
                );
            }
            *start_took = Some(took);
            took
        }
    };
    let mut landed = 0;
    for fraction in at {
        let (child, lines) = spawn()?;
        tokio::time::sleep(full_start.mul_f64(*fraction)).await;
        if !lines
            .try_iter()
            .any(|l| l.starts_with("order-service ready"))
        {
            landed += 1;
        }
        kill(child)?;
    }
    Ok(landed)
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
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.cycles),
        "--cycles must be between 1 and 1000000"
    );
    anyhow::ensure!(
        (1..=64).contains(&args.orders_per_cycle),
        "--orders-per-cycle must be between 1 and 64"
    );
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
        "reproduce: cargo run --features failpoints -- campaign --seed {seed} --cycles {} --orders-per-cycle {} --faults {} --stage-events {} --one-phase {}{}",
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

    let exe = std::env::current_exe().context("locate the twopc binary")?;
    let coordinator_addr: SocketAddr =
        format!("127.0.0.1:{}", twopc_testkit::free_port()).parse()?;
    let mut coordinator = CoordinatorProc {
        exe,
        addr: coordinator_addr,
        data_dir: work.join("coordinator"),
        log: work.join("coordinator.log"),
        broken: args.broken,
        one_phase: args.one_phase.on_in(0),
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
        exe: std::env::current_exe().context("locate the twopc binary")?,
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
            FaultKind::KillCoordinator | FaultKind::KillCoordinatorAtStart
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
        "kills_while_starting": {
            "coordinator": coordinator_start_kills,
            "order_service": order_service_start_kills,
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

/// Waits until the coordinator answers on the participant's own channel (so the next
/// orders do not fail on a connection to the previous process).
async fn coordinator_answers(p: &Participant, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut coordinator = p.sdk.coordinator();
    loop {
        match coordinator
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("after {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until nothing is in doubt anywhere: no prepared gid, nothing staged, no event
/// waiting in the outbox table, the coordinator working on nothing.
async fn settle(p: &Participant, env: &Env, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut coordinator = twopc_proto::v1::coordinator_client::CoordinatorClient::new(
        tonic::transport::Endpoint::from_shared(env.coordinator_url.clone())?.connect_lazy(),
    );
    loop {
        p.sdk.recover_now().await;
        let prepared = p.db.prepared_count().await.unwrap_or(-1);
        let staged = p.staging.len();
        let open = p.db.open_branch_list(Duration::ZERO).len();
        let outbox = p.db.outbox_backlog().await.unwrap_or(-1);
        let live_txs = match coordinator
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
        {
            Ok(r) => Some(r.into_inner().transactions),
            Err(_) => None,
        };
        let live = live_txs.as_ref().map_or(-1, |t| t.len() as i64);
        if prepared == 0 && staged == 0 && live == 0 && open == 0 && outbox == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            // Name what the coordinator is stuck on: each live transaction's branches and
            // their last errors.
            let mut stuck = Vec::new();
            for t in live_txs.unwrap_or_default().iter().take(5) {
                let detail = match coordinator
                    .get_transaction(pb::GetTransactionRequest {
                        tx_id: t.tx_id.clone(),
                    })
                    .await
                {
                    Ok(r) => r
                        .into_inner()
                        .branches
                        .iter()
                        .map(|b| {
                            format!(
                                "{} {:?} after {} attempt(s): {}",
                                b.branch.as_ref().map_or("?", |b| b.branch_id.as_str()),
                                pb::BranchState::try_from(b.state).unwrap_or_default(),
                                b.attempts,
                                b.last_error
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(e) => e.message().to_string(),
                };
                stuck.push(format!(
                    "tx {} {:?}: {detail}",
                    t.tx_id,
                    pb::TxState::try_from(t.state).unwrap_or_default()
                ));
            }
            bail!(
                "after {within:?}: {prepared} prepared gid(s), {staged} staged batch(es), \
                 {open} open database branch(es), {live} live transaction(s), \
                 {outbox} event(s) in twopc_outbox{}{}",
                if stuck.is_empty() { "" } else { "; live: " },
                stuck.join(" | ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct CheckResult {
    violations: Vec<String>,
    duplicates: u64,
    /// One-phase markers left of transactions whose Commit call did not answer (allowed).
    markers_left: usize,
    /// One-phase markers of answered commits whose deletion failed while PostgreSQL was
    /// down and was not retried before the end (tolerated in kill-postgres cycles only).
    markers_leaked: usize,
}

/// How long the checker lets the outbox sweep publish what is left (every cycle already
/// waited for an empty outbox, so this normally returns at once).
const DRAIN: Duration = Duration::from_secs(15);

/// How long the checker lets the relay delete the markers of answered one-phase commits
/// (it does so right after each answer; every cycle settled since).
const MARKER_WAIT: Duration = Duration::from_secs(2);

/// The checker: PostgreSQL and the broker, read directly.
async fn check(
    ops: &[Op],
    env: &Env,
    p: &Participant,
    amqp_url: &str,
) -> anyhow::Result<CheckResult> {
    let mut violations = Vec::new();
    let c = env.pool.get().await?;
    // The outbox first: what is left in it is published by the sweep (every 200 ms, rows
    // older than 500 ms); only then is the queue complete.
    let deadline = Instant::now() + DRAIN;
    let outbox_left: Vec<(String, String)> = loop {
        let left: Vec<(String, String)> = c
            .query(
                "SELECT message_id, to_char(staged_at, 'HH24:MI:SS.MS') FROM twopc_outbox ORDER BY id",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !outbox_left.is_empty() {
        let some: Vec<String> = outbox_left
            .iter()
            .take(10)
            .map(|(id, at)| format!("{id} (staged {at})"))
            .collect();
        violations.push(format!(
            "{} event(s) still in twopc_outbox after a {DRAIN:?} drain (never published): {}",
            outbox_left.len(),
            some.join(", ")
        ));
    }
    // Rows.
    let rows: HashMap<String, Order> = c
        .query("SELECT id, customer, item, quantity FROM orders", &[])
        .await?
        .into_iter()
        .map(|r| {
            let o = Order {
                id: r.get(0),
                customer: r.get(1),
                item: r.get(2),
                quantity: r.get(3),
            };
            (o.id.clone(), o)
        })
        .collect();
    // Events, drained straight from the queue, deduplicated by message id.
    let (events, duplicates) = drain_queue(amqp_url, &env.queue).await?;
    let mut events_by_order: HashMap<String, (String, Order)> = HashMap::new();
    for (message_id, payload) in &events {
        match serde_json::from_slice::<OrderCreated>(payload) {
            Ok(e) => {
                if let Some((other, _)) =
                    events_by_order.insert(e.order.id.clone(), (message_id.clone(), e.order))
                {
                    violations.push(format!(
                        "two different messages for one order (messages {other} and {message_id})"
                    ));
                }
            }
            Err(e) => violations.push(format!("message {message_id} is not an OrderCreated: {e}")),
        }
    }
    let mut coordinator = twopc_proto::v1::coordinator_client::CoordinatorClient::new(
        tonic::transport::Endpoint::from_shared(env.coordinator_url.clone())?.connect_lazy(),
    );
    for op in ops {
        let label = op.label();
        let id = &label;
        let id_key = &op.order.id;
        let row = rows.get(id_key);
        let event = events_by_order.get(id_key);
        match (&op.result, row, event) {
            (OpResult::Ok, Some(r), Some((_, e))) => {
                if r != &op.order || e != &op.order {
                    violations.push(format!(
                        "{id}: row {r:?} / event {e:?} differ from the order"
                    ));
                }
            }
            (OpResult::Ok, _, _) => violations.push(format!(
                "{id}: OK reply but row={} event={}",
                row.is_some(),
                event.is_some()
            )),
            (OpResult::Aborted(why), None, None) => {
                let _ = why;
            }
            (OpResult::Aborted(why), _, _) => violations.push(format!(
                "{id}: ABORTED reply ({why}) but row={} event={}",
                row.is_some(),
                event.is_some()
            )),
            (OpResult::Unknown(_), Some(_), Some(_)) | (OpResult::Unknown(_), None, None) => {}
            (OpResult::Unknown(why), _, _) => violations.push(format!(
                "{id}: unknown reply ({why}) and half-committed: row={} event={}",
                row.is_some(),
                event.is_some()
            )),
        }
        // The event is this transaction's, staged where the order said.
        if let Some((message_id, _)) = event {
            match op.expected_message_id() {
                Some(expected) if *message_id != expected => violations.push(format!(
                    "{id}: event has message id {message_id}, expected {expected}"
                )),
                Some(_) => {}
                None => violations.push(format!(
                    "{id}: event {message_id} although the transaction never began"
                )),
            }
        }
        // The coordinator's decision matches the branches.
        if let Some(tx_id) = &op.tx_id {
            if let Ok(resp) = coordinator
                .get_transaction(pb::GetTransactionRequest {
                    tx_id: tx_id.clone(),
                })
                .await
            {
                let outcome = resp.into_inner().outcome;
                let committed = row.is_some() && event.is_some();
                if outcome == pb::Outcome::Committed as i32 && !committed {
                    violations.push(format!(
                        "{id}: coordinator says COMMITTED but row={} event={}",
                        row.is_some(),
                        event.is_some()
                    ));
                }
                // One-phase commits included: their intent and outcome are synced, so a
                // crash never makes the coordinator forget a committed one.
                if outcome == pb::Outcome::Aborted as i32 && (row.is_some() || event.is_some()) {
                    violations.push(format!(
                        "{id}: coordinator says ABORTED but row={} event={}",
                        row.is_some(),
                        event.is_some()
                    ));
                }
            }
        }
    }
    for id in rows.keys() {
        if !events_by_order.contains_key(id) {
            violations.push(format!("{id}: row without event"));
        }
    }
    for (id, (message_id, _)) in &events_by_order {
        if !rows.contains_key(id) {
            violations.push(format!("{id}: event {message_id} without row"));
        }
    }
    // One-phase markers. Written in the one-phase commit's own transaction, so each one
    // belongs to a committed database-staged order of a one-phase cycle; deleted (by the
    // relay) once the owner's Commit answered and a coordinator Barrier of the same epoch
    // made the outcome durable. Markers of orders whose Commit did not answer may stay
    // (until marker_retention).
    let by_gid: HashMap<String, &Op> = ops
        .iter()
        .filter_map(|op| op.db_gid().map(|g| (g, op)))
        .collect();
    let deadline = Instant::now() + MARKER_WAIT;
    let markers: Vec<String> = loop {
        let markers: Vec<String> = c
            .query(MARKERS_SQL, &[])
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let answered = markers.iter().any(|g| {
            by_gid
                .get(g)
                .is_some_and(|op| !matches!(op.result, OpResult::Unknown(_)))
        });
        if !answered || Instant::now() > deadline {
            break markers;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut markers_left = 0;
    let mut markers_leaked = 0;
    for gid in &markers {
        let Some(op) = by_gid.get(gid) else {
            violations.push(format!(
                "one-phase marker {gid} of no transaction of the campaign"
            ));
            continue;
        };
        let id = op.label();
        match &op.result {
            OpResult::Unknown(_) => markers_left += 1,
            // The relay deletes the marker of an answered one-phase commit right after the
            // answer and, when PostgreSQL is down then, again at every sweep; a participant
            // restarted before that forgets the retry (the marker then goes after
            // marker_retention, 24 h). Tolerated only for orders of a cycle that killed
            // PostgreSQL; counted.
            OpResult::Ok if op.fault == FaultKind::KillPostgres => {
                markers_leaked += 1;
                eprintln!(
                    "campaign: note: {id}: one-phase marker {gid} left although the Commit answered: \
                     PostgreSQL was killed when the relay deleted it, and no retry has run since"
                );
            }
            // Answered early, and the coordinator was killed before the SDK's Barrier (the
            // restarted one answers another epoch, so the outcome may not be durable), or
            // the participant process "died" with the commit waiting for its Barrier: the
            // marker must stay (until marker_retention). Counted.
            OpResult::Ok
                if matches!(
                    op.fault,
                    FaultKind::KillCoordinator
                        | FaultKind::KillCoordinatorAtStart
                        | FaultKind::RestartParticipantMidLoad
                ) =>
            {
                markers_leaked += 1;
                eprintln!(
                    "campaign: note: {id}: one-phase marker {gid} kept: {:?} before a Barrier made \
                     the early-answered outcome durable",
                    op.fault
                );
            }
            r => violations.push(format!(
                "{id}: its one-phase marker {gid} is left ({MARKER_WAIT:?} after the end) although the owner's Commit \
                 answered ({})",
                r.name()
            )),
        }
        if op.staging != EventStaging::Database || !op.one_phase {
            violations.push(format!(
                "{id}: one-phase marker {gid} of a transaction that could not commit in one phase"
            ));
        }
        if !rows.contains_key(&op.order.id) {
            violations.push(format!(
                "{id}: one-phase marker {gid} but no order row (the marker commits with the row)"
            ));
        }
    }
    let prepared = p.db.prepared_count().await?;
    if prepared != 0 {
        violations.push(format!("{prepared} prepared transaction(s) left"));
    }
    if !p.staging.is_empty() {
        violations.push(format!("{} staged batch(es) left", p.staging.len()));
    }
    Ok(CheckResult {
        violations,
        duplicates,
        markers_left,
        markers_leaked,
    })
}

/// The gids of the one-phase markers in `twopc_one_phase` (not the fences), in order.
const MARKERS_SQL: &str = "SELECT gid FROM twopc_one_phase WHERE NOT fenced ORDER BY gid";

/// The gids of the one-phase markers ([`MARKERS_SQL`]).
async fn marker_gids(pool: &deadpool_postgres::Pool) -> anyhow::Result<Vec<String>> {
    let c = pool.get().await?;
    Ok(c.query(MARKERS_SQL, &[])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

async fn declare_queue(amqp_url: &str, queue: &str) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| crate::demo::rabbit_hint(amqp_url))?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await?;
    let _ = conn.close(200, "ok".into()).await;
    Ok(())
}

/// Every message in the queue, deduplicated by message id; returns them and how many
/// duplicates were removed. Deletes the queue afterwards.
async fn drain_queue(
    amqp_url: &str,
    queue: &str,
) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, u64)> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut seen = BTreeMap::new();
    let mut duplicates = 0;
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await?
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if seen.insert(id, m.delivery.data.clone()).is_some() {
            duplicates += 1;
        }
    }
    let _ = ch
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
    Ok((seen, duplicates))
}

fn urlencode_vhost(vhost: &str) -> String {
    if vhost == "/" {
        "%2f".into()
    } else {
        vhost.replace('/', "%2f")
    }
}
