//! The coordinator requests tests send most, spelled once: the fields a test does not
//! vary take the values an ordinary client sends. And the branch tests look up most in
//! a GetTransaction answer.

use twopc_proto::v1 as pb;

/// A Commit of `tx_id` that waits for phase two as long as the coordinator's default,
/// names no branches, and is answered once the decision is durable.
pub fn commit(tx_id: impl AsRef<str>) -> pb::CommitRequest {
    commit_waiting(tx_id, None)
}

/// [`commit`] that waits at most `phase_two_wait_ms` for phase two (`None`: the
/// coordinator's default).
pub fn commit_waiting(tx_id: impl AsRef<str>, phase_two_wait_ms: Option<u64>) -> pb::CommitRequest {
    pb::CommitRequest {
        tx_id: tx_id.as_ref().to_string(),
        phase_two_wait_ms,
        branches: Vec::new(),
        answer_before_durable: false,
    }
}

/// A GetTransaction of `tx_id`.
pub fn get(tx_id: impl AsRef<str>) -> pb::GetTransactionRequest {
    pb::GetTransactionRequest {
        tx_id: tx_id.as_ref().to_string(),
    }
}

/// The branch `branch_id` of the transaction `view` shows, if it has one.
pub fn branch_of<'a>(
    view: &'a pb::GetTransactionResponse,
    branch_id: &str,
) -> Option<&'a pb::BranchStatus> {
    view.branches
        .iter()
        .find(|b| b.branch.as_ref().is_some_and(|b| b.branch_id == branch_id))
}
