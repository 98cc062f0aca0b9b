//! [`EtcdLog`]: the [`DecisionLog`] on etcd, for a coordinator that must survive the loss
//! of its machine. etcd (Raft, linearizable reads, leases, transactions with compare
//! guards) replicates every decision to a quorum of members before it counts as durable.
//!
//! # Ownership, epochs and fencing
//!
//! The log holds one shard (shard 0 for now) of a named cluster (`<cluster>`, the key
//! prefix; see `keys.rs` for every key). Opening it grants a lease of a few seconds
//! ([`EtcdLogOptions::lease_ttl_s`]) and creates the shard's owner key on it only if the
//! key is absent (`Txn If create_revision(owner) == 0 Then Put(owner, lease)`); the key's
//! create revision is this open's **epoch** (etcd revisions only grow, so every open has a
//! larger one than any before it). If the key exists, the open fails at once with
//! [`LogError::Locked`] naming the owner, like the sled log's directory lock.
//!
//! Every write is `Txn If create_revision(owner) == epoch Then [...] Else Get(owner)`: the
//! compare, not the lease, is what keeps two coordinators from deciding for one shard (a
//! lease can expire while its holder still believes in it). A write that finds another
//! epoch (or no owner key) writes nothing, answers [`LogError::Fenced`] and poisons the
//! log: it is never retried as if it had worked, and every later call fails.
//!
//! A background task keeps the lease alive and opens the keep-alive stream again at once
//! when it breaks (a dead member, a leader change). When the lease expires anyway, or
//! etcd says it is gone, the log poisons itself (fail-stop): whoever creates the owner
//! key next owns the shard, and this node must not write.
//!
//! # Node id, LSNs, durability
//!
//! The node id is a random `u32` stored once per cluster (create-if-absent), so a
//! coordinator that opens the cluster again issues transaction ids of the same node. LSNs
//! are counted by the writer and stored in the LSN counter key in the same transaction as
//! the records they number. A write is durable when its transaction returned: etcd
//! answers only once a quorum of members has the entry in its fsynced Raft log. Reads go
//! to etcd each time (linearizable, etcd's default), never to a cache of what was written.
//!
//! # Group commit
//!
//! `writer.rs`: one writer task takes every request queued while the previous etcd
//! transaction ran and writes their decisions together, many per transaction (see
//! [`MAX_FORCED_PER_TXN`] for the limits of etcd it respects). Lazy records are queued and
//! written by the writer before each batch, every 20 ms when idle, and before any read.
//!
//! # Threads
//!
//! The etcd client runs on a runtime of its own (one worker thread, plus the thread that
//! owns it). The trait's synchronous methods hand their work to it and block on a
//! channel for the answer, so they may be called from inside any tokio runtime (never
//! `block_on` in a runtime worker); the async ones await a oneshot from the writer.
//!
//! # Layout
//!
//! * `mod.rs` (this file): [`EtcdLog`] and [`EtcdLogOptions`], opening (connect, node id,
//!   owner key), the reads, collection, and closing (the lease is revoked, so the next
//!   owner need not wait for it to expire).
//! * `keys.rs`: the key layout and the checks of the cluster name.
//! * `store.rs`: the fenced write, linearizable reads, retries.
//! * `writer.rs`: the writer task (group commit, lazy records).
//! * `lease.rs`: the lease keep-alive task.
//!
//! Values are the sled log's `prost` records (`sled_log/codec.rs`), so both logs share one
//! encoding and one format version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, ConnectOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{mpsc, oneshot};

use super::sled_log::codec::{
    self as sled_codec, decode_audit, decode_collected, decode_commit, decode_last_lsn,
    decode_preparing, encode_collected,
};
use super::{
    AuditRecord, Collected, CommitRecord, DecisionLog, Kept, LazyRecord, LogError, LogStats, Lsn,
    Recovered, StoredDecision,
};
use crate::types::TxId;

mod contract;
mod keys;
mod lease;
mod store;
mod writer;

#[cfg(test)]
use contract::tx_of_suffix;

pub use keys::{cluster_name_problem, MAX_CLUSTER_NAME_LEN};
pub use writer::MAX_FORCED_PER_TXN;

use keys::Keys;
use store::{retrying, Members, Store, WriteError, ATTEMPT_TIMEOUT};
use writer::{Item, Request, Writer};

/// Default of [`EtcdLogOptions::cluster`].
pub const DEFAULT_ETCD_CLUSTER: &str = "default";
/// Default of [`EtcdLogOptions::lease_ttl_s`].
pub const DEFAULT_LEASE_TTL_S: i64 = 5;

/// Settings of an [`EtcdLog`].
#[derive(Clone, Debug)]
pub struct EtcdLogOptions {
    /// etcd client URLs, e.g. `http://10.0.0.1:2379`. At least one; the client balances
    /// over them and retries on another when one is down.
    pub endpoints: Vec<String>,
    /// The cluster name: every key lives under `/twopc/v1/<cluster>/`, so coordinators of
    /// different clusters can share one etcd (see [`cluster_name_problem`]).
    pub cluster: String,
    /// The shard this log owns. Only shard 0 is used for now.
    pub shard: u32,
    /// Time to live of the owner key's lease, in seconds: how long the shard stays locked
    /// after its owner died without closing the log. Default [`DEFAULT_LEASE_TTL_S`].
    pub lease_ttl_s: i64,
    /// What the owner key says about where this node answers (its gRPC endpoint), for
    /// operators and, later, for routing. May be empty.
    pub advertise: String,
    /// Bound on one etcd request, and on the retries of a request that fails on the way
    /// (a member down, a leader election). Default 5 s.
    pub request_timeout: Duration,
    /// Fault injection for tests: while `true`, every write fails before it is sent,
    /// which poisons the log. Leave `None` in production.
    pub fail_writes: Option<Arc<AtomicBool>>,
}

impl EtcdLogOptions {
    /// Options for `endpoints` and `cluster`, everything else default.
    pub fn new(endpoints: Vec<String>, cluster: impl Into<String>) -> EtcdLogOptions {
        EtcdLogOptions {
            endpoints,
            cluster: cluster.into(),
            shard: 0,
            lease_ttl_s: DEFAULT_LEASE_TTL_S,
            advertise: String::new(),
            request_timeout: Duration::from_secs(5),
            fail_writes: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// State shared by the [`EtcdLog`] handle, its writer and its lease keeper.
struct Shared {
    durable_lsn: AtomicU64,
    stats: Mutex<LogStats>,
    failed: AtomicBool,
    /// The first failure, reported by every later call.
    failure: Mutex<Option<String>>,
    /// Lazy records not yet written, oldest first.
    queued: Mutex<Vec<LazyRecord>>,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(
            lock(&self.failure)
                .clone()
                .unwrap_or_else(|| "unknown failure".to_string()),
        )
    }

    /// Poisons the log (keeping the first message) and returns the error to report.
    fn poison(&self, msg: String) -> LogError {
        let mut slot = lock(&self.failure);
        if slot.is_none() {
            tracing::error!(error = %msg, "etcd decision log failed; refusing all further writes");
            *slot = Some(msg);
        }
        self.failed.store(true, Ordering::Release);
        LogError::Failed(slot.clone().unwrap_or_default())
    }
}

/// The runtime the etcd client runs on, owned by a thread of its own (a runtime may not
/// be dropped inside another one, and the log may be dropped anywhere).
struct Io {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Io {
    fn start() -> Result<Io, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("twopc-etcd-log")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the etcd client's runtime: {e}"))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("twopc-etcd-rt".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| format!("cannot start the etcd client's thread: {e}"))?;
        Ok(Io {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `fut` on the etcd runtime and blocks the calling thread (never a worker of
    /// that runtime) until it answers.
    fn call<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| "the etcd client's runtime stopped before answering".to_string())
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The decision log on etcd. See the module docs.
///
/// Dropping it writes the queued lazy records, stops the lease keeper and revokes the
/// lease (deleting the owner key), so another coordinator can own the shard at once.
pub struct EtcdLog {
    node_id: u32,
    epoch: u64,
    /// Where the log lives, for messages: endpoints and owner key.
    place: String,
    store: Arc<Store>,
    shared: Arc<Shared>,
    sender: Option<mpsc::UnboundedSender<Request>>,
    writer: Option<tokio::task::JoinHandle<()>>,
    lease: Option<lease::Keeper>,
    // Last: the runtime stops after everything above has used it.
    io: Io,
}

impl std::fmt::Debug for EtcdLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLog")
            .field("place", &self.place)
            .field("node_id", &format_args!("{:08x}", self.node_id))
            .field("epoch", &self.epoch)
            .field(
                "durable_lsn",
                &self.shared.durable_lsn.load(Ordering::Acquire),
            )
            .field("failed", &self.shared.failed.load(Ordering::Acquire))
            .finish()
    }
}

/// What [`EtcdLog::open`] found and made.
struct Opened {
    members: Arc<Members>,
    node_id: u32,
    epoch: i64,
    lease_id: i64,
    last_lsn: Lsn,
}

/// Why an open failed, before it is turned into a [`LogError`].
enum OpenError {
    Locked(String),
    Failed(String),
}

impl EtcdLog {
    /// Connects to etcd, creates the cluster's node id if it has none, takes the shard's
    /// owner key on a new lease (its create revision is the epoch), reads the LSN counter
    /// and starts the writer and the lease keeper.
    ///
    /// Fails with [`LogError::Locked`] at once when the owner key exists (its lease is
    /// alive: another coordinator owns the shard), naming the owner; with
    /// [`LogError::Open`] for bad options, an etcd that cannot be reached, or corrupt data.
    pub fn open(opts: EtcdLogOptions) -> Result<EtcdLog, LogError> {
        let place = format!("etcd {}", opts.endpoints.join(","));
        let open_failed = |detail: String| LogError::Open {
            dir: place.clone(),
            detail,
        };
        if opts.endpoints.is_empty() || opts.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(open_failed(
                "no etcd endpoints given (or an empty one)".into(),
            ));
        }
        if let Some(problem) = cluster_name_problem(&opts.cluster) {
            return Err(open_failed(problem));
        }
        if !(1..=3600).contains(&opts.lease_ttl_s) {
            return Err(open_failed(format!(
                "lease time to live {} s is out of range 1..=3600",
                opts.lease_ttl_s
            )));
        }
        let keys = Keys::new(&opts.cluster, opts.shard);
        let owner_key = String::from_utf8_lossy(&keys.owner()).into_owned();
        let io = Io::start().map_err(&open_failed)?;
        let opened = io
            .call(open_on_etcd(opts.clone(), keys.clone()))
            .map_err(&open_failed)?;
        let opened = match opened {
            Ok(o) => o,
            Err(OpenError::Locked(detail)) => {
                return Err(LogError::Locked {
                    dir: format!("{place} key {owner_key}"),
                    detail,
                })
            }
            Err(OpenError::Failed(detail)) => return Err(open_failed(detail)),
        };
        let epoch = u64::try_from(opened.epoch)
            .map_err(|_| open_failed(format!("owner key revision {}", opened.epoch)))?;
        let shared = Arc::new(Shared {
            durable_lsn: AtomicU64::new(opened.last_lsn),
            stats: Mutex::new(LogStats::default()),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            queued: Mutex::new(Vec::new()),
        });
        let store = Arc::new(Store::new(
            opened.members.clone(),
            keys,
            opened.epoch,
            opts.request_timeout,
            opts.fail_writes.clone(),
        ));
        let lease = lease::Keeper::start(
            &io.handle,
            opened.members.clone(),
            opened.lease_id,
            opts.lease_ttl_s,
            shared.clone(),
        );
        let (sender, receiver) = mpsc::unbounded_channel();
        let writer = Writer {
            store: store.clone(),
            shared: shared.clone(),
            epoch,
            last_lsn: opened.last_lsn,
        };
        let writer = io.handle.spawn(writer.run(receiver));
        tracing::info!(
            etcd = %place,
            owner_key = %owner_key,
            node = format_args!("{:08x}", opened.node_id),
            epoch,
            durable_lsn = opened.last_lsn,
            "decision log opened on etcd"
        );
        Ok(EtcdLog {
            node_id: opened.node_id,
            epoch,
            place: format!("{place} key {owner_key}"),
            store,
            shared,
            sender: Some(sender),
            writer: Some(writer),
            lease: Some(lease),
            io,
        })
    }

    /// Where the log lives: the endpoints and the owner key (for messages).
    pub fn place(&self) -> &str {
        &self.place
    }

    /// Hands one request to the writer and waits for its answer.
    async fn request(&self, item: Item) -> Result<Lsn, LogError> {
        let (reply, answer) = oneshot::channel();
        let sender = self
            .sender
            .as_ref()
            .ok_or_else(|| LogError::Failed("decision log is closing".into()))?;
        if sender.send(Request { item, reply }).is_err() {
            return Err(self
                .shared
                .poison("the etcd decision log writer has stopped".into()));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self
                .shared
                .poison("the etcd decision log writer stopped without answering".into())),
        }
    }

    fn check_write(&self, epoch: u64) -> Result<(), LogError> {
        if let Some(msg) = self.shared.failure() {
            return Err(LogError::Failed(msg));
        }
        if epoch != self.epoch {
            return Err(LogError::Fenced {
                caller: epoch,
                current: self.epoch,
            });
        }
        Ok(())
    }

    fn check_read(&self) -> Result<(), LogError> {
        match self.shared.failure() {
            Some(msg) => Err(LogError::Failed(msg)),
            None => Ok(()),
        }
    }

    /// Runs a read on the etcd runtime after the writer wrote the lazy records queued
    /// so far (so the read sees them), and blocks for its answer.
    fn read<T: Send + 'static>(
        &self,
        flush: bool,
        f: impl FnOnce(
                Arc<Store>,
            )
                -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>
            + Send
            + 'static,
    ) -> Result<T, LogError> {
        self.check_read()?;
        let flushed = if flush {
            let (reply, answer) = oneshot::channel();
            let sender = self
                .sender
                .as_ref()
                .ok_or_else(|| LogError::Failed("decision log is closing".into()))?;
            sender
                .send(Request {
                    item: Item::Flush,
                    reply,
                })
                .map_err(|_| {
                    self.shared
                        .poison("the etcd decision log writer has stopped".into())
                })?;
            Some(answer)
        } else {
            None
        };
        let store = self.store.clone();
        let result = self
            .io
            .call(async move {
                if let Some(answer) = flushed {
                    match answer.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(Err(e)),
                        Err(_) => {
                            return Err(Err(LogError::Failed(
                                "the etcd decision log writer stopped without answering".into(),
                            )))
                        }
                    }
                }
                f(store).await.map_err(Ok)
            })
            .map_err(LogError::Failed)?;
        match result {
            Ok(v) => Ok(v),
            Err(Err(e)) => Err(e),
            // A read that failed on the way (etcd unreachable): an error for this call,
            // not a poisoned log; nothing was written.
            Err(Ok(msg)) => Err(LogError::Failed(msg)),
        }
    }

    /// Decodes a COMMIT record value, or poisons the log if it is corrupt.
    fn decode_or_poison(&self, bytes: &[u8]) -> Result<sled_codec::StoredCommit, LogError> {
        decode_commit(bytes).map_err(|m| self.shared.poison(m))
    }

    /// The low-water mark of `epoch` (0: none).
    fn low_water_mark(&self, epoch: u64) -> Result<u64, LogError> {
        let key = self.store.keys.collected(epoch);
        let kv = self.read(false, move |store| {
            Box::pin(async move { store.get(key).await })
        })?;
        match kv {
            Some(kv) => decode_collected(kv.value()).map_err(|m| self.shared.poison(m)),
            None => Ok(0),
        }
    }
}

/// The open, on the etcd runtime: connect, node id, lease, owner key, LSN counter.
async fn open_on_etcd(opts: EtcdLogOptions, keys: Keys) -> Result<Opened, OpenError> {
    let retry = opts.request_timeout;
    let connect = ConnectOptions::new()
        .with_connect_timeout(ATTEMPT_TIMEOUT)
        .with_timeout(ATTEMPT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), ATTEMPT_TIMEOUT);
    let members = Arc::new(
        Members::connect(&opts.endpoints, connect)
            .await
            .map_err(OpenError::Failed)?,
    );

    // The node id: created once per cluster, then read by every open.
    let node_key = keys.node_id();
    let fresh = format!("{:08x}", rand::random::<u32>());
    let txn = Txn::new()
        .when([Compare::create_revision(
            node_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(node_key.clone(), fresh.clone(), None)])
        .or_else([TxnOp::get(node_key.clone(), None)]);
    let resp = retrying(&members, retry, "node id creation", |client| {
        let (mut kv, txn) = (client.kv_client(), txn.clone());
        async move { kv.txn(txn).await }
    })
    .await
    .map_err(OpenError::Failed)?;
    let node_text = if resp.succeeded() {
        fresh
    } else {
        match resp.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .unwrap_or_default(),
            _ => String::new(),
        }
    };
    let node_id = u32::from_str_radix(&node_text, 16)
        .ok()
        .filter(|_| node_text.len() == 8)
        .ok_or_else(|| {
            OpenError::Failed(format!(
                "the node id at {} is {node_text:?}, not 8 hex digits; it was not written by twopc",
                String::from_utf8_lossy(&node_key)
            ))
        })?;

    // The lease and the owner key.
    let grant = retrying(&members, retry, "lease grant", |client| {
        let mut leases = client.lease_client();
        let ttl = opts.lease_ttl_s;
        async move { leases.grant(ttl, None).await }
    })
    .await
    .map_err(OpenError::Failed)?;
    let lease_id = grant.id();
    let owner_key = keys.owner();
    let owner_value = format!(
        "node={node_id:08x} endpoint={} pid={} lease={lease_id:x}",
        if opts.advertise.is_empty() {
            "-"
        } else {
            &opts.advertise
        },
        std::process::id()
    );
    let txn = Txn::new()
        .when([Compare::create_revision(
            owner_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            owner_key.clone(),
            owner_value,
            Some(etcd_client::PutOptions::new().with_lease(lease_id)),
        )])
        .or_else([TxnOp::get(owner_key.clone(), None)]);
    let resp = retrying(&members, retry, "owner key creation", |client| {
        let (mut kv, txn) = (client.kv_client(), txn.clone());
        async move { kv.txn(txn).await }
    })
    .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            revoke(&members, lease_id).await;
            return Err(OpenError::Failed(e));
        }
    };
    if !resp.succeeded() {
        revoke(&members, lease_id).await;
        let holder: Option<KeyValue> = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
            _ => None,
        };
        return Err(OpenError::Locked(match holder {
            Some(kv) => format!(
                "the shard is owned by {} (epoch {}, lease {:x}); it is free once that coordinator stops or its lease expires",
                String::from_utf8_lossy(kv.value()),
                kv.create_revision(),
                kv.lease()
            ),
            None => "the shard's owner key exists".into(),
        }));
    }
    let epoch = resp.header().map(|h| h.revision()).unwrap_or(0);
    if epoch <= 0 {
        revoke(&members, lease_id).await;
        return Err(OpenError::Failed(
            "etcd did not say at which revision the owner key was created".into(),
        ));
    }

    let lsn_key = keys.lsn();
    let read = retrying(&members, retry, "read of the LSN counter", |client| {
        let (mut kv, key) = (client.kv_client(), lsn_key.clone());
        async move { kv.get(key, None).await }
    })
    .await;
    let last_lsn = match read.map(|r| r.kvs().first().map(|kv| decode_last_lsn(kv.value()))) {
        Ok(None) => 0,
        Ok(Some(Ok(lsn))) => lsn,
        Ok(Some(Err(e))) | Err(e) => {
            revoke(&members, lease_id).await;
            return Err(OpenError::Failed(e));
        }
    };
    Ok(Opened {
        members,
        node_id,
        epoch,
        lease_id,
        last_lsn,
    })
}

/// Revokes `lease_id` (best effort, bounded): an open that fails after the grant leaves
/// nothing behind.
async fn revoke(members: &Members, lease_id: i64) {
    let (_, client) = members.pick();
    let mut leases = client.lease_client();
    let _ = tokio::time::timeout(ATTEMPT_TIMEOUT, leases.revoke(lease_id)).await;
}

impl Drop for EtcdLog {
    fn drop(&mut self) {
        // Closing the channel ends the writer once it has written what was queued.
        drop(self.sender.take());
        let writer = self.writer.take();
        let lease = self.lease.take();
        let result = self.io.call(async move {
            if let Some(w) = writer {
                let _ = w.await;
            }
            if let Some(l) = lease {
                l.stop_and_revoke().await;
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, place = %self.place, "closing the etcd decision log");
        }
    }
}

#[cfg(test)]
mod tests;
