//! The collector: deletes finished decision records in the background once they are older
//! than the retention (`--decision-retention-ms`), so the log's size and a restart's work
//! depend on what is recent or in doubt, not on how many transactions ever ran.
//!
//! A child module of [`crate::runtime`].
//!
//! # Which ids may be forgotten
//!
//! Collection raises the log's low-water mark over what it deletes, and an id under the
//! mark without a record answers FORGOTTEN. So an id may go under the mark only once it
//! has been finished for a whole retention: until then a participant asking about it must
//! hear its outcome, and an aborted transaction (which has no record; presumed abort
//! answers for it) would otherwise turn FORGOTTEN the moment a later id's record is
//! collected. The collector therefore samples the engine's lowest open id
//! ([`Engine::lowest_open`](crate::engine::Engine::lowest_open)) every tick
//! ([`Horizon`]); the newest sample at least one retention old is the horizon: every id
//! below it was finished already then. A pass deletes the finished records below the
//! horizon ([`DecisionLog::collect`]). A start samples afresh, so nothing is collected
//! during the first retention after a start.
//!
//! # Cost
//!
//! A pass runs on a blocking thread in batches of [`BATCH`] records (one unforced sled
//! write each, carried to disk by the next group-commit sync), yielding between batches,
//! so it never holds up a decision's sync for long. Every [`COUNT_EVERY`] (or less often,
//! when counting takes long: never more than a twentieth of a core) it counts what the log
//! keeps ([`DecisionLog::kept`]) for the gauges.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, warn};

use super::{lock, Inner};
use crate::log::DecisionLog;
use crate::transport::Transport;
use crate::types::TxId;

/// Records deleted per write.
pub const BATCH: usize = 1024;
/// How often the collector counts what the log keeps.
pub const COUNT_EVERY: Duration = Duration::from_secs(60);
/// Bounds of the tick: a sixteenth of the retention, within these.
const TICK_MIN: Duration = Duration::from_millis(50);
const TICK_MAX: Duration = Duration::from_secs(60);

/// The lowest open id, sampled over time: what may be forgotten now.
#[derive(Debug)]
pub struct Horizon {
    retention_ms: u64,
    /// (runtime clock in ms, lowest open id then), oldest first.
    samples: VecDeque<(u64, TxId)>,
}

impl Horizon {
    /// No samples yet: nothing may be forgotten.
    pub fn new(retention: Duration) -> Self {
        Horizon {
            retention_ms: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
            samples: VecDeque::new(),
        }
    }

    /// Records that `lowest_open` was the lowest open id at `now_ms`.
    pub fn sample(&mut self, now_ms: u64, lowest_open: TxId) {
        self.samples.push_back((now_ms, lowest_open));
    }

    /// The horizon at `now_ms`: the lowest open id of the newest sample taken at least a
    /// retention ago (every id below it has been finished for a retention), or `None` if
    /// no sample is that old. Drops the samples it will never need again.
    pub fn at(&mut self, now_ms: u64) -> Option<TxId> {
        let cutoff = now_ms.checked_sub(self.retention_ms)?;
        while self.samples.get(1).is_some_and(|(at, _)| *at <= cutoff) {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .filter(|(at, _)| *at <= cutoff)
            .map(|(_, tx)| *tx)
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// How often the collector wakes for `retention`.
pub fn tick(retention: Duration) -> Duration {
    (retention / 16).clamp(TICK_MIN, TICK_MAX)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The collector task: runs until the runtime is dropped.
pub(super) async fn run<L: DecisionLog, T: Transport>(
    inner: Weak<Inner<L, T>>,
    retention: Duration,
) {
    let mut horizon = Horizon::new(retention);
    let mut ticker = tokio::time::interval(tick(retention));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the next count is due: a minute after the last, or longer when counting took
    // long (a big log), so it never takes more than a twentieth of a core.
    let mut count_due = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.log.is_failed() {
            return; // the engine halts; nothing more is written
        }
        let now = inner.now_ms();
        horizon.sample(now, lock(&inner.engine).lowest_open());
        if let Some(below) = horizon.at(now) {
            collect_below(&inner, below).await;
        }
        if tokio::time::Instant::now() >= count_due {
            let started = tokio::time::Instant::now();
            count(&inner).await;
            count_due = started + COUNT_EVERY.max(started.elapsed() * 20);
        }
    }
}

/// One pass: every finished record below `below`, a batch at a time.
async fn collect_below<L: DecisionLog, T: Transport>(inner: &Arc<Inner<L, T>>, below: TxId) {
    loop {
        let log = inner.log.clone();
        let result = tokio::task::spawn_blocking(move || log.collect(&below, BATCH)).await;
        match result {
            Ok(Ok(done)) => {
                inner.metrics.collection.collected(done.records);
                if done.records > 0 {
                    debug!(records = done.records, %below, "collected finished decision records");
                    super::named_crash_point("coordinator::during_collection");
                }
                if !done.more {
                    return;
                }
                tokio::task::yield_now().await;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "collection of finished decision records failed");
                return;
            }
            Err(e) => {
                warn!(error = %e, "collection of finished decision records stopped");
                return;
            }
        }
    }
}

/// Counts what the log keeps, for the gauges.
async fn count<L: DecisionLog, T: Transport>(inner: &Arc<Inner<L, T>>) {
    let log = inner.log.clone();
    match tokio::task::spawn_blocking(move || log.kept()).await {
        Ok(Ok(kept)) => {
            let age = kept
                .oldest_decided_at_ms
                .map_or(0, |at| wall_ms().saturating_sub(at));
            inner.metrics.collection.kept(kept.records, age);
        }
        Ok(Err(e)) => warn!(error = %e, "counting the decision records kept failed"),
        Err(e) => warn!(error = %e, "counting the decision records kept stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> TxId {
        TxId {
            node: 1,
            epoch: 2,
            seq,
        }
    }

    /// The horizon is the sample a retention old, never a younger one, and the samples
    /// it will not need again go.
    #[test]
    fn the_horizon_is_the_lowest_open_id_one_retention_ago() {
        let mut h = Horizon::new(Duration::from_millis(100));
        assert_eq!(h.at(1_000), None, "no samples: nothing may be forgotten");
        h.sample(0, id(1));
        h.sample(40, id(5));
        h.sample(80, id(9));
        h.sample(120, id(12));
        let rows: [(u64, Option<TxId>, usize); 6] = [
            (99, None, 4),         // no sample is a retention old yet
            (100, Some(id(1)), 4), // exactly a retention
            (139, Some(id(1)), 4), // only the first is old enough
            (140, Some(id(5)), 3), // the first is no longer needed
            (185, Some(id(9)), 2), // the newest old enough
            (10_000, Some(id(12)), 1),
        ];
        for (now, want, held) in rows {
            assert_eq!(h.at(now), want, "horizon at {now}");
            assert_eq!(h.len(), held, "samples held at {now}");
        }
    }

    /// A retention of zero forgets what was finished at the last sample.
    #[test]
    fn a_zero_retention_uses_the_newest_sample() {
        let mut h = Horizon::new(Duration::ZERO);
        h.sample(5, id(3));
        h.sample(6, id(4));
        assert_eq!(h.at(6), Some(id(4)));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_tick_is_a_sixteenth_of_the_retention_within_bounds() {
        for (retention, want) in [
            (Duration::from_millis(10), TICK_MIN),
            (Duration::from_secs(16), Duration::from_secs(1)),
            (Duration::from_secs(300), Duration::from_millis(18_750)),
            (Duration::from_secs(86_400), TICK_MAX),
        ] {
            assert_eq!(tick(retention), want, "tick of {retention:?}");
        }
    }
}
