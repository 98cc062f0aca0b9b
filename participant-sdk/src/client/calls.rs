//! The client API calls (Begin, BeginLocal, Enlist, Commit, ReportLocalCommits, Abort,
//! ReleaseUnused) of one handle: over the shared
//! `Pipeline` stream, or unary against a coordinator that does not serve it, each bounded
//! by the handle's `call_timeout` (plus the phase-two wait a Commit asks for).

use std::time::Duration;

use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

use super::Inner;
use crate::channel::CoordinatorChannel;

/// The client API calls: over the pipeline, or unary when the coordinator does not serve
/// it.
impl Inner {
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

    pub(super) async fn begin_local(
        &self,
        req: pb::BeginLocalRequest,
    ) -> std::result::Result<pb::BeginLocalResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.begin_local(r),
            |mut c, r| async move { c.begin_local(r).await },
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

    pub(super) async fn report_local_commits(
        &self,
        req: pb::ReportLocalCommitsRequest,
    ) -> std::result::Result<pb::ReportLocalCommitsResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.report_local_commits(r),
            |mut c, r| async move { c.report_local_commits(r).await },
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

    pub(super) async fn release_unused(
        &self,
        req: pb::ReleaseUnusedRequest,
    ) -> std::result::Result<pb::ReleaseUnusedResponse, tonic::Status> {
        self.call(
            req,
            Duration::ZERO,
            |p, r| p.release_unused(r),
            |mut c, r| async move { c.release_unused(r).await },
        )
        .await
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
