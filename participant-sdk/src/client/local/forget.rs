//! The forget lane of the local-commit core: committed branches are forgotten (their
//! one-phase markers dropped) only once a `Barrier` of the same coordinator epoch says
//! the outcome is durable. The queue is bounded ([`MAX_UNFORGOTTEN`]); one Barrier in
//! flight serves everything queued; a failed one is tried again after a backoff; at
//! shutdown one last Barrier (bounded by [`BARRIER_AT_SHUTDOWN`]) covers what is queued.
//! Pure: it returns the calls to make, and the time is passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::core::{BarrierAnswer, CallId, Command, Ids};

/// Most transactions waiting to be forgotten; beyond, the oldest are dropped (their
/// markers go after `OutboxOptions::marker_retention`).
pub(crate) const MAX_UNFORGOTTEN: usize = 100_000;

/// Bound on one `Barrier` call (the forgetter's, and the one shared by local
/// transactions waiting for their intents to be durable).
pub(crate) const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait before a failed `Barrier` is tried again; doubles up to
/// [`BARRIER_RETRY_MAX`]. The reports of local commits back off the same way.
pub(crate) const BARRIER_RETRY_MIN: Duration = Duration::from_millis(100);

/// Longest wait between two tries of a failed `Barrier` (or report).
pub(crate) const BARRIER_RETRY_MAX: Duration = Duration::from_secs(2);

/// Bound on the last `Barrier` at shutdown.
pub(crate) const BARRIER_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// A committed transaction whose branches of this process wait for a `Barrier`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unforgotten {
    /// The transaction.
    pub(crate) tx_id: String,
    /// Its branches of this process (`<service>:<resource>`).
    pub(crate) branch_ids: Vec<String>,
    /// The coordinator epoch of the Commit (or report) answer.
    pub(crate) epoch: u64,
}

/// The entries of `batch` that may be forgotten after a `Barrier` returned
/// `barrier_epoch`: those answered by the same coordinator epoch (their outcome records
/// were written before the Barrier arrived, so they are durable now). An entry of another
/// epoch was answered by a coordinator that has restarted since (its record may be lost):
/// it is not returned.
pub(crate) fn forgettable(batch: Vec<Unforgotten>, barrier_epoch: u64) -> Vec<Unforgotten> {
    batch
        .into_iter()
        .filter(|u| u.epoch == barrier_epoch)
        .collect()
}

/// Where the lane is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Forgetting as entries come.
    Running,
    /// The last Barrier at shutdown is in flight.
    Stopping,
    /// Done: later entries are dropped (their markers go after `marker_retention`, or
    /// are reported and dropped by the next process's recovery).
    Stopped,
}

/// The forget queue and its one Barrier in flight.
pub(crate) struct ForgetLane {
    /// Entries waiting for the next Barrier, oldest first, at most [`MAX_UNFORGOTTEN`].
    queue: VecDeque<Unforgotten>,
    /// The Barrier in flight and the entries it covers (those queued before it started).
    /// An answer to any other call (abandoned at shutdown) is ignored.
    in_flight: Option<(CallId, Vec<Unforgotten>)>,
    /// After a failed Barrier: when the next one may start.
    backoff_until: Option<Instant>,
    /// The wait after the next failure.
    retry: Duration,
    /// Running, or stopping/stopped at shutdown.
    phase: Phase,
}

impl Default for ForgetLane {
    fn default() -> Self {
        ForgetLane {
            queue: VecDeque::new(),
            in_flight: None,
            backoff_until: None,
            retry: BARRIER_RETRY_MIN,
            phase: Phase::Running,
        }
    }
}

impl ForgetLane {
    /// Queues `entry`, dropping the oldest beyond [`MAX_UNFORGOTTEN`], and starts a
    /// Barrier unless one runs or the lane backs off.
    pub(crate) fn push<E>(&mut self, entry: Unforgotten, ids: &mut Ids, out: &mut Vec<Command<E>>) {
        if self.phase != Phase::Running {
            debug!(tx_id = %entry.tx_id,
                "committed after shutdown: the branch keeps its marker until marker_retention");
            return;
        }
        self.queue.push_back(entry);
        let dropped = self.trim();
        if dropped > 0 {
            debug!(
                dropped,
                "forget queue full: the oldest committed transactions keep their markers"
            );
        }
        self.start(BARRIER_TIMEOUT, ids, out);
    }

    /// Drops the oldest entries beyond [`MAX_UNFORGOTTEN`]; how many.
    fn trim(&mut self) -> usize {
        let excess = self.queue.len().saturating_sub(MAX_UNFORGOTTEN);
        self.queue.drain(..excess).count()
    }

    /// Starts a Barrier (bounded by `within`) for everything queued, when none is in
    /// flight, the lane does not back off and something is queued.
    fn start<E>(&mut self, within: Duration, ids: &mut Ids, out: &mut Vec<Command<E>>) {
        if self.in_flight.is_some() || self.backoff_until.is_some() || self.queue.is_empty() {
            return;
        }
        let call = ids.call();
        self.in_flight = Some((call, self.queue.drain(..).collect()));
        out.push(Command::Barrier { call, within });
    }

    /// Whether `call` is this lane's Barrier in flight.
    pub(crate) fn owns(&self, call: CallId) -> bool {
        self.in_flight.as_ref().is_some_and(|(c, _)| *c == call)
    }

    /// The answer of this lane's Barrier `call` (see [`ForgetLane::owns`]): forgets the
    /// entries of its epoch, or puts the batch back and backs off. At shutdown the lane
    /// stops after this answer, whatever it is.
    pub(crate) fn answered<E>(
        &mut self,
        call: CallId,
        answer: BarrierAnswer,
        now: Instant,
        ids: &mut Ids,
        out: &mut Vec<Command<E>>,
    ) {
        let batch = match self.in_flight.take() {
            Some((c, batch)) if c == call => batch,
            other => {
                self.in_flight = other;
                return;
            }
        };
        if self.phase == Phase::Stopping {
            self.phase = Phase::Stopped;
            match answer {
                Ok(epoch) => forget(batch, epoch, out),
                Err(e) => warn!(error = %e, transactions = batch.len(),
                    "Barrier failed at shutdown: these one-phase commits keep their markers until marker_retention"),
            }
            return;
        }
        match answer {
            Ok(epoch) => {
                self.retry = BARRIER_RETRY_MIN;
                forget(batch, epoch, out);
            }
            Err(e) => {
                warn!(error = %e, transactions = batch.len(), retry_in = ?self.retry,
                    "Barrier failed: these one-phase commits keep their markers until it succeeds");
                for entry in batch.into_iter().rev() {
                    self.queue.push_front(entry);
                }
                self.trim();
                self.backoff_until = Some(now + self.retry);
                self.retry = (self.retry * 2).min(BARRIER_RETRY_MAX);
            }
        }
        self.start(BARRIER_TIMEOUT, ids, out);
    }

    /// When the lane wants to be woken ([`ForgetLane::tick`]): the end of its backoff.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.backoff_until
    }

    /// Time passes: a backoff that ended lets the next Barrier start.
    pub(crate) fn tick<E>(&mut self, now: Instant, ids: &mut Ids, out: &mut Vec<Command<E>>) {
        if self.backoff_until.is_some_and(|until| until <= now) {
            self.backoff_until = None;
            self.start(BARRIER_TIMEOUT, ids, out);
        }
    }

    /// Shutdown: a Barrier in flight is abandoned (its batch goes back in front), the
    /// backoff ends, and one last Barrier (bounded by [`BARRIER_AT_SHUTDOWN`]) covers
    /// everything queued; with nothing queued the lane stops at once.
    pub(crate) fn shutdown<E>(&mut self, ids: &mut Ids, out: &mut Vec<Command<E>>) {
        if self.phase != Phase::Running {
            return;
        }
        if let Some((_, batch)) = self.in_flight.take() {
            for entry in batch.into_iter().rev() {
                self.queue.push_front(entry);
            }
            self.trim();
        }
        self.backoff_until = None;
        if self.queue.is_empty() {
            self.phase = Phase::Stopped;
            return;
        }
        self.phase = Phase::Stopping;
        self.start(BARRIER_AT_SHUTDOWN, ids, out);
    }

    /// Whether the lane has stopped (after [`ForgetLane::shutdown`] and its last Barrier).
    pub(crate) fn stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Entries queued and in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len() + self.in_flight.as_ref().map_or(0, |(_, b)| b.len())
    }
}

/// Forgets the entries of `batch` that a `Barrier` answered with `epoch` covers.
fn forget<E>(batch: Vec<Unforgotten>, epoch: u64, out: &mut Vec<Command<E>>) {
    let total = batch.len();
    let forget = forgettable(batch, epoch);
    if forget.len() < total {
        debug!(
            barrier_epoch = epoch,
            dropped = total - forget.len(),
            "commits answered by another coordinator epoch keep their markers until marker_retention"
        );
    }
    if !forget.is_empty() {
        out.push(Command::Forget(forget));
    }
}
