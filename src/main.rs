//! `twopc`: the coordinator's command-line entry point.
//!
//! - `twopc serve`: runs the coordinator (gRPC on `--listen`, decision log in `--data-dir`,
//!   Prometheus metrics on `--metrics-listen` if given).
//! - `twopc tx list|show|resolve`: the operator's view of unfinished transactions and
//!   heuristic resolution of stuck ones, over the coordinator's Admin service.
//!
//! The demo, the order service, the benchmarks and the fault campaign are the lab's
//! (`lab/`, binary `twopc-lab`, built with `--features lab`): this binary links neither
//! the participant SDK nor a broker or database client.
//!
//! Built with the `failpoints` feature, the coordinator's fail points are configured from
//! the `FAILPOINTS` environment variable at start
//! (e.g. `FAILPOINTS="coordinator::before_log_decision=return(abort)"`).
//!
//! Every flag also reads an environment variable (shown by `--help`); `twopc serve` also
//! reads a TOML file (`--config`; precedence flag > env > file > default, see
//! `twopc_coordinator::config`) and `--print-config` prints the result. Logs go to stderr;
//! `RUST_LOG` (or `--log`) sets the filter. With `--otlp-endpoint`, `twopc serve` also
//! exports its tracing spans to an OpenTelemetry collector ([`otel`]); the stderr log is
//! unchanged by it.

mod admin_cli;
mod otel;

/// mimalloc instead of the system allocator: gRPC and protobuf allocate and free many
/// small buffers per message, and glibc's malloc showed at 5-10% of a loaded coordinator's
/// profile (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;
use twopc_coordinator::config::{self, Effective, ServeArgs};
use twopc_coordinator::log::DecisionLog;
use twopc_coordinator::server;

/// twopc: a two-phase-commit transaction coordinator for the dual-write problem.
#[derive(clap::Parser, Debug)]
#[command(name = "twopc", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info" or "twopc_coordinator=debug".
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
    /// Run the coordinator: a gRPC server with a durable decision log.
    ///
    /// Configuration precedence: flag > environment variable > `--config` TOML file >
    /// built-in default; `--print-config` shows the result and where each value came from.
    Serve(ServeArgs),
    /// Operators: list unfinished transactions, show one, resolve a stuck one by hand.
    Tx(admin_cli::TxArgs),
}

fn main() -> ExitCode {
    // The matches are kept: `serve` asks them where each value came from (flag, env or
    // default) to merge in its config file.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Fail points named in FAILPOINTS are armed for the life of the process.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // `serve` resolves its configuration (flags, env, file) before logging starts: whether
    // spans are exported depends on it.
    let serve_config = match &cli.command {
        Command::Serve(args) => match resolve_serve(args, &matches) {
            Ok(effective) => Some(effective),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    // The operator's commands print their own reports; library logs are noise unless asked for.
    let filter = match (&cli.command, std::env::var_os("RUST_LOG")) {
        (Command::Tx(_), None) if cli.log == "info" => "warn".to_string(),
        _ => cli.log.clone(),
    };
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
    // The OTLP exporter's connection lives on this runtime.
    let _runtime_context = rt.enter();
    let otlp = match &cli.command {
        Command::Serve(args) if !args.print_config => serve_config.as_ref().and_then(|e| {
            let c = &e.config;
            c.otlp_endpoint
                .as_deref()
                .map(|endpoint| (endpoint, c.otlp_service_name.as_str()))
        }),
        _ => None,
    };
    let (otel_layer, otel_guard) = match otlp {
        Some((endpoint, service_name)) => match otel::layer(endpoint, service_name) {
            Ok((layer, guard)) => (Some(layer), Some(guard)),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => (None, None),
    };
    // Two layers with filters of their own: the stderr log (`--log`) and, when enabled,
    // the span export (`otel::export_filter`).
    tracing_subscriber::registry()
        .with(otel_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(
                    tracing_subscriber::EnvFilter::try_new(&filter)
                        .unwrap_or_else(|_| "info".into()),
                ),
        )
        .init();
    if let Some(endpoint) = otlp.map(|(endpoint, _)| endpoint) {
        tracing::info!(endpoint, "exporting trace spans over OTLP");
    }
    let result = rt.block_on(dispatch(cli.command, serve_config));
    // After the server has stopped (SIGTERM included), before the runtime goes: the
    // spans still queued are exported now or never.
    if let Some(guard) = otel_guard {
        guard.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The effective configuration of `twopc serve` (flags, environment, `--config` file).
fn resolve_serve(args: &ServeArgs, matches: &ArgMatches) -> anyhow::Result<Effective> {
    let serve_matches = matches
        .subcommand_matches("serve")
        .context("internal error: no arguments of `serve`")?;
    Ok(config::resolve(args, serve_matches)?)
}

async fn dispatch(command: Command, serve_config: Option<Effective>) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let effective = serve_config.context("internal error: the configuration of `serve`")?;
            if args.print_config {
                print!("{}", effective.to_toml());
                return Ok(());
            }
            serve(effective.config).await
        }
        Command::Tx(args) => admin_cli::run(args).await,
    }
}

async fn serve(cfg: config::ServeConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    // Certificate, key and token files are checked before anything else, so a bad one
    // stops the start before the log is opened or the port is bound.
    server::Security::load(&cfg)?;
    // The log first: a second coordinator on the same directory fails here, before it
    // binds a port or says it is listening.
    let log = Arc::new(cfg.open_log()?);
    tracing::info!(
        log = %log.place(),
        epoch = log.epoch(),
        node = format_args!("{:08x}", log.node_id()),
        "decision log open"
    );
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    let metrics = server::bind_metrics(&cfg).await?;
    // One machine-readable line on stdout, so scripts and tests can use `--listen 127.0.0.1:0`.
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    println!("twopc listening on {addr}");
    // With --metrics-listen, a second line after it (same purpose).
    if let Some(m) = &metrics {
        let addr = m
            .local_addr()
            .context("cannot read the bound metrics address")?;
        println!("twopc metrics on {addr}");
    }
    server::run_with_listeners(
        cfg,
        log,
        listener,
        metrics,
        twopc_coordinator::signal::shutdown_signal(),
    )
    .await?;
    Ok(())
}
