//! Local one-phase commits and the forgetter, as a pure core and one driver task.
//!
//! - [`core`]: the state machine, without I/O: the pools of ids begun ahead, the
//!   `Barrier` shared by local transactions waiting for their intents to be durable, and
//!   the lanes of [`report`] (reports of local commits, batched) and [`forget`] (the
//!   bounded forget queue). Events in, commands out, time passed in; tested exhaustively
//!   without any I/O (`tests.rs`).
//! - [`driver`]: the one task that owns the core, performs its commands over the narrow
//!   [`LocalCoordinator`] trait (implemented by the handle's gRPC client) and answers the
//!   handle's requests ([`LocalHandle`]) through oneshots.
//!
//! The split keeps every decision (what to batch, when to retry, which epoch counts, what
//! goes back at shutdown) in one place that a test can drive step by step, and every call
//! in one task that closes over nothing but the coordinator client and the resources.

pub(crate) mod core;
pub(crate) mod driver;
pub(crate) mod forget;
pub(crate) mod report;
#[cfg(test)]
mod tests;

pub(crate) use self::core::{BarrierAnswer, BeginLocalAnswer, Intent};
pub(crate) use driver::{start, Began, LocalCoordinator, LocalHandle};
pub(crate) use forget::Unforgotten;
pub(crate) use report::ReportAnswer;
