//! The client API calls (Begin, BeginLocal, Enlist, Commit, ReportLocalCommits, Abort,
//! ReleaseUnused, Barrier) of one handle: over the shared
//! `Pipeline` stream, or unary against a coordinator that does not serve it, each bounded
//! by the handle's `call_timeout` (plus the phase-two wait a Commit asks for). [`Calls`]
//! is also the [`LocalCoordinator`] the local-commit driver calls.

use std::time::Duration;

use tracing::debug;
use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use super::local::{BarrierAnswer, BeginLocalAnswer, LocalCoordinator, ReportAnswer};
use crate::channel::CoordinatorChannel;
use crate::error::Error;

/// The coordinator as one handle calls it.
pub(super) struct Calls {
    /// Client of the coordinator's API (stamps the bearer token, if any).
    pub(super) coordinator: CoordinatorClient<CoordinatorChannel>,
    /// The coordinator's URL as given to the builder, for messages that name it.
    pub(super) coordinator_url: String,
    /// The longest a client call waits (the builder's `call_timeout`).
    pub(super) call_timeout: Duration,
    /// Begin / Enlist / Commit / Abort of every transaction of this handle over one
    /// `Pipeline` stream (unary calls against a coordinator that does not serve it).
    pub(super) pipeline: mux::Pipeline,
}

/// The client API calls: over the pipeline, or unary when the coordinator does not serve
/// it.
impl Calls {
    /// One call: over the pipeline, or as the unary call when the coordinator does not
    /// serve it; at most `call_timeout` plus `wait` (the phase-two wait a Commit asks
    /// for), then `DEADLINE_EXCEEDED`.
    pub(super) async fn call<'a, Req, Resp, PF, UF>(
        &'a self,
        req: Req,
        wait: Duration,
        piped: impl FnOnce(&'a mux::Pipeline, Req) -> PF,
        unary: impl FnOnce(CoordinatorClient<CoordinatorChannel>, Req) -> UF,
    ) -> std::result::Result<Resp, tonic::Status>
    where
        Req: Clone,
        PF: std::future::Future<Output = std::result::Result<Resp, mux::PipelineError>>,
        UF: std::future::Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let within = self.call_timeout + wait;
        let call = async {
            match piped(&self.pipeline, req.clone()).await {
                Err(mux::PipelineError::Unsupported) => {
                    Ok(unary(self.coordinator.clone(), req).await?.into_inner())
                }
                other => Ok(other?),
            }
        };
        match tokio::time::timeout(within, call).await {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from the coordinator at {} within {} ms (call_timeout {} ms{})",
                self.coordinator_url,
                within.as_millis(),
                self.call_timeout.as_millis(),
                if wait.is_zero() {
                    String::new()
                } else {
                    format!(" + commit wait {} ms", wait.as_millis())
                }
            ))),
        }
    }

    pub(super) async fn begin(
        &self,
        req: pb::BeginRequest,
    ) -> std::result::Result<pb::BeginResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.begin(r),
            |mut c, r| async move { c.begin(r).await },
        )
        .await
    }

    pub(super) async fn enlist(
        &self,
        req: pb::EnlistRequest,
    ) -> std::result::Result<pb::EnlistResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.enlist(r),
            |mut c, r| async move { c.enlist(r).await },
        )
        .await
    }

    pub(super) async fn commit(
        &self,
        req: pb::CommitRequest,
    ) -> std::result::Result<pb::CommitResponse, tonic::Status> {
        let wait = Duration::from_millis(req.phase_two_wait_ms.unwrap_or(0));
        self.call(
            req,
            wait,
            |p, r| p.commit(r),
            |mut c, r| async move { c.commit(r).await },
        )
        .await
    }

    pub(super) async fn abort(
        &self,
        req: pb::AbortRequest,
    ) -> std::result::Result<pb::AbortResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.abort(r),
            |mut c, r| async move { c.abort(r).await },
        )
        .await
    }
}

impl LocalCoordinator for Calls {
    async fn begin_local(&self, branch: pb::Branch, count: u32) -> BeginLocalAnswer<Error> {
        let req = pb::BeginLocalRequest {
            branch: Some(branch),
            timeout_ms: 0,
            count,
        };
        let answer = self
            .call(
                req,
                Duration::ZERO,
                |p, r| p.begin_local(r),
                |mut c, r| async move { c.begin_local(r).await },
            )
            .await;
        match answer {
            Ok(resp) => {
                let mut ids = resp.tx_ids.into_iter();
                match ids.next() {
                    Some(first) => BeginLocalAnswer::Begun {
                        first,
                        rest: ids.collect(),
                        epoch: resp.epoch,
                        timeout_ms: resp.timeout_ms,
                    },
                    None => BeginLocalAnswer::Failed(
                        tonic::Status::internal("BeginLocal answered without a transaction id")
                            .into(),
                    ),
                }
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                debug!(
                    error = s.message(),
                    "the coordinator does not begin local transactions"
                );
                BeginLocalAnswer::Off
            }
            Err(s) => BeginLocalAnswer::Failed(s.into()),
        }
    }

    async fn barrier(&self) -> BarrierAnswer {
        match self
            .coordinator
            .clone()
            .barrier(pb::BarrierRequest {})
            .await
        {
            Ok(resp) => Ok(resp.into_inner().epoch),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        }
    }

    async fn report(&self, tx_ids: Vec<String>) -> ReportAnswer {
        let req = pb::ReportLocalCommitsRequest {
            tx_ids,
            answer_before_durable: true,
        };
        let answer = self
            .call(
                req,
                Duration::ZERO,
                |p, r| p.report_local_commits(r),
                |mut c, r| async move { c.report_local_commits(r).await },
            )
            .await;
        match answer {
            Ok(resp) => ReportAnswer::Recorded(resp.epoch),
            Err(s) => ReportAnswer::Failed {
                retryable: retryable(&s),
                error: format!("{:?}: {}", s.code(), s.message()),
            },
        }
    }

    async fn release(&self, tx_id: String) -> Result<(), String> {
        let req = pb::ReleaseUnusedRequest { tx_id };
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.release_unused(r),
            |mut c, r| async move { c.release_unused(r).await },
        )
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
    }

    async fn abort(&self, tx_id: String, reason: String) -> Result<(), String> {
        Calls::abort(self, pb::AbortRequest { tx_id, reason })
            .await
            .map(|_| ())
            .map_err(|s| s.to_string())
    }
}

/// Whether a failed call may succeed if tried again.
pub(super) fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
    )
}
