//! The twopc lab: everything that shows, measures and attacks the coordinator without
//! being part of it. Built as the `twopc-lab` binary (root package, `--features lab`), so
//! the production `twopc` binary links no participant SDK, broker client, PostgreSQL
//! client or test kit.
//!
//! # Layout
//! - [`demo`]: the seed scenario end to end: a coordinator, the order service (order row
//!   + `OrderCreated`, both or neither) and an inventory consumer, N orders.
//! - [`order_service`]: the order service, in-process for the demo and the benchmarks or
//!   as a process of its own (`twopc-lab order-service`) that the crash tests kill.
//! - [`bench`]: `bench coordinator`, the coordinator alone against the disk's ceiling;
//!   [`bench_dual`]: `bench dual-write`, naive dual write vs outbox vs twopc.
//! - [`campaign`]: the seeded randomized fault campaign with its invariant checker; it
//!   runs the real `twopc serve` (the binary next to this one, or `--twopc-bin`) and real
//!   order-service processes.
//!
//! Built with the `failpoints` feature, the fail points of the coordinator and of the
//! participant SDK are configured from the `FAILPOINTS` environment variable at start
//! (e.g. `FAILPOINTS="participant::before_commit=return(abort)"`).

pub mod bench;
pub mod bench_collection;
pub mod bench_dual;
pub mod campaign;
pub mod demo;
pub mod order_service;

use std::io::IsTerminal;
use std::ops::RangeInclusive;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// twopc-lab: the demo, the order service, the benchmarks and the fault campaign of twopc.
#[derive(Parser, Debug)]
#[command(name = "twopc-lab", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info" or "twopc_participant=debug".
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and moved into its command: the size of the largest variant costs
// nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// The seed scenario: coordinator + order service + inventory consumer, N orders.
    Demo(demo::DemoArgs),
    /// Seeded randomized fault campaign with an invariant checker.
    Campaign(campaign::CampaignArgs),
    /// Benchmarks (see docs/performance.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The order service as a process: places an order (row + OrderCreated, both or
    /// neither) and recovers what an earlier run left in doubt.
    OrderService(order_service::OrderServiceArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// The coordinator alone: real gRPC, real sled log and syncs, null participants.
    Coordinator(bench::CoordinatorBench),
    /// The order-service workload: naive dual write vs transactional outbox vs twopc.
    DualWrite(bench_dual::DualWriteBench),
    /// Collection of finished decision records: throughput with it on and off, the data
    /// directory after a long history, restart time and memory, recovery of many in doubt.
    Collection(bench_collection::CollectionBench),
}

/// The command-line option `option` must lie in `range`; the error names the option and
/// the range.
pub(crate) fn check_range<T>(option: &str, value: T, range: RangeInclusive<T>) -> anyhow::Result<()>
where
    T: PartialOrd + std::fmt::Display,
{
    anyhow::ensure!(
        range.contains(&value),
        "{option} must be between {} and {}",
        range.start(),
        range.end()
    );
    Ok(())
}

/// The `twopc-lab` binary: parses the command line, sets up logging and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Fail points named in FAILPOINTS are armed for the life of the process.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // The demo, benchmarks and campaign print their own reports; library logs are noise
    // unless asked for. The order service logs like a service.
    let filter = match (&cli.command, std::env::var_os("RUST_LOG")) {
        (Command::OrderService(_), _) | (_, Some(_)) => cli.log.clone(),
        _ if cli.log == "info" => "warn".to_string(),
        _ => cli.log.clone(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Campaign(args) => campaign::run(args).await,
            Command::Bench(BenchCommand::Coordinator(args)) => bench::run(args).await,
            Command::Bench(BenchCommand::DualWrite(args)) => bench_dual::run(args).await,
            Command::Bench(BenchCommand::Collection(args)) => bench_collection::run(args).await,
            Command::OrderService(args) => order_service::run_process(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
