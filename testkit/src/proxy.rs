//! [`FaultProxy`]: a TCP proxy on `127.0.0.1` whose network faults are switched at run
//! time, separately for each direction.
//!
//! Put it between a client and a server (the coordinator and a participant, say: tell the
//! client [`FaultProxy::url`] instead of the server's address) and switch what each
//! direction does to the bytes it carries:
//!
//! * [`Fault::Pass`]: forward as they come.
//! * [`Fault::Drop`]: a blackhole. The bytes are read and thrown away; the connection stays
//!   open and the sender learns nothing (no error, no reset, no back-pressure), as behind a
//!   firewall that DROPs packets.
//! * [`Fault::Delay`]: every chunk is held for the given time before it is forwarded (the
//!   delay is taken when the chunk is read, so a stream is delayed, not slowed down: chunks
//!   keep their order and spacing).
//! * [`Fault::Reset`]: every open connection is closed with a TCP RST (`SO_LINGER` 0) on
//!   both of its sockets, and new connections are accepted and reset at once, for as long
//!   as the fault is set. A TCP connection carries both directions, so Reset on either
//!   direction resets the whole connection.
//!
//! [`FaultProxy::cut`] (both directions Reset), [`FaultProxy::blackhole`] (both Drop) and
//! [`FaultProxy::restore`] (both Pass) cover the common cases; [`FaultProxy::stats`] counts
//! bytes and connections per direction.
//!
//! # A connection that lost bytes is reset when its direction heals
//! A blackhole here really discards bytes, whereas real TCP would retransmit them after a
//! short partition. Forwarding again after a hole would hand the receiver a stream with
//! bytes missing from its middle (for HTTP/2: half frames and a desynchronised header
//! compression table), which no protocol is expected to survive. So by default a
//! connection that dropped bytes in a direction is reset as soon as that direction stops
//! dropping (when the fault changes, or at the latest before anything else would be
//! forwarded): what TCP itself does when a partition outlasts its retransmissions. The
//! client then reconnects through the proxy. [`FaultProxyOptions::reset_damaged_on_heal`]
//! turns this off.
//!
//! # Shape
//! One accept task; one task per accepted connection pair, which runs both directions
//! (each a reader and a writer joined by a bounded queue, so a delayed direction holds at
//! most [`FaultProxyOptions::queue_chunks`] chunks before it pushes back on its sender)
//! and a watcher that resets the pair when a Reset fault is set, a damaged direction heals
//! or the proxy is dropped. Concurrent connections, chunk size, queue length, upstream
//! connect time and delays are all bounded. Dropping the [`FaultProxy`] stops accepting
//! and resets every open connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{Result, TestkitError};

/// Longest [`Fault::Delay`] accepted (a longer one is a mistake in the test).
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// One direction of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client that connected to the proxy towards the target server.
    ClientToServer,
    /// From the target server back to the client.
    ServerToClient,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];

    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// What a direction does to the bytes it carries. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Forward.
    #[default]
    Pass,
    /// Read and discard; keep the connection open.
    Drop,
    /// Hold each chunk this long before forwarding it (at most [`MAX_DELAY`]).
    Delay(Duration),
    /// Reset every connection (both directions) and every new one while set.
    Reset,
}

/// The faults of both directions, published to every connection task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Faults([Fault; 2]);

impl Faults {
    fn get(&self, d: Direction) -> Fault {
        self.0[d.index()]
    }

    fn any_reset(&self) -> bool {
        self.0.contains(&Fault::Reset)
    }
}

/// Limits and behaviour of a [`FaultProxy`]. `Default` suits tests.
#[derive(Clone, Debug)]
pub struct FaultProxyOptions {
    /// Most connection pairs open at once; further clients are reset (default 256).
    pub max_connections: usize,
    /// Bound on connecting to the target; a client whose upstream connection fails or
    /// takes longer is reset (default 2 s).
    pub connect_timeout: Duration,
    /// Largest chunk read at once (default 16 KiB).
    pub chunk_bytes: usize,
    /// Chunks a direction may hold (delayed or waiting for the receiver) before it stops
    /// reading from its sender (default 64).
    pub queue_chunks: usize,
    /// Reset a connection that dropped bytes once its direction stops dropping (default
    /// true; see the module docs).
    pub reset_damaged_on_heal: bool,
}

impl Default for FaultProxyOptions {
    fn default() -> Self {
        FaultProxyOptions {
            max_connections: 256,
            connect_timeout: Duration::from_secs(2),
            chunk_bytes: 16 * 1024,
            queue_chunks: 64,
            reset_damaged_on_heal: true,
        }
    }
}

/// Counters of one direction (a snapshot, see [`FaultProxy::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Bytes written to the receiver.
    pub bytes_forwarded: u64,
    /// Bytes thrown away by [`Fault::Drop`].
    pub bytes_dropped: u64,
    /// Chunks held back by [`Fault::Delay`].
    pub chunks_delayed: u64,
    /// Connections that carried at least one byte in this direction (forwarded or not).
    pub connections_used: u64,
    /// Connections that lost bytes in this direction.
    pub connections_damaged: u64,
}

/// Counters of a proxy (a snapshot, see [`FaultProxy::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client to server.
    pub client_to_server: DirectionStats,
    /// Server to client.
    pub server_to_client: DirectionStats,
    /// Connections accepted from clients (including those reset at once).
    pub connections_accepted: u64,
    /// Connection pairs currently open.
    pub connections_active: u64,
    /// Open connections closed with RST (a Reset fault, a healed damaged direction, an
    /// I/O error on either side, the proxy dropped).
    pub connections_reset: u64,
    /// New connections reset at once (a Reset fault was set, or too many were open).
    pub connections_refused: u64,
    /// Clients reset because the target could not be reached in time.
    pub upstream_failures: u64,
}

impl ProxyStats {
    /// The counters of direction `d`.
    pub fn direction(&self, d: Direction) -> DirectionStats {
        match d {
            Direction::ClientToServer => self.client_to_server,
            Direction::ServerToClient => self.server_to_client,
        }
    }
}

#[derive(Default)]
struct DirCounters {
    bytes_forwarded: AtomicU64,
    bytes_dropped: AtomicU64,
    chunks_delayed: AtomicU64,
    connections_used: AtomicU64,
    connections_damaged: AtomicU64,
}

impl DirCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            bytes_forwarded: self.bytes_forwarded.load(Ordering::Relaxed),
            bytes_dropped: self.bytes_dropped.load(Ordering::Relaxed),
            chunks_delayed: self.chunks_delayed.load(Ordering::Relaxed),
            connections_used: self.connections_used.load(Ordering::Relaxed),
            connections_damaged: self.connections_damaged.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Counters {
    dirs: [DirCounters; 2],
    accepted: AtomicU64,
    active: AtomicU64,
    reset: AtomicU64,
    refused: AtomicU64,
    upstream_failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What the accept task and every connection task share.
struct Shared {
    target: SocketAddr,
    opts: FaultProxyOptions,
    /// The current faults; connection tasks watch it to reset on a change.
    faults: watch::Sender<Faults>,
    counters: Counters,
}

/// A TCP proxy with switchable faults. See the module docs.
pub struct FaultProxy {
    shared: Arc<Shared>,
    listen: SocketAddr,
    /// Set to true on drop: the accept task stops (dropping the listener) and every
    /// connection task resets its connection. (Aborting the tasks instead would close the
    /// connections with a FIN, which looks like a clean end to the peers.)
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("listen", &self.listen)
            .field("target", &self.shared.target)
            .field("faults", &*self.shared.faults.borrow())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy to `target` on `127.0.0.1:<a port the OS picks>` with
    /// [`FaultProxyOptions::default`], every direction passing. Call it inside a tokio
    /// runtime (the proxy's tasks run on it).
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        Self::start_with(target, FaultProxyOptions::default()).await
    }

    /// Like [`start`](Self::start) with explicit options.
    pub async fn start_with(target: SocketAddr, opts: FaultProxyOptions) -> Result<FaultProxy> {
        if opts.max_connections == 0 || opts.chunk_bytes == 0 || opts.queue_chunks == 0 {
            return Err(TestkitError::Usage(format!(
                "FaultProxyOptions: max_connections, chunk_bytes and queue_chunks must be positive: {opts:?}"
            )));
        }
        // Port 0: the OS picks a port nobody holds, and the proxy keeps it for its whole
        // life, so there is no race with other tests.
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| TestkitError::io("binding the fault proxy on 127.0.0.1", e))?;
        let listen = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the fault proxy's address", e))?;
        let (faults, _) = watch::channel(Faults::default());
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            target,
            faults,
            counters: Counters::default(),
            opts,
        });
        tokio::spawn(accept_loop(shared.clone(), listener, shutdown.subscribe()));
        Ok(FaultProxy {
            shared,
            listen,
            shutdown,
        })
    }

    /// The address clients connect to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// `http://127.0.0.1:PORT` of [`listen_addr`](Self::listen_addr) (a gRPC endpoint).
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The server the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Sets the fault of direction `d`; it applies to open and new connections at once.
    ///
    /// # Panics
    /// On a [`Fault::Delay`] longer than [`MAX_DELAY`].
    pub fn set(&self, d: Direction, fault: Fault) {
        check(fault);
        self.shared.faults.send_modify(|f| f.0[d.index()] = fault);
    }

    /// Sets both directions to `fault`.
    ///
    /// # Panics
    /// On a [`Fault::Delay`] longer than [`MAX_DELAY`].
    pub fn set_both(&self, fault: Fault) {
        check(fault);
        self.shared.faults.send_modify(|f| f.0 = [fault; 2]);
    }

    /// The fault of direction `d`.
    pub fn fault(&self, d: Direction) -> Fault {
        self.shared.faults.borrow().get(d)
    }

    /// A partition that refuses: both directions [`Fault::Reset`].
    pub fn cut(&self) {
        self.set_both(Fault::Reset);
    }

    /// A silent partition: both directions [`Fault::Drop`].
    pub fn blackhole(&self) {
        self.set_both(Fault::Drop);
    }

    /// Heals: both directions [`Fault::Pass`].
    pub fn restore(&self) {
        self.set_both(Fault::Pass);
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            client_to_server: c.dirs[0].snapshot(),
            server_to_client: c.dirs[1].snapshot(),
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_active: c.active.load(Ordering::Relaxed),
            connections_reset: c.reset.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    /// Stops accepting and resets every open connection (asynchronously, on the runtime:
    /// within a scheduler tick or two).
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

fn check(fault: Fault) {
    if let Fault::Delay(d) = fault {
        assert!(
            d <= MAX_DELAY,
            "FaultProxy: a delay of {d:?} is longer than MAX_DELAY ({MAX_DELAY:?})"
        );
    }
}

/// Closes `s` with a TCP RST instead of a FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(shared.opts.max_connections));
    let mut tasks = JoinSet::new();
    let c = &shared.counters;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => r,
        };
        let sock = match accepted {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of file descriptors, say: back off a little instead of spinning.
                tracing::debug!(error = %e, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        bump(&c.accepted, 1);
        if *shutdown.borrow() || shared.faults.borrow().any_reset() {
            bump(&c.refused, 1);
            reset(sock);
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            bump(&c.refused, 1);
            reset(sock);
            continue;
        };
        tasks.spawn(connection(shared.clone(), sock, shutdown.clone(), permit));
        // Reap finished connection tasks so the set stays as small as the open ones.
        while tasks.try_join_next().is_some() {}
    }
    // Each connection task resets its connection when it sees the shutdown; let them.
    tasks.detach_all();
}

/// Decrements the active-connection counter however the connection task ends.
struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection pair must be reset rather than closed.
#[derive(Debug)]
struct MustReset;

/// One connection pair: connect upstream, run both directions until both end (then
/// close normally) or something calls for a reset.
async fn connection(
    shared: Arc<Shared>,
    client: TcpStream,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let c = &shared.counters;
    bump(&c.active, 1);
    let _active = ActiveGuard(&c.active);
    let _ = client.set_nodelay(true);
    let upstream = match tokio::time::timeout(
        shared.opts.connect_timeout,
        TcpStream::connect(shared.target),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(target = %shared.target, error = %e, "fault proxy cannot reach its target");
            bump(&c.upstream_failures, 1);
            reset(client);
            return;
        }
        Err(_) => {
            tracing::debug!(target = %shared.target, "fault proxy: connecting to the target timed out");
            bump(&c.upstream_failures, 1);
            reset(client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut client = client;
    let mut upstream = upstream;
    let damaged = [AtomicBool::new(false), AtomicBool::new(false)];
    let mut faults = shared.faults.subscribe();
    let outcome = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let c2s = pump(&shared, Direction::ClientToServer, cr, uw, &damaged[0]);
        let s2c = pump(&shared, Direction::ServerToClient, ur, cw, &damaged[1]);
        tokio::select! {
            r = async { tokio::try_join!(c2s, s2c) } => r.map(|_| ()),
            () = reset_called_for(&shared, &mut faults, &mut shutdown, &damaged) => Err(MustReset),
        }
        // The halves (and any chunks still queued) are dropped here, before the sockets.
    };
    if outcome.is_err() {
        bump(&c.reset, 1);
        reset(client);
        reset(upstream);
    }
}

/// Completes when the connection must be reset: a Reset fault is set, a direction that
/// dropped bytes no longer drops (see the module docs), or the proxy is dropped.
async fn reset_called_for(
    shared: &Shared,
    faults: &mut watch::Receiver<Faults>,
    shutdown: &mut watch::Receiver<bool>,
    damaged: &[AtomicBool; 2],
) {
    loop {
        let f = *faults.borrow_and_update();
        if f.any_reset() || *shutdown.borrow_and_update() {
            return;
        }
        if shared.opts.reset_damaged_on_heal
            && Direction::BOTH
                .iter()
                .any(|d| damaged[d.index()].load(Ordering::Relaxed) && f.get(*d) != Fault::Drop)
        {
            return;
        }
        tokio::select! {
            r = faults.changed() => if r.is_err() { return },
            r = shutdown.changed() => if r.is_err() { return },
        }
    }
}

/// A chunk on its way from a direction's reader to its writer.
enum Item {
    /// Bytes, to be written no earlier than the instant (if any).
    Data(Vec<u8>, Option<Instant>),
    /// The sender closed its side: shut down the receiver's write side.
    Eof,
}

/// One direction: a reader applying the fault of the moment to each chunk, and a writer,
/// joined by a bounded queue. `Ok` when the direction ended normally (EOF forwarded, or
/// swallowed by a blackhole); `Err` when the connection must be reset.
async fn pump(
    shared: &Shared,
    dir: Direction,
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    damaged: &AtomicBool,
) -> Result<(), MustReset> {
    let counters = &shared.counters.dirs[dir.index()];
    let opts = &shared.opts;
    let (tx, mut rx) = mpsc::channel::<Item>(opts.queue_chunks);
    let reader = async move {
        let mut buf = vec![0u8; opts.chunk_bytes];
        let mut used = false;
        loop {
            let n = from.read(&mut buf).await.map_err(|_| MustReset)?;
            let fault = shared.faults.borrow().get(dir);
            if n > 0 && !used {
                used = true;
                bump(&counters.connections_used, 1);
            }
            if opts.reset_damaged_on_heal && fault != Fault::Drop && damaged.load(Ordering::Relaxed)
            {
                return Err(MustReset);
            }
            let item = match fault {
                Fault::Reset => return Err(MustReset),
                Fault::Drop => {
                    if !damaged.swap(true, Ordering::Relaxed) {
                        bump(&counters.connections_damaged, 1);
                    }
                    if n == 0 {
                        // The FIN is lost in the blackhole too.
                        return Ok(());
                    }
                    bump(&counters.bytes_dropped, n as u64);
                    continue;
                }
                _ if n == 0 => Item::Eof,
                Fault::Pass => Item::Data(buf[..n].to_vec(), None),
                Fault::Delay(d) => {
                    bump(&counters.chunks_delayed, 1);
                    Item::Data(buf[..n].to_vec(), Some(Instant::now() + d))
                }
            };
            let eof = matches!(item, Item::Eof);
            // The writer only goes away on an error, which resets the pair anyway.
            tx.send(item).await.map_err(|_| MustReset)?;
            if eof {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Data(bytes, due) => {
                    if let Some(due) = due {
                        tokio::time::sleep_until(due).await;
                    }
                    to.write_all(&bytes).await.map_err(|_| MustReset)?;
                    bump(&counters.bytes_forwarded, bytes.len() as u64);
                }
                Item::Eof => {
                    to.shutdown().await.map_err(|_| MustReset)?;
                    return Ok(());
                }
            }
        }
        Ok::<(), MustReset>(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    /// A tiny echo server on 127.0.0.1:0; it runs until the test's runtime ends.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    async fn proxy() -> FaultProxy {
        let echo = echo_server().await;
        FaultProxy::start(echo).await.expect("start proxy")
    }

    async fn connect(p: &FaultProxy) -> TcpStream {
        let s = TcpStream::connect(p.listen_addr())
            .await
            .expect("connect to proxy");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    /// Reads exactly `n` bytes within `within`.
    async fn read_n(s: &mut TcpStream, n: usize, within: Duration) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(within, s.read_exact(&mut buf))
            .await
            .expect("echo arrives in time")
            .expect("read echo");
        buf
    }

    /// Polls `cond` every 5 ms until it holds, panicking after 5 s.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the next read fails with a reset (or sees EOF) within 5 s.
    async fn is_closed(s: &mut TcpStream) -> std::result::Result<(), String> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Err(e)) if is_reset(&e) => Ok(()),
            other => Err(format!("expected a reset, got {other:?}")),
        }
    }

    fn is_reset(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        )
    }

    #[tokio::test]
    async fn passes_and_counts_both_directions() {
        let p = proxy().await;
        assert!(p.url().starts_with("http://127.0.0.1:"), "{}", p.url());
        let mut s = connect(&p).await;
        s.write_all(b"hello").await.expect("write");
        assert_eq!(read_n(&mut s, 5, Duration::from_secs(5)).await, b"hello");
        let st = p.stats();
        assert_eq!(st.client_to_server.bytes_forwarded, 5);
        assert_eq!(st.server_to_client.bytes_forwarded, 5);
        assert_eq!(st.client_to_server.connections_used, 1);
        assert_eq!(st.connections_accepted, 1);
        assert_eq!(st.connections_active, 1);
        // A clean close by the client is forwarded and ends the pair without a reset.
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("EOF in time")
            .expect("clean EOF");
        assert!(rest.is_empty());
        wait_for("the pair to close", || p.stats().connections_active == 0).await;
        assert_eq!(p.stats().connections_reset, 0);
    }

    #[tokio::test]
    async fn drop_blackholes_one_direction_and_keeps_the_connection_open() {
        for dir in Direction::BOTH {
            let p = proxy().await;
            let mut s = connect(&p).await;
            p.set(dir, Fault::Drop);
            s.write_all(b"lost")
                .await
                .expect("write into the blackhole");
            wait_for("4 bytes dropped", || {
                p.stats().direction(dir).bytes_dropped == 4
            })
            .await;
            // Dropped by the proxy: they can never arrive. The connection is still open.
            let mut buf = [0u8; 8];
            assert!(
                matches!(s.try_read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "{dir:?}: nothing may arrive"
            );
            assert_eq!(p.stats().connections_reset, 0);
            assert_eq!(p.stats().direction(dir).connections_damaged, 1);
            // Healing resets the damaged connection; a new one passes.
            p.restore();
            is_closed(&mut s)
                .await
                .unwrap_or_else(|e| panic!("{dir:?}: {e}"));
            wait_for("the reset to be counted", || {
                p.stats().connections_reset == 1
            })
            .await;
            let mut s = connect(&p).await;
            s.write_all(b"again").await.expect("write");
            assert_eq!(read_n(&mut s, 5, Duration::from_secs(5)).await, b"again");
        }
    }

    #[tokio::test]
    async fn drop_without_reset_on_heal_forwards_again() {
        let echo = echo_server().await;
        let opts = FaultProxyOptions {
            reset_damaged_on_heal: false,
            ..Default::default()
        };
        let p = FaultProxy::start_with(echo, opts).await.expect("start");
        let mut s = connect(&p).await;
        p.set(Direction::ClientToServer, Fault::Drop);
        s.write_all(b"lost").await.expect("write");
        wait_for("4 bytes dropped", || {
            p.stats().client_to_server.bytes_dropped == 4
        })
        .await;
        p.restore();
        s.write_all(b"kept").await.expect("write");
        assert_eq!(read_n(&mut s, 4, Duration::from_secs(5)).await, b"kept");
    }

    #[tokio::test]
    async fn delay_holds_each_chunk() {
        for dir in Direction::BOTH {
            let p = proxy().await;
            let mut s = connect(&p).await;
            let d = Duration::from_millis(300);
            p.set(dir, Fault::Delay(d));
            let sent = Instant::now();
            s.write_all(b"slow").await.expect("write");
            assert_eq!(read_n(&mut s, 4, Duration::from_secs(5)).await, b"slow");
            assert!(
                sent.elapsed() >= d,
                "{dir:?}: arrived after {:?}",
                sent.elapsed()
            );
            assert_eq!(p.stats().direction(dir).chunks_delayed, 1);
            p.restore();
            let sent = Instant::now();
            s.write_all(b"fast").await.expect("write");
            assert_eq!(read_n(&mut s, 4, Duration::from_secs(5)).await, b"fast");
            assert!(sent.elapsed() < d, "{dir:?}: no delay after restore");
        }
    }

    #[tokio::test]
    async fn reset_closes_open_connections_and_refuses_new_ones_until_restored() {
        for dir in Direction::BOTH {
            let p = proxy().await;
            let mut s = connect(&p).await;
            s.write_all(b"x").await.expect("write");
            read_n(&mut s, 1, Duration::from_secs(5)).await;
            p.set(dir, Fault::Reset);
            is_closed(&mut s)
                .await
                .unwrap_or_else(|e| panic!("{dir:?}: {e}"));
            // A new connection is accepted and reset at once.
            let mut s2 = connect(&p).await;
            is_closed(&mut s2)
                .await
                .unwrap_or_else(|e| panic!("{dir:?}: {e}"));
            let st = p.stats();
            assert_eq!(st.connections_reset, 1, "{st:?}");
            assert_eq!(st.connections_refused, 1, "{st:?}");
            p.restore();
            let mut s3 = connect(&p).await;
            s3.write_all(b"back").await.expect("write");
            assert_eq!(read_n(&mut s3, 4, Duration::from_secs(5)).await, b"back");
        }
    }

    #[tokio::test]
    async fn cut_and_restore() {
        let p = proxy().await;
        let mut s = connect(&p).await;
        p.cut();
        assert_eq!(p.fault(Direction::ClientToServer), Fault::Reset);
        assert_eq!(p.fault(Direction::ServerToClient), Fault::Reset);
        is_closed(&mut s).await.expect("cut resets");
        p.blackhole();
        assert_eq!(p.fault(Direction::ServerToClient), Fault::Drop);
        p.restore();
        assert_eq!(p.fault(Direction::ClientToServer), Fault::Pass);
        let mut s = connect(&p).await;
        s.write_all(b"ok").await.expect("write");
        assert_eq!(read_n(&mut s, 2, Duration::from_secs(5)).await, b"ok");
    }

    #[tokio::test]
    async fn an_unreachable_target_resets_the_client() {
        // Bind, learn the port, close: nothing listens there now.
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        let p = FaultProxy::start(gone).await.expect("start");
        let mut s = connect(&p).await;
        is_closed(&mut s)
            .await
            .expect("reset when the target is down");
        assert_eq!(p.stats().upstream_failures, 1);
    }

    #[tokio::test]
    async fn dropping_the_proxy_resets_connections_and_stops_listening() {
        let p = proxy().await;
        let addr = p.listen_addr();
        let mut s = connect(&p).await;
        s.write_all(b"x").await.expect("write");
        read_n(&mut s, 1, Duration::from_secs(5)).await;
        drop(p);
        is_closed(&mut s).await.expect("reset on drop");
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                _ => {
                    assert!(Instant::now() < end, "the proxy still listens on {addr}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    #[tokio::test]
    #[should_panic(expected = "MAX_DELAY")]
    async fn an_overlong_delay_is_refused() {
        let p = proxy().await;
        p.set(Direction::ClientToServer, Fault::Delay(MAX_DELAY * 2));
    }
}
