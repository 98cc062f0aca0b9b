//! The report lane of the local-commit core: local commits are reported to the
//! coordinator (`ReportLocalCommits`) in batches — everything queued while the previous
//! batch call ran goes in the next, up to [`REPORT_BATCH`] commits, one batch call in
//! flight — and a batch that fails is reported one commit at a time, each up to
//! [`REPORT_ATTEMPTS`] attempts with a backoff in between (a batch of one is already the
//! first of those attempts). A recorded commit goes to the
//! forget lane with the answer's epoch. Pure: it returns the calls to make, and the time
//! is passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::core::{CallId, Command, Ids};
use super::forget::{Unforgotten, BARRIER_RETRY_MAX, BARRIER_RETRY_MIN};

/// Attempts of the report of one local commit on its own (backoff
/// [`BARRIER_RETRY_MIN`]..[`BARRIER_RETRY_MAX`] in between). A report that never gets
/// through changes no outcome: at the transaction timeout the coordinator asks the
/// branch, which answers that it committed.
pub(crate) const REPORT_ATTEMPTS: u32 = 20;

/// Most local commits one report carries (the coordinator takes 1024).
pub(crate) const REPORT_BATCH: usize = 1024;

/// A local commit to report: `(tx_id, branch_id)`.
pub(crate) type LocalCommit = (String, String);

/// How a report call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReportAnswer {
    /// The coordinator recorded the commits; its epoch.
    Recorded(u64),
    /// The call failed; `retryable` when trying again may succeed (the coordinator was
    /// unreachable, slow or overloaded), not when it refused the report.
    Failed { retryable: bool, error: String },
}

/// A report call in flight.
struct Call {
    commits: Vec<LocalCommit>,
    /// `None` for a batch; the attempt of a report on its own.
    alone: Option<Attempt>,
}

/// One attempt at reporting a commit on its own.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    /// 1 to [`REPORT_ATTEMPTS`].
    number: u32,
    /// The wait before the next attempt if this one fails.
    retry: Duration,
}

impl Attempt {
    const FIRST: Attempt = Attempt {
        number: 1,
        retry: BARRIER_RETRY_MIN,
    };
}

/// The commit reports queued, in flight and waiting to be tried again.
#[derive(Default)]
pub(crate) struct ReportLane {
    /// Commits waiting for the next batch call.
    queued: VecDeque<LocalCommit>,
    /// The batch call in flight (at most one).
    batch: Option<CallId>,
    /// Every report call in flight, batch or alone.
    calls: HashMap<CallId, Call>,
    /// Reports on their own that failed and wait to be tried again: when, and which
    /// attempt comes next.
    retries: Vec<(Instant, LocalCommit, Attempt)>,
}

impl ReportLane {
    /// Queues the report of a local commit; starts a batch call unless one is in flight.
    pub(crate) fn committed<E>(
        &mut self,
        commit: LocalCommit,
        ids: &mut Ids,
        out: &mut Vec<Command<E>>,
    ) {
        self.queued.push_back(commit);
        if self.batch.is_none() {
            self.next_batch(ids, out);
        }
    }

    /// Takes up to [`REPORT_BATCH`] queued commits into the next call, the batch call in
    /// flight: what is queued while it runs goes in the one after. A lone commit is that
    /// call's only one, as the first attempt of a report on its own: if it fails, it is
    /// tried again by itself.
    fn next_batch<E>(&mut self, ids: &mut Ids, out: &mut Vec<Command<E>>) {
        let n = self.queued.len().min(REPORT_BATCH);
        if n == 0 {
            self.batch = None;
            return;
        }
        let commits: Vec<LocalCommit> = self.queued.drain(..n).collect();
        let alone = (n == 1).then_some(Attempt::FIRST);
        self.batch = Some(self.call(commits, alone, ids, out));
    }

    fn call<E>(
        &mut self,
        commits: Vec<LocalCommit>,
        alone: Option<Attempt>,
        ids: &mut Ids,
        out: &mut Vec<Command<E>>,
    ) -> CallId {
        let call = ids.call();
        out.push(Command::Report {
            call,
            tx_ids: commits.iter().map(|(t, _)| t.clone()).collect(),
        });
        self.calls.insert(call, Call { commits, alone });
        call
    }

    /// The answer of report `call`: the commits recorded (to be forgotten after a
    /// Barrier of the answer's epoch), returned; failures are reported alone or tried
    /// again.
    pub(crate) fn answered<E>(
        &mut self,
        call: CallId,
        answer: ReportAnswer,
        now: Instant,
        ids: &mut Ids,
        out: &mut Vec<Command<E>>,
    ) -> Vec<Unforgotten> {
        let Some(Call { commits, alone }) = self.calls.remove(&call) else {
            return Vec::new();
        };
        let mut recorded = Vec::new();
        match (alone, answer) {
            (_, ReportAnswer::Recorded(epoch)) => {
                recorded = commits
                    .into_iter()
                    .map(|(tx_id, branch_id)| Unforgotten {
                        tx_id,
                        branch_ids: vec![branch_id],
                        epoch,
                    })
                    .collect();
            }
            (None, ReportAnswer::Failed { error, .. }) => {
                debug!(%error, count = commits.len(),
                    "a batch of local commit reports failed; reporting them one by one");
                for commit in commits {
                    self.call(vec![commit], Some(Attempt::FIRST), ids, out);
                }
            }
            (
                Some(_),
                ReportAnswer::Failed {
                    retryable: false,
                    error,
                },
            ) => {
                for (tx_id, _) in commits {
                    warn!(%tx_id, %error,
                        "the coordinator refused the report of a local commit; the branch keeps its marker");
                }
            }
            (Some(a), ReportAnswer::Failed { error, .. }) if a.number < REPORT_ATTEMPTS => {
                for commit in commits {
                    debug!(tx_id = %commit.0, %error, retry_in = ?a.retry,
                        "report of a local commit failed");
                    let next = Attempt {
                        number: a.number + 1,
                        retry: (a.retry * 2).min(BARRIER_RETRY_MAX),
                    };
                    self.retries.push((now + a.retry, commit, next));
                }
            }
            (Some(_), ReportAnswer::Failed { error, .. }) => {
                for (tx_id, _) in commits {
                    warn!(%tx_id, %error,
                        "could not report a local commit; the coordinator learns it from the branch at the transaction timeout");
                }
            }
        }
        if self.batch == Some(call) {
            self.next_batch(ids, out);
        }
        recorded
    }

    /// When the lane wants to be woken ([`ReportLane::tick`]): its earliest retry.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.retries.iter().map(|(at, _, _)| *at).min()
    }

    /// Time passes: the reports whose retry is due are tried again.
    pub(crate) fn tick<E>(&mut self, now: Instant, ids: &mut Ids, out: &mut Vec<Command<E>>) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.retries = later;
        for (_, commit, attempt) in due {
            self.call(vec![commit], Some(attempt), ids, out);
        }
    }

    /// Reports queued, in flight or waiting to be tried again.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.queued.len()
            + self.calls.values().map(|c| c.commits.len()).sum::<usize>()
            + self.retries.len()
    }
}
