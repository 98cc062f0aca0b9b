//! The embedded participant gRPC server: routes the coordinator's Prepare / Commit / Abort
//! to the registered [`Resource`](crate::resource::Resource) named in the branch id
//! (`<service>:<resource>`). The same handlers serve the batched `ParticipantExchange`
//! stream, call by call, so the two ways in behave alike (fail points included).
//!
//! An Abort answers the resource's [`AbortOutcome`](crate::resource::AbortOutcome) as
//! `ABORT_RESULT_ABORTED` or `ABORT_RESULT_ALREADY_COMMITTED` (a restarted coordinator
//! settles a one-phase commit by it). An Abort for a resource name not registered here
//! undoes nothing and fails with UNAVAILABLE, so the coordinator asks again — the
//! resource may only not be registered *yet* (the server starts before the application
//! registers its resources) and may hold a prepared or committed branch.
//!
//! # Fail points
//!
//! With the crate feature `failpoints` (and `fail::FailScenario::setup()` called by the
//! binary, which reads `FAILPOINTS` from the environment), three crash points exist. The
//! action `return(abort)` aborts the process on the spot (SIGABRT: no destructor, no
//! flush, no reply, like a SIGKILL); any other `return` argument is ignored. Without the
//! feature they compile to nothing.
//!
//! * `participant::after_prepare_before_reply`: a branch voted yes (it is durably
//!   prepared), before the vote is sent to the coordinator.
//! * `participant::before_commit`: a Commit (two-phase or one-phase) for a registered
//!   resource arrived, before the resource commits.
//! * `participant::after_commit_before_ack`: the resource committed, before the
//!   acknowledgement is sent.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::{info_span, warn, Instrument};
use twopc_proto::mux;
use twopc_proto::v1 as pb;

use crate::crash_point;
use twopc_proto::v1::participant_exchange_server::{
    ParticipantExchange, ParticipantExchangeServer,
};
use twopc_proto::v1::participant_server::{Participant, ParticipantServer};

use crate::resource::Registry;
use crate::resource::{AbortOutcome, OnePhase, Resource, Vote};

/// Serves the participant API on `listener` until `stop` turns true. `server` carries the
/// TLS settings (if any); nodelay is set on every accepted connection here, since tonic
/// skips its own `tcp_nodelay` for a custom incoming stream.
pub(crate) async fn serve(
    mut server: Server,
    listener: TcpListener,
    registry: Registry,
    mut stop: watch::Receiver<bool>,
) {
    let svc = ParticipantService {
        registry,
        stopping: stop.clone(),
    };
    let res = server
        .add_service(ParticipantServer::new(svc.clone()))
        .add_service(ParticipantExchangeServer::new(svc))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await;
    if let Err(e) = res {
        warn!(error = %e, "participant server stopped with an error");
    }
}

#[derive(Clone)]
struct ParticipantService {
    registry: Registry,
    /// Turns true when the server stops: open Exchange streams then end.
    stopping: watch::Receiver<bool>,
}

impl ParticipantService {
    /// The resource a branch id names, or a status saying why there is none.
    fn route(&self, tx_id: &str, branch_id: &str) -> Result<Arc<dyn Resource>, Status> {
        if tx_id.is_empty() || tx_id.len() > 64 {
            return Err(Status::invalid_argument("tx_id must be 1-64 characters"));
        }
        let name = branch_id.split_once(':').map(|(_, r)| r).ok_or_else(|| {
            Status::invalid_argument(format!(
                "branch_id {branch_id:?} is not <service>:<resource>"
            ))
        })?;
        let reg = self
            .registry
            .read()
            .map_err(|_| Status::internal("registry lock poisoned"))?;
        reg.get(name).cloned().ok_or_else(|| {
            Status::not_found(format!("no resource named {name:?} is registered here"))
        })
    }
}

impl ParticipantService {
    async fn prepare(&self, req: pb::PrepareRequest) -> Result<pb::PrepareResponse, Status> {
        let span = info_span!("prepare", tx_id = %req.tx_id, branch_id = %req.branch_id);
        let (vote, reason) = match self.route(&req.tx_id, &req.branch_id) {
            Ok(r) => match r.prepare(&req.tx_id, &req.branch_id).instrument(span).await {
                Vote::Yes => (pb::Vote::Yes, String::new()),
                Vote::ReadOnly => (pb::Vote::ReadOnly, String::new()),
                Vote::No(reason) => (pb::Vote::No, reason),
            },
            // Nothing here can have prepared this branch: a safe "no".
            Err(s) => (pb::Vote::No, s.message().to_string()),
        };
        if vote == pb::Vote::Yes {
            crash_point("participant::after_prepare_before_reply");
        }
        Ok(pb::PrepareResponse {
            vote: vote as i32,
            reason,
        })
    }

    async fn commit(
        &self,
        req: pb::CommitBranchRequest,
    ) -> Result<pb::CommitBranchResponse, Status> {
        let span = info_span!("commit", tx_id = %req.tx_id, branch_id = %req.branch_id, one_phase = req.one_phase);
        let resource = self.route(&req.tx_id, &req.branch_id)?;
        crash_point("participant::before_commit");
        if req.one_phase {
            return match resource
                .commit_one_phase(&req.tx_id, &req.branch_id)
                .instrument(span)
                .await
            {
                Ok(OnePhase::Committed) => {
                    crash_point("participant::after_commit_before_ack");
                    Ok(pb::CommitBranchResponse {
                        committed: true,
                        reason: String::new(),
                    })
                }
                Ok(OnePhase::Refused(reason)) => Ok(pb::CommitBranchResponse {
                    committed: false,
                    reason,
                }),
                Err(e) => Err(Status::unavailable(e.0)),
            };
        }
        match resource
            .commit(&req.tx_id, &req.branch_id)
            .instrument(span)
            .await
        {
            Ok(()) => {
                crash_point("participant::after_commit_before_ack");
                Ok(pb::CommitBranchResponse {
                    committed: true,
                    reason: String::new(),
                })
            }
            Err(e) => Err(Status::unavailable(e.0)),
        }
    }

    async fn abort(&self, req: pb::AbortBranchRequest) -> Result<pb::AbortBranchResponse, Status> {
        let span = info_span!("abort", tx_id = %req.tx_id, branch_id = %req.branch_id);
        let resource = match self.route(&req.tx_id, &req.branch_id) {
            Ok(r) => r,
            // No resource of that name is registered here *now*. That does not prove it
            // never held the branch: after a restart the server answers before the
            // application registered its resources again, and the branch may have been
            // prepared, or committed in one phase, before the restart. So nothing is
            // undone and nothing is claimed: the abort fails (UNAVAILABLE) and the
            // coordinator asks again, getting the resource's own answer once it is
            // registered.
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(Status::unavailable(format!(
                    "{}; cannot tell whether branch {} of transaction {} committed, ask again \
                     once it is registered",
                    s.message(),
                    req.branch_id,
                    req.tx_id
                )))
            }
            Err(s) => return Err(s),
        };
        let result = match resource
            .abort(&req.tx_id, &req.branch_id)
            .instrument(span)
            .await
        {
            Ok(AbortOutcome::Aborted) => pb::AbortResult::Aborted,
            Ok(AbortOutcome::AlreadyCommitted) => pb::AbortResult::AlreadyCommitted,
            Err(e) => return Err(Status::unavailable(e.0)),
        };
        Ok(pb::AbortBranchResponse {
            result: result as i32,
        })
    }
}

/// The answer of a unary call.
type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Participant for ParticipantService {
    async fn prepare(&self, req: Request<pb::PrepareRequest>) -> Reply<pb::PrepareResponse> {
        Ok(Response::new(
            ParticipantService::prepare(self, req.into_inner()).await?,
        ))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitBranchRequest>,
    ) -> Reply<pb::CommitBranchResponse> {
        Ok(Response::new(
            ParticipantService::commit(self, req.into_inner()).await?,
        ))
    }

    async fn abort(&self, req: Request<pb::AbortBranchRequest>) -> Reply<pb::AbortBranchResponse> {
        Ok(Response::new(
            ParticipantService::abort(self, req.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl ParticipantExchange for ParticipantService {
    type ExchangeStream = mux::OutboundStream<Result<pb::ExchangeResponse, Status>>;

    async fn exchange(
        &self,
        request: Request<tonic::Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let mut stopping = self.stopping.clone();
        Ok(Response::new(mux::serve_exchange(
            self.clone(),
            request.into_inner(),
            async move {
                let _ = stopping.wait_for(|s| *s).await;
            },
        )))
    }
}
