//! A participant for tests and benchmarks that drive the coordinator without the SDK: a
//! real gRPC server answering the unary `Participant` service and, when asked, the batched
//! `ParticipantExchange` stream, with the answers of a [`Behaviour`] (by default: vote
//! yes, commit, abort). A behaviour sees every call and how it arrived, so a test can
//! count calls or check, on each commit, that the coordinator's decision is durable.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::participant_exchange_server::{
    ParticipantExchange, ParticipantExchangeServer,
};
use twopc_proto::v1::participant_server::{Participant, ParticipantServer};

use crate::TestkitError;

/// How a call reached the participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A unary `Participant` call.
    Unary,
    /// A call inside an `Exchange` stream.
    Stream,
}

/// What a [`TestParticipant`] answers. Every method has the answer of a participant
/// that votes yes, commits and aborts; override what the test needs.
pub trait Behaviour: Send + Sync + 'static {
    /// Called first for every call, with how it arrived.
    fn arrived(&self, _via: Via) {}

    /// The answer to a prepare.
    fn prepare(&self, _req: &pb::PrepareRequest) -> Result<pb::PrepareResponse, Status> {
        Ok(pb::PrepareResponse {
            vote: pb::Vote::Yes as i32,
            reason: String::new(),
        })
    }

    /// The answer to a commit.
    fn commit(&self, _req: &pb::CommitBranchRequest) -> Result<pb::CommitBranchResponse, Status> {
        Ok(pb::CommitBranchResponse {
            committed: true,
            reason: String::new(),
        })
    }

    /// The answer to an abort.
    fn abort(&self, _req: &pb::AbortBranchRequest) -> Result<pb::AbortBranchResponse, Status> {
        Ok(pb::AbortBranchResponse {
            result: pb::AbortResult::Aborted as i32,
        })
    }
}

/// Votes yes, commits, aborts: the participant of a benchmark or of a test about the
/// coordinator alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysYes;

impl Behaviour for AlwaysYes {}

/// The gRPC face of a behaviour: `via` says which service a call came through.
struct Served<B> {
    behaviour: Arc<B>,
    via: Via,
    /// Becomes `true` when the server stops, which ends the `Exchange` streams.
    stopping: watch::Receiver<bool>,
}

impl<B> Clone for Served<B> {
    fn clone(&self) -> Self {
        Served {
            behaviour: self.behaviour.clone(),
            via: self.via,
            stopping: self.stopping.clone(),
        }
    }
}

#[tonic::async_trait]
impl<B: Behaviour> Participant for Served<B> {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        self.behaviour.arrived(self.via);
        self.behaviour.prepare(request.get_ref()).map(Response::new)
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        self.behaviour.arrived(self.via);
        self.behaviour.commit(request.get_ref()).map(Response::new)
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        self.behaviour.arrived(self.via);
        self.behaviour.abort(request.get_ref()).map(Response::new)
    }
}

#[tonic::async_trait]
impl<B: Behaviour> ParticipantExchange for Served<B> {
    type ExchangeStream = mux::OutboundStream<Result<pb::ExchangeResponse, Status>>;

    async fn exchange(
        &self,
        request: Request<tonic::Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let mut stopping = self.stopping.clone();
        let streamed = Served {
            via: Via::Stream,
            ..self.clone()
        };
        Ok(Response::new(mux::serve_exchange(
            streamed,
            request.into_inner(),
            async move {
                let _ = stopping.wait_for(|s| *s).await;
            },
        )))
    }
}

/// Which services a [`TestParticipant`] offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Services {
    /// The unary `Participant` service only (the coordinator falls back to it).
    UnaryOnly,
    /// The unary service and the batched `ParticipantExchange` stream.
    UnaryAndStream,
}

/// A running test participant on `127.0.0.1` (a port of its own). Stopped by
/// [`TestParticipant::stop`], or when dropped.
pub struct TestParticipant {
    /// Its address, as `http://127.0.0.1:PORT`: the endpoint to enlist branches with.
    pub endpoint: String,
    /// Its address.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestParticipant {
    /// Starts a participant answering with `behaviour` on a free port.
    pub async fn start<B: Behaviour>(
        behaviour: Arc<B>,
        services: Services,
    ) -> Result<TestParticipant, TestkitError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| TestkitError::io("bind a test participant", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("read a test participant's address", e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop_streams, stopping) = watch::channel(false);
        let served = Served {
            behaviour,
            via: Via::Unary,
            stopping,
        };
        let exchange = (services == Services::UnaryAndStream)
            .then(|| ParticipantExchangeServer::new(served.clone()));
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(ParticipantServer::new(served))
                .add_optional_service(exchange)
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move {
                        let _ = stopped.await;
                        let _ = stop_streams.send(true);
                    },
                )
                .await;
        });
        Ok(TestParticipant {
            endpoint: format!("http://{addr}"),
            addr,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
