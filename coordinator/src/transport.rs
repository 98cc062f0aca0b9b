//! How the coordinator talks to participants: the [`Transport`] trait and its gRPC
//! implementation.
//!
//! The runtime only needs three calls (prepare, commit, abort), each answering with the
//! engine's own types, so tests and simulations can substitute an in-process transport.
//! [`GrpcTransport`] keeps one lazily connected tonic channel per endpoint (HTTP/2
//! multiplexes every transaction's messages over it) and bounds every call by a timeout.
//! With [`GrpcTransport::with_tls`] every participant is dialed over (mutual) TLS.
//!
//! Calls go over the participant's batched stream ([`crate::exchange`]) when it serves
//! one, and as unary calls otherwise (or always, with [`GrpcTransport::unary_only`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use twopc_proto::mux::CallError;
use twopc_proto::v1 as pb;
use twopc_proto::v1::participant_call::Call;
use twopc_proto::v1::participant_client::ParticipantClient;
use twopc_proto::v1::participant_result::Result as CallResult;

use crate::engine::{AbortAck, CommitAck, RpcResult, Vote};
use crate::exchange::Exchanges;
use crate::types::TxId;

/// Sends protocol messages to participants. Every call is one attempt: retries are the
/// engine's business. `Err` carries a human-readable transport error or timeout.
pub trait Transport: Send + Sync + 'static {
    /// Phase one.
    fn prepare(
        &self,
        endpoint: &str,
        tx: TxId,
        branch_id: &str,
    ) -> impl Future<Output = RpcResult<Vote>> + Send;
    /// Phase two: commit (or the single phase, with `one_phase`).
    fn commit(
        &self,
        endpoint: &str,
        tx: TxId,
        branch_id: &str,
        one_phase: bool,
    ) -> impl Future<Output = RpcResult<CommitAck>> + Send;
    /// Phase two: abort (also how a restarted coordinator settles a one-phase commit: the
    /// answer says whether the branch had already committed).
    fn abort(
        &self,
        endpoint: &str,
        tx: TxId,
        branch_id: &str,
    ) -> impl Future<Output = RpcResult<AbortAck>> + Send;
}

/// Timeouts of [`GrpcTransport`].
#[derive(Clone, Copy, Debug)]
pub struct GrpcTransportOptions {
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on one call, connection included.
    pub rpc_timeout: Duration,
}

/// [`Transport`] over tonic, one cached channel per endpoint.
#[derive(Clone)]
pub struct GrpcTransport {
    opts: GrpcTransportOptions,
    /// Channels by endpoint. A tonic `Channel` is cheap to clone and reconnects by itself,
    /// so one per participant is enough for any number of concurrent transactions.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// TLS towards participants (`--participant-ca`): when set, every endpoint is dialed
    /// over TLS, `http://` ones as `https://`, so an enlisted plaintext URL cannot turn
    /// the connection into plaintext.
    tls: Option<ClientTlsConfig>,
    /// Batched streams by endpoint; `None` with [`GrpcTransport::unary_only`].
    exchanges: Option<Exchanges>,
}

impl GrpcTransport {
    /// A transport with the given timeouts.
    pub fn new(opts: GrpcTransportOptions) -> Self {
        GrpcTransport {
            opts,
            channels: Arc::new(Mutex::new(HashMap::new())),
            tls: None,
            exchanges: Some(Exchanges::default()),
        }
    }

    /// Never uses the batched stream: one unary call per message (for comparison, and for
    /// networks whose proxies cut long-lived streams).
    pub fn unary_only(mut self) -> Self {
        self.exchanges = None;
        self
    }

    /// Dials every participant over TLS with `tls` (trust roots, and the client identity
    /// for participants that require one).
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    fn channel(&self, endpoint: &str) -> RpcResult<Channel> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| "transport lock poisoned".to_string())?;
        if let Some(ch) = channels.get(endpoint) {
            return Ok(ch.clone());
        }
        let mut ep = match (&self.tls, endpoint.strip_prefix("http://")) {
            (Some(_), Some(rest)) => Endpoint::from_shared(format!("https://{rest}")),
            _ => Endpoint::from_shared(endpoint.to_string()),
        }
        .map_err(|e| format!("bad participant endpoint {endpoint:?}: {e}"))?;
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS towards {endpoint:?}: {e}"))?;
        }
        let ch = ep
            .connect_timeout(self.opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(endpoint.to_string(), ch.clone());
        Ok(ch)
    }

    /// One call: over the batched stream as `streamed` (its result taken apart by
    /// `unpack`) when the participant serves one, else as the unary call `f`.
    async fn call<T, F, Fut>(
        &self,
        endpoint: &str,
        streamed: Call,
        unpack: fn(CallResult) -> Option<T>,
        f: F,
    ) -> RpcResult<T>
    where
        F: FnOnce(ParticipantClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let channel = self.channel(endpoint)?;
        if let Some(exchanges) = &self.exchanges {
            let timeout = self.opts.rpc_timeout;
            match exchanges.call(endpoint, &channel, streamed, timeout).await {
                Ok(CallResult::Error(e)) => {
                    return Err(format!(
                        "{endpoint}: {}: {}",
                        tonic::Code::from(e.code),
                        e.message
                    ))
                }
                Ok(r) => {
                    return unpack(r).ok_or_else(|| {
                        format!("{endpoint}: participant answered with another call's result")
                    })
                }
                Err(CallError::Unsupported) => {}
                Err(CallError::Timeout) => {
                    return Err(format!(
                        "{endpoint}: no answer within {} ms",
                        timeout.as_millis()
                    ))
                }
                Err(e @ (CallError::Transport(_) | CallError::Refused(_))) => {
                    return Err(format!("{endpoint}: {e}"))
                }
            }
        }
        let client = ParticipantClient::new(channel);
        match tokio::time::timeout(self.opts.rpc_timeout, f(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(format!(
                "{endpoint}: {}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!(
                "{endpoint}: no answer within {} ms",
                self.opts.rpc_timeout.as_millis()
            )),
        }
    }
}

impl Transport for GrpcTransport {
    async fn prepare(&self, endpoint: &str, tx: TxId, branch_id: &str) -> RpcResult<Vote> {
        let req = pb::PrepareRequest {
            tx_id: tx.to_string(),
            branch_id: branch_id.to_string(),
        };
        let resp = self
            .call(
                endpoint,
                Call::Prepare(req.clone()),
                |r| match r {
                    CallResult::Prepare(v) => Some(v),
                    _ => None,
                },
                |mut c| async move { c.prepare(req).await },
            )
            .await?;
        match pb::Vote::try_from(resp.vote) {
            Ok(pb::Vote::Yes) => Ok(Vote::Yes),
            Ok(pb::Vote::ReadOnly) => Ok(Vote::ReadOnly),
            Ok(pb::Vote::No) => Ok(Vote::No(resp.reason)),
            // A participant that does not say yes has not promised anything: treat as no.
            _ => Ok(Vote::No(format!(
                "participant sent an invalid vote ({})",
                resp.vote
            ))),
        }
    }

    async fn commit(
        &self,
        endpoint: &str,
        tx: TxId,
        branch_id: &str,
        one_phase: bool,
    ) -> RpcResult<CommitAck> {
        let req = pb::CommitBranchRequest {
            tx_id: tx.to_string(),
            branch_id: branch_id.to_string(),
            one_phase,
        };
        let resp = self
            .call(
                endpoint,
                Call::Commit(req.clone()),
                |r| match r {
                    CallResult::Commit(v) => Some(v),
                    _ => None,
                },
                |mut c| async move { c.commit(req).await },
            )
            .await?;
        if resp.committed {
            Ok(CommitAck::Committed)
        } else if one_phase {
            Ok(CommitAck::Refused(resp.reason))
        } else {
            // After a yes vote a participant may not refuse; treat it as "not yet" and retry.
            Err(format!(
                "{endpoint}: participant did not commit a prepared branch: {}",
                resp.reason
            ))
        }
    }

    async fn abort(&self, endpoint: &str, tx: TxId, branch_id: &str) -> RpcResult<AbortAck> {
        let req = pb::AbortBranchRequest {
            tx_id: tx.to_string(),
            branch_id: branch_id.to_string(),
        };
        self.call(
            endpoint,
            Call::Abort(req.clone()),
            |r| match r {
                CallResult::Abort(v) => Some(v),
                _ => None,
            },
            |mut c| async move { c.abort(req).await },
        )
        .await
        .and_then(|resp| abort_ack(endpoint, branch_id, resp.result))
    }
}

/// The engine's reading of `AbortBranchResponse.result` from the participant at
/// `endpoint`: an answer without a result (ABORT_RESULT_UNSPECIFIED, or a value that is
/// not an AbortResult) is a failed delivery, asked again like any failed abort.
pub fn abort_ack(endpoint: &str, branch_id: &str, result: i32) -> RpcResult<AbortAck> {
    match pb::AbortResult::try_from(result) {
        Ok(pb::AbortResult::Aborted) => Ok(AbortAck::Aborted),
        Ok(pb::AbortResult::AlreadyCommitted) => Ok(AbortAck::AlreadyCommitted),
        Ok(pb::AbortResult::Unspecified) => Err(format!(
            "{endpoint}: participant answered the abort of branch {branch_id} without a \
             result (AbortBranchResponse.result is ABORT_RESULT_UNSPECIFIED)"
        )),
        Err(_) => Err(format!(
            "{endpoint}: participant answered the abort of branch {branch_id} with result \
             {result}, which is not an AbortResult (AbortBranchResponse.result)"
        )),
    }
}
