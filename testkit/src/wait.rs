//! Waiting for a condition in a test, bounded: [`eventually`] polls until the condition
//! holds and fails the test, naming what it waited for, once the limit has passed.

use std::future::Future;
use std::time::{Duration, Instant};

/// How [`eventually`] waits: for at most `limit`, checking every `every`.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    /// How long the condition may take to hold.
    pub limit: Duration,
    /// The pause between two checks.
    pub every: Duration,
}

impl From<Duration> for Wait {
    /// At most `limit`, checking every 20 ms.
    fn from(limit: Duration) -> Wait {
        Wait {
            limit,
            every: Duration::from_millis(20),
        }
    }
}

/// Polls `check` (every `wait.every`) until it returns true; panics naming `what` once
/// `wait.limit` has passed.
pub async fn eventually<F, Fut>(wait: impl Into<Wait>, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let wait = wait.into();
    let deadline = Instant::now() + wait.limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting until {what}",
            wait.limit
        );
        tokio::time::sleep(wait.every).await;
    }
}
