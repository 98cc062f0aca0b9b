//! A participant for tests and benchmarks that drive the coordinator without the SDK: a
//! real gRPC server answering the unary `Participant` service and, when asked, the batched
//! `ParticipantExchange` stream, with the answers of a [`Behaviour`] (by default: vote
//! yes, commit, abort). A behaviour sees every call and how it arrived, so a test can
//! count calls or check, on each commit, that the coordinator's decision is durable; an
//! answer may also take its time (wait for the test, ask another server).
//!
//! A participant can be stopped gracefully ([`TestParticipant::stop`]), or crashed
//! ([`TestParticipant::crash`], or from a behaviour through a [`CrashHandle`]): the
//! listener and every open connection are dropped at once, like a killed process's; it
//! then serves again on the same port after [`TestParticipant::restart`], with the same
//! behaviour (whose state survives, as a durable participant's would).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};
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

/// The answer of one of [`Behaviour`]'s `answer_*` methods: a future of its own.
pub type Answer<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send>>;

/// What a [`TestParticipant`] answers. Every method has the answer of a participant
/// that votes yes, commits and aborts; override what the test needs.
///
/// The server calls the `answer_*` methods, which by default answer at once with
/// `prepare`, `commit` and `abort`; a behaviour whose answers must wait (for a release by
/// the test, a delay, another server) overrides those instead.
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

    /// The answer to a prepare, when it may take its time: [`Behaviour::prepare`]'s.
    fn answer_prepare(self: Arc<Self>, req: pb::PrepareRequest) -> Answer<pb::PrepareResponse> {
        Box::pin(async move { self.prepare(&req) })
    }

    /// The answer to a commit, when it may take its time: [`Behaviour::commit`]'s.
    fn answer_commit(
        self: Arc<Self>,
        req: pb::CommitBranchRequest,
    ) -> Answer<pb::CommitBranchResponse> {
        Box::pin(async move { self.commit(&req) })
    }

    /// The answer to an abort, when it may take its time: [`Behaviour::abort`]'s.
    fn answer_abort(
        self: Arc<Self>,
        req: pb::AbortBranchRequest,
    ) -> Answer<pb::AbortBranchResponse> {
        Box::pin(async move { self.abort(&req) })
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
    /// Cancelled when the server stops or crashes, which ends the `Exchange` streams.
    stopping: CancellationToken,
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

/// The answer of a unary call.
type Reply<T> = Result<Response<T>, Status>;

impl<B: Behaviour> Served<B> {
    /// Answers a unary call with the behaviour's `answer`, once its arrival is noted.
    async fn unary<Req, Resp>(
        &self,
        req: Request<Req>,
        answer: fn(Arc<B>, Req) -> Answer<Resp>,
    ) -> Reply<Resp> {
        self.behaviour.arrived(self.via);
        answer(self.behaviour.clone(), req.into_inner())
            .await
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl<B: Behaviour> Participant for Served<B> {
    async fn prepare(&self, req: Request<pb::PrepareRequest>) -> Reply<pb::PrepareResponse> {
        self.unary(req, B::answer_prepare).await
    }

    async fn commit(
        &self,
        req: Request<pb::CommitBranchRequest>,
    ) -> Reply<pb::CommitBranchResponse> {
        self.unary(req, B::answer_commit).await
    }

    async fn abort(&self, req: Request<pb::AbortBranchRequest>) -> Reply<pb::AbortBranchResponse> {
        self.unary(req, B::answer_abort).await
    }
}

#[tonic::async_trait]
impl<B: Behaviour> ParticipantExchange for Served<B> {
    type ExchangeStream = mux::OutboundStream<Result<pb::ExchangeResponse, Status>>;

    async fn exchange(
        &self,
        request: Request<tonic::Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let stopping = self.stopping.clone().cancelled_owned();
        let streamed = Served {
            via: Via::Stream,
            ..self.clone()
        };
        Ok(Response::new(mux::serve_exchange(
            streamed,
            request.into_inner(),
            stopping,
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

/// One life of the server, from a start to its stop or crash.
#[derive(Clone, Default)]
struct Life {
    /// Cancelled by a graceful stop and by a crash: no new connection, streams end.
    stopping: CancellationToken,
    /// Cancelled by a crash only: the listener and every connection are dropped.
    crashed: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Crashes a [`TestParticipant`]'s current server from anywhere (a behaviour that
/// crashes on a given call holds one).
#[derive(Clone)]
pub struct CrashHandle(Arc<Mutex<Life>>);

impl CrashHandle {
    /// Drops the listener and every open connection at once.
    pub fn crash(&self) {
        let life = lock(&self.0).clone();
        life.crashed.cancel();
        life.stopping.cancel();
    }

    /// Whether the current server is down (crashed or stopped).
    pub fn is_down(&self) -> bool {
        lock(&self.0).stopping.is_cancelled()
    }
}

type Serve = Box<dyn Fn(TcpListener, Life) -> JoinHandle<()> + Send + Sync>;

/// A running test participant on `127.0.0.1` (a port of its own). Stopped by
/// [`TestParticipant::stop`], or when dropped.
pub struct TestParticipant {
    /// Its address, as `http://127.0.0.1:PORT`: the endpoint to enlist branches with.
    pub endpoint: String,
    /// Its address (the same after a restart).
    pub addr: SocketAddr,
    life: Arc<Mutex<Life>>,
    serve: Serve,
    server: Option<JoinHandle<()>>,
}

impl TestParticipant {
    /// Starts a participant answering with `behaviour` on a free port.
    pub async fn start<B: Behaviour>(
        behaviour: Arc<B>,
        services: Services,
    ) -> Result<TestParticipant, TestkitError> {
        let listener = bind_reuse(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| TestkitError::io("bind a test participant", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("read a test participant's address", e))?;
        let serve: Serve = Box::new(move |listener, life: Life| {
            let served = Served {
                behaviour: behaviour.clone(),
                via: Via::Unary,
                stopping: life.stopping.clone(),
            };
            let exchange = (services == Services::UnaryAndStream)
                .then(|| ParticipantExchangeServer::new(served.clone()));
            let incoming = Incoming {
                listener: Some(listener),
                killed: Box::pin(life.crashed.clone().cancelled_owned()),
                token: life.crashed,
            };
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(ParticipantServer::new(served))
                    .add_optional_service(exchange)
                    .serve_with_incoming_shutdown(incoming, life.stopping.cancelled_owned())
                    .await;
            })
        });
        let life = Life::default();
        let server = serve(listener, life.clone());
        Ok(TestParticipant {
            endpoint: format!("http://{addr}"),
            addr,
            life: Arc::new(Mutex::new(life)),
            serve,
            server: Some(server),
        })
    }

    /// A handle that crashes the current server (see [`TestParticipant::crash`]).
    pub fn crash_handle(&self) -> CrashHandle {
        CrashHandle(self.life.clone())
    }

    /// Whether the server is down (crashed or stopped).
    pub fn is_down(&self) -> bool {
        self.crash_handle().is_down()
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(mut self) {
        lock(&self.life).stopping.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// Crashes the server: the listener and every open connection are dropped at once.
    pub async fn crash(&mut self) {
        self.crash_handle().crash();
        self.reap().await;
    }

    /// Serves again on the same port (after a crash; a running server is crashed first).
    ///
    /// # Panics
    /// When the port cannot be bound again within 5 s.
    pub async fn restart(&mut self) {
        self.crash().await;
        let end = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind_reuse(self.addr) {
                Ok(l) => break l,
                Err(_) if Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("cannot bind test participant {} again: {e}", self.addr),
            }
        };
        let life = Life::default();
        *lock(&self.life) = life.clone();
        self.server = Some((self.serve)(listener, life));
    }

    /// Waits (up to 3 s, then aborts it) for the server task to end.
    async fn reap(&mut self) {
        if let Some(handle) = self.server.take() {
            let abort = handle.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), handle)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        lock(&self.life).stopping.cancel();
    }
}

/// A listener with SO_REUSEADDR, so that a restart can bind the port again at once.
fn bind_reuse(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A connection that can be cut from outside: once the token is cancelled every read and
/// write fails (and pending ones wake up), so the server drops it like a crashed process.
struct KillableStream {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

fn killed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "test participant crashed")
}

impl KillableStream {
    fn dead(&mut self, cx: &mut Context<'_>) -> bool {
        self.killed.as_mut().poll(cx).is_ready()
    }

    /// `io` on the connection, unless it was cut.
    fn alive<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        io: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        io(Pin::new(&mut this.inner), cx)
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.alive(cx, |s, cx| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.alive(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.alive(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.alive(cx, |s, cx| s.poll_shutdown(cx))
    }
}

impl Connected for KillableStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections until the token is cancelled; then drops the listener at once.
struct Incoming {
    listener: Option<TcpListener>,
    token: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for Incoming {
    type Item = io::Result<KillableStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.killed.as_mut().poll(cx).is_ready() {
            this.listener = None;
            return Poll::Ready(None);
        }
        let Some(listener) = this.listener.as_ref() else {
            return Poll::Ready(None);
        };
        match listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => {
                let _ = stream.set_nodelay(true);
                Poll::Ready(Some(Ok(KillableStream {
                    inner: stream,
                    killed: Box::pin(this.token.clone().cancelled_owned()),
                })))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}
