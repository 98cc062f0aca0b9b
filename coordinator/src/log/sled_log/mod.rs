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
//! order) to an open COMMIT record (phase two not done), plus one counter record under
//! [`LAST_LSN_KEY`] written in the same atomic batch as the commits it numbers; `done`
//! maps the same keys to finished records (a COMMIT record moves there when its phase two
//! is done, copied first and then removed, so a crash may leave it in both but never in
//! neither; a one-phase outcome is written there) and
//! holds the low-water mark of each epoch collection deleted records of, so recovery
//! reads only `commits` and `preparing`; `preparing` maps a [`TxId`] key to
//! the branches of a transaction being prepared (or, flagged `one_phase`, the one branch a
//! one-phase commit goes to). Audit records (operator resolutions) live
//! in `commits` too, under the transaction's key followed by [`AUDIT_TAG`] and a
//! big-endian `u32` index (25 bytes, so readers of COMMIT records skip them by length):
//! that keeps them in the same atomic batch as the LSN counter that numbers them. Every
//! value is a `prost` message defined in `codec`, with a `format` field for versioning.
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
//!
//! # Layout
//!
//! The module is a folder, one concern per file, so each can be read (and reviewed) on
//! its own:
//!
//! * `mod.rs` (this file): [`SledLog`] and its [`SledLogOptions`], opening a data
//!   directory (lock, sled, epoch, the syncs at open), the [`DecisionLog`] reads and the
//!   hand-off of writes to the writer thread, and the final flush on drop.
//! * `codec.rs`: what is stored and how: the `prost` record types, the keys, the encode
//!   and decode functions and the format-version checks ([`FORMAT_VERSION`]).
//! * `writer.rs`: the writer thread: group commit (gathering a batch, the optional
//!   delay), writing forced records, the sync of each batch and its fail points.
//! * `trees.rs`: the sled trees and how queued lazy records are written to them,
//!   leaving out the ones that cancel out.
//!
//! Each file holds the unit tests of what it defines; the tests of a whole [`SledLog`]
//! (reopen, locking, sync failures, sled's files) are in this file.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use twopc_durable::{open_sled, sync_dir, LockError, Syncer};

use super::{
    AuditRecord, Collected, CommitRecord, DecisionLog, Kept, LazyRecord, LogError, LogStats, Lsn,
    Recovered, StoredDecision,
};
use crate::types::TxId;

pub(in crate::log) mod codec;
mod trees;
mod writer;

use codec::{
    audit_prefix, check_format, collected_key, decode_audit, decode_collected, decode_commit,
    decode_last_lsn, decode_preparing, encode_collected, tx_key, MetaPb, StoredCommit,
    AUDIT_KEY_LEN, BASE_FORMAT, COMMITS_TREE, DONE_TREE, META_KEY, PREPARING_TREE, TX_KEY_LEN,
};
pub use codec::{AUDIT_TAG, FORMAT_VERSION, LAST_LSN_KEY};
use trees::{sled_error, Trees};
pub use writer::GROUP_COMMIT_SIBLINGS;
use writer::{Item, Request, Writer};

const LOCK_FILE: &str = "LOCK";

/// [`DecisionLog::collect`] stops scanning after this many finished records too young to
/// collect: ids are issued in order, so past the old ones the rest are young too.
const SLED_DIR: &str = "sled";

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

// ---------------------------------------------------------------------------------------
// Shared state
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
        let done = db.open_tree(DONE_TREE).map_err(sled_err)?;

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
            done,
        };
        // Finished records a build that kept them in `commits` left there (before the
        // writer starts, so nothing else writes meanwhile).
        let moved = trees
            .move_finished(&shared)
            .map_err(|e| open_failed(dir, e))?;
        if moved > 0 {
            db.flush().map_err(sled_err)?;
            tracing::info!(dir = %dir.display(), moved, "finished records moved out of the open ones");
        }
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

    /// The low-water mark of `epoch`: the highest sequence number of it whose record was
    /// collected (0: none).
    fn low_water_mark(&self, epoch: u64) -> Result<u64, LogError> {
        match self
            .trees
            .done
            .get(collected_key(epoch))
            .map_err(|e| self.sled_error("sled read of a low-water mark", e))?
        {
            Some(bytes) => decode_collected(&bytes).map_err(|m| self.shared.poison(m)),
            None => Ok(0),
        }
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

    async fn sync(&self, epoch: u64) -> Result<Lsn, LogError> {
        self.force(epoch, Item::Sync).await
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
            .find_commit(&tx_key(tx))
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
                .find_commit(&key)
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

    fn collect(&self, below: &TxId, limit: usize) -> Result<Collected, LogError> {
        self.check_read()?;
        let mut batch = sled::Batch::default();
        let mut marks: BTreeMap<u64, u64> = BTreeMap::new();
        let mut collected = Collected::default();
        // Keys are ids in order: the scan reads only what lies below the horizon.
        for item in self.trees.done.range(..tx_key(below)) {
            let (key, value) =
                item.map_err(|e| self.sled_error("sled scan of finished records", e))?;
            if key.len() != TX_KEY_LEN {
                continue; // a low-water mark
            }
            let stored = self.decode_or_poison(&value)?;
            assert!(
                stored.done,
                "an unfinished record in the finished ones: {:?}",
                stored.record.tx
            );
            if collected.records as usize >= limit {
                collected.more = true;
                break;
            }
            let tx = stored.record.tx;
            batch.remove(key);
            collected.records += 1;
            let mark = marks.entry(tx.epoch).or_insert(0);
            *mark = (*mark).max(tx.seq);
        }
        for (epoch, seq) in marks {
            if seq > self.low_water_mark(epoch)? {
                batch.insert(&collected_key(epoch)[..], &encode_collected(seq)[..]);
            }
        }
        self.trees
            .done
            .apply_batch(batch)
            .map_err(|e| self.sled_error("sled removal of finished records", e))?;
        Ok(collected)
    }

    fn kept(&self) -> Result<Kept, LogError> {
        self.check_read()?;
        let mut kept = Kept::default();
        for (tree, what) in [
            (&self.trees.commits, "sled scan of open records"),
            (&self.trees.done, "sled scan of finished records"),
        ] {
            for item in tree.iter() {
                let (key, value) = item.map_err(|e| self.sled_error(what, e))?;
                if key.len() != TX_KEY_LEN {
                    continue; // the LSN counter, an audit record or a low-water mark
                }
                let at = self.decode_or_poison(&value)?.record.decided_at_ms;
                kept.records += 1;
                kept.oldest_decided_at_ms =
                    Some(kept.oldest_decided_at_ms.map_or(at, |o| o.min(at)));
            }
        }
        Ok(kept)
    }

    fn collected(&self, tx: &TxId) -> Result<bool, LogError> {
        self.check_read()?;
        if tx.node != self.node_id {
            return Ok(false);
        }
        Ok(tx.seq <= self.low_water_mark(tx.epoch)?)
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
}
