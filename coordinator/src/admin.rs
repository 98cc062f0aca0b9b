//! The `twopc.v1.Admin` gRPC service: what an operator sees, and the one lever they have.
//!
//! * `ListTransactions`: every transaction the coordinator has not finished, oldest
//!   first, with its age, how many branches it still waits for, and whether an operator
//!   resolution was accepted for it.
//! * `ShowTransaction`: one transaction's branches (state, attempts, last error, time
//!   since the last attempt) and its audit records; for a finished transaction from the
//!   decision log.
//! * `Resolve`: an operator's heuristic decision for a stuck transaction. The engine
//!   judges it ([`crate::engine`], "Operator resolutions"; the table in
//!   `proto/twopc/v1/admin.proto`), the audit record is forced before anything happens,
//!   and refusals are recorded too.
//!
//! Handlers validate every field before the runtime sees it (messages name the field);
//! errors become statuses only through [`crate::service::status_of`].

use std::collections::HashMap;

use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};
use twopc_proto::v1 as pb;

use crate::engine::{Outcome, ResolveRequest};
use crate::log::{AuditRecord, DecisionLog};
use crate::runtime::{Known, Runtime, TxView};
use crate::service::{
    branch_state_pb, branch_to_pb, known_pb, list_transactions, outcome_pb, parse_tx, status_of,
    view_state,
};
use crate::transport::Transport;
use crate::types::{HeuristicDecision, TxId};

pub use crate::service::DEFAULT_LIST_LIMIT;

/// The gRPC Admin face of a [`Runtime`].
pub struct AdminService<L: DecisionLog, T: Transport> {
    rt: Runtime<L, T>,
}

impl<L: DecisionLog, T: Transport> AdminService<L, T> {
    /// Serves `rt`.
    pub fn new(rt: Runtime<L, T>) -> Self {
        AdminService { rt }
    }
}

/// Wire form of an operator's decision.
pub fn decision_pb(d: HeuristicDecision) -> pb::ResolveDecision {
    match d {
        HeuristicDecision::Commit => pb::ResolveDecision::Commit,
        HeuristicDecision::Abort => pb::ResolveDecision::Abort,
    }
}

/// Wire form of an audit record.
pub fn audit_to_pb(a: &AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        tx_id: a.tx.to_string(),
        decision: decision_pb(a.decision) as i32,
        operator: a.operator.clone(),
        reason: a.reason.clone(),
        force: a.force,
        at_ms: a.at_ms,
        prior_state: a.prior_state.clone(),
        accepted: a.accepted,
        contradicts: a.contradicts,
        branches: a.branches.clone(),
        detail: a.detail.clone(),
    }
}

/// Branch id -> what the latest accepted resolution declared it.
fn heuristics(audits: &[AuditRecord]) -> HashMap<&str, HeuristicDecision> {
    let mut map = HashMap::new();
    for a in audits.iter().filter(|a| a.accepted) {
        for b in &a.branches {
            map.insert(b.as_str(), a.decision);
        }
    }
    map
}

fn heuristic_pb(map: &HashMap<&str, HeuristicDecision>, branch_id: &str) -> i32 {
    map.get(branch_id)
        .map(|d| decision_pb(*d))
        .unwrap_or(pb::ResolveDecision::Unspecified) as i32
}

impl<L: DecisionLog, T: Transport> AdminService<L, T> {
    /// The branches of a transaction: live ones from the engine, finished ones from the
    /// COMMIT record (if any) and the branches the resolutions named.
    fn branches(
        &self,
        tx: &TxId,
        view: &TxView,
        audits: &[AuditRecord],
    ) -> Result<Vec<pb::AdminBranch>, Status> {
        let declared = heuristics(audits);
        if let Some(e) = &view.live {
            let now = self.rt.now_ms();
            return Ok(e
                .branches
                .iter()
                .map(|b| pb::AdminBranch {
                    branch: Some(branch_to_pb(&b.spec)),
                    state: branch_state_pb(b.state) as i32,
                    attempts: b.attempts,
                    last_error: b.last_error.clone().unwrap_or_default(),
                    last_attempt_age_ms: b.last_attempt_ms.map_or(0, |t| now.saturating_sub(t)),
                    heuristic: heuristic_pb(&declared, &b.spec.branch_id),
                })
                .collect());
        }
        let mut out = Vec::new();
        let committed = view.known == Known::Decided(Outcome::Committed);
        if committed {
            if let Some(d) = self.rt.logged_decision(tx).map_err(status_of)? {
                for spec in &d.record.branches {
                    // A heuristic branch never acknowledged: it was last known prepared.
                    let state = if declared.contains_key(spec.branch_id.as_str()) {
                        pb::BranchState::Prepared
                    } else {
                        pb::BranchState::Committed
                    };
                    out.push(pb::AdminBranch {
                        branch: Some(branch_to_pb(spec)),
                        state: state as i32,
                        heuristic: heuristic_pb(&declared, &spec.branch_id),
                        ..Default::default()
                    });
                }
            }
        }
        // Branches only a resolution names (an aborted transaction keeps no branch list).
        let mut named: Vec<&str> = Vec::new();
        for a in audits.iter().filter(|a| a.accepted) {
            for b in &a.branches {
                let known = out
                    .iter()
                    .any(|o| o.branch.as_ref().is_some_and(|x| x.branch_id == *b));
                if !known && !named.contains(&b.as_str()) {
                    named.push(b);
                }
            }
        }
        for b in named {
            out.push(pb::AdminBranch {
                branch: Some(pb::Branch {
                    branch_id: b.to_string(),
                    ..Default::default()
                }),
                state: pb::BranchState::Unspecified as i32,
                heuristic: heuristic_pb(&declared, b),
                ..Default::default()
            });
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl<L: DecisionLog, T: Transport> pb::admin_server::Admin for AdminService<L, T> {
    async fn list_transactions(
        &self,
        request: Request<pb::AdminListTransactionsRequest>,
    ) -> Result<Response<pb::AdminListTransactionsResponse>, Status> {
        let req = request.into_inner();
        let listed = list_transactions(&self.rt, req.state, req.limit, req.older_than_ms)?;
        let mut transactions = Vec::with_capacity(listed.len());
        for l in listed {
            transactions.push(pb::AdminTransaction {
                heuristic: self.rt.is_heuristic(&l.view.tx).map_err(status_of)?,
                tx_id: l.view.tx.to_string(),
                state: view_state(&l.view) as i32,
                outcome: known_pb(l.view.known) as i32,
                age_ms: l.view.age_ms,
                branch_count: l.branches,
                pending_branch_count: l.pending,
            });
        }
        Ok(Response::new(pb::AdminListTransactionsResponse {
            transactions,
        }))
    }

    async fn show_transaction(
        &self,
        request: Request<pb::AdminShowTransactionRequest>,
    ) -> Result<Response<pb::AdminShowTransactionResponse>, Status> {
        let tx = parse_tx(&request.into_inner().tx_id)?;
        let view = self.rt.get(tx).map_err(status_of)?;
        let audits = self.rt.audits(&tx).map_err(status_of)?;
        let branches = self.branches(&tx, &view, &audits)?;
        Ok(Response::new(pb::AdminShowTransactionResponse {
            tx_id: tx.to_string(),
            state: view_state(&view) as i32,
            outcome: known_pb(view.known) as i32,
            age_ms: view.age_ms,
            reason: view
                .live
                .as_ref()
                .and_then(|e| e.abort_reason.clone())
                .unwrap_or_default(),
            branches,
            heuristic: audits.iter().any(|a| a.accepted),
            audits: audits.iter().map(audit_to_pb).collect(),
        }))
    }

    async fn resolve(
        &self,
        request: Request<pb::AdminResolveRequest>,
    ) -> Result<Response<pb::AdminResolveResponse>, Status> {
        let req = request.into_inner();
        let tx = parse_tx(&req.tx_id)?;
        let decision = match pb::ResolveDecision::try_from(req.decision) {
            Ok(pb::ResolveDecision::Commit) => HeuristicDecision::Commit,
            Ok(pb::ResolveDecision::Abort) => HeuristicDecision::Abort,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "decision {} is not RESOLVE_DECISION_COMMIT (1) or RESOLVE_DECISION_ABORT (2)",
                    req.decision
                )))
            }
        };
        crate::types::validate_resolve_reason(&req.reason).map_err(Status::invalid_argument)?;
        crate::types::validate_operator(&req.operator).map_err(Status::invalid_argument)?;
        let span = info_span!("resolve", tx_id = %tx, operator = %req.operator);
        let report = self
            .rt
            .resolve_tx(
                tx,
                ResolveRequest {
                    decision,
                    operator: req.operator,
                    reason: req.reason,
                    force: req.force,
                },
            )
            .instrument(span)
            .await
            .map_err(status_of)?;
        let state = match (report.state, report.outcome) {
            (Some(s), _) => crate::service::state_pb(s),
            (None, Some(Outcome::Committed)) => pb::TxState::Committed,
            (None, Some(Outcome::Aborted)) => pb::TxState::Aborted,
            (None, None) => pb::TxState::Unspecified,
        };
        Ok(Response::new(pb::AdminResolveResponse {
            record: Some(audit_to_pb(&report.record)),
            state: state as i32,
            outcome: outcome_pb(report.outcome) as i32,
            heuristic_branches: report.heuristic_branches,
        }))
    }
}
