//! [`SledLog`]: the file-backed [`DecisionLog`] on sled 0.34, with group commit.
//!
//! # Layout of a data directory
//!
//! ```text
//! <dir>/LOCK     exclusive lock (File::try_lock) held while the log is open; holds the pid
//! <dir>/sled/    the sled database: `conf`, `db` (the log-structured data file),
//!                `blobs/` (values too large to inline; unused for normal records),
//!                `snap.<lsn>` (sled's own snapshots)
//! ```
//!
//! sled trees: the default tree holds one `meta` record (node id, epoch); `commits` maps a
//! [`TxId`] key (node, epoch, seq as big-endian bytes, so iteration is in transaction
//! order) to a COMMIT record, plus one counter record under [`LAST_LSN_KEY`] written in
//! the same atomic batch as the commits it numbers; `preparing` maps a [`TxId`] key to
//! the branches of a transaction being prepared (or, flagged `one_phase`, the one branch a
//! one-phase commit goes to). Audit records (operator resolutions) live
//! in `commits` too, under the transaction's key followed by [`AUDIT_TAG`] and a
//! big-endian `u32` index (25 bytes, so readers of COMMIT records skip them by length):
//! that keeps them in the same atomic batch as the LSN counter that numbers them. Every
//! value is a `prost` message defined below, with a `format` field for versioning.
//!
//! # Durability
//!
//! sled 0.34's `flush()` ends with `sync_file_range`, which neither forces the drive's
//! cache nor persists file metadata (sled issues #1351, #1452). So after every `flush()`
//! this module calls `fdatasync` ([`File::sync_data`]) on its own handle to sled's data
//! file `<dir>/sled/db`, syncs any file in `<dir>/sled/blobs/` that is new or has grown
//! since it was last synced, and fsyncs `<dir>/sled` (and `blobs/`) whenever their
//! listing changed (sled renames snapshot files). At open, `conf` and the directories
//! (including `<dir>` and, if `<dir>` was created, its parent) are fsynced once
//! (`twopc_durable::Syncer`, shared with the participant's staging store). A
//! decision is reported durable only after all of that returned success.
//!
//! # Group commit
//!
//! One writer thread owns all forced writes (COMMIT decisions and audit records) and the
//! syncs asked for by [`DecisionLog::sync`] (which write nothing themselves: they flush
//! and sync whatever lazy records were written before them).
//! [`DecisionLog::force_commit`] (or [`DecisionLog::force_audit`]) sends the record over a
//! channel and awaits a `tokio::sync::oneshot` reply; the writer takes one
//! request, drains everything else queued, writes the new records in one sled batch,
//! flushes, syncs once, advances [`DecisionLog::durable_lsn`] and answers every waiter.
//!
//! Under load the writer can also wait a little for company
//! ([`SledLogOptions::group_commit_delay_us`], off by default, like PostgreSQL's
//! `commit_delay` and `commit_siblings`): when its previous batch held at least
//! [`GROUP_COMMIT_SIBLINGS`] requests, it sleeps that long after the first request of the
//! next batch arrived, then takes everything queued. Fewer, larger syncs leave more CPU
//! to everything else (each sync costs sled's flush, thread hand-offs and an
//! `fdatasync`); at low concurrency the wait is only added latency, so a lone client or a
//! few never wait.
//!
//! # Lazy records
//!
//! Lazy records are not written by the caller (which holds the engine's lock): they are
//! queued, and the writer thread writes the queue in order before each batch (so a sync
//! covers every record queued before it was asked for), every 20 ms when idle, and before
//! it stops; a read of the log ([`DecisionLog::decision`], [`DecisionLog::recover`])
//! writes it first, so readers see every record recorded before them. A `Preparing`
//! record is never written when its transaction's COMMIT is in the same batch (the COMMIT
//! record carries the branches), nor is a `Preparing` record or one-phase intent that the
//! same queue removes again (an abort, the end of phase two, a one-phase outcome). So a
//! two-phase commit usually costs two sled writes (its COMMIT, then its done flag), both
//! on the writer thread, instead of four, three of them under the engine's lock
//! (docs/performance.md has the numbers).
//!
//! # Fault injection
//!
//! With the crate feature `failpoints`, the fail points `coordinator::log::before_sync`
//! (between the batch write and its sync) and `coordinator::log::after_sync` (after the
//! sync, before waiters are answered) accept `return(abort)` to abort the process and
//! `return(error)` (or a bare `return`) to make the sync fail. Without the feature,
//! [`SledLogOptions::fail_syncs`] makes every sync fail while the flag is set.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use twopc_durable::{open_sled, sync_dir, LockError, Syncer};

use super::{
    AuditRecord, CommitRecord, DecisionLog, LazyRecord, LogError, LogStats, Lsn, Recovered,
    StoredDecision,
};
use crate::types::{BranchKind, BranchSpec, HeuristicDecision, TxId};

/// The newest `format` this build reads (and writes, for one-phase intents); values with a
/// newer format are refused rather than misread.
pub const FORMAT_VERSION: u32 = 3;

/// Format of a one-phase intent (a `preparing` value with `one_phase` set). A build that
/// reads only version 1 would take an intent for a plain `Preparing` record and abort a
/// branch that may have committed; a build that reads up to version 2 (intents written at
/// Commit) would answer an intent by committing the branch in one phase again, though
/// intents are now written when the branch enlists, before the client may have asked to
/// commit. So intents carry version 3 and such builds refuse them instead. Version-2
/// intents are still read (and settled the version-3 way: an abort that the branch
/// answers with what it did). Every other value is still written as version 1.
const ONE_PHASE_INTENT_FORMAT: u32 = 3;

/// Format of every value other than a one-phase intent.
const BASE_FORMAT: u32 = 1;

/// Key of the record in the `commits` tree that holds the highest LSN ever assigned. It
/// is written in the same atomic sled batch as the commits it numbers, and its length
/// (not 20 bytes) tells it apart from transaction keys.
pub const LAST_LSN_KEY: &[u8] = b"~last_lsn";

const META_KEY: &[u8] = b"meta";
const COMMITS_TREE: &str = "commits";
const PREPARING_TREE: &str = "preparing";
const LOCK_FILE: &str = "LOCK";
const SLED_DIR: &str = "sled";
const TX_KEY_LEN: usize = 20;

/// Byte after a transaction's key that starts the key of one of its audit records.
pub const AUDIT_TAG: u8 = b'A';
/// Length of an audit record's key: transaction key, [`AUDIT_TAG`], `u32` index.
const AUDIT_KEY_LEN: usize = TX_KEY_LEN + 1 + 4;

/// Settings of a [`SledLog`].
#[derive(Clone, Debug)]
pub struct SledLogOptions {
    /// How often sled flushes in the background, in milliseconds; this is what makes
    /// lazy records (which are never synced explicitly) reach the disk between forced
    /// batches. `0` disables the background flush. Default 200.
    pub flush_every_ms: u64,
    /// sled page cache size in bytes. Default 64 MiB.
    pub cache_capacity_bytes: u64,
    /// Group-commit delay in microseconds: when the writer's previous batch held at least
    /// [`GROUP_COMMIT_SIBLINGS`] requests, it waits this long after the first request of
    /// the next batch arrived, then writes and syncs everything queued together. `0`
    /// (the default, [`DEFAULT_GROUP_COMMIT_DELAY_US`]) disables it.
    pub group_commit_delay_us: u64,
    /// Fault injection for tests: while the flag is `true`, every sync the log attempts
    /// (at open and for every batch) fails with an I/O error, which poisons the log.
    /// Leave `None` in production.
    pub fail_syncs: Option<Arc<AtomicBool>>,
}

impl Default for SledLogOptions {
    fn default() -> Self {
        SledLogOptions {
            flush_every_ms: 200,
            cache_capacity_bytes: 64 * 1024 * 1024,
            group_commit_delay_us: DEFAULT_GROUP_COMMIT_DELAY_US,
            fail_syncs: None,
        }
    }
}

/// Default of [`SledLogOptions::group_commit_delay_us`]: off. On two cores, 300 µs
/// (about a third of one loaded sync: sled's flush and the `fdatasync`) halved the syncs
/// per decision and gained 5–25% two-phase decisions/s at 64 clients, but cost a
/// one-phase commit at 4 clients a fifth of its throughput: worth it only for a
/// coordinator that is busy (see docs/performance.md).
pub const DEFAULT_GROUP_COMMIT_DELAY_US: u64 = 0;

/// Requests the writer's previous batch must have held before it waits for company
/// (PostgreSQL's `commit_siblings` is 5): fewer mean few clients, which the wait would
/// only slow down.
pub const GROUP_COMMIT_SIBLINGS: usize = 4;

/// How long the writer waits before taking its next batch once the first request arrived:
/// `delay` when the previous batch held at least [`GROUP_COMMIT_SIBLINGS`] requests, else
/// nothing.
fn gather_window(delay: Duration, previous_batch: usize) -> Option<Duration> {
    (!delay.is_zero() && previous_batch >= GROUP_COMMIT_SIBLINGS).then_some(delay)
}

/// A batch: `first`, then, after sleeping through `window` (if any), everything queued on
/// `rx`. The writer sleeps rather than taking each arrival as it comes: a wake-up per
/// request would cost the CPU the delay is meant to save.
fn gather<T>(rx: &mpsc::Receiver<T>, first: T, window: Option<Duration>) -> Vec<T> {
    let mut batch = vec![first];
    if let Some(window) = window {
        std::thread::sleep(window);
    }
    while let Ok(more) = rx.try_recv() {
        batch.push(more);
    }
    batch
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// A branch as stored.
#[derive(Clone, PartialEq, Message)]
struct BranchPb {
    #[prost(string, tag = "1")]
    branch_id: String,
    #[prost(string, tag = "2")]
    endpoint: String,
    #[prost(uint32, tag = "3")]
    commit_order: u32,
    /// [`BranchKind::code`].
    #[prost(int32, tag = "4")]
    kind: i32,
}

/// Value of a `commits` entry.
#[derive(Clone, PartialEq, Message)]
struct CommitPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint32, tag = "2")]
    tx_node: u32,
    #[prost(uint64, tag = "3")]
    tx_epoch: u64,
    #[prost(uint64, tag = "4")]
    tx_seq: u64,
    #[prost(message, repeated, tag = "5")]
    branches: Vec<BranchPb>,
    #[prost(uint64, tag = "6")]
    decided_at_ms: u64,
    #[prost(uint64, tag = "7")]
    lsn: u64,
    #[prost(bool, tag = "8")]
    done: bool,
    /// Written by [`LazyRecord::OnePhaseCommitted`]: not forced, `lsn` is 0.
    #[prost(bool, tag = "9")]
    one_phase: bool,
}

/// Value of a `preparing` entry.
#[derive(Clone, PartialEq, Message)]
struct PreparingPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint32, tag = "2")]
    tx_node: u32,
    #[prost(uint64, tag = "3")]
    tx_epoch: u64,
    #[prost(uint64, tag = "4")]
    tx_seq: u64,
    #[prost(message, repeated, tag = "5")]
    branches: Vec<BranchPb>,
    /// Written by [`LazyRecord::OnePhase`]: a one-phase commit goes to the only branch.
    #[prost(bool, tag = "6")]
    one_phase: bool,
}

/// Value of an audit record in the `commits` tree.
#[derive(Clone, PartialEq, Message)]
struct AuditPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint32, tag = "2")]
    tx_node: u32,
    #[prost(uint64, tag = "3")]
    tx_epoch: u64,
    #[prost(uint64, tag = "4")]
    tx_seq: u64,
    /// [`HeuristicDecision::code`].
    #[prost(int32, tag = "5")]
    decision: i32,
    #[prost(string, tag = "6")]
    operator: String,
    #[prost(string, tag = "7")]
    reason: String,
    #[prost(bool, tag = "8")]
    force: bool,
    #[prost(uint64, tag = "9")]
    at_ms: u64,
    #[prost(string, tag = "10")]
    prior_state: String,
    #[prost(bool, tag = "11")]
    accepted: bool,
    #[prost(bool, tag = "12")]
    contradicts: bool,
    #[prost(string, repeated, tag = "13")]
    branches: Vec<String>,
    #[prost(string, tag = "14")]
    detail: String,
    /// The LSN it was forced at: readers ignore records past the durable LSN.
    #[prost(uint64, tag = "15")]
    lsn: u64,
}

/// Value of the `meta` record in the default tree.
#[derive(Clone, PartialEq, Message)]
struct MetaPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint32, tag = "2")]
    node_id: u32,
    #[prost(uint64, tag = "3")]
    epoch: u64,
}

/// Value of the [`LAST_LSN_KEY`] record.
#[derive(Clone, PartialEq, Message)]
struct LastLsnPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint64, tag = "2")]
    last_lsn: u64,
}

fn tx_key(tx: &TxId) -> [u8; TX_KEY_LEN] {
    let mut key = [0u8; TX_KEY_LEN];
    key[..4].copy_from_slice(&tx.node.to_be_bytes());
    key[4..12].copy_from_slice(&tx.epoch.to_be_bytes());
    key[12..].copy_from_slice(&tx.seq.to_be_bytes());
    key
}

/// Key of audit record number `index` of `tx`.
fn audit_key(tx: &TxId, index: u32) -> [u8; AUDIT_KEY_LEN] {
    let mut key = [0u8; AUDIT_KEY_LEN];
    key[..TX_KEY_LEN].copy_from_slice(&tx_key(tx));
    key[TX_KEY_LEN] = AUDIT_TAG;
    key[TX_KEY_LEN + 1..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The prefix every audit key of `tx` starts with.
fn audit_prefix(tx: &TxId) -> [u8; TX_KEY_LEN + 1] {
    let mut key = [0u8; TX_KEY_LEN + 1];
    key[..TX_KEY_LEN].copy_from_slice(&tx_key(tx));
    key[TX_KEY_LEN] = AUDIT_TAG;
    key
}

fn encode_audit(record: &AuditRecord, lsn: Lsn) -> Vec<u8> {
    AuditPb {
        format: BASE_FORMAT,
        tx_node: record.tx.node,
        tx_epoch: record.tx.epoch,
        tx_seq: record.tx.seq,
        decision: record.decision.code(),
        operator: record.operator.clone(),
        reason: record.reason.clone(),
        force: record.force,
        at_ms: record.at_ms,
        prior_state: record.prior_state.clone(),
        accepted: record.accepted,
        contradicts: record.contradicts,
        branches: record.branches.clone(),
        detail: record.detail.clone(),
        lsn,
    }
    .encode_to_vec()
}

fn decode_audit(bytes: &[u8]) -> Result<(AuditRecord, Lsn), String> {
    let pb = AuditPb::decode(bytes).map_err(|e| format!("corrupt audit record: {e}"))?;
    check_format("audit record", pb.format)?;
    let decision = HeuristicDecision::from_code(pb.decision).ok_or_else(|| {
        format!(
            "corrupt audit record: decision code {} is unknown",
            pb.decision
        )
    })?;
    Ok((
        AuditRecord {
            tx: TxId {
                node: pb.tx_node,
                epoch: pb.tx_epoch,
                seq: pb.tx_seq,
            },
            decision,
            operator: pb.operator,
            reason: pb.reason,
            force: pb.force,
            at_ms: pb.at_ms,
            prior_state: pb.prior_state,
            accepted: pb.accepted,
            contradicts: pb.contradicts,
            branches: pb.branches,
            detail: pb.detail,
        },
        pb.lsn,
    ))
}

fn branches_to_pb(branches: &[BranchSpec]) -> Vec<BranchPb> {
    branches
        .iter()
        .map(|b| BranchPb {
            branch_id: b.branch_id.clone(),
            endpoint: b.endpoint.clone(),
            commit_order: b.commit_order,
            kind: b.kind.code(),
        })
        .collect()
}

fn branches_from_pb(branches: Vec<BranchPb>) -> Vec<BranchSpec> {
    branches
        .into_iter()
        .map(|b| BranchSpec {
            branch_id: b.branch_id,
            endpoint: b.endpoint,
            commit_order: b.commit_order,
            kind: BranchKind::from_code(b.kind),
        })
        .collect()
}

fn check_format(what: &str, format: u32) -> Result<(), String> {
    if format == 0 || format > FORMAT_VERSION {
        return Err(format!(
            "{what} has format version {format}; this build reads versions 1..={FORMAT_VERSION}"
        ));
    }
    Ok(())
}

fn encode_commit(record: &CommitRecord, lsn: Lsn, done: bool, one_phase: bool) -> Vec<u8> {
    CommitPb {
        format: BASE_FORMAT,
        tx_node: record.tx.node,
        tx_epoch: record.tx.epoch,
        tx_seq: record.tx.seq,
        branches: branches_to_pb(&record.branches),
        decided_at_ms: record.decided_at_ms,
        lsn,
        done,
        one_phase,
    }
    .encode_to_vec()
}

/// A decoded `commits` value.
struct StoredCommit {
    record: CommitRecord,
    /// 0 for a one-phase record.
    lsn: Lsn,
    done: bool,
    one_phase: bool,
}

fn decode_commit(bytes: &[u8]) -> Result<StoredCommit, String> {
    let pb = CommitPb::decode(bytes).map_err(|e| format!("corrupt commit record: {e}"))?;
    check_format("commit record", pb.format)?;
    Ok(StoredCommit {
        record: CommitRecord {
            tx: TxId {
                node: pb.tx_node,
                epoch: pb.tx_epoch,
                seq: pb.tx_seq,
            },
            branches: branches_from_pb(pb.branches),
            decided_at_ms: pb.decided_at_ms,
        },
        lsn: pb.lsn,
        done: pb.done,
        one_phase: pb.one_phase,
    })
}

/// A decoded `preparing` value: the transaction, its branches, and whether it is a
/// one-phase intent.
fn decode_preparing(bytes: &[u8]) -> Result<(TxId, Vec<BranchSpec>, bool), String> {
    let pb = PreparingPb::decode(bytes).map_err(|e| format!("corrupt preparing record: {e}"))?;
    check_format("preparing record", pb.format)?;
    Ok((
        TxId {
            node: pb.tx_node,
            epoch: pb.tx_epoch,
            seq: pb.tx_seq,
        },
        branches_from_pb(pb.branches),
        pb.one_phase,
    ))
}

fn encode_preparing(tx: &TxId, branches: &[BranchSpec], one_phase: bool) -> Vec<u8> {
    PreparingPb {
        format: if one_phase {
            ONE_PHASE_INTENT_FORMAT
        } else {
            BASE_FORMAT
        },
        tx_node: tx.node,
        tx_epoch: tx.epoch,
        tx_seq: tx.seq,
        branches: branches_to_pb(branches),
        one_phase,
    }
    .encode_to_vec()
}

fn decode_last_lsn(bytes: &[u8]) -> Result<Lsn, String> {
    let pb = LastLsnPb::decode(bytes).map_err(|e| format!("corrupt LSN counter: {e}"))?;
    check_format("LSN counter", pb.format)?;
    Ok(pb.last_lsn)
}

fn encode_last_lsn(last_lsn: Lsn) -> Vec<u8> {
    LastLsnPb {
        format: BASE_FORMAT,
        last_lsn,
    }
    .encode_to_vec()
}

// ---------------------------------------------------------------------------------------
// Shared state, syncing
// ---------------------------------------------------------------------------------------

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the [`SledLog`] handle and its writer thread.
struct Shared {
    durable_lsn: AtomicU64,
    stats: Mutex<LogStats>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Blob files synced; only read by tests.
    #[cfg_attr(not(test), allow(dead_code))]
    blob_syncs: Arc<AtomicU64>,
    /// Lazy records not yet written to sled, oldest first (see [`Trees::apply_queued`]).
    queued: Mutex<Vec<LazyRecord>>,
    /// Held while queued records are written: a reader that writes the queue first waits
    /// for records the writer thread has taken but not yet written.
    applying: Mutex<()>,
}

impl Shared {
    /// The poison message, if the log is poisoned.
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
            tracing::error!(error = %msg, "decision log failed; refusing all further writes");
            *slot = Some(msg);
        }
        self.failed.store(true, Ordering::Release);
        LogError::Failed(slot.clone().unwrap_or_default())
    }
}

/// What a fail point's `return` action asks for: `abort` aborts the process, anything
/// else makes the sync fail. Compiled whatever the features: `fail_point!` expands
/// whenever `fail/failpoints` is on, which another package (the participant SDK's own
/// `failpoints` feature) can turn on without this crate's.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn failpoint_action(name: &str, arg: Option<String>) -> io::Result<()> {
    if arg.as_deref() == Some("abort") {
        tracing::error!(failpoint = name, "aborting the process at fail point");
        std::process::abort();
    }
    Err(io::Error::other(format!(
        "injected sync failure at fail point {name}"
    )))
}

// ---------------------------------------------------------------------------------------
// Writer thread
// ---------------------------------------------------------------------------------------

type Reply = oneshot::Sender<Result<Lsn, LogError>>;

/// What a forced write carries.
enum Item {
    /// A COMMIT decision (write-once, idempotent for the same branches).
    Commit(CommitRecord),
    /// An audit record (always appended).
    Audit(AuditRecord),
    /// No record: make everything written so far durable ([`DecisionLog::sync`]).
    Sync,
}

struct Request {
    item: Item,
    reply: Reply,
}

/// A COMMIT decision of a batch, unpacked from its [`Request`].
struct CommitRequest {
    record: CommitRecord,
    reply: Reply,
}

struct Writer {
    db: sled::Db,
    /// Its trees (the COMMIT decisions go to `commits`, queued lazy records to both).
    trees: Trees,
    syncer: Syncer,
    shared: Arc<Shared>,
    last_lsn: Lsn,
    /// [`SledLogOptions::group_commit_delay_us`].
    delay: Duration,
}

/// A record of the current batch waiting for the sync.
struct Waiting {
    reply: Reply,
    lsn: Lsn,
    /// A COMMIT decision (counted in the stats), not an audit record.
    decision: bool,
}

impl Writer {
    /// Serves requests until every sender is gone; returns the syncer for the final sync.
    fn run(mut self, rx: mpsc::Receiver<Request>) -> Syncer {
        let mut previous_batch = 0;
        loop {
            match rx.recv_timeout(LAZY_APPLY_INTERVAL) {
                Ok(first) => {
                    let batch = gather(&rx, first, gather_window(self.delay, previous_batch));
                    previous_batch = batch.len();
                    self.process(batch);
                }
                // Idle: queued lazy records still reach sled (and its background flush).
                Err(mpsc::RecvTimeoutError::Timeout) => self.apply_idle(),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Closing: what was queued is written before the final flush and sync.
        self.apply_idle();
        self.syncer
    }

    /// Writes the queued lazy records outside a batch. A failure poisons the log (in
    /// [`Trees::apply_queued`]); every later write and read reports it.
    fn apply_idle(&self) {
        if self.shared.failure().is_none() {
            let _ = self.trees.apply_queued(&self.shared, &HashSet::new());
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        if let Some(msg) = self.shared.failure() {
            for req in batch {
                let _ = req.reply.send(Err(LogError::Failed(msg.clone())));
            }
            return;
        }
        let mut waiting: Vec<Waiting> = Vec::new();
        let result = self.write_batch(batch, &mut waiting);
        match result {
            Ok(Some(last)) => {
                self.last_lsn = last;
                self.shared.durable_lsn.fetch_max(last, Ordering::AcqRel);
                {
                    let mut stats = lock(&self.shared.stats);
                    let n = waiting.iter().filter(|w| w.decision).count() as u64;
                    stats.syncs += 1;
                    if n > 0 {
                        stats.batches += 1;
                        stats.decisions += n;
                        stats.max_batch = stats.max_batch.max(n);
                    }
                }
                for w in waiting {
                    let _ = w.reply.send(Ok(w.lsn));
                }
            }
            Ok(None) => {
                debug_assert!(waiting.is_empty());
            }
            Err((msg, rest)) => {
                let err = self.shared.poison(msg);
                for reply in waiting.into_iter().map(|w| w.reply).chain(rest) {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Writes the new decisions of `batch`, flushes and syncs. Answers conflicts and
    /// repeats of decisions made durable earlier at once; the others are left in
    /// `waiting`. Returns the batch's highest LSN (`None` if nothing new was written), or
    /// the failure with the replies not yet in `waiting`.
    fn write_batch(
        &mut self,
        batch: Vec<Request>,
        waiting: &mut Vec<Waiting>,
    ) -> Result<Option<Lsn>, (String, Vec<Reply>)> {
        // The lazy records queued so far go first: a sync covers every record written
        // before it was asked for, and this batch's syncs were asked after them.
        let committing: HashSet<TxId> = batch
            .iter()
            .filter_map(|r| match &r.item {
                Item::Commit(record) => Some(record.tx),
                _ => None,
            })
            .collect();
        if let Err(e) = self.trees.apply_queued(&self.shared, &committing) {
            return Err((e.to_string(), batch.into_iter().map(|r| r.reply).collect()));
        }
        let mut in_batch: HashMap<TxId, (Lsn, Vec<BranchSpec>)> = HashMap::new();
        // Audit records of this batch per transaction: they come after the stored ones.
        let mut audits_in_batch: HashMap<TxId, u32> = HashMap::new();
        let mut sled_batch = sled::Batch::default();
        let mut next = self.last_lsn;
        let mut sync_asked = false;
        let mut requests = batch.into_iter();
        while let Some(req) = requests.next() {
            let record = match req.item {
                Item::Commit(record) => record,
                Item::Sync => {
                    sync_asked = true;
                    waiting.push(Waiting {
                        reply: req.reply,
                        lsn: self.last_lsn,
                        decision: false,
                    });
                    continue;
                }
                Item::Audit(audit) => {
                    let tx = audit.tx;
                    let index = match audits_in_batch.get(&tx) {
                        Some(n) => *n,
                        None => match self.stored_audits(&tx) {
                            Ok(n) => n,
                            Err(msg) => {
                                let rest =
                                    std::iter::once(req.reply).chain(requests.map(|r| r.reply));
                                return Err((msg, rest.collect()));
                            }
                        },
                    };
                    audits_in_batch.insert(tx, index.saturating_add(1));
                    next += 1;
                    sled_batch.insert(&audit_key(&tx, index)[..], encode_audit(&audit, next));
                    waiting.push(Waiting {
                        reply: req.reply,
                        lsn: next,
                        decision: false,
                    });
                    continue;
                }
            };
            let req = CommitRequest {
                record,
                reply: req.reply,
            };
            let tx = req.record.tx;
            if let Some((lsn, branches)) = in_batch.get(&tx) {
                if *branches == req.record.branches {
                    waiting.push(Waiting {
                        reply: req.reply,
                        lsn: *lsn,
                        decision: true,
                    });
                } else {
                    let _ = req.reply.send(Err(LogError::Conflict { tx }));
                }
                continue;
            }
            let key = tx_key(&tx);
            let existing = match self.trees.commits.get(key) {
                Ok(v) => v,
                Err(e) => {
                    let rest = std::iter::once(req.reply).chain(requests.map(|r| r.reply));
                    return Err((
                        format!("sled read of commit {tx} failed: {e}"),
                        rest.collect(),
                    ));
                }
            };
            match existing.as_deref().map(decode_commit) {
                Some(Ok(stored)) if stored.record.branches != req.record.branches => {
                    let _ = req.reply.send(Err(LogError::Conflict { tx }));
                }
                Some(Ok(stored)) if stored.one_phase => {
                    // A lazy one-phase record: the same decision, now forced.
                    next += 1;
                    sled_batch.insert(
                        &key[..],
                        encode_commit(&stored.record, next, stored.done, false),
                    );
                    in_batch.insert(tx, (next, req.record.branches));
                    waiting.push(Waiting {
                        reply: req.reply,
                        lsn: next,
                        decision: true,
                    });
                }
                Some(Ok(stored)) => {
                    // Made durable by an earlier batch or before this open (open syncs).
                    self.shared
                        .durable_lsn
                        .fetch_max(stored.lsn, Ordering::AcqRel);
                    let _ = req.reply.send(Ok(stored.lsn));
                }
                Some(Err(msg)) => {
                    let rest = std::iter::once(req.reply).chain(requests.map(|r| r.reply));
                    return Err((format!("commit {tx}: {msg}"), rest.collect()));
                }
                None => {
                    next += 1;
                    sled_batch.insert(&key[..], encode_commit(&req.record, next, false, false));
                    in_batch.insert(tx, (next, req.record.branches));
                    waiting.push(Waiting {
                        reply: req.reply,
                        lsn: next,
                        decision: true,
                    });
                }
            }
        }
        if next == self.last_lsn && !sync_asked {
            return Ok(None);
        }
        if next > self.last_lsn {
            sled_batch.insert(LAST_LSN_KEY, encode_last_lsn(next));
            self.trees.commits.apply_batch(sled_batch).map_err(|e| {
                (
                    format!("sled write of {} records failed: {e}", next - self.last_lsn),
                    vec![],
                )
            })?;
        }
        self.db
            .flush()
            .map_err(|e| (format!("sled flush failed: {e}"), vec![]))?;
        self.sync_batch()
            .map_err(|e| (format!("sync failed: {e}"), vec![]))?;
        Ok(Some(next))
    }

    /// How many audit records of `tx` are stored (the index the next one gets).
    fn stored_audits(&self, tx: &TxId) -> Result<u32, String> {
        let mut n: u32 = 0;
        for item in self.trees.commits.scan_prefix(audit_prefix(tx)) {
            item.map_err(|e| format!("sled scan of the audit records of {tx} failed: {e}"))?;
            n = n.saturating_add(1);
        }
        Ok(n)
    }

    /// The sync of one batch, between the fail points.
    fn sync_batch(&mut self) -> io::Result<()> {
        fail::fail_point!("coordinator::log::before_sync", |arg| failpoint_action(
            "coordinator::log::before_sync",
            arg
        ));
        self.syncer.sync()?;
        fail::fail_point!("coordinator::log::after_sync", |arg| failpoint_action(
            "coordinator::log::after_sync",
            arg
        ));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Lazy records
// ---------------------------------------------------------------------------------------

/// How long an idle writer thread leaves queued lazy records unwritten (a busy one writes
/// them before each batch); sled's background flush ([`SledLogOptions::flush_every_ms`])
/// then takes them to the disk.
const LAZY_APPLY_INTERVAL: Duration = Duration::from_millis(20);

/// The sled trees lazy records go to.
#[derive(Clone)]
struct Trees {
    commits: sled::Tree,
    preparing: sled::Tree,
}

fn sled_error(shared: &Shared, what: &str, e: sled::Error) -> LogError {
    shared.poison(format!("{what}: {e}"))
}

/// Which queued records need not be written: a `Preparing` record whose transaction's
/// COMMIT is written in the same batch (`committing`: the COMMIT record carries the
/// branches and makes the transaction decided), and a `Preparing` record or one-phase
/// intent that a later record of the same queue removes again (`Aborted`, `Done`,
/// `OnePhaseCommitted`). No sync came between the two (a sync writes the queue), so the
/// insert was never promised durable. The removals still run (removing an absent key
/// writes nothing), so a record written by an earlier queue goes too.
fn skipped_inserts(records: &[LazyRecord], committing: &HashSet<TxId>) -> Vec<bool> {
    let mut skip = vec![false; records.len()];
    let mut pending: HashMap<TxId, Vec<usize>> = HashMap::new();
    for (i, record) in records.iter().enumerate() {
        match record {
            LazyRecord::Preparing { tx, .. } if committing.contains(tx) => skip[i] = true,
            LazyRecord::Preparing { tx, .. } | LazyRecord::OnePhase { tx, .. } => {
                pending.entry(*tx).or_default().push(i)
            }
            LazyRecord::Aborted { tx }
            | LazyRecord::Done { tx }
            | LazyRecord::OnePhaseCommitted { tx, .. } => {
                for j in pending.remove(tx).unwrap_or_default() {
                    skip[j] = true;
                }
            }
        }
    }
    skip
}

impl Trees {
    /// Writes the queued lazy records, oldest first, leaving out the inserts
    /// [`skipped_inserts`] finds unneeded. A sled failure poisons the log; the records
    /// not yet written are dropped with it (a poisoned log writes nothing more).
    fn apply_queued(&self, shared: &Shared, committing: &HashSet<TxId>) -> Result<(), LogError> {
        let _applying = lock(&shared.applying);
        let records = std::mem::take(&mut *lock(&shared.queued));
        if records.is_empty() {
            return Ok(());
        }
        let skip = skipped_inserts(&records, committing);
        for (record, skip) in records.into_iter().zip(skip) {
            if !skip {
                self.write_lazy(shared, record)?;
            }
        }
        Ok(())
    }

    /// Writes one lazy record to sled.
    fn write_lazy(&self, shared: &Shared, record: LazyRecord) -> Result<(), LogError> {
        match record {
            LazyRecord::Preparing { tx, branches } => {
                self.preparing
                    .insert(tx_key(&tx), encode_preparing(&tx, &branches, false))
                    .map_err(|e| sled_error(shared, "sled write of a preparing record", e))?;
            }
            LazyRecord::OnePhase { tx, branch } => {
                self.preparing
                    .insert(tx_key(&tx), encode_preparing(&tx, &[branch], true))
                    .map_err(|e| sled_error(shared, "sled write of a one-phase intent", e))?;
            }
            LazyRecord::Aborted { tx } => {
                self.preparing
                    .remove(tx_key(&tx))
                    .map_err(|e| sled_error(shared, "sled removal of a preparing record", e))?;
            }
            LazyRecord::Done { tx } => {
                let mut corrupt: Option<String> = None;
                self.commits
                    .fetch_and_update(tx_key(&tx), |old| {
                        let old = old?;
                        match decode_commit(old) {
                            Ok(stored) if stored.done => Some(old.to_vec()),
                            Ok(stored) => Some(encode_commit(
                                &stored.record,
                                stored.lsn,
                                true,
                                stored.one_phase,
                            )),
                            Err(m) => {
                                corrupt = Some(m);
                                Some(old.to_vec())
                            }
                        }
                    })
                    .map_err(|e| sled_error(shared, "sled update of a commit record", e))?;
                if let Some(m) = corrupt {
                    return Err(shared.poison(format!("commit {tx}: {m}")));
                }
                self.preparing
                    .remove(tx_key(&tx))
                    .map_err(|e| sled_error(shared, "sled removal of a preparing record", e))?;
            }
            LazyRecord::OnePhaseCommitted { tx, branches } => {
                let record = CommitRecord {
                    tx,
                    branches,
                    decided_at_ms: now_ms(),
                };
                let value = encode_commit(&record, 0, true, true);
                // Insert only if absent: never overwrite an existing decision.
                let _ = self
                    .commits
                    .compare_and_swap(tx_key(&tx), None as Option<&[u8]>, Some(value))
                    .map_err(|e| sled_error(shared, "sled write of a one-phase record", e))?;
                self.preparing
                    .remove(tx_key(&tx))
                    .map_err(|e| sled_error(shared, "sled removal of a preparing record", e))?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// SledLog
// ---------------------------------------------------------------------------------------

/// The file-backed decision log. See the module docs.
///
/// Dropping it stops the writer thread, flushes and syncs what was written (lazy records
/// included, unless the log is poisoned) and releases the directory lock.
pub struct SledLog {
    dir: PathBuf,
    node_id: u32,
    epoch: u64,
    shared: Arc<Shared>,
    sender: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<Syncer>>,
    // Field order matters: sled must be closed before the lock is released.
    db: sled::Db,
    /// The `commits` and `preparing` trees.
    trees: Trees,
    _lock: File,
}

impl std::fmt::Debug for SledLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledLog")
            .field("dir", &self.dir)
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

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a store that does not open holds, for its error message.
const HOLDS: &str = "the COMMIT decisions of transactions whose branches may still wait for them, and deleting it turns them into aborts";

fn open_failed(dir: &Path, what: impl std::fmt::Display) -> LogError {
    LogError::Open {
        dir: dir.display().to_string(),
        detail: what.to_string(),
    }
}

/// Takes the exclusive lock on `<dir>/LOCK` (see [`twopc_durable::take_lock`]).
fn take_lock(dir: &Path) -> Result<File, LogError> {
    twopc_durable::take_lock(
        dir,
        LOCK_FILE,
        "another coordinator (or another open of this log in this process)",
    )
    .map_err(|e| match e {
        LockError::Locked { detail } => LogError::Locked {
            dir: dir.display().to_string(),
            detail,
        },
        LockError::Io(what) => open_failed(dir, what),
    })
}

impl SledLog {
    /// Opens (creating if needed) the log in `dir`: locks `<dir>/LOCK`, opens sled in
    /// `<dir>/sled`, creates the node id on first open, increments the epoch and makes all
    /// of it durable before returning.
    ///
    /// Fails with [`LogError::Locked`] at once if the directory is locked (by another
    /// process or another open `SledLog` of this process), and with [`LogError::Open`]
    /// for any I/O, sled or sync error. What a kill can leave half-written in sled's
    /// directory is put right first (see [`twopc_durable::repair`]).
    pub fn open(dir: &Path, opts: SledLogOptions) -> Result<SledLog, LogError> {
        let existed = dir.exists();
        fs::create_dir_all(dir).map_err(|e| open_failed(dir, format!("cannot create it: {e}")))?;
        let lock_file = take_lock(dir)?;

        let sled_dir = dir.join(SLED_DIR);
        let config = sled::Config::new()
            .cache_capacity(opts.cache_capacity_bytes)
            .flush_every_ms(if opts.flush_every_ms == 0 {
                None
            } else {
                Some(opts.flush_every_ms)
            });
        let db = open_sled(&sled_dir, config).map_err(|e| open_failed(dir, e.explained(HOLDS)))?;
        let sled_err = |e: sled::Error| open_failed(dir, format!("sled: {e}"));
        let commits = db.open_tree(COMMITS_TREE).map_err(sled_err)?;
        let preparing = db.open_tree(PREPARING_TREE).map_err(sled_err)?;

        let meta = match db.get(META_KEY).map_err(sled_err)? {
            Some(bytes) => {
                let meta = MetaPb::decode(&*bytes)
                    .map_err(|e| open_failed(dir, format!("corrupt meta record: {e}")))?;
                check_format("meta record", meta.format).map_err(|m| open_failed(dir, m))?;
                meta
            }
            None => MetaPb {
                format: BASE_FORMAT,
                node_id: rand::random::<u32>(),
                epoch: 0,
            },
        };
        let epoch = meta
            .epoch
            .checked_add(1)
            .ok_or_else(|| open_failed(dir, "epoch overflow"))?;
        let meta = MetaPb {
            format: BASE_FORMAT,
            node_id: meta.node_id,
            epoch,
        };
        db.insert(META_KEY, meta.encode_to_vec())
            .map_err(sled_err)?;
        let last_lsn = match commits.get(LAST_LSN_KEY).map_err(sled_err)? {
            Some(bytes) => decode_last_lsn(&bytes).map_err(|m| open_failed(dir, m))?,
            None => 0,
        };
        db.flush().map_err(sled_err)?;

        // Everything readable now (records of earlier runs, written but perhaps never
        // synced before a crash, and the new epoch) becomes durable here.
        let mut syncer = Syncer::new(
            sled_dir,
            opts.fail_syncs.clone(),
            "SledLogOptions::fail_syncs",
        )
        .map_err(|e| open_failed(dir, e))?;
        syncer
            .sync_at_open()
            .map_err(|e| open_failed(dir, format!("sync failed: {e}")))?;
        lock_file
            .sync_all()
            .and_then(|_| sync_dir(dir))
            .and_then(|_| match dir.parent() {
                Some(parent) if !existed && !parent.as_os_str().is_empty() => sync_dir(parent),
                _ => Ok(()),
            })
            .map_err(|e| open_failed(dir, format!("sync failed: {e}")))?;

        let shared = Arc::new(Shared {
            durable_lsn: AtomicU64::new(last_lsn),
            stats: Mutex::new(LogStats::default()),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            blob_syncs: syncer.blob_syncs(),
            queued: Mutex::new(Vec::new()),
            applying: Mutex::new(()),
        });
        let (sender, receiver) = mpsc::channel();
        let trees = Trees {
            commits: commits.clone(),
            preparing: preparing.clone(),
        };
        let writer = Writer {
            db: db.clone(),
            trees: trees.clone(),
            syncer,
            shared: shared.clone(),
            last_lsn,
            delay: Duration::from_micros(opts.group_commit_delay_us),
        };
        let handle = std::thread::Builder::new()
            .name("twopc-decision-log".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| open_failed(dir, format!("cannot start the writer thread: {e}")))?;

        tracing::info!(
            dir = %dir.display(),
            node = format_args!("{:08x}", meta.node_id),
            epoch,
            durable_lsn = last_lsn,
            "decision log opened"
        );
        Ok(SledLog {
            dir: dir.to_path_buf(),
            node_id: meta.node_id,
            epoch,
            shared,
            sender: Some(sender),
            writer: Some(handle),
            db,
            trees,
            _lock: lock_file,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands one forced write to the writer thread and waits for its durability.
    async fn force(&self, epoch: u64, item: Item) -> Result<Lsn, LogError> {
        self.check_write(epoch)?;
        let (reply, answer) = oneshot::channel();
        let sender = self
            .sender
            .as_ref()
            .ok_or_else(|| LogError::Failed("decision log is closing".into()))?;
        if sender.send(Request { item, reply }).is_err() {
            return Err(self
                .shared
                .poison("the decision log writer thread has stopped".into()));
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self
                .shared
                .poison("the decision log writer thread stopped without answering".into())),
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

    /// Decodes a `commits` value, or poisons the log if it is corrupt.
    fn decode_or_poison(&self, bytes: &[u8]) -> Result<StoredCommit, LogError> {
        decode_commit(bytes).map_err(|m| self.shared.poison(m))
    }

    fn sled_error(&self, what: &str, e: sled::Error) -> LogError {
        sled_error(&self.shared, what, e)
    }

    /// Blob files synced by the writer so far (tests).
    #[cfg(test)]
    fn blob_syncs(&self) -> u64 {
        self.shared.blob_syncs.load(Ordering::Acquire)
    }
}

impl DecisionLog for SledLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn node_id(&self) -> u32 {
        self.node_id
    }

    async fn force_commit(&self, epoch: u64, record: CommitRecord) -> Result<Lsn, LogError> {
        self.force(epoch, Item::Commit(record)).await
    }

    async fn force_audit(&self, epoch: u64, record: AuditRecord) -> Result<Lsn, LogError> {
        self.force(epoch, Item::Audit(record)).await
    }

    async fn sync(&self, epoch: u64) -> Result<(), LogError> {
        self.force(epoch, Item::Sync).await.map(|_| ())
    }

    fn audits(&self, tx: &TxId) -> Result<Vec<AuditRecord>, LogError> {
        self.check_read()?;
        let durable = self.durable_lsn();
        let mut records = Vec::new();
        // Keys sort by index (big-endian), so this is the order they were forced in.
        for item in self.trees.commits.scan_prefix(audit_prefix(tx)) {
            let (key, value) =
                item.map_err(|e| self.sled_error("sled scan of audit records", e))?;
            if key.len() != AUDIT_KEY_LEN {
                continue;
            }
            let (record, lsn) = decode_audit(&value)
                .map_err(|m| self.shared.poison(format!("transaction {tx}: {m}")))?;
            // Written by the writer but not yet synced: not a record yet.
            if lsn <= durable {
                records.push(record);
            }
        }
        Ok(records)
    }

    fn record_lazy(&self, epoch: u64, record: LazyRecord) -> Result<(), LogError> {
        self.check_write(epoch)?;
        // Queued for the writer thread: no sled work under the caller's locks, and records
        // that cancel out never reach sled. Reads write the queue first.
        lock(&self.shared.queued).push(record);
        Ok(())
    }

    fn decision(&self, tx: &TxId) -> Result<Option<StoredDecision>, LogError> {
        self.check_read()?;
        // A queued `Done` or one-phase outcome of this transaction counts.
        self.trees.apply_queued(&self.shared, &HashSet::new())?;
        let Some(bytes) = self
            .trees
            .commits
            .get(tx_key(tx))
            .map_err(|e| self.sled_error("sled read of a commit record", e))?
        else {
            return Ok(None);
        };
        let stored = self.decode_or_poison(&bytes)?;
        // A record the writer has written but not yet synced is not a decision yet.
        // (One-phase records have LSN 0: they need no sync, the branch committed itself.)
        if stored.lsn > self.durable_lsn() {
            return Ok(None);
        }
        Ok(Some(StoredDecision {
            record: stored.record,
            done: stored.done,
        }))
    }

    fn recover(&self) -> Result<Recovered, LogError> {
        self.check_read()?;
        self.trees.apply_queued(&self.shared, &HashSet::new())?;
        let durable = self.durable_lsn();
        let mut open_commits: Vec<(Lsn, CommitRecord)> = Vec::new();
        for item in self.trees.commits.iter() {
            let (key, value) = item.map_err(|e| self.sled_error("sled scan of commits", e))?;
            if key.len() != TX_KEY_LEN {
                continue;
            }
            let stored = self.decode_or_poison(&value)?;
            if !stored.done && stored.lsn <= durable {
                open_commits.push((stored.lsn, stored.record));
            }
        }
        open_commits.sort_by_key(|(lsn, _)| *lsn);

        let mut undecided = Vec::new();
        let mut one_phase = Vec::new();
        for item in self.trees.preparing.iter() {
            let (key, value) = item.map_err(|e| self.sled_error("sled scan of preparing", e))?;
            let decided = match self
                .trees
                .commits
                .get(&key)
                .map_err(|e| self.sled_error("sled read of a commit record", e))?
            {
                Some(bytes) => self.decode_or_poison(&bytes)?.lsn <= durable,
                None => false,
            };
            if !decided {
                let (tx, branches, is_one_phase) =
                    decode_preparing(&value).map_err(|m| self.shared.poison(m))?;
                match (is_one_phase, branches.first()) {
                    (true, Some(branch)) => one_phase.push((tx, branch.clone())),
                    _ => undecided.push((tx, branches)),
                }
            }
        }
        Ok(Recovered {
            commits: open_commits.into_iter().map(|(_, r)| r).collect(),
            undecided,
            one_phase,
        })
    }

    fn durable_lsn(&self) -> Lsn {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    fn stats(&self) -> LogStats {
        *lock(&self.shared.stats)
    }

    fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once it has answered everything.
        drop(self.sender.take());
        let syncer = match self.writer.take().map(JoinHandle::join) {
            Some(Ok(syncer)) => Some(syncer),
            Some(Err(_)) => {
                self.shared
                    .poison("the decision log writer thread panicked".into());
                None
            }
            None => None,
        };
        // Make lazy records durable too on a clean shutdown (best effort).
        if let (Some(mut syncer), false) = (syncer, self.is_failed()) {
            let result = self
                .db
                .flush()
                .map_err(|e| e.to_string())
                .and_then(|_| syncer.sync().map_err(|e| e.to_string()));
            if let Err(e) = result {
                tracing::warn!(
                    error = %e,
                    dir = %self.dir.display(),
                    "final flush of the decision log failed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{self, audit, branches, commit, tx_of, Subject, SuiteOptions};

    fn names(dir: &Path) -> Vec<String> {
        twopc_durable::sorted_listing(dir)
            .expect("list")
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    fn open(dir: &Path) -> SledLog {
        SledLog::open(dir, SledLogOptions::default()).expect("open")
    }

    #[test]
    fn the_writer_waits_for_company_only_after_a_batch_that_had_some() {
        let delay = Duration::from_micros(300);
        assert_eq!(gather_window(delay, 0), None);
        assert_eq!(gather_window(delay, 1), None);
        assert_eq!(gather_window(delay, GROUP_COMMIT_SIBLINGS - 1), None);
        assert_eq!(gather_window(delay, GROUP_COMMIT_SIBLINGS), Some(delay));
        assert_eq!(gather_window(delay, 64), Some(delay));
        assert_eq!(gather_window(Duration::ZERO, 64), None);
    }

    #[test]
    fn a_batch_takes_what_arrives_within_its_window_and_what_is_queued() {
        for (window, expected) in [
            (None, vec![1, 2]),
            (Some(Duration::from_secs(2)), vec![1, 2, 3]),
        ] {
            let (tx, rx) = mpsc::channel();
            tx.send(2).expect("send");
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let _ = tx.send(3);
            });
            assert_eq!(gather(&rx, 1, window), expected, "window {window:?}");
            sender.join().expect("sender");
        }
    }

    #[tokio::test]
    async fn a_lone_client_never_waits_for_the_group_commit_delay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SledLog::open(
            dir.path(),
            SledLogOptions {
                group_commit_delay_us: 5_000_000,
                ..Default::default()
            },
        )
        .expect("open");
        let epoch = log.epoch();
        for i in 0..3 {
            let started = std::time::Instant::now();
            log.force_commit(epoch, commit(tx_of(&log, i), branches(1, "lone"), i))
                .await
                .expect("force");
            log.sync(epoch).await.expect("sync");
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "request {i} waited {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn queued_inserts_that_cancel_out_are_skipped_and_removals_always_run() {
        let t = |seq| TxId {
            node: 1,
            epoch: 1,
            seq,
        };
        let preparing = |seq| LazyRecord::Preparing {
            tx: t(seq),
            branches: branches(2, "q"),
        };
        let records = vec![
            preparing(1),                     // 0: its COMMIT is in the batch
            preparing(2),                     // 1: aborted below
            preparing(3),                     // 2: done below
            preparing(4),                     // 3: stays
            preparing(5),                     // 4: written twice, then aborted
            LazyRecord::Aborted { tx: t(2) }, // 5
            LazyRecord::Done { tx: t(3) },    // 6
            preparing(5),                     // 7
            LazyRecord::Aborted { tx: t(5) }, // 8
            LazyRecord::OnePhase {
                tx: t(6),
                branch: branches(1, "q").remove(0),
            }, // 9: aborted below
            LazyRecord::Aborted { tx: t(6) }, // 10
            LazyRecord::Done { tx: t(7) },    // 11: nothing queued to cancel
            LazyRecord::OnePhase {
                tx: t(8),
                branch: branches(1, "q").remove(0),
            }, // 12: its outcome follows
            LazyRecord::OnePhaseCommitted {
                tx: t(8),
                branches: branches(1, "q"),
            }, // 13: written
            LazyRecord::OnePhase {
                tx: t(9),
                branch: branches(1, "q").remove(0),
            }, // 14: stays
        ];
        let committing: HashSet<TxId> = [t(1)].into_iter().collect();
        assert_eq!(
            skipped_inserts(&records, &committing),
            vec![
                true, true, true, false, true, false, false, true, false, true, false, false, true,
                false, false
            ]
        );
        // Without a COMMIT in the batch the first one is written.
        assert!(!skipped_inserts(&records, &HashSet::new())[0]);
    }

    #[tokio::test]
    async fn queued_records_reach_sled_before_the_batch_that_follows_them_and_when_idle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let epoch = log.epoch();
        let (t1, t2, t3) = (tx_of(&log, 1), tx_of(&log, 2), tx_of(&log, 3));
        let present = |log: &SledLog, tx: &TxId| {
            log.trees
                .preparing
                .get(tx_key(tx))
                .expect("read preparing")
                .is_some()
        };
        for tx in [t1, t2] {
            log.record_lazy(
                epoch,
                LazyRecord::Preparing {
                    tx,
                    branches: branches(2, "q"),
                },
            )
            .expect("lazy");
        }
        // t1's COMMIT goes in the batch after its Preparing record: that record is never
        // written (the COMMIT carries its branches); t2's is.
        log.force_commit(epoch, commit(t1, branches(2, "q"), 1))
            .await
            .expect("force");
        assert!(
            !present(&log, &t1),
            "a decided transaction's Preparing record was written"
        );
        assert!(
            present(&log, &t2),
            "the batch did not write what was queued before it"
        );
        let recovered = log.recover().expect("recover");
        assert_eq!(recovered.commits.len(), 1);
        assert_eq!(recovered.undecided, vec![(t2, branches(2, "q"))]);

        // Done and Aborted are applied before a read that could see them...
        log.record_lazy(epoch, LazyRecord::Done { tx: t1 })
            .expect("lazy");
        log.record_lazy(epoch, LazyRecord::Aborted { tx: t2 })
            .expect("lazy");
        assert!(log.decision(&t1).expect("decision").expect("t1").done);
        assert!(!present(&log, &t2));

        // ...and by the idle writer without any other call.
        log.record_lazy(
            epoch,
            LazyRecord::Preparing {
                tx: t3,
                branches: branches(1, "q"),
            },
        )
        .expect("lazy");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !present(&log, &t3) {
            assert!(
                std::time::Instant::now() < deadline,
                "an idle writer left a queued record unwritten"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // And a sync covers what was queued before it, across a reopen.
        log.record_lazy(epoch, LazyRecord::Aborted { tx: t3 })
            .expect("lazy");
        log.sync(epoch).await.expect("sync");
        assert!(!present(&log, &t3));
        drop(log);
        let log = open(dir.path());
        let recovered = log.recover().expect("recover");
        assert!(recovered.commits.is_empty(), "t1 was marked done");
        assert!(recovered.undecided.is_empty());
    }

    #[tokio::test]
    async fn sled_log_passes_the_conformance_suite() {
        conformance::run_all(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let flag = Arc::new(AtomicBool::new(false));
                let opts = SledLogOptions {
                    fail_syncs: Some(flag.clone()),
                    ..Default::default()
                };
                let log = SledLog::open(&dir.path().join("data"), opts).expect("open");
                Subject::new(log, move |_: &SledLog| flag.store(true, Ordering::SeqCst))
                    .keep_alive(dir)
            },
            SuiteOptions::default(),
        )
        .await;
    }

    #[tokio::test]
    async fn reopen_keeps_decisions_and_done_flags_and_bumps_the_epoch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        let (node, e1) = (log.node_id(), log.epoch());
        assert_eq!(e1, 1);
        let finished = commit(tx_of(&log, 1), branches(2, "a"), 11);
        let open_one = commit(tx_of(&log, 2), branches(3, "b"), 12);
        log.force_commit(e1, finished.clone()).await.expect("force");
        let lsn = log.force_commit(e1, open_one.clone()).await.expect("force");
        log.record_lazy(e1, LazyRecord::Done { tx: finished.tx })
            .expect("done");
        let undecided = tx_of(&log, 3);
        log.record_lazy(
            e1,
            LazyRecord::Preparing {
                tx: undecided,
                branches: branches(1, "c"),
            },
        )
        .expect("preparing");
        let one_phase = tx_of(&log, 4);
        log.record_lazy(
            e1,
            LazyRecord::OnePhaseCommitted {
                tx: one_phase,
                branches: branches(1, "d"),
            },
        )
        .expect("one phase");
        drop(log);

        let log = open(&dir);
        assert_eq!(log.node_id(), node, "node id is fixed at creation");
        assert_eq!(log.epoch(), e1 + 1, "every open increments the epoch");
        assert_eq!(log.durable_lsn(), lsn, "durable LSN survives");
        assert_eq!(
            log.decision(&finished.tx).expect("read"),
            Some(StoredDecision {
                record: finished.clone(),
                done: true
            })
        );
        assert_eq!(
            log.decision(&open_one.tx).expect("read"),
            Some(StoredDecision {
                record: open_one.clone(),
                done: false
            })
        );
        assert_eq!(
            log.decision(&one_phase).expect("read").map(|d| d.done),
            Some(true)
        );
        assert_eq!(
            log.recover().expect("recover"),
            Recovered {
                commits: vec![open_one.clone()],
                undecided: vec![(undecided, branches(1, "c"))],
                one_phase: vec![],
            }
        );
        // Write-once across restarts; LSNs keep growing.
        assert!(matches!(
            log.force_commit(log.epoch(), commit(open_one.tx, vec![], 0))
                .await,
            Err(LogError::Conflict { .. })
        ));
        assert_eq!(
            log.force_commit(log.epoch(), open_one.clone())
                .await
                .expect("idempotent"),
            lsn
        );
        let next = log
            .force_commit(log.epoch(), commit(tx_of(&log, 1), branches(1, "n"), 0))
            .await
            .expect("force");
        assert_eq!(next, lsn + 1);
        // The old epoch is fenced.
        assert!(matches!(
            log.force_commit(e1, commit(tx_of(&log, 2), vec![], 0))
                .await,
            Err(LogError::Fenced {
                caller: 1,
                current: 2
            })
        ));
        drop(log);

        let log = open(&dir);
        assert_eq!((log.node_id(), log.epoch()), (node, 3));
        assert_eq!(log.durable_lsn(), lsn + 1);
    }

    #[tokio::test]
    async fn audit_records_survive_reopen_share_batches_and_are_not_work() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        let e = log.epoch();
        let t = tx_of(&log, 1);
        let rec = commit(t, branches(2, "a"), 1);
        log.force_commit(e, rec.clone()).await.expect("force");
        // Concurrent decisions and audits share one writer and its batches.
        let audits: Vec<AuditRecord> = (1..=6)
            .map(|n| audit(t, crate::types::HeuristicDecision::Commit, n))
            .collect();
        let forced = conformance::join_all(
            audits
                .iter()
                .map(|a| log.force_audit(e, a.clone()))
                .collect(),
        )
        .await;
        let lsns: Vec<Lsn> = forced.into_iter().map(|r| r.expect("audit")).collect();
        assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{lsns:?}");
        assert_eq!(log.audits(&t).expect("audits"), audits);
        let last = *lsns.last().expect("six");
        drop(log);

        let log = open(&dir);
        assert_eq!(log.durable_lsn(), last, "audit LSNs are counted durably");
        assert_eq!(log.audits(&t).expect("audits"), audits, "kept in order");
        assert_eq!(
            log.recover().expect("recover").commits,
            vec![rec.clone()],
            "recovery reads past audit keys"
        );
        let more = audit(t, crate::types::HeuristicDecision::Abort, 7);
        let lsn = log
            .force_audit(log.epoch(), more.clone())
            .await
            .expect("audit");
        assert_eq!(lsn, last + 1);
        let mut all = audits.clone();
        all.push(more);
        assert_eq!(
            log.audits(&t).expect("audits"),
            all,
            "appended after reopen"
        );
        assert_eq!(log.decision(&t).expect("read").map(|d| d.record), Some(rec));
    }

    #[tokio::test]
    async fn a_second_open_of_a_locked_directory_fails_at_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        let started = std::time::Instant::now();
        let err = SledLog::open(&dir, SledLogOptions::default()).expect_err("must be locked");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "fails at once"
        );
        match &err {
            LogError::Locked { dir: d, detail } => {
                assert_eq!(d, &dir.display().to_string());
                assert!(detail.contains("LOCK"), "{detail}");
                assert!(
                    detail.contains(&std::process::id().to_string()),
                    "names the holder: {detail}"
                );
            }
            other => panic!("want Locked, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.display().to_string()) && msg.contains("locked"),
            "{msg}"
        );
        let epoch = log.epoch();
        drop(log);
        let log = open(&dir);
        assert_eq!(
            log.epoch(),
            epoch + 1,
            "the failed open did not take an epoch"
        );
    }

    /// What sled 0.34 creates, so we know which files the sync must cover: `conf`, `db`
    /// and `blobs/` (empty for normal records), plus `snap.*` once sled snapshots.
    #[tokio::test]
    async fn sled_files_are_the_ones_we_sync() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        assert_eq!(names(&dir), vec!["LOCK", "sled"]);
        for seq in 1..=50 {
            log.force_commit(log.epoch(), commit(tx_of(&log, seq), branches(4, "f"), seq))
                .await
                .expect("force");
        }
        let sled_files = names(&dir.join(SLED_DIR));
        let unexpected: Vec<&String> = sled_files
            .iter()
            .filter(|n| !matches!(n.as_str(), "conf" | "db" | "blobs") && !n.starts_with("snap."))
            .collect();
        assert!(
            unexpected.is_empty(),
            "sled created files we do not sync: {sled_files:?}"
        );
        for must in ["conf", "db", "blobs"] {
            assert!(
                sled_files.iter().any(|n| n == must),
                "{must} missing: {sled_files:?}"
            );
        }
        assert!(
            names(&dir.join(SLED_DIR).join("blobs")).is_empty(),
            "normal records use no blobs"
        );
        assert_eq!(log.blob_syncs(), 0);
        drop(log);
        // After a clean close sled may have written a snapshot; still nothing else.
        let sled_files = names(&dir.join(SLED_DIR));
        assert!(
            sled_files
                .iter()
                .all(|n| matches!(n.as_str(), "conf" | "db" | "blobs") || n.starts_with("snap.")),
            "{sled_files:?}"
        );
    }

    /// A record too large to inline goes to a sled blob file, which the writer syncs too.
    #[tokio::test]
    async fn large_records_in_blobs_are_synced_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        let mut big = branches(600, "big");
        for b in &mut big {
            b.endpoint = format!("http://{}.example:7001", "h".repeat(200));
        }
        let rec = commit(tx_of(&log, 1), big, 1);
        log.force_commit(log.epoch(), rec.clone())
            .await
            .expect("force");
        assert!(
            !names(&dir.join(SLED_DIR).join("blobs")).is_empty(),
            "expected a blob"
        );
        assert!(log.blob_syncs() >= 1, "the blob must be synced");
        drop(log);
        let log = open(&dir);
        assert_eq!(
            log.decision(&rec.tx).expect("read").map(|d| d.record),
            Some(rec)
        );
    }

    #[tokio::test]
    async fn a_failing_sync_at_open_fails_the_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let flag = Arc::new(AtomicBool::new(true));
        let opts = SledLogOptions {
            fail_syncs: Some(flag.clone()),
            ..Default::default()
        };
        let err = SledLog::open(&dir, opts).expect_err("open must fail");
        assert!(
            matches!(&err, LogError::Open { detail, .. } if detail.contains("sync")),
            "{err:?}"
        );
        // The lock was released and nothing was reported durable.
        flag.store(false, Ordering::SeqCst);
        let log = open(&dir);
        assert_eq!(log.durable_lsn(), 0);
    }

    #[tokio::test]
    async fn a_failed_batch_sync_is_not_durable_after_reopen_either() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let flag = Arc::new(AtomicBool::new(false));
        let opts = SledLogOptions {
            fail_syncs: Some(flag.clone()),
            ..Default::default()
        };
        let log = SledLog::open(&dir, opts).expect("open");
        let ok = commit(tx_of(&log, 1), branches(1, "a"), 1);
        let lsn = log
            .force_commit(log.epoch(), ok.clone())
            .await
            .expect("force");
        flag.store(true, Ordering::SeqCst);
        let err = log
            .force_commit(log.epoch(), commit(tx_of(&log, 2), branches(1, "b"), 2))
            .await
            .expect_err("sync fails");
        assert!(
            matches!(&err, LogError::Failed(m) if m.contains("injected")),
            "{err:?}"
        );
        assert!(log.is_failed());
        assert_eq!(log.durable_lsn(), lsn);
        assert!(matches!(log.recover(), Err(LogError::Failed(_))));
        drop(log);
        // A restart: the earlier decision is there.
        flag.store(false, Ordering::SeqCst);
        let log = open(&dir);
        assert!(!log.is_failed());
        assert_eq!(
            log.decision(&ok.tx).expect("read").map(|d| d.record),
            Some(ok)
        );
    }

    #[test]
    fn keys_sort_in_transaction_order() {
        let a = TxId {
            node: 1,
            epoch: 2,
            seq: 300,
        };
        let b = TxId {
            node: 1,
            epoch: 3,
            seq: 1,
        };
        let c = TxId {
            node: 2,
            epoch: 0,
            seq: 0,
        };
        assert!(tx_key(&a) < tx_key(&b) && tx_key(&b) < tx_key(&c));
        assert_ne!(tx_key(&a).len(), LAST_LSN_KEY.len());
    }

    #[test]
    fn values_round_trip_and_newer_formats_are_refused() {
        let rec = commit(
            TxId {
                node: 7,
                epoch: 8,
                seq: 9,
            },
            branches(3, "rt"),
            123,
        );
        let stored = decode_commit(&encode_commit(&rec, 5, true, false)).expect("decode");
        assert_eq!(
            (stored.record, stored.lsn, stored.done, stored.one_phase),
            (rec, 5, true, false)
        );
        let newer = CommitPb {
            format: FORMAT_VERSION + 1,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode_commit(&newer).is_err());
        assert!(decode_commit(b"\xff\xff\xff").is_err());

        let t9 = TxId {
            node: 7,
            epoch: 8,
            seq: 9,
        };
        let a = audit(t9, crate::types::HeuristicDecision::Abort, 5);
        assert_eq!(decode_audit(&encode_audit(&a, 9)).expect("decode"), (a, 9));
        let newer = AuditPb {
            format: FORMAT_VERSION + 1,
            decision: 1,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode_audit(&newer).is_err());
        let unknown = AuditPb {
            format: FORMAT_VERSION,
            decision: 7,
            ..Default::default()
        }
        .encode_to_vec();
        assert!(decode_audit(&unknown).is_err());
        assert_eq!(audit_key(&t9, 3).len(), AUDIT_KEY_LEN);

        // A one-phase intent is format 3, so a build reading only formats 1 (or 1 and 2)
        // refuses it instead of taking it for a Preparing record (or an intent written at
        // Commit); everything else stays format 1.
        let intent = encode_preparing(&t9, &branches(1, "i"), true);
        let plain = encode_preparing(&t9, &branches(2, "p"), false);
        let format_of = |v: &[u8]| PreparingPb::decode(v).expect("decode").format;
        assert_eq!((format_of(&intent), format_of(&plain)), (3, 1));
        // An intent of the release before (format 2) is still read as an intent.
        let mut older = PreparingPb::decode(&*intent).expect("decode");
        older.format = 2;
        assert_eq!(
            decode_preparing(&older.encode_to_vec()).expect("decode"),
            (t9, branches(1, "i"), true)
        );
        assert_eq!(
            decode_preparing(&intent).expect("decode"),
            (t9, branches(1, "i"), true)
        );
        assert_eq!(
            decode_preparing(&plain).expect("decode"),
            (t9, branches(2, "p"), false)
        );
        let commit_format = CommitPb::decode(&*encode_commit(
            &commit(t9, branches(1, "c"), 1),
            1,
            false,
            false,
        ))
        .expect("decode")
        .format;
        assert_eq!(
            commit_format, 1,
            "COMMIT records stay readable by format-1 builds"
        );
        assert!(audit_key(&t9, 3).starts_with(&tx_key(&t9)));
        assert!(audit_key(&t9, 2) < audit_key(&t9, 3));
    }
}
