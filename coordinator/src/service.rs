//! The `twopc.v1.Coordinator` gRPC service.
//!
//! Handlers validate everything they receive before the engine sees it, convert between
//! wire and engine types, and open a tracing span carrying the `tx_id`. [`status_of`] is
//! the only place an error becomes a `tonic::Status`. `Pipeline` runs each call of its
//! stream through the same handler as the call's unary twin.

use std::time::Duration;

use tokio::sync::watch;

use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};
use twopc_proto::mux;
use twopc_proto::v1 as pb;

use crate::engine::{BranchState, Outcome, TxError, TxState};
use crate::log::DecisionLog;
use crate::runtime::{Known, Runtime, TxView};
use crate::transport::Transport;
use crate::types::{BranchKind, BranchSpec, TxId};

/// Longest accepted abort reason.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest phase-two wait a caller may ask for.
pub const MAX_COMMIT_WAIT_MS: u64 = 10 * 60 * 1000;
/// Most transactions one report of local commits may carry
/// (`ReportLocalCommitsRequest.tx_ids`).
pub const MAX_LOCAL_REPORTS: usize = 1024;
/// Most transactions one ListTransactions returns.
pub const MAX_LIST_LIMIT: u32 = 10_000;
/// How many transactions a list returns when the request says 0.
pub const DEFAULT_LIST_LIMIT: u32 = 100;

/// One transaction of a list, with its branch counts (0 for a forgotten one).
pub(crate) struct Listed {
    pub view: TxView,
    pub branches: u32,
    pub pending: u32,
}

/// The list of either API (`Coordinator` and `Admin` ListTransactions): checks `state`
/// and `limit` (0 means [`DEFAULT_LIST_LIMIT`]) and returns the transactions in that state
/// (any, for TX_STATE_UNSPECIFIED) at least `min_age_ms` old, oldest first.
pub(crate) fn list_transactions<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    state: i32,
    limit: u32,
    min_age_ms: u64,
) -> Result<Vec<Listed>, Status> {
    let want = pb::TxState::try_from(state)
        .map_err(|_| Status::invalid_argument(format!("state {state} is not a TxState")))?;
    if limit > MAX_LIST_LIMIT {
        return Err(Status::invalid_argument(format!(
            "limit is {limit}; at most {MAX_LIST_LIMIT} is allowed"
        )));
    }
    let limit = if limit == 0 {
        DEFAULT_LIST_LIMIT
    } else {
        limit
    };
    let views = rt.list(
        |v| (want == pb::TxState::Unspecified || view_state(v) == want) && v.age_ms >= min_age_ms,
        limit as usize,
    );
    Ok(views
        .into_iter()
        .map(|view| {
            let (branches, pending) = match &view.live {
                Some(e) => (e.branches.len() as u32, e.pending_branches().len() as u32),
                None => (0, 0),
            };
            Listed {
                view,
                branches,
                pending,
            }
        })
        .collect())
}

/// The gRPC face of a [`Runtime`].
pub struct CoordinatorService<L: DecisionLog, T: Transport> {
    rt: Runtime<L, T>,
    /// Turns true when the server shuts down: open `Pipeline` streams then end.
    stopping: watch::Receiver<bool>,
}

impl<L: DecisionLog, T: Transport> CoordinatorService<L, T> {
    /// Serves `rt`.
    pub fn new(rt: Runtime<L, T>) -> Self {
        // A sender that is never used: streams end only with their client.
        let (_, stopping) = watch::channel(false);
        CoordinatorService { rt, stopping }
    }

    /// Ends every open `Pipeline` stream (after its running calls) once `stopping` turns
    /// true, so a graceful shutdown does not wait for clients to close them.
    pub fn with_shutdown(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }
}

/// Maps an engine error to its gRPC status. The one place this happens.
pub fn status_of(e: TxError) -> Status {
    match e {
        TxError::InvalidArgument(m) => Status::invalid_argument(m),
        TxError::NotFound(m) => Status::not_found(m),
        TxError::FailedPrecondition(m) => Status::failed_precondition(m),
        TxError::AlreadyExists(m) => Status::already_exists(m),
        TxError::Aborted(m) => Status::aborted(m),
        TxError::Unavailable(m) => Status::unavailable(m),
    }
}

/// Parses a wire transaction id; the error names the field.
pub(crate) fn parse_tx(s: &str) -> Result<TxId, Status> {
    s.parse::<TxId>()
        .map_err(|e| Status::invalid_argument(format!("tx_id: {e}")))
}

fn branch_from_pb(b: pb::Branch) -> Result<BranchSpec, Status> {
    // Field-level checks happen in the engine too; these give the field's wire name.
    crate::types::validate_branch_id(&b.branch_id).map_err(Status::invalid_argument)?;
    crate::types::validate_endpoint(&b.participant_endpoint).map_err(Status::invalid_argument)?;
    if pb::BranchKind::try_from(b.kind).is_err() {
        return Err(Status::invalid_argument(format!(
            "branch {:?}: kind {} is not a BranchKind",
            b.branch_id, b.kind
        )));
    }
    Ok(BranchSpec {
        branch_id: b.branch_id,
        endpoint: b.participant_endpoint,
        commit_order: b.commit_order,
        kind: BranchKind::from_code(b.kind),
    })
}

/// Wire form of a branch.
pub fn branch_to_pb(b: &BranchSpec) -> pb::Branch {
    pb::Branch {
        branch_id: b.branch_id.clone(),
        participant_endpoint: b.endpoint.clone(),
        commit_order: b.commit_order,
        kind: b.kind.code(),
    }
}

/// Wire form of an outcome (`None`: not decided).
pub(crate) fn outcome_pb(o: Option<Outcome>) -> pb::Outcome {
    match o {
        Some(Outcome::Committed) => pb::Outcome::Committed,
        Some(Outcome::Aborted) => pb::Outcome::Aborted,
        None => pb::Outcome::Unspecified,
    }
}

/// Wire form of what is known of a transaction's outcome.
pub(crate) fn known_pb(k: Known) -> pb::Outcome {
    match k {
        Known::Forgotten => pb::Outcome::Forgotten,
        other => outcome_pb(other.outcome()),
    }
}

/// Wire form of a live transaction state.
pub(crate) fn state_pb(s: TxState) -> pb::TxState {
    match s {
        TxState::Active => pb::TxState::Active,
        TxState::Preparing => pb::TxState::Preparing,
        TxState::Deciding | TxState::InDoubt => pb::TxState::Deciding,
        TxState::Committing => pb::TxState::Committing,
        TxState::Aborting => pb::TxState::Aborting,
    }
}

/// Wire form of a branch state.
pub(crate) fn branch_state_pb(s: BranchState) -> pb::BranchState {
    match s {
        BranchState::Enlisted => pb::BranchState::Enlisted,
        BranchState::Preparing => pb::BranchState::Preparing,
        BranchState::Prepared => pb::BranchState::Prepared,
        BranchState::ReadOnly => pb::BranchState::ReadOnly,
        BranchState::VotedNo => pb::BranchState::VotedNo,
        BranchState::Committed => pb::BranchState::Committed,
        BranchState::Aborted => pb::BranchState::Aborted,
    }
}

/// The wire state of a view: live transactions by their engine state, finished ones by
/// what is known of their outcome.
pub(crate) fn view_state(v: &TxView) -> pb::TxState {
    match (&v.live, v.known) {
        (Some(e), _) => state_pb(e.state),
        (None, Known::Decided(Outcome::Committed)) => pb::TxState::Committed,
        (None, Known::Forgotten) => pb::TxState::Forgotten,
        (None, _) => pb::TxState::Aborted,
    }
}

fn view_to_pb(v: TxView) -> pb::GetTransactionResponse {
    let state = view_state(&v);
    let (branches, reason) = match &v.live {
        Some(e) => (
            e.branches
                .iter()
                .map(|b| pb::BranchStatus {
                    branch: Some(branch_to_pb(&b.spec)),
                    state: branch_state_pb(b.state) as i32,
                    attempts: b.attempts,
                    last_error: b.last_error.clone().unwrap_or_default(),
                })
                .collect(),
            e.abort_reason.clone().unwrap_or_default(),
        ),
        None => (Vec::new(), String::new()),
    };
    pb::GetTransactionResponse {
        tx_id: v.tx.to_string(),
        state: state as i32,
        outcome: known_pb(v.known) as i32,
        branches,
        age_ms: v.age_ms,
        reason,
    }
}

/// The transactions' timeout as answered: the request's, or the coordinator's default.
fn timeout_of<L: DecisionLog, T: Transport>(rt: &Runtime<L, T>, timeout_ms: u64) -> u64 {
    match timeout_ms {
        0 => rt.default_tx_timeout_ms(),
        t => t,
    }
}

async fn begin<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::BeginRequest,
) -> Result<pb::BeginResponse, Status> {
    let branches = req
        .branches
        .into_iter()
        .map(branch_from_pb)
        .collect::<Result<Vec<_>, _>>()?;
    let tx = rt
        .begin(req.timeout_ms, branches)
        .await
        .map_err(status_of)?;
    tracing::debug!(tx_id = %tx, "begun");
    Ok(pb::BeginResponse {
        tx_id: tx.to_string(),
        epoch: rt.log().epoch(),
        timeout_ms: timeout_of(rt, req.timeout_ms),
    })
}

async fn begin_local<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::BeginLocalRequest,
) -> Result<pb::BeginLocalResponse, Status> {
    let branch = req
        .branch
        .ok_or_else(|| Status::invalid_argument("branch is missing"))?;
    let branch = branch_from_pb(branch)?;
    let txs = rt
        .begin_local(req.timeout_ms, branch, req.count)
        .await
        .map_err(status_of)?;
    if txs.is_empty() {
        return Err(Status::internal("BeginLocal issued no transaction"));
    }
    tracing::debug!(first = %txs[0], count = txs.len(), "begun local");
    Ok(pb::BeginLocalResponse {
        tx_ids: txs.iter().map(|tx| tx.to_string()).collect(),
        epoch: rt.log().epoch(),
        timeout_ms: timeout_of(rt, req.timeout_ms),
    })
}

async fn enlist<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::EnlistRequest,
) -> Result<pb::EnlistResponse, Status> {
    let tx = parse_tx(&req.tx_id)?;
    let branch = req
        .branch
        .ok_or_else(|| Status::invalid_argument("branch is missing"))?;
    let branch = branch_from_pb(branch)?;
    let span = info_span!("enlist", tx_id = %tx, branch_id = %branch.branch_id);
    rt.enlist(tx, branch)
        .instrument(span)
        .await
        .map_err(status_of)?;
    Ok(pb::EnlistResponse {})
}

async fn commit<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::CommitRequest,
) -> Result<pb::CommitResponse, Status> {
    let tx = parse_tx(&req.tx_id)?;
    let wait = match req.phase_two_wait_ms {
        Some(ms) if ms > MAX_COMMIT_WAIT_MS => {
            return Err(Status::invalid_argument(format!(
                "phase_two_wait_ms is {ms}; at most {MAX_COMMIT_WAIT_MS} is allowed"
            )));
        }
        Some(ms) => Some(Duration::from_millis(ms)),
        None => None,
    };
    // Every branch is checked before any is enlisted: a bad one changes nothing.
    let branches = req
        .branches
        .into_iter()
        .map(branch_from_pb)
        .collect::<Result<Vec<_>, _>>()?;
    let span = info_span!("commit", tx_id = %tx);
    async move {
        // Branches the transaction no longer takes because it is past ACTIVE (a repeated
        // Commit): the outcome decides, and a COMMITTED one must have had them.
        let mut late = Vec::new();
        for branch in branches {
            match rt.enlist(tx, branch.clone()).await {
                Ok(()) => {}
                Err(TxError::FailedPrecondition(_)) => late.push(branch),
                Err(e) => return Err(status_of(e)),
            }
        }
        let res = rt
            .commit(tx, wait, req.answer_before_durable)
            .await
            .map_err(status_of)?;
        if !late.is_empty() {
            let had = match rt.log().decision(&tx) {
                Ok(Some(d)) => d.record.branches,
                _ => Vec::new(),
            };
            if let Some(b) = late.iter().find(|b| !had.contains(b)) {
                return Err(Status::failed_precondition(format!(
                    "transaction {tx} committed without branch {:?}; it can no longer be enlisted",
                    b.branch_id
                )));
            }
        }
        Ok(pb::CommitResponse {
            outcome: pb::Outcome::Committed as i32,
            pending_branches: res.pending,
            epoch: res.epoch,
        })
    }
    .instrument(span)
    .await
}

/// A report of local commits: each transaction recorded as if reported alone; every id is
/// checked before any is recorded. OK once all are, else the first failure (named by its
/// transaction when the report holds several).
async fn report_local_commits<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::ReportLocalCommitsRequest,
) -> Result<pb::ReportLocalCommitsResponse, Status> {
    if req.tx_ids.is_empty() {
        return Err(Status::invalid_argument(
            "tx_ids is empty; a report names 1 or more local transactions",
        ));
    }
    if req.tx_ids.len() > MAX_LOCAL_REPORTS {
        return Err(Status::invalid_argument(format!(
            "tx_ids holds {} ids; at most {MAX_LOCAL_REPORTS} are allowed",
            req.tx_ids.len()
        )));
    }
    let txs = req
        .tx_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            id.parse::<TxId>()
                .map_err(|e| Status::invalid_argument(format!("tx_ids[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let answer_before_durable = req.answer_before_durable;
    let reports = txs.iter().map(|&tx| {
        let span = info_span!("report_local_commit", tx_id = %tx);
        async move {
            rt.committed_locally(tx, answer_before_durable)
                .instrument(span)
                .await
                .map_err(|e| (tx, e))
        }
    });
    let mut epoch = rt.log().epoch();
    for res in futures::future::join_all(reports).await {
        match res {
            Ok(r) => epoch = r.epoch,
            Err((tx, e)) if txs.len() > 1 => {
                let s = status_of(e);
                return Err(Status::new(
                    s.code(),
                    format!("transaction {tx}: {}", s.message()),
                ));
            }
            Err((_, e)) => return Err(status_of(e)),
        }
    }
    Ok(pb::ReportLocalCommitsResponse {
        recorded: txs.len() as u32,
        epoch,
    })
}

/// Checks an abort reason's length.
fn check_reason(reason: &str) -> Result<(), Status> {
    if reason.len() > MAX_REASON_LEN {
        return Err(Status::invalid_argument(format!(
            "reason is {} bytes long; at most {MAX_REASON_LEN} are allowed",
            reason.len()
        )));
    }
    Ok(())
}

async fn abort<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::AbortRequest,
) -> Result<pb::AbortResponse, Status> {
    let tx = parse_tx(&req.tx_id)?;
    check_reason(&req.reason)?;
    let span = info_span!("abort", tx_id = %tx);
    rt.abort(tx, req.reason)
        .instrument(span)
        .await
        .map_err(status_of)?;
    Ok(pb::AbortResponse {
        outcome: pb::Outcome::Aborted as i32,
    })
}

async fn release_unused<L: DecisionLog, T: Transport>(
    rt: &Runtime<L, T>,
    req: pb::ReleaseUnusedRequest,
) -> Result<pb::ReleaseUnusedResponse, Status> {
    let tx = parse_tx(&req.tx_id)?;
    let span = info_span!("release_unused", tx_id = %tx);
    rt.release(tx).instrument(span).await.map_err(status_of)?;
    Ok(pb::ReleaseUnusedResponse {
        outcome: pb::Outcome::Aborted as i32,
    })
}

/// Runs one call of a Pipeline stream exactly as its unary twin would run.
async fn pipeline_call<L: DecisionLog, T: Transport>(
    rt: Runtime<L, T>,
    call: pb::ClientCall,
) -> pb::ClientResult {
    use pb::client_call::Call;
    use pb::client_result::Result as R;
    let result = match call.call {
        Some(Call::Begin(req)) => begin(&rt, req).await.map(R::Begin),
        Some(Call::Enlist(req)) => enlist(&rt, req).await.map(R::Enlist),
        Some(Call::Commit(req)) => commit(&rt, req).await.map(R::Commit),
        Some(Call::Abort(req)) => abort(&rt, req).await.map(R::Abort),
        Some(Call::BeginLocal(req)) => begin_local(&rt, req).await.map(R::BeginLocal),
        Some(Call::ReportLocalCommits(req)) => report_local_commits(&rt, req)
            .await
            .map(R::ReportLocalCommits),
        Some(Call::ReleaseUnused(req)) => release_unused(&rt, req).await.map(R::ReleaseUnused),
        None => Err(Status::invalid_argument(
            "call is missing: set one of begin, begin_local, enlist, commit, \
             report_local_commits, abort, release_unused",
        )),
    };
    pb::ClientResult {
        call_id: call.call_id,
        result: Some(result.unwrap_or_else(|s| R::Error(s.into()))),
    }
}

#[tonic::async_trait]
impl<L: DecisionLog, T: Transport> pb::coordinator_server::Coordinator
    for CoordinatorService<L, T>
{
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        begin(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn begin_local(
        &self,
        request: Request<pb::BeginLocalRequest>,
    ) -> Result<Response<pb::BeginLocalResponse>, Status> {
        begin_local(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn enlist(
        &self,
        request: Request<pb::EnlistRequest>,
    ) -> Result<Response<pb::EnlistResponse>, Status> {
        enlist(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        commit(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        abort(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn report_local_commits(
        &self,
        request: Request<pb::ReportLocalCommitsRequest>,
    ) -> Result<Response<pb::ReportLocalCommitsResponse>, Status> {
        report_local_commits(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn release_unused(
        &self,
        request: Request<pb::ReleaseUnusedRequest>,
    ) -> Result<Response<pb::ReleaseUnusedResponse>, Status> {
        release_unused(&self.rt, request.into_inner())
            .await
            .map(Response::new)
    }

    type PipelineStream = mux::OutboundStream<Result<pb::PipelineResponse, Status>>;

    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<pb::PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let rt = self.rt.clone();
        let mut stopping = self.stopping.clone();
        Ok(Response::new(mux::serve(
            request.into_inner(),
            move |call: pb::ClientCall| pipeline_call(rt.clone(), call),
            async move {
                // An error means the sender is gone: the server is not stopping.
                if stopping.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        )))
    }

    async fn barrier(
        &self,
        _request: Request<pb::BarrierRequest>,
    ) -> Result<Response<pb::BarrierResponse>, Status> {
        let epoch = self.rt.barrier().await.map_err(status_of)?;
        Ok(Response::new(pb::BarrierResponse { epoch }))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::GetTransactionResponse>, Status> {
        let tx = parse_tx(&request.into_inner().tx_id)?;
        let view = self.rt.get(tx).map_err(status_of)?;
        Ok(Response::new(view_to_pb(view)))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let req = request.into_inner();
        let transactions = list_transactions(&self.rt, req.state, req.limit, req.min_age_ms)?
            .into_iter()
            .map(|l| pb::TransactionSummary {
                tx_id: l.view.tx.to_string(),
                state: view_state(&l.view) as i32,
                outcome: known_pb(l.view.known) as i32,
                age_ms: l.view.age_ms,
                branch_count: l.branches,
                pending_branch_count: l.pending,
            })
            .collect();
        Ok(Response::new(pb::ListTransactionsResponse { transactions }))
    }
}
