//! The [`Resource`] trait: what the SDK's participant server drives for each branch.
//!
//! A resource is one thing that can take part in transactions: a PostgreSQL database, a
//! RabbitMQ connection, a NATS JetStream context. It keeps its own per-branch state (an
//! open database transaction, buffered messages) keyed by `(tx_id, branch_id)`, and
//! answers the coordinator's prepare / commit / abort for those branches.
//!
//! # Contract
//! * Every method is idempotent by `(tx_id, branch_id)`: a repeated or late call returns
//!   the same answer and changes nothing more.
//! * `prepare` returns `Yes` only once the branch is durable enough to commit later,
//!   whatever happens to this process meanwhile (PostgreSQL: `PREPARE TRANSACTION`
//!   returned; broker: messages staged and synced). Anything it cannot make durable is a
//!   `No` with the resource's own message.
//! * After `Yes`, the resource never decides alone: it commits or aborts only when told,
//!   by the coordinator or by recovery asking the coordinator.
//! * `commit` of a branch it no longer holds after a yes vote means "already committed"
//!   (PostgreSQL answers 42704 to a second `COMMIT PREPARED`): success. `Err` means "not
//!   done, try again later" (the coordinator retries).
//! * `abort` answers what became of the branch: [`AbortOutcome::Aborted`] once nothing of
//!   it is committed (rolled back now or before, or never there: an unknown branch is a
//!   success, presumed abort), [`AbortOutcome::AlreadyCommitted`] when it had committed
//!   (a one-phase commit, or a committed branch) and nothing was undone. A restarted
//!   coordinator settles a single-branch transaction it may have committed in one phase
//!   with an abort and trusts this answer, so a resource must not answer `Aborted` for a
//!   branch it knows to have committed; it must remember a one-phase commit until
//!   [`Resource::outcome_known`] (or answer `Err(Retry)` while it cannot tell).
//! * `in_doubt` lists branches that voted yes and are not finished, from durable state
//!   (prepared gids, staged messages), so recovery works after a restart.
//!
//! The conformance suite in `participant-sdk/tests/conformance.rs` checks this contract for
//! every adapter.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

/// Vote of a branch at prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Prepared (durable); will commit or abort as told.
    Yes,
    /// Cannot prepare; the reason is shown to the caller of Commit.
    No(String),
    /// Nothing to commit; takes no part in phase two.
    ReadOnly,
}

/// Answer to a one-phase commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnePhase {
    /// Committed.
    Committed,
    /// Refused (rolled back), with the reason.
    Refused(String),
}

/// Answer to an abort: what became of the branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortOutcome {
    /// Nothing of the branch is committed: rolled back now, before, or never there.
    Aborted,
    /// The branch had committed (a one-phase commit, or a committed branch): nothing was
    /// undone.
    AlreadyCommitted,
}

/// A failure that means "not now": the caller retries later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry(pub String);

impl fmt::Display for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Retry {}

/// What kind of branch a resource opens (decides its commit tier).
pub use twopc_proto::v1::BranchKind;

/// A branch's resource manager. See the module docs for the contract.
#[tonic::async_trait]
pub trait Resource: Send + Sync + 'static {
    /// The name branches of this resource carry (`<service>:<name>`); unique per service.
    fn name(&self) -> &str;

    /// Databases commit before brokers.
    fn kind(&self) -> BranchKind;

    /// Phase one.
    async fn prepare(&self, tx_id: &str, branch_id: &str) -> Vote;

    /// Phase two after a yes vote. `Ok` once committed (or already committed).
    async fn commit(&self, tx_id: &str, branch_id: &str) -> Result<(), Retry>;

    /// The single phase of a one-branch transaction: commit without prepare.
    async fn commit_one_phase(&self, tx_id: &str, branch_id: &str) -> Result<OnePhase, Retry>;

    /// Abort. [`AbortOutcome::Aborted`] once nothing of the branch remains (or nothing
    /// was there); [`AbortOutcome::AlreadyCommitted`] when the branch had committed (a
    /// one-phase commit, or a committed branch), in which case nothing is undone.
    async fn abort(&self, tx_id: &str, branch_id: &str) -> Result<AbortOutcome, Retry>;

    /// The coordinator holds the final outcome of the transaction durably (its owner's
    /// Commit returned it in this process, and — when the coordinator answered before
    /// its record was durable — a later `Barrier` of the same coordinator epoch
    /// confirmed it), so nothing the branch kept for a repeated call of the coordinator
    /// (a one-phase commit's marker) is needed any more. Default: nothing to forget.
    fn outcome_known(&self, _tx_id: &str, _branch_id: &str) {}

    /// Branches that voted yes and are not finished, as `(tx_id, branch_id)`.
    async fn in_doubt(&self) -> Result<Vec<(String, String)>, Retry>;

    /// Branches opened here that have not voted yet and were opened at least
    /// `older_than` ago (a database transaction still in progress, buffered messages).
    /// Recovery aborts those whose transaction the coordinator reports aborted or never
    /// issued — safe, since they never voted yes — so an application that lost track of a
    /// transaction (an error between enlisting and committing, a coordinator restart)
    /// does not leave locks and connections held forever. Default: none.
    async fn open_branches(&self, older_than: std::time::Duration) -> Vec<(String, String)> {
        let _ = older_than;
        Vec::new()
    }

    /// One-phase commits made at least `older_than` ago that this resource still
    /// remembers (it was not told [`Resource::outcome_known`], e.g. because its process
    /// died before the coordinator's record was durable). Recovery reports each to the
    /// coordinator as committed (which records it, or answers from its record) and then
    /// calls `outcome_known`. Only branches this resource committed may be listed.
    /// Default: none.
    async fn remembered_commits(&self, older_than: std::time::Duration) -> Vec<(String, String)> {
        let _ = older_than;
        Vec::new()
    }
}

/// Resources by name, shared with the participant server and recovery.
pub(crate) type Registry = Arc<RwLock<HashMap<String, Arc<dyn Resource>>>>;

/// The commit tier of a branch kind: databases (0) before other resources (5) before
/// brokers (10), so a consumer that receives an event finds its row.
pub(crate) fn commit_order(kind: BranchKind) -> u32 {
    match kind {
        BranchKind::Database => 0,
        BranchKind::Broker => 10,
        _ => 5,
    }
}
