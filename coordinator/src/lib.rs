//! # twopc coordinator
//!
//! A two-phase-commit coordinator with presumed abort, for the dual-write problem.
//!
//! ## Layout
//! - [`types`]: transaction ids, branch specs and their validation (no I/O).
//! - [`engine`]: the protocol as a pure state machine: events in, commands out. No tokio,
//!   tonic or sled, so it is unit-tested command by command and model-checked.
//! - [`log`]: the decision log trait and its contract, the sled implementation (group
//!   commit, explicit `fdatasync`, directory lock, epochs), an in-memory one, and the
//!   conformance suite both pass.
//! - [`transport`]: how the coordinator reaches participants (trait + tonic client).
//! - [`runtime`]: executes the engine's commands with real I/O (log, transport, timers).
//! - [`service`]: the tonic `Coordinator` service; the one place errors become statuses.
//! - [`admin`]: the tonic `Admin` service: list and show unfinished transactions, and
//!   resolve stuck ones by hand (heuristic decisions, recorded in the decision log).
//! - [`config`]: the settings of `twopc serve`, each declared once ([`config::ServeConfig`]:
//!   flag, environment variable, file key, default, range), where their values come from
//!   (flags > env > TOML file > defaults), `--print-config`, and the engine's, runtime's
//!   and transport's options derived from them.
//! - [`server`]: `run(config, listener, shutdown)`, with health and reflection.
//! - [`signal`]: the SIGTERM / Ctrl-C a graceful stop waits for.
//! - [`metrics`]: Prometheus metrics the runtime records, and their `/metrics` endpoint.
//! - [`auth`]: bearer tokens of the Coordinator and Admin services, checked before any
//!   handler runs; [`tls`]: certificates of the gRPC port and towards participants.
//!   Both read their settings from [`config`]; [`server`] uses all three.
//!
//! The split keeps every decision in [`engine`] and every side effect in [`runtime`]: the
//! same engine runs under the real server, in unit tests and inside the model checker.

pub mod admin;
pub mod auth;
pub mod config;
pub mod engine;
pub mod exchange;
pub mod log;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod service;
pub mod signal;
pub mod tls;
pub mod transport;
pub mod types;
