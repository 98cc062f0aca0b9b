//! # twopc participant SDK
//!
//! What a service embeds to make "save the row + publish the event" atomic.
//!
//! ## Layout
//! - [`client`]: [`TwoPc`] (connect, register resources, begin/join) and [`Transaction`]
//!   (enlist, commit, abort).
//! - [`resource`]: the [`Resource`] trait every adapter implements, and its contract.
//! - `server` (internal): the embedded participant gRPC server routing Prepare / Commit /
//!   Abort to resources by branch id.
//! - `recovery` (internal): asks the coordinator about every in-doubt branch, at start and
//!   periodically, and finishes it.
//! - `ahead` (internal): the pools of local transactions begun ahead, many per Begin, that
//!   [`TwoPc::begin_local`] takes its ids from under load.
//! - [`postgres`], [`rabbitmq`], [`nats`]: the adapters; [`broker`] and [`staging`]: what
//!   broker branches share; [`outbox`]: messages staged in a PostgreSQL branch instead.
//! - [`propagation`]: carries the transaction id across services in gRPC metadata.
//! - [`error`]: the SDK's error type.

mod ahead;
pub mod broker;
mod channel;
pub mod client;
pub mod dedup;
pub mod error;
pub mod nats;
pub mod outbox;
pub mod postgres;
pub mod propagation;
pub mod rabbitmq;
mod recovery;
pub mod resource;
mod server;
pub mod staging;

pub use ahead::{DEFAULT_BEGIN_AHEAD, MAX_BEGIN_AHEAD};
pub use broker::{Broker, BrokerCore, BrokerOptions, PublishOptions, PublishOutcome};
pub use channel::{BearerToken, CoordinatorChannel};
pub use client::{
    BranchCommit, Committed, Enlisted, Transaction, TwoPc, TwoPcBuilder, DEFAULT_CALL_TIMEOUT,
};
pub use error::{Error, Result};
pub use nats::NatsResource;
pub use outbox::OutboxOptions;
pub use postgres::{DeferredParams, PgBranch, PgResource, PreparedBranch};
pub use rabbitmq::RabbitResource;
pub use recovery::forgotten_answers;
pub use resource::{AbortOutcome, OnePhase, Resource, Retry, Vote};
pub use staging::{StagedMessage, StagingError, StagingOptions, StagingStore};

/// A crash point: with the crate feature `failpoints` (and `fail::FailScenario::setup()`
/// called by the binary), `<name>=return(abort)` aborts the process on the spot (SIGABRT:
/// no destructor, no flush, no reply, like a SIGKILL); any other action is ignored.
#[cfg(feature = "failpoints")]
pub(crate) fn crash_point(name: &str) {
    if let Some(Some(arg)) = fail::eval(name, |arg| arg) {
        if arg == "abort" {
            eprintln!("failpoint {name} hit: aborting the process");
            std::process::abort();
        }
    }
}

/// A crash point; nothing without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn crash_point(_name: &str) {}

/// Locks `m`, also when an earlier holder panicked: every critical section of this crate
/// leaves its data consistent at each step (maps updated in one go, sync state advanced
/// only after success), so a poisoned lock holds nothing half-written.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
