//! The forgetter: committed branches are forgotten (their one-phase markers dropped) only
//! once a `Barrier` of the same coordinator epoch says the outcome is durable. The queue
//! is bounded; one Barrier in flight serves everything queued (see the module docs of
//! [`crate::client`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{debug, warn};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use super::transaction::tell_outcome_known;
use crate::channel::CoordinatorChannel;
use crate::resource::Registry;

/// Most transactions waiting for the forgetter; beyond, the oldest are dropped (their
/// markers go after `OutboxOptions::marker_retention`).
pub(super) const MAX_UNFORGOTTEN: usize = 100_000;

/// Bound on one `Barrier` call of the forgetter.
pub(super) const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// A committed transaction whose branches of this process wait for a `Barrier`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Unforgotten {
    pub(super) tx_id: String,
    pub(super) branch_ids: Vec<String>,
    /// The coordinator epoch of the Commit answer.
    pub(super) epoch: u64,
}

/// What the forgetter has to do: a bounded queue and the signal that it is not empty.
#[derive(Default)]
pub(super) struct ForgetQueue {
    pub(super) queue: Mutex<VecDeque<Unforgotten>>,
    pub(super) ready: Notify,
}

impl ForgetQueue {
    /// Queues `entry`, dropping the oldest beyond [`MAX_UNFORGOTTEN`].
    pub(super) fn push(&self, entry: Unforgotten) {
        let dropped = {
            let mut q = crate::lock(&self.queue);
            q.push_back(entry);
            let excess = q.len().saturating_sub(MAX_UNFORGOTTEN);
            q.drain(..excess).count()
        };
        if dropped > 0 {
            debug!(
                dropped,
                "forgetter queue full: the oldest committed transactions keep their markers"
            );
        }
        self.ready.notify_one();
    }

    /// Everything queued so far.
    pub(super) fn take(&self) -> Vec<Unforgotten> {
        crate::lock(&self.queue).drain(..).collect()
    }

    /// Puts a batch whose `Barrier` failed back in front of what was queued since, within
    /// [`MAX_UNFORGOTTEN`] (the oldest are dropped beyond).
    pub(super) fn put_back(&self, batch: Vec<Unforgotten>) {
        let mut q = crate::lock(&self.queue);
        for entry in batch.into_iter().rev() {
            q.push_front(entry);
        }
        let excess = q.len().saturating_sub(MAX_UNFORGOTTEN);
        q.drain(..excess);
    }
}

/// The entries of `batch` that may be forgotten after a `Barrier` returned
/// `barrier_epoch`: those answered by the same coordinator epoch (their outcome records
/// were written before the Barrier arrived, so they are durable now). An entry of another
/// epoch was answered by a coordinator that has restarted since (its record may be lost):
/// it is not returned.
pub(super) fn forgettable(batch: Vec<Unforgotten>, barrier_epoch: u64) -> Vec<Unforgotten> {
    batch
        .into_iter()
        .filter(|u| u.epoch == barrier_epoch)
        .collect()
}

/// First wait before a failed `Barrier` is tried again; doubles up to [`BARRIER_RETRY_MAX`].
pub(super) const BARRIER_RETRY_MIN: Duration = Duration::from_millis(100);

pub(super) const BARRIER_RETRY_MAX: Duration = Duration::from_secs(2);

/// Bound on the last `Barrier` at shutdown.
pub(super) const BARRIER_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// One `Barrier` call bounded by `within`: the coordinator's epoch, or why not.
pub(super) async fn barrier(
    coordinator: &CoordinatorClient<CoordinatorChannel>,
    within: Duration,
) -> std::result::Result<u64, String> {
    match tokio::time::timeout(within, coordinator.clone().barrier(pb::BarrierRequest {})).await {
        Ok(Ok(resp)) => Ok(resp.into_inner().epoch),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Forgets the entries of `batch` that a `Barrier` answered with `epoch` covers.
pub(super) fn forget_batch(registry: &Registry, batch: Vec<Unforgotten>, epoch: u64) {
    let total = batch.len();
    let forget = forgettable(batch, epoch);
    if forget.len() < total {
        debug!(
            barrier_epoch = epoch,
            dropped = total - forget.len(),
            "commits answered by another coordinator epoch keep their markers until marker_retention"
        );
    }
    for u in &forget {
        tell_outcome_known(registry, &u.tx_id, &u.branch_ids);
    }
}

/// The forgetter: waits for queued entries, takes all of them, calls `Barrier` once
/// (bounded by [`BARRIER_TIMEOUT`]) and forgets the entries [`forgettable`] keeps; the
/// others are dropped. A failed `Barrier` puts the batch back and is tried again after a
/// backoff (a coordinator that restarted meanwhile answers another epoch, and the batch is
/// dropped then). When `stop` turns true, what is queued gets one last `Barrier` (bounded
/// by [`BARRIER_AT_SHUTDOWN`]), so a graceful shutdown leaves no marker behind.
pub(super) async fn run_forgetter(
    coordinator: CoordinatorClient<CoordinatorChannel>,
    registry: Registry,
    queue: Arc<ForgetQueue>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = BARRIER_RETRY_MIN;
    loop {
        let stopping = tokio::select! {
            _ = queue.ready.notified() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let batch = queue.take();
        if stopping {
            if !batch.is_empty() {
                match barrier(&coordinator, BARRIER_AT_SHUTDOWN).await {
                    Ok(epoch) => forget_batch(&registry, batch, epoch),
                    Err(e) => warn!(error = %e, transactions = batch.len(),
                        "Barrier failed at shutdown: these one-phase commits keep their markers until marker_retention"),
                }
            }
            return;
        }
        if batch.is_empty() {
            continue;
        }
        let answer = tokio::select! {
            a = barrier(&coordinator, BARRIER_TIMEOUT) => a,
            _ = stop.wait_for(|s| *s) => {
                queue.put_back(batch);
                continue;
            }
        };
        match answer {
            Ok(epoch) => {
                retry = BARRIER_RETRY_MIN;
                forget_batch(&registry, batch, epoch);
            }
            Err(e) => {
                warn!(error = %e, transactions = batch.len(), retry_in = ?retry,
                    "Barrier failed: these one-phase commits keep their markers until it succeeds");
                queue.put_back(batch);
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                retry = (retry * 2).min(BARRIER_RETRY_MAX);
                queue.ready.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tx_id: &str, epoch: u64) -> Unforgotten {
        Unforgotten {
            tx_id: tx_id.into(),
            branch_ids: vec!["svc:db".into()],
            epoch,
        }
    }

    #[test]
    fn only_commits_of_the_barriers_epoch_are_forgotten() {
        let batch = vec![entry("a", 3), entry("b", 2), entry("c", 3), entry("d", 4)];
        assert_eq!(
            forgettable(batch.clone(), 3),
            vec![entry("a", 3), entry("c", 3)]
        );
        // The coordinator restarted (a newer epoch) or the answer came from elsewhere:
        // nothing of another epoch is forgotten.
        assert_eq!(forgettable(batch.clone(), 5), Vec::new());
        assert_eq!(forgettable(batch, 0), Vec::new());
    }

    #[test]
    fn the_forget_queue_is_bounded_and_drops_the_oldest() {
        let q = ForgetQueue::default();
        for i in 0..MAX_UNFORGOTTEN + 3 {
            q.push(entry(&i.to_string(), 1));
        }
        let taken = q.take();
        assert_eq!(taken.len(), MAX_UNFORGOTTEN);
        assert_eq!(taken.first().map(|u| u.tx_id.as_str()), Some("3"));
        assert!(q.take().is_empty());
    }
}
