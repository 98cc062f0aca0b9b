//! Local one-phase commits: the ids begun ahead and given back unused, the one `Barrier`
//! in flight shared by every local transaction waiting for its intent to be durable, and
//! the reporter that tells the coordinator about local commits in batches (one commit at
//! a time when a batch fails).

use crate::error::Result;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, warn};
use twopc_proto::v1 as pb;

use super::calls::retryable;
use super::forget::{barrier, Unforgotten, BARRIER_RETRY_MAX, BARRIER_RETRY_MIN, BARRIER_TIMEOUT};
use super::Inner;
use crate::ahead::{self, Ahead};

/// What a BeginLocal gave.
pub(super) enum Begun {
    /// Local transactions (the first and the rest of as many as the coordinator began),
    /// each usable once the Barrier asked after the answer reports its epoch.
    Local(Ahead, Vec<Ahead>),
    /// None: the coordinator runs with one-phase commits off (it answered
    /// FAILED_PRECONDITION), so its transactions commit through Commit.
    Off,
}

/// Begins `count` local transactions of `branch` in one call (BeginLocal), and asks for
/// the Barrier that shows their intents durable.
pub(super) async fn begin_ahead(
    inner: &Arc<Inner>,
    branch: pb::Branch,
    count: u32,
) -> Result<Begun> {
    let resp = match inner
        .begin_local(pb::BeginLocalRequest {
            branch: Some(branch),
            timeout_ms: 0,
            count,
        })
        .await
    {
        Ok(resp) => resp,
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            debug!(
                error = s.message(),
                "the coordinator does not begin local transactions"
            );
            return Ok(Begun::Off);
        }
        Err(s) => return Err(s.into()),
    };
    let mut ids = resp.tx_ids.into_iter();
    let Some(first) = ids.next() else {
        return Err(tonic::Status::internal("BeginLocal answered without a transaction id").into());
    };
    // The intents were written before the answer; a Barrier called from now on returns
    // once they are durable. It runs while the application does its work.
    let durable = barrier_after_now(inner).shared();
    let begun = Instant::now();
    let max_age = ahead::max_age(resp.timeout_ms);
    let ahead = |tx_id| Ahead {
        tx_id,
        epoch: resp.epoch,
        durable: durable.clone(),
        begun,
        max_age,
    };
    let first = ahead(first);
    Ok(Begun::Local(first, ids.map(ahead).collect()))
}

/// Refills the pool of resource `name` with `count` local transactions of `branch`, in
/// the background.
pub(super) fn refill(inner: &Arc<Inner>, branch: pb::Branch, name: &str, count: u32) {
    let (inner, name) = (inner.clone(), name.to_string());
    tokio::spawn(async move {
        let _refill = inner.ahead.refill(&name);
        match begin_ahead(&inner, branch, count).await {
            Ok(Begun::Local(first, mut rest)) => {
                rest.insert(0, first);
                inner.ahead.put(&name, rest);
            }
            Ok(Begun::Off) => inner.ahead.turn_off(&name),
            Err(e) => debug!(error = %e, "could not begin local transactions ahead"),
        }
    });
}

/// Gives local transactions begun ahead back unused (ReleaseUnused), in the background.
pub(super) fn release_unused(inner: &Arc<Inner>, ids: Vec<Ahead>) {
    if ids.is_empty() {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move { release_now(&inner, ids).await });
}

/// Gives local transactions begun ahead back unused, and waits for the answers.
pub(super) async fn release_now(inner: &Inner, ids: Vec<Ahead>) {
    let calls = ids.into_iter().map(|a| async move {
        let req = pb::ReleaseUnusedRequest {
            tx_id: a.tx_id.clone(),
        };
        if let Err(s) = inner.release_unused(req).await {
            debug!(tx_id = %a.tx_id, error = %s,
                "could not give back an unused transaction id; the coordinator settles it at its timeout");
        }
    });
    futures::future::join_all(calls).await;
}

/// Callers waiting for a `Barrier` that starts after they asked, and whether one is
/// running. One call serves everyone who asked before it started.
#[derive(Default)]
pub(super) struct SharedBarrier {
    pub(super) running: bool,
    pub(super) waiting: Vec<oneshot::Sender<std::result::Result<u64, String>>>,
}

/// The answer of a `Barrier` call that starts after this call (its epoch, or why it
/// failed). Calls are shared: one runs at a time, for everyone who asked before it.
pub(super) fn barrier_after_now(
    inner: &Arc<Inner>,
) -> oneshot::Receiver<std::result::Result<u64, String>> {
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut b = crate::lock(&inner.barriers);
        b.waiting.push(tx);
        !std::mem::replace(&mut b.running, true)
    };
    if start {
        let inner = inner.clone();
        tokio::spawn(async move {
            loop {
                let batch = {
                    let mut b = crate::lock(&inner.barriers);
                    if b.waiting.is_empty() {
                        b.running = false;
                        return;
                    }
                    std::mem::take(&mut b.waiting)
                };
                let answer = barrier(&inner.coordinator, BARRIER_TIMEOUT).await;
                for w in batch {
                    let _ = w.send(answer.clone());
                }
            }
        });
    }
    rx
}

/// Attempts of the background report of a local commit (backoff
/// [`BARRIER_RETRY_MIN`]..[`BARRIER_RETRY_MAX`] in between). A report that never gets
/// through changes no outcome: at the transaction timeout the coordinator asks the
/// branch, which answers that it committed.
pub(super) const REPORT_ATTEMPTS: u32 = 20;

/// Most local commits one report carries (the coordinator takes 1024).
pub(super) const REPORT_BATCH: usize = 1024;

/// Local commits waiting to be reported, and whether a reporter runs.
#[derive(Default)]
pub(super) struct Reports {
    pub(super) running: bool,
    /// `(tx_id, branch_id)`.
    pub(super) queued: Vec<(String, String)>,
}

/// Reports the local commit of `tx_id` to the coordinator in the background: queued for
/// the reporter, which sends everything queued in one call (ReportLocalCommits, answered
/// early) and queues the branches for the forgetter with the answer's epoch. A batch
/// that fails is reported one by one ([`report_alone`]).
pub(super) fn report_local_commit(inner: Arc<Inner>, tx_id: String, branch_id: String) {
    let start = {
        let mut r = crate::lock(&inner.reports);
        r.queued.push((tx_id, branch_id));
        !std::mem::replace(&mut r.running, true)
    };
    if !start {
        return;
    }
    tokio::spawn(async move {
        loop {
            let batch = {
                let mut r = crate::lock(&inner.reports);
                if r.queued.is_empty() {
                    r.running = false;
                    return;
                }
                let n = r.queued.len().min(REPORT_BATCH);
                r.queued.drain(..n).collect::<Vec<_>>()
            };
            crate::crash_point("participant::after_local_commit_before_report");
            if batch.len() == 1 {
                for (tx_id, branch_id) in batch {
                    tokio::spawn(report_alone(inner.clone(), tx_id, branch_id));
                }
                continue;
            }
            let req = pb::ReportLocalCommitsRequest {
                tx_ids: batch.iter().map(|(t, _)| t.clone()).collect(),
                answer_before_durable: true,
            };
            let rest = match inner.report_local_commits(req).await {
                Ok(resp) => {
                    recorded_locally(&inner, batch, resp.epoch);
                    Vec::new()
                }
                Err(s) => {
                    debug!(error = %s, count = batch.len(),
                        "a batch of local commit reports failed; reporting them one by one");
                    batch
                }
            };
            for (tx_id, branch_id) in rest {
                tokio::spawn(report_alone(inner.clone(), tx_id, branch_id));
            }
        }
    });
}

/// Reports the local commit of `tx_id` alone (ReportLocalCommits, answered early, up to
/// [`REPORT_ATTEMPTS`] attempts), then queues the branch for the forgetter with the
/// answer's epoch.
pub(super) async fn report_alone(inner: Arc<Inner>, tx_id: String, branch_id: String) {
    let req = pb::ReportLocalCommitsRequest {
        tx_ids: vec![tx_id.clone()],
        answer_before_durable: true,
    };
    let mut retry = BARRIER_RETRY_MIN;
    for attempt in 1..=REPORT_ATTEMPTS {
        match inner.report_local_commits(req.clone()).await {
            Ok(resp) => {
                recorded_locally(&inner, vec![(tx_id, branch_id)], resp.epoch);
                return;
            }
            Err(s) if !retryable(&s) => {
                warn!(tx_id = %tx_id, code = ?s.code(), error = s.message(),
                    "the coordinator refused the report of a local commit; the branch keeps its marker");
                return;
            }
            Err(s) if attempt < REPORT_ATTEMPTS => {
                debug!(tx_id = %tx_id, error = %s, retry_in = ?retry, "report of a local commit failed");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(BARRIER_RETRY_MAX);
            }
            Err(s) => warn!(tx_id = %tx_id, error = %s,
                "could not report a local commit; the coordinator learns it from the branch at the transaction timeout"),
        }
    }
}

/// Local commits the coordinator recorded, answered with `epoch`: their branches are
/// queued for the forgetter.
pub(super) fn recorded_locally(inner: &Inner, commits: Vec<(String, String)>, epoch: u64) {
    for (tx_id, branch_id) in commits {
        inner.forget.push(Unforgotten {
            tx_id,
            branch_ids: vec![branch_id],
            epoch,
        });
    }
}

/// Tells the coordinator in the background that the local commit of `tx_id` was refused
/// (the branch rolled back), so it finishes the transaction now rather than at its
/// timeout.
pub(super) fn report_local_abort(inner: Arc<Inner>, tx_id: String, reason: String) {
    tokio::spawn(async move {
        let req = pb::AbortRequest {
            tx_id: tx_id.clone(),
            reason,
        };
        if let Err(s) = inner.abort(req).await {
            debug!(tx_id = %tx_id, error = %s,
                "abort after a refused local commit failed; the coordinator settles it at the transaction timeout");
        }
    });
}
