//! `twopc campaign`: a seeded, randomized fault campaign with a checker.
//!
//! Each cycle places a few orders (row + OrderCreated, through the SDK) while one random
//! fault strikes: the coordinator process killed with SIGKILL or paused with SIGSTOP, the
//! coordinator↔participant link blackholed, delayed or reset in either direction,
//! PostgreSQL killed, the broker cut off, or the participant restarted. Every operation is
//! recorded as invoked → ok / aborted / unknown. Then faults stop, recovery gets a bounded
//! time, and the checker reads PostgreSQL and drains the broker directly to assert:
//!
//! - every OK order has its row and its event, and the event's payload equals the row;
//! - every ABORTED order has neither; an unknown one has both or neither;
//! - no event without a row, no row without an event (duplicates counted, removed by id);
//! - the coordinator's outcome for every transaction matches its branches;
//! - no prepared gid and no staged message is left.
//!
//! It prints the seed, a one-line reproduce command and a one-line JSON summary
//! `{"cycles":..,"faults":..,"transactions":..,"violations":..}`, and exits non-zero on any
//! violation. `--broken` runs the coordinator with a deliberately unsafe test-only switch
//! (commits sent before the decision is durable) to show the checker catches it.

use std::collections::{BTreeMap, HashMap};
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
use twopc_participant::{Error, TwoPc};
use twopc_proto::v1 as pb;
use twopc_testkit::proxy::{Direction, Fault, FaultProxy};
use twopc_testkit::PgCluster;

use crate::order_service::{Order, OrderCreated, ORDER_SCHEMA};

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
    /// Keep the work directory (coordinator log, staging store, logs) here.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The faults a cycle can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// No fault (a control cycle).
    None,
    /// SIGKILL the coordinator during the load; restart it afterwards.
    KillCoordinator,
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
}

const ALL_FAULTS: [FaultKind; 10] = [
    FaultKind::None,
    FaultKind::KillCoordinator,
    FaultKind::PauseCoordinator,
    FaultKind::DropRequests,
    FaultKind::DropReplies,
    FaultKind::Delay,
    FaultKind::Reset,
    FaultKind::KillPostgres,
    FaultKind::CutBroker,
    FaultKind::RestartParticipant,
];

/// What the client saw of one order.
#[derive(Clone, Debug)]
struct Op {
    order: Order,
    tx_id: Option<String>,
    result: OpResult,
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
    child: Option<Child>,
}

impl CoordinatorProc {
    fn start(&mut self) -> anyhow::Result<()> {
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
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.broken {
            cmd.env("TWOPC_UNSAFE_COMMIT_BEFORE_DURABLE", "1");
        }
        self.child = Some(cmd.spawn().context("spawn twopc serve")?);
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
            std::thread::sleep(Duration::from_millis(20));
        }
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

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        let alive = match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        };
        if !alive {
            self.kill9();
            self.start()?;
        }
        Ok(())
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

/// The in-process order service: SDK handle, resources, staging store.
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
}

async fn start_participant(env: &Env) -> anyhow::Result<Participant> {
    let sdk = TwoPc::builder(&env.coordinator_url)
        .service("orders")
        .listen(env.participant_addr)
        .advertise(env.participant_proxy.url())
        .data_dir(&env.data_dir)
        .recovery_interval(Duration::from_millis(300))
        .commit_wait(Duration::from_millis(500))
        .start()
        .await?;
    let db = sdk.register(PgResource::new("db", env.pool.clone()).await?)?;
    // A restarted participant reopens the store the previous handle just released.
    let deadline = Instant::now() + Duration::from_secs(5);
    let staging = loop {
        match StagingStore::open(&env.data_dir) {
            Ok(s) => break Arc::new(s),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let broker = sdk.register(Arc::new(RabbitResource::connect_lazy(
        "events",
        &env.broker_url,
        staging.clone(),
    )?))?;
    Ok(Participant {
        sdk,
        db,
        broker,
        staging,
    })
}

/// Places one order (row + event) and records what the client saw.
async fn place(p: &Participant, queue: &str, order: Order) -> Op {
    let mut op = Op {
        order: order.clone(),
        tx_id: None,
        result: OpResult::Unknown(String::new()),
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
        tx.publish(&*p.broker, queue, payload).await?;
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
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let faults: Vec<FaultKind> = if args.faults.is_empty() {
        ALL_FAULTS.to_vec()
    } else {
        args.faults.clone()
    };
    let fault_list: Vec<String> = faults
        .iter()
        .map(|f| {
            clap::ValueEnum::to_possible_value(f)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        })
        .collect();
    println!("seed {seed}");
    println!(
        "reproduce: cargo run --features failpoints -- campaign --seed {seed} --cycles {} --orders-per-cycle {} --faults {}{}",
        args.cycles,
        args.orders_per_cycle,
        fault_list.join(","),
        if args.broken { " --broken" } else { "" }
    );

    let tmp = tempfile::tempdir().context("temp dir")?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
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
        child: None,
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
    };
    let mut participant = start_participant(&env).await?;
    declare_queue(&args.amqp_url, &queue).await?;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut ops: Vec<Op> = Vec::new();
    let mut fault_counts: BTreeMap<FaultKind, u64> = BTreeMap::new();
    let mut violations: Vec<String> = Vec::new();
    let mut order_seq = 0u64;
    let started = Instant::now();
    for cycle in 0..args.cycles {
        let fault = faults[rng.random_range(0..faults.len())];
        *fault_counts.entry(fault).or_default() += 1;
        tracing::info!(cycle, ?fault, "campaign cycle");
        let delay_ms: u64 = rng.random_range(0..40);
        let hold_ms: u64 = rng.random_range(100..900);
        let orders: Vec<Order> = (0..args.orders_per_cycle)
            .map(|_| {
                order_seq += 1;
                Order {
                    id: format!("c{cycle}-o{order_seq}"),
                    // One in eight is refused at PREPARE (deferred FK): aborts happen without faults too.
                    customer: if rng.random_range(0..8) == 0 {
                        "mallory".into()
                    } else {
                        "alice".into()
                    },
                    item: format!("sku-{}", order_seq % 7),
                    quantity: (order_seq % 5) as i32 + 1,
                }
            })
            .collect();

        // Load and fault, concurrently.
        let load = futures::future::join_all(
            orders
                .into_iter()
                .map(|o| place(&participant, &env.queue, o)),
        );
        let inject = async {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            match fault {
                FaultKind::None => {}
                FaultKind::KillCoordinator => coordinator.kill9(),
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
                FaultKind::RestartParticipant => {}
            }
        };
        let (results, ()) = tokio::join!(load, inject);
        ops.extend(results);
        if fault == FaultKind::RestartParticipant {
            participant.sdk.shutdown().await;
            drop(participant);
            participant = start_participant(&env).await?;
        }

        // Faults stop; recovery gets a bounded time.
        env.participant_proxy.restore();
        broker_proxy.restore();
        coordinator.signal(libc::SIGCONT);
        coordinator.ensure_running()?;
        if !cluster.is_running() {
            cluster.start_again()?;
        }
        if let Err(e) = settle(&participant, &env, Duration::from_secs(30)).await {
            violations.push(format!("cycle {cycle} ({fault:?}): not settled: {e}"));
            break;
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
        "seed": seed,
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "fault_counts": fault_counts.iter().map(|(k, v)| (format!("{k:?}"), *v)).collect::<BTreeMap<_, _>>(),
    });
    println!("{summary}");
    drop(coordinator);
    if !violations.is_empty() {
        bail!(
            "{} violation(s); reproduce with --seed {seed}",
            violations.len()
        );
    }
    Ok(())
}

/// Waits until nothing is in doubt anywhere: no prepared gid, nothing staged, the
/// coordinator working on nothing.
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
        let live = match coordinator
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
        {
            Ok(r) => r.into_inner().transactions.len() as i64,
            Err(_) => -1,
        };
        if prepared == 0 && staged == 0 && live == 0 && open == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {within:?}: {prepared} prepared gid(s), {staged} staged batch(es), \
                 {open} open database branch(es), {live} live transaction(s)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct CheckResult {
    violations: Vec<String>,
    duplicates: u64,
}

/// The checker: PostgreSQL and the broker, read directly.
async fn check(
    ops: &[Op],
    env: &Env,
    p: &Participant,
    amqp_url: &str,
) -> anyhow::Result<CheckResult> {
    let mut violations = Vec::new();
    // Rows.
    let c = env.pool.get().await?;
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
    let mut events_by_order: HashMap<String, Order> = HashMap::new();
    for (message_id, payload) in &events {
        match serde_json::from_slice::<OrderCreated>(payload) {
            Ok(e) => {
                if events_by_order
                    .insert(e.order.id.clone(), e.order)
                    .is_some()
                {
                    violations.push(format!(
                        "two different messages for one order (message {message_id})"
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
        let label = format!(
            "{} (tx {})",
            op.order.id,
            op.tx_id.as_deref().unwrap_or("-")
        );
        let id = &label;
        let id_key = &op.order.id;
        let row = rows.get(id_key);
        let event = events_by_order.get(id_key);
        match (&op.result, row, event) {
            (OpResult::Ok, Some(r), Some(e)) => {
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
    for id in events_by_order.keys() {
        if !rows.contains_key(id) {
            violations.push(format!("{id}: event without row"));
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
    })
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
