//! Participant recovery: every in-doubt branch (a prepared gid, a staged batch) asks the
//! coordinator for its outcome and finishes accordingly. Runs at start and periodically.
//! A branch that voted yes is never decided here alone: while the coordinator has not
//! decided (or cannot be reached), it stays in doubt and is asked again next pass.
//!
//! One-phase commits a resource still remembers ([`Resource::remembered_commits`]: its
//! process died before the coordinator's record of them was durable, or before a local
//! commit was reported) are reported to the coordinator as committed, answered once the
//! record is durable, and then forgotten. [`pass`] run on demand reports every one. The
//! first periodic pass over each resource (a resource is registered after the handle
//! started, so usually not the pass at start) reports every one committed before the
//! loop started (an earlier process's); later periodic passes only those older than
//! [`REMEMBERED_AFTER`]. So periodic passes never race this process's reporter and
//! forgetter for the commits of the moment.
//!
//! A coordinator deletes a finished transaction's record after its retention and then
//! answers FORGOTTEN for it (finished, outcome no longer kept). A prepared branch of such
//! a transaction is never guessed at: recovery logs an error naming it, counts it
//! ([`forgotten_answers`]) and leaves it prepared for an operator, who learns the outcome
//! from the other branches. An open branch (it never voted, so no commit depended on it)
//! of a forgotten transaction is rolled back like one of an aborted transaction.

use crate::Resource;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use crate::channel::CoordinatorChannel;
use crate::resource::AbortOutcome;
use crate::resource::Registry;

/// In-doubt branches this process found answered FORGOTTEN, counted once per pass that
/// finds one (see the module docs).
static FORGOTTEN_ANSWERS: AtomicU64 = AtomicU64::new(0);

/// How many times recovery in this process found a prepared branch whose transaction the
/// coordinator no longer keeps (answered FORGOTTEN), and left it for an operator: a
/// number to export as a metric and alert on when it grows.
pub fn forgotten_answers() -> u64 {
    FORGOTTEN_ANSWERS.load(Ordering::Relaxed)
}

/// Runs a pass now and then every `every` until `stop` turns true.
pub(crate) async fn run_loop(
    coordinator: CoordinatorClient<CoordinatorChannel>,
    registry: Registry,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut passed = HashSet::new();
    loop {
        let periodic = Markers::Periodic {
            started,
            passed: &mut passed,
        };
        pass(&coordinator, &registry, periodic).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Which remembered one-phase commits a pass reports.
pub(crate) enum Markers<'a> {
    /// Every one (a pass run on demand).
    All,
    /// Of a resource not in `passed` (its first pass: the set takes it), every one
    /// committed before `started` (when this process's loop started: an earlier
    /// process's) or older than [`REMEMBERED_AFTER`]; of the others, those older than
    /// [`REMEMBERED_AFTER`]. This process's commits of the moment are its reporter's
    /// and forgetter's.
    Periodic {
        started: Instant,
        passed: &'a mut HashSet<String>,
    },
}

impl Markers<'_> {
    /// How old a remembered commit of `resource` must be to be reported by this pass.
    fn min_age(&mut self, resource: &str) -> Duration {
        match self {
            Markers::All => Duration::ZERO,
            Markers::Periodic { started, passed } => {
                if passed.insert(resource.to_string()) {
                    // Older than REMEMBERED_AFTER is any later pass's anyway.
                    started.elapsed().min(REMEMBERED_AFTER)
                } else {
                    REMEMBERED_AFTER
                }
            }
        }
    }
}

/// Serializes recovery passes of one process (the periodic loop and `recover_now`), so
/// two passes never race to finish the same branch.
static PASS_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How old a remembered one-phase commit must be before a periodic pass reports it (but
/// the first pass over its resource, which reports those made before the loop started).
pub(crate) const REMEMBERED_AFTER: Duration = Duration::from_secs(60);

/// One recovery pass over every registered resource, reporting the remembered one-phase
/// commits `markers` selects. Returns how many branches finished.
///
/// Resources are visited in commit-tier order (databases, then others, then brokers), the
/// order phase two uses, so recovery too makes a row visible before its event is out.
pub(crate) async fn pass(
    coordinator: &CoordinatorClient<CoordinatorChannel>,
    registry: &Registry,
    mut markers: Markers<'_>,
) -> usize {
    let _serial = PASS_LOCK.lock().await;
    let mut resources: Vec<_> = match registry.read() {
        Ok(r) => r.values().cloned().collect(),
        Err(_) => return 0,
    };
    resources.sort_by_key(|r| {
        (
            crate::resource::commit_order(r.kind()),
            r.name().to_string(),
        )
    });
    let mut finished = 0;
    for resource in &resources {
        let in_doubt = match resource.in_doubt().await {
            Ok(list) => list,
            Err(e) => {
                warn!(resource = resource.name(), error = %e, "recovery: cannot list in-doubt branches");
                continue;
            }
        };
        for (tx_id, branch_id) in in_doubt {
            let req = pb::GetTransactionRequest {
                tx_id: tx_id.clone(),
            };
            let outcome = match coordinator.clone().get_transaction(req).await {
                Ok(resp) => pb::Outcome::try_from(resp.into_inner().outcome)
                    .unwrap_or(pb::Outcome::Unspecified),
                Err(s) => {
                    // NOT_FOUND: the coordinator never issued it (wrong coordinator, or its
                    // data was lost). Never guess: leave it for an operator.
                    warn!(tx_id, branch_id, code = ?s.code(), message = s.message(), "recovery: cannot learn the outcome");
                    continue;
                }
            };
            let res = match outcome {
                pb::Outcome::Committed => resource.commit(&tx_id, &branch_id).await,
                pb::Outcome::Aborted => match resource.abort(&tx_id, &branch_id).await {
                    Ok(AbortOutcome::Aborted) => Ok(()),
                    Ok(AbortOutcome::AlreadyCommitted) => {
                        // Cannot happen for a branch that voted yes and waits for the
                        // decision; say so loudly if a resource claims it anyway.
                        error!(
                            tx_id,
                            branch_id,
                            "recovery: the coordinator says aborted, but the resource had \
                             already committed the branch; an operator must reconcile"
                        );
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                pb::Outcome::Unspecified => {
                    debug!(tx_id, branch_id, "recovery: not decided yet");
                    continue;
                }
                pb::Outcome::Forgotten => {
                    FORGOTTEN_ANSWERS.fetch_add(1, Ordering::Relaxed);
                    error!(
                        tx_id,
                        branch_id,
                        resource = resource.name(),
                        "recovery: the coordinator no longer keeps this transaction's outcome \
                         (it finished longer ago than its decision retention); the branch \
                         stays prepared: an operator must learn the outcome from the other \
                         branches and commit or roll it back by hand"
                    );
                    continue;
                }
            };
            match res {
                Ok(()) => {
                    info!(
                        tx_id,
                        branch_id,
                        ?outcome,
                        "recovery: finished in-doubt branch"
                    );
                    finished += 1;
                }
                Err(e) => {
                    warn!(tx_id, branch_id, error = %e, "recovery: could not finish branch; will retry")
                }
            }
        }
    }
    finished += abandoned(coordinator, &resources).await;
    finished += reported(coordinator, &resources, &mut markers).await;
    finished
}

/// Reports the one-phase commits the resources remember (those `markers` selects) to
/// the coordinator and forgets those whose outcome it now holds durably.
async fn reported(
    coordinator: &CoordinatorClient<CoordinatorChannel>,
    resources: &[std::sync::Arc<dyn Resource>],
    markers: &mut Markers<'_>,
) -> usize {
    let mut finished = 0;
    for resource in resources {
        let older_than = markers.min_age(resource.name());
        for (tx_id, branch_id) in resource.remembered_commits(older_than).await {
            let req = pb::ReportLocalCommitsRequest {
                tx_ids: vec![tx_id.clone()],
                // Answered once the record is durable: the marker may go right after.
                answer_before_durable: false,
            };
            match coordinator.clone().report_local_commits(req).await {
                Ok(_) => {
                    resource.outcome_known(&tx_id, &branch_id);
                    info!(
                        tx_id,
                        branch_id, "recovery: reported a remembered one-phase commit"
                    );
                    finished += 1;
                }
                Err(s) if s.code() == tonic::Code::Aborted => error!(
                    tx_id,
                    branch_id,
                    message = s.message(),
                    "recovery: the coordinator records ABORTED for a branch this resource \
                     committed in one phase; an operator must reconcile (the marker stays)"
                ),
                Err(s) => debug!(tx_id, branch_id, code = ?s.code(), message = s.message(),
                    "recovery: a remembered one-phase commit is not reported now; next pass"),
            }
        }
    }
    finished
}

/// Open (never voted) branches whose transaction is over or unknown are rolled back.
async fn abandoned(
    coordinator: &CoordinatorClient<CoordinatorChannel>,
    resources: &[std::sync::Arc<dyn crate::Resource>],
) -> usize {
    let mut finished = 0;
    for resource in resources {
        for (tx_id, branch_id) in resource.open_branches(ABANDONED_AFTER).await {
            let req = pb::GetTransactionRequest {
                tx_id: tx_id.clone(),
            };
            let over = match coordinator.clone().get_transaction(req).await {
                Ok(resp) => matches!(
                    pb::Outcome::try_from(resp.into_inner().outcome),
                    Ok(pb::Outcome::Aborted | pb::Outcome::Forgotten)
                ),
                Err(s) => s.code() == tonic::Code::NotFound,
            };
            if !over {
                continue;
            }
            match resource.abort(&tx_id, &branch_id).await {
                Ok(AbortOutcome::AlreadyCommitted) => {
                    error!(
                        tx_id,
                        branch_id,
                        "recovery: an open branch of a transaction the coordinator does not \
                         commit turned out committed; an operator must reconcile"
                    );
                }
                Ok(AbortOutcome::Aborted) => {
                    info!(
                        tx_id,
                        branch_id, "recovery: rolled back an abandoned open branch"
                    );
                    finished += 1;
                }
                Err(e) => {
                    warn!(tx_id, branch_id, error = %e, "recovery: could not roll back an abandoned branch")
                }
            }
        }
    }
    finished
}

/// How old an open branch must be before recovery asks whether its transaction is over.
const ABANDONED_AFTER: Duration = Duration::from_secs(1);
