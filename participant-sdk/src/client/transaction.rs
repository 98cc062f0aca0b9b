//! [`Transaction`]: the application's handle on one transaction: enlisting resources,
//! commit (through the coordinator, or locally in one phase for a local transaction) and
//! abort, and telling the branches when their outcome is known.

use crate::error::Result;
use std::collections::HashSet;
use std::sync::Mutex;

use tracing::warn;
use twopc_proto::v1 as pb;

use tokio::sync::oneshot;

use super::local::{Intent, Unforgotten};
use super::TwoPc;
use crate::error::Error;
use crate::resource::{OnePhase, Resource};

/// One distributed transaction, seen from this service.
pub struct Transaction {
    pub(super) id: String,
    /// Began here (may commit/abort) or joined.
    pub(super) owner: bool,
    pub(super) sdk: TwoPc,
    /// Resources already enlisted in this transaction by this handle.
    pub(super) enlisted: Mutex<HashSet<String>>,
    /// Begun with [`TwoPc::begin_local`] (and the coordinator agreed).
    pub(super) local: Option<Local>,
}

/// What a transaction begun with [`TwoPc::begin_local`] commits by itself.
pub(super) struct Local {
    /// The resource whose branch it is.
    pub(super) resource: String,
    /// What the `Barrier` called after the BeginLocal answer says of the intent: durable
    /// when it reported the BeginLocal's epoch.
    pub(super) durable: oneshot::Receiver<Intent>,
}

/// What enlisting a resource tells it ([`Transaction::enlist`]): its branch id and how
/// the branch will commit, so a resource can prepare for its commit from the start
/// without asking the transaction what kind it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enlisted {
    /// The branch id (`<service>:<resource>`).
    pub branch_id: String,
    /// How the branch will commit.
    pub commit: BranchCommit,
}

/// How an enlisted branch will commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchCommit {
    /// It is the only branch of a transaction begun with [`TwoPc::begin_local`]: this
    /// process commits it in one phase ([`Resource::commit_one_phase`]). (PostgreSQL
    /// then learns the transaction id with `BEGIN`, so the commit needs no query for it.)
    HereInOnePhase,
    /// As the coordinator decides: in two phases, or in one phase when it turns out to be
    /// the transaction's only branch.
    ByTheCoordinator,
}

/// What [`Transaction::commit`] learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Branches phase two has not reached yet (the coordinator keeps trying).
    pub pending_branches: Vec<String>,
}

impl Transaction {
    /// The transaction id (propagate it to other services with [`crate::propagation`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The SDK handle this transaction belongs to.
    pub fn sdk(&self) -> &TwoPc {
        &self.sdk
    }

    /// The branch id `resource` gets in this transaction.
    pub fn branch_id(&self, resource: &dyn Resource) -> String {
        format!("{}:{}", self.sdk.inner.service, resource.name())
    }

    /// Enlists `resource` (once per transaction; later calls are free) and returns its
    /// branch id and how the branch will commit. Resources call this when they open a
    /// branch.
    pub async fn enlist(&self, resource: &dyn Resource) -> Result<Enlisted> {
        let branch_id = self.branch_id(resource);
        let commit = if self.local.is_some() {
            BranchCommit::HereInOnePhase
        } else {
            BranchCommit::ByTheCoordinator
        };
        if self
            .enlisted
            .lock()
            .map(|s| s.contains(&branch_id))
            .unwrap_or(false)
        {
            return Ok(Enlisted { branch_id, commit });
        }
        if self.local.is_some() {
            return Err(Error::Usage(format!(
                "transaction {} was begun with begin_local: its one resource is its only \
                 branch, so {:?} cannot join it (use begin_with for a transaction of several)",
                self.id,
                resource.name()
            )));
        }
        let branch = self.sdk.branch_of(resource)?;
        self.sdk
            .inner
            .calls
            .enlist(pb::EnlistRequest {
                tx_id: self.id.clone(),
                branch: Some(branch),
            })
            .await?;
        if let Ok(mut s) = self.enlisted.lock() {
            s.insert(branch_id.clone());
        }
        Ok(Enlisted { branch_id, commit })
    }

    /// Commits: every branch of every service in the transaction, or none. `Ok` means
    /// committed (decided; `pending_branches` are still being delivered).
    /// [`Error::Aborted`] means nothing of it is committed anywhere.
    ///
    /// A one-phase commit (the transaction has a single branch) may be answered before
    /// the coordinator's record of it is durable (the request sets
    /// `answer_before_durable`): the commit itself is done in the branch's resource, and
    /// until the coordinator's record is durable the resource keeps what tells a
    /// restarted coordinator that it committed. This process's branches are forgotten
    /// ([`Resource::outcome_known`]) by the handle's forgetter once a coordinator
    /// `Barrier` of the same epoch as the answer returned (see the module docs), or at
    /// once when the coordinator reports no epoch (it answered once durable).
    ///
    /// A transaction begun with [`TwoPc::begin_local`] is committed here, by its resource
    /// ([`Resource::commit_one_phase`]), once a `Barrier` of the BeginLocal's epoch showed the
    /// coordinator's intent durable, and reported to the coordinator in the background
    /// (see [`TwoPc::begin_local`]). Without that Barrier (the coordinator restarted or is
    /// unreachable), or when the resource cannot tell whether it committed (its connection
    /// broke during COMMIT), the commit is handed to the coordinator, which asks the
    /// resource until it can tell.
    pub async fn commit(mut self) -> Result<Committed> {
        if !self.owner {
            return Err(Error::Usage(format!(
                "transaction {} was joined, not begun, here: its owner commits it",
                self.id
            )));
        }
        if let Some(local) = self.local.take() {
            if let Some(done) = self.commit_locally(local).await {
                return done;
            }
        }
        self.commit_via_coordinator().await
    }

    /// The local one-phase commit; `None` when it must go through the coordinator.
    pub(super) async fn commit_locally(&self, local: Local) -> Option<Result<Committed>> {
        match local.durable.await {
            Ok(Intent::Durable) => {}
            Ok(Intent::Restarted { begun, now }) => {
                warn!(tx_id = %self.id, begun, now,
                    "the coordinator restarted since Begin; committing through it");
                return None;
            }
            Ok(Intent::Unknown(e)) => {
                warn!(tx_id = %self.id, error = %e,
                    "Barrier failed; committing through the coordinator");
                return None;
            }
            Err(_) => return None,
        }
        let resource = self
            .sdk
            .inner
            .registry
            .read()
            .ok()
            .and_then(|r| r.get(&local.resource).cloned());
        let Some(resource) = resource else {
            return Some(Err(Error::Usage(format!(
                "resource {:?} is no longer registered with this TwoPc handle",
                local.resource
            ))));
        };
        let branch_id = self.branch_id(&*resource);
        match resource.commit_one_phase(&self.id, &branch_id).await {
            Ok(OnePhase::Committed) => {
                self.sdk.inner.local.committed(self.id.clone(), branch_id);
                Some(Ok(Committed {
                    pending_branches: Vec::new(),
                }))
            }
            Ok(OnePhase::Refused(why)) => {
                let why = format!("branch {branch_id} refused to commit: {why}");
                self.sdk.inner.local.refused(self.id.clone(), why.clone());
                Some(Err(Error::Aborted(why)))
            }
            Err(e) => {
                warn!(tx_id = %self.id, error = %e,
                    "local one-phase commit outcome unknown; asking the coordinator to finish it");
                None
            }
        }
    }

    /// The Commit call: the coordinator runs the protocol.
    pub(super) async fn commit_via_coordinator(self) -> Result<Committed> {
        let req = pb::CommitRequest {
            tx_id: self.id.clone(),
            phase_two_wait_ms: self.sdk.inner.commit_wait.map(|d| d.as_millis() as u64),
            branches: Vec::new(),
            answer_before_durable: true,
        };
        match self.sdk.inner.calls.commit(req).await {
            Ok(resp) => {
                self.forget_after_barrier(resp.epoch);
                Ok(Committed {
                    pending_branches: resp.pending_branches,
                })
            }
            Err(s) if s.code() == tonic::Code::Aborted => {
                Err(Error::Aborted(s.message().to_string()))
            }
            Err(s) => Err(Error::Coordinator(s)),
        }
    }

    /// The branch ids this handle enlisted in this transaction.
    pub(super) fn enlisted_branches(&self) -> Vec<String> {
        self.enlisted
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Queues this transaction's branches for the forgetter: they are forgotten once a
    /// `Barrier` returns `epoch`.
    pub(super) fn forget_after_barrier(&self, epoch: u64) {
        let branch_ids = self.enlisted_branches();
        if branch_ids.is_empty() {
            return;
        }
        self.sdk.inner.local.forget(Unforgotten {
            tx_id: self.id.clone(),
            branch_ids,
            epoch,
        });
    }

    /// Aborts: nothing of the transaction is committed anywhere.
    pub async fn abort(self, reason: impl Into<String>) -> Result<()> {
        if !self.owner {
            return Err(Error::Usage(format!(
                "transaction {} was joined, not begun, here: its owner aborts it",
                self.id
            )));
        }
        let req = pb::AbortRequest {
            tx_id: self.id.clone(),
            reason: reason.into(),
        };
        self.sdk.inner.calls.abort(req).await?;
        Ok(())
    }
}
