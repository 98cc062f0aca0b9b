//! Batched call streams: many independent calls over one long-lived gRPC stream.
//!
//! The protocol's unary calls (Begin/Commit from services, Prepare/Commit/Abort from the
//! coordinator) each cost an HTTP/2 stream, headers and a frame per message; at thousands
//! of transactions a second on a small machine that per-call cost, not the disk, is the
//! limit. The `Pipeline` (client → coordinator) and `Exchange` (coordinator → participant)
//! streams carry the same calls, tagged with a `call_id`, packed several per frame.
//!
//! * [`Session`] is the calling side: [`Session::call`] sends one call and waits for its
//!   result; a writer task packs whatever is queued into one batch; a reader task hands
//!   results to their callers by id. A broken stream fails the calls in flight (the caller
//!   retries as it would after a failed unary call) and the next call opens a new stream.
//!   A peer that answers UNIMPLEMENTED gets [`CallError::Unsupported`]: the caller falls
//!   back to the unary calls.
//! * [`serve`] is the serving side: every call of every inbound batch runs as its own task
//!   (a slow call never holds up the others), at most [`MAX_IN_FLIGHT`] per stream, and
//!   results go back in batches as they complete.
//! * [`Pipeline`] is the client API (Begin / BeginLocal / Enlist / Commit /
//!   ReportLocalCommits / Abort / ReleaseUnused) over a [`Session`];
//!   [`serve_exchange`] serves a participant's stream through its unary handlers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::{Code, Status, Streaming};

use crate::v1 as pb;

/// Most calls one frame carries.
pub const MAX_BATCH: usize = 512;
/// Most calls one served stream runs at once; the reader waits for a slot beyond that.
pub const MAX_IN_FLIGHT: usize = 4096;

/// A batch message of a call stream: a list of items.
pub trait Batch: Send + 'static + Sized {
    /// One call or one result.
    type Item: Tagged;
    /// The items, in order.
    fn into_items(self) -> Vec<Self::Item>;
    /// A batch of these items.
    fn from_items(items: Vec<Self::Item>) -> Self;
}

/// A call or a result, carrying the id that matches them.
pub trait Tagged: Send + 'static {
    /// The call id.
    fn call_id(&self) -> u64;
    /// Sets the call id.
    fn set_call_id(&mut self, id: u64);
}

macro_rules! batch {
    ($batch:ty, $item:ty, $field:ident) => {
        impl Batch for $batch {
            type Item = $item;
            fn into_items(self) -> Vec<$item> {
                self.$field
            }
            fn from_items(items: Vec<$item>) -> Self {
                Self { $field: items }
            }
        }
        impl Tagged for $item {
            fn call_id(&self) -> u64 {
                self.call_id
            }
            fn set_call_id(&mut self, id: u64) {
                self.call_id = id;
            }
        }
    };
}

batch!(pb::ExchangeRequest, pb::ParticipantCall, calls);
batch!(pb::ExchangeResponse, pb::ParticipantResult, results);
batch!(pb::PipelineRequest, pb::ClientCall, calls);
batch!(pb::PipelineResponse, pb::ClientResult, results);

/// Why a call on a [`Session`] did not produce a result.
#[derive(Clone, Debug)]
pub enum CallError {
    /// The peer does not serve the stream (UNIMPLEMENTED): use the unary call.
    Unsupported,
    /// The stream could not be opened or broke before the result came; the call may or
    /// may not have reached the peer.
    Transport(String),
    /// The peer refused to open the stream with this status (UNAUTHENTICATED, say): the
    /// call did not reach it.
    Refused(Status),
    /// No result within the call's timeout; the call may or may not have reached the peer.
    Timeout,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unsupported => write!(f, "the peer does not serve batched streams"),
            CallError::Transport(m) => write!(f, "{m}"),
            CallError::Refused(s) => write!(f, "{}: {}", s.code(), s.message()),
            CallError::Timeout => write!(f, "no answer in time"),
        }
    }
}

type Reply<R> = oneshot::Sender<Result<R, CallError>>;
type OpenFuture<Resp> =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Streaming<Resp>>, Status>> + Send>>;
/// Opens the stream: given the outbound batches, starts the call and returns the inbound
/// batches (a closure over a tonic client, e.g. `move |s| client.exchange(s)`).
pub type Opener<Req, Resp> =
    Arc<dyn Fn(OutboundStream<Req>) -> OpenFuture<Resp> + Send + Sync + 'static>;
/// The outbound half handed to the opener.
pub type OutboundStream<Req> = tokio_stream::wrappers::ReceiverStream<Req>;

/// Calls of one stream awaiting their results; `closed` once the stream has ended.
struct Pending<R> {
    waiting: HashMap<u64, Reply<R>>,
    closed: bool,
}

/// One open stream: its queue and its calls awaiting results.
struct Live<Req: Batch, Resp: Batch> {
    queue: mpsc::UnboundedSender<Req::Item>,
    pending: Arc<Mutex<Pending<Resp::Item>>>,
}

/// How long a peer that answered UNIMPLEMENTED is taken at its word before the stream is
/// tried again (it may have been upgraded meanwhile).
pub const RECHECK_UNSUPPORTED: Duration = Duration::from_secs(60);

/// The calling side of a batched call stream, opened lazily and reopened after it breaks.
pub struct Session<Req: Batch, Resp: Batch> {
    open: Opener<Req, Resp>,
    live: Mutex<Option<Live<Req, Resp>>>,
    next_id: AtomicU64,
    /// When the peer last answered UNIMPLEMENTED.
    unsupported: Arc<Mutex<Option<Instant>>>,
}

impl<Req: Batch, Resp: Batch> Session<Req, Resp> {
    /// A session that opens its stream with `open` on the first call.
    pub fn new(open: Opener<Req, Resp>) -> Self {
        Session {
            open,
            live: Mutex::new(None),
            next_id: AtomicU64::new(1),
            unsupported: Arc::new(Mutex::new(None)),
        }
    }

    /// Sends `call` (its id is set here) and waits at most `timeout` for its result.
    pub async fn call(
        &self,
        mut call: Req::Item,
        timeout: Duration,
    ) -> Result<Resp::Item, CallError> {
        if self.known_unsupported() {
            return Err(CallError::Unsupported);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        call.set_call_id(id);
        let (tx, rx) = oneshot::channel();
        let pending = {
            let mut live = lock(&self.live);
            let reuse = matches!(&*live, Some(l) if !lock(&l.pending).closed);
            if !reuse {
                *live = Some(self.start());
            }
            let Some(l) = live.as_ref() else {
                return Err(CallError::Transport("no stream".into()));
            };
            {
                // Checked and inserted under the lock the closing task takes: a call is
                // either failed by it or goes to a new stream, never stranded.
                let mut p = lock(&l.pending);
                if p.closed {
                    return Err(self.closed_under_us());
                }
                p.waiting.insert(id, tx);
            }
            if l.queue.send(call).is_err() {
                lock(&l.pending).waiting.remove(&id);
                return Err(self.closed_under_us());
            }
            l.pending.clone()
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Transport("the stream closed".into())),
            Err(_) => {
                lock(&pending).waiting.remove(&id);
                Err(CallError::Timeout)
            }
        }
    }

    /// Whether the peer answered UNIMPLEMENTED recently (the caller uses unary calls).
    fn known_unsupported(&self) -> bool {
        matches!(*lock(&self.unsupported), Some(t) if t.elapsed() < RECHECK_UNSUPPORTED)
    }

    /// The error of a call whose stream ended between its checks and its send: the peer's
    /// UNIMPLEMENTED (set before the stream's task lets go of its queue) when that was
    /// why, so the caller falls back to a unary call instead of failing the message.
    fn closed_under_us(&self) -> CallError {
        if self.known_unsupported() {
            CallError::Unsupported
        } else {
            CallError::Transport("the stream is closed".into())
        }
    }

    /// Opens a new stream: a task that opens it, then writes batches and reads results.
    fn start(&self) -> Live<Req, Resp> {
        let (queue, mut queued) = mpsc::unbounded_channel::<Req::Item>();
        let pending = Arc::new(Mutex::new(Pending {
            waiting: HashMap::new(),
            closed: false,
        }));
        let open = self.open.clone();
        let p = pending.clone();
        let unsupported = self.unsupported.clone();
        tokio::spawn(async move {
            let (out_tx, out_rx) = mpsc::channel::<Req>(64);
            // The writer runs before the stream is open: the first batch goes out with it.
            let writer = tokio::spawn(async move {
                while let Some(first) = queued.recv().await {
                    // Let the tasks that are ready run first: under load they queue more
                    // calls, and the frame carries them all (no timer, no added wait when
                    // idle).
                    tokio::task::yield_now().await;
                    let mut items = vec![first];
                    while items.len() < MAX_BATCH {
                        match queued.try_recv() {
                            Ok(i) => items.push(i),
                            Err(_) => break,
                        }
                    }
                    if out_tx.send(Req::from_items(items)).await.is_err() {
                        break;
                    }
                }
            });
            let failure = match open(OutboundStream::new(out_rx)).await {
                Err(s) if s.code() == Code::Unimplemented => {
                    *lock(&unsupported) = Some(Instant::now());
                    CallError::Unsupported
                }
                // No stream: the connection is down or closing (hyper reports a closed
                // connection as CANCELLED). The calls are answered UNAVAILABLE.
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) =>
                {
                    CallError::Transport(format!("{}: {}", s.code(), s.message()))
                }
                Err(s) => CallError::Refused(s),
                Ok(resp) => {
                    *lock(&unsupported) = None;
                    let mut inbound = resp.into_inner();
                    loop {
                        match inbound.message().await {
                            Ok(Some(batch)) => {
                                let mut map = lock(&p);
                                for r in batch.into_items() {
                                    if let Some(reply) = map.waiting.remove(&r.call_id()) {
                                        let _ = reply.send(Ok(r));
                                    }
                                }
                            }
                            Ok(None) => {
                                break CallError::Transport("the peer ended the stream".into())
                            }
                            Err(s) => {
                                break CallError::Transport(format!(
                                    "{}: {}",
                                    s.code(),
                                    s.message()
                                ))
                            }
                        }
                    }
                }
            };
            writer.abort();
            let stranded: Vec<_> = {
                let mut map = lock(&p);
                map.closed = true;
                map.waiting.drain().map(|(_, r)| r).collect()
            };
            for reply in stranded {
                let _ = reply.send(Err(failure.clone()));
            }
        });
        Live { queue, pending }
    }
}

/// Why a [`Pipeline`] call failed.
#[derive(Debug)]
pub enum PipelineError {
    /// The coordinator does not serve `Pipeline`: use the unary call.
    Unsupported,
    /// The call failed with this status (from the coordinator, or made here for a broken
    /// stream: UNAVAILABLE, or DEADLINE_EXCEEDED after the timeout).
    Status(Status),
}

impl From<PipelineError> for Status {
    fn from(e: PipelineError) -> Status {
        match e {
            PipelineError::Status(s) => s,
            PipelineError::Unsupported => {
                Status::unimplemented("the coordinator does not serve Pipeline")
            }
        }
    }
}

/// The client API over one `Pipeline` stream: Begin / BeginLocal / Enlist / Commit /
/// ReportLocalCommits / Abort / ReleaseUnused with the unary calls' meaning, many transactions' calls per frame.
pub struct Pipeline {
    session: Session<pb::PipelineRequest, pb::PipelineResponse>,
    timeout: Duration,
}

impl Pipeline {
    /// A pipeline that opens its stream with `open` (e.g. over a
    /// `CoordinatorClient::pipeline`) and waits at most `timeout` for any result.
    pub fn new(open: Opener<pb::PipelineRequest, pb::PipelineResponse>, timeout: Duration) -> Self {
        Pipeline {
            session: Session::new(open),
            timeout,
        }
    }

    /// `Coordinator.Begin`.
    pub async fn begin(&self, req: pb::BeginRequest) -> Result<pb::BeginResponse, PipelineError> {
        self.run(pb::client_call::Call::Begin(req), |r| match r {
            pb::client_result::Result::Begin(v) => Some(v),
            _ => None,
        })
        .await
    }

    /// `Coordinator.BeginLocal`.
    pub async fn begin_local(
        &self,
        req: pb::BeginLocalRequest,
    ) -> Result<pb::BeginLocalResponse, PipelineError> {
        self.run(pb::client_call::Call::BeginLocal(req), |r| match r {
            pb::client_result::Result::BeginLocal(v) => Some(v),
            _ => None,
        })
        .await
    }

    /// `Coordinator.Enlist`.
    pub async fn enlist(
        &self,
        req: pb::EnlistRequest,
    ) -> Result<pb::EnlistResponse, PipelineError> {
        self.run(pb::client_call::Call::Enlist(req), |r| match r {
            pb::client_result::Result::Enlist(v) => Some(v),
            _ => None,
        })
        .await
    }

    /// `Coordinator.Commit`. The timeout is extended by the phase-two wait asked for.
    pub async fn commit(
        &self,
        req: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, PipelineError> {
        self.run(pb::client_call::Call::Commit(req), |r| match r {
            pb::client_result::Result::Commit(v) => Some(v),
            _ => None,
        })
        .await
    }

    /// `Coordinator.ReportLocalCommits`.
    pub async fn report_local_commits(
        &self,
        req: pb::ReportLocalCommitsRequest,
    ) -> Result<pb::ReportLocalCommitsResponse, PipelineError> {
        self.run(
            pb::client_call::Call::ReportLocalCommits(req),
            |r| match r {
                pb::client_result::Result::ReportLocalCommits(v) => Some(v),
                _ => None,
            },
        )
        .await
    }

    /// `Coordinator.Abort`.
    pub async fn abort(&self, req: pb::AbortRequest) -> Result<pb::AbortResponse, PipelineError> {
        self.run(pb::client_call::Call::Abort(req), |r| match r {
            pb::client_result::Result::Abort(v) => Some(v),
            _ => None,
        })
        .await
    }

    /// `Coordinator.ReleaseUnused`.
    pub async fn release_unused(
        &self,
        req: pb::ReleaseUnusedRequest,
    ) -> Result<pb::ReleaseUnusedResponse, PipelineError> {
        self.run(pb::client_call::Call::ReleaseUnused(req), |r| match r {
            pb::client_result::Result::ReleaseUnused(v) => Some(v),
            _ => None,
        })
        .await
    }

    async fn run<T>(
        &self,
        call: pb::client_call::Call,
        unpack: fn(pb::client_result::Result) -> Option<T>,
    ) -> Result<T, PipelineError> {
        let timeout = match &call {
            pb::client_call::Call::Commit(c) => {
                self.timeout + Duration::from_millis(c.phase_two_wait_ms.unwrap_or(0))
            }
            _ => self.timeout,
        };
        let call = pb::ClientCall {
            call_id: 0,
            call: Some(call),
        };
        match self.session.call(call, timeout).await {
            Ok(pb::ClientResult {
                result: Some(pb::client_result::Result::Error(e)),
                ..
            }) => Err(PipelineError::Status(Status::new(
                Code::from(e.code),
                e.message,
            ))),
            Ok(pb::ClientResult {
                result: Some(r), ..
            }) => unpack(r).ok_or_else(|| {
                PipelineError::Status(Status::internal(
                    "the coordinator answered with another call's result",
                ))
            }),
            Ok(pb::ClientResult { result: None, .. }) => Err(PipelineError::Status(
                Status::internal("the coordinator sent an empty result"),
            )),
            Err(CallError::Unsupported) => Err(PipelineError::Unsupported),
            Err(CallError::Timeout) => {
                Err(PipelineError::Status(Status::deadline_exceeded(format!(
                    "no answer from the coordinator within {} ms",
                    timeout.as_millis()
                ))))
            }
            Err(CallError::Transport(m)) => Err(PipelineError::Status(Status::unavailable(m))),
            Err(CallError::Refused(s)) => Err(PipelineError::Status(s)),
        }
    }
}

type Handler<In, Out> =
    Arc<dyn Fn(In) -> Pin<Box<dyn Future<Output = Out> + Send>> + Send + Sync + 'static>;

/// Serves a batched call stream: every inbound call runs `handle` as its own task, and the
/// results go back batched. The returned receiver is the response stream.
///
/// When `stop` completes (the server is shutting down) no further call is read; the calls
/// already running finish, their results are sent, and the response stream ends, so a
/// graceful shutdown is not held up by a peer that keeps its stream open. The peer fails
/// the calls it sent that were not read, as it would for a broken connection.
pub fn serve<Req, Resp, H, Fut, S>(
    mut inbound: Streaming<Req>,
    handle: H,
    stop: S,
) -> OutboundStream<Result<Resp, Status>>
where
    Req: Batch,
    Resp: Batch,
    H: Fn(Req::Item) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp::Item> + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    let handle: Handler<Req::Item, Resp::Item> = Arc::new(move |c| Box::pin(handle(c)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Resp::Item>();
    let (out_tx, out_rx) = mpsc::channel::<Result<Resp, Status>>(64);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let reader_out = out_tx.clone();
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                () = &mut stop => return,
            };
            match next {
                Ok(Some(batch)) => {
                    for call in batch.into_items() {
                        let Ok(permit) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        let (handle, done) = (handle.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let _ = done.send(handle(call).await);
                            drop(permit);
                        });
                    }
                }
                Ok(None) => return,
                Err(s) => {
                    let _ = reader_out.send(Err(s)).await;
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        // Ends when the reader and every call task are done (all senders dropped).
        while let Some(first) = done_rx.recv().await {
            // As on the calling side: results that are ready go in the same frame.
            tokio::task::yield_now().await;
            let mut items = vec![first];
            while items.len() < MAX_BATCH {
                match done_rx.try_recv() {
                    Ok(i) => items.push(i),
                    Err(_) => break,
                }
            }
            if out_tx.send(Ok(Resp::from_items(items))).await.is_err() {
                return;
            }
        }
    });
    OutboundStream::new(out_rx)
}

impl From<Status> for pb::CallError {
    fn from(s: Status) -> Self {
        pb::CallError {
            code: s.code() as i32,
            message: s.message().to_string(),
        }
    }
}

/// Serves a `ParticipantExchange.Exchange` stream by running every call through `svc`'s
/// unary [`Participant`](pb::participant_server::Participant) handlers, so a participant
/// behaves the same whichever way the coordinator calls it. `stop` as in [`serve`].
pub fn serve_exchange<P, S>(
    svc: P,
    inbound: Streaming<pb::ExchangeRequest>,
    stop: S,
) -> OutboundStream<Result<pb::ExchangeResponse, Status>>
where
    P: pb::participant_server::Participant + Clone,
    S: Future<Output = ()> + Send + 'static,
{
    serve(
        inbound,
        move |call: pb::ParticipantCall| {
            let svc = svc.clone();
            async move {
                use pb::participant_call::Call;
                use pb::participant_result::Result as R;
                let result = match call.call {
                    Some(Call::Prepare(r)) => svc
                        .prepare(tonic::Request::new(r))
                        .await
                        .map(|r| R::Prepare(r.into_inner())),
                    Some(Call::Commit(r)) => svc
                        .commit(tonic::Request::new(r))
                        .await
                        .map(|r| R::Commit(r.into_inner())),
                    Some(Call::Abort(r)) => svc
                        .abort(tonic::Request::new(r))
                        .await
                        .map(|r| R::Abort(r.into_inner())),
                    None => Err(Status::invalid_argument(
                        "call is missing: set one of prepare, commit, abort",
                    )),
                };
                pb::ParticipantResult {
                    call_id: call.call_id,
                    result: Some(result.unwrap_or_else(|s| R::Error(s.into()))),
                }
            }
        },
        stop,
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every call to a peer that does not serve the stream hears `Unsupported` (and falls
    /// back to a unary call), also the calls that raced the stream's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_racing_an_unimplemented_answer_all_hear_unsupported() {
        for round in 0..50 {
            let open: Opener<pb::ExchangeRequest, pb::ExchangeResponse> = Arc::new(|_outbound| {
                Box::pin(async move {
                    tokio::task::yield_now().await;
                    Err(tonic::Status::unimplemented("no ParticipantExchange here"))
                })
            });
            let session = Arc::new(Session::new(open));
            let calls = (0..64).map(|_| {
                let session = session.clone();
                tokio::spawn(async move {
                    session
                        .call(pb::ParticipantCall::default(), Duration::from_secs(5))
                        .await
                })
            });
            for call in calls {
                match call.await.expect("call task") {
                    Err(CallError::Unsupported) => {}
                    other => panic!("round {round}: {other:?}"),
                }
            }
        }
    }
}
