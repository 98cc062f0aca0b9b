//! [`StagingStore`]: the participant-side durable store for broker branches.
//!
//! A broker has no prepare step, so a broker branch "prepares" by writing its messages
//! here, durably, before it votes yes; commit publishes them and then deletes the staged
//! copy; abort just deletes it. After a crash the staged batches are exactly the branches
//! that voted yes and are not finished ([`StagingStore::list`]), which recovery resolves
//! by asking the coordinator.
//!
//! # Where the staged copy lives (design choice)
//!
//! This is a participant-local sled database. It works with every broker and every
//! service, but it needs a **persistent volume**: if the service's disk is lost (a
//! throwaway container disk, a replaced VM) while a branch is staged, its messages are
//! lost although the transaction committed (the database rows exist, the events never
//! get published). Run services that stage messages with a persistent data directory, and
//! keep one data directory per service instance (the exclusive lock below enforces it).
//! The alternative the design guide mentions (staging the messages in a table inside the
//! PostgreSQL branch's prepared transaction) needs no local state; it is not built here.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/staging/LOCK   exclusive lock (File::try_lock) held while the store is open;
//!                           holds the pid of the holder
//! <data_dir>/staging/sled/  the sled database (`conf`, `db`, `blobs/`, `snap.*`)
//! ```
//!
//! One sled tree, `staged`, maps `<tx_id> 0x00 <branch_id>` to a `prost`-encoded batch
//! (with a `format` field for versioning). Transaction and branch ids never contain a NUL
//! byte.
//!
//! # Durability
//!
//! sled 0.34's `flush()` ends with `sync_file_range`, which neither forces the drive's
//! write cache nor persists file metadata (sled issues #1351, #1452). So, as the
//! coordinator's decision log does, [`StagingStore::stage`] returns only after
//! `flush()` **and** an `fdatasync` of sled's data file `sled/db`, of every blob file that
//! is new or has grown (large payloads go to `sled/blobs/`), and an fsync of the
//! directories whose listing changed. At open, `conf`, both directories and the parent
//! are synced once. (The syncing, the directory lock and the sled open are
//! `twopc_durable`'s, shared with the decision log.)
//!
//! Concurrent stages share syncs (group commit): every stage writes its batch, takes a
//! sequence number, and then waits for the sync lock; whoever holds it syncs everything
//! written so far, so the stages queued behind it usually find their write already
//! durable and return without a sync of their own.
//!
//! A failed sync is fatal for the store: after it, the page cache may hold data the disk
//! does not, so every later [`StagingStore::stage`] fails (the branch votes no) until the
//! process reopens the store. Reads and removals keep working.
//!
//! [`StagingStore::remove`] is lazy: it is not synced (sled's background flush writes it
//! out within about half a second). If a removal is lost in a crash, the batch is staged
//! again after restart and recovery publishes it a second time **with the same message
//! ids**, which the broker (NATS, within its duplicate window) or the consumer (by
//! message id) deduplicates.
//!
//! # Fault injection
//!
//! With the crate feature `failpoints`, the crash point `participant::staging::before_sync`
//! (`return(abort)`) aborts the process after a stage's batch was written and flushed to
//! sled's files, before the fdatasync that makes it durable.
//!
//! [`StagingOptions::fail_syncs`] makes every sync fail while the flag is set (which
//! poisons the store, as a real failure would). [`StagingStore::syncs`] counts the data
//! file syncs done, for tests of the group commit.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use twopc_durable::{open_sled, sync_dir, LockError, Syncer};

use crate::{crash_point, lock};

/// Version written into every batch's `format` field; batches with a newer format are
/// refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;

const LOCK_FILE: &str = "LOCK";
const SLED_DIR: &str = "sled";
const STAGING_DIR: &str = "staging";
const TREE: &str = "staged";

/// One message of a staged batch: everything needed to publish it later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedMessage {
    /// The deterministic message id (`<tx_id>:<branch_id>:<index>`), sent as the broker's
    /// message id so a repeated publish is recognised as a duplicate.
    pub message_id: String,
    /// Where it goes (a RabbitMQ queue, a NATS subject; see the adapter).
    pub destination: String,
    /// The message body.
    pub payload: Vec<u8>,
    /// Application headers, in order.
    pub headers: Vec<(String, String)>,
    /// MIME content type, if any.
    pub content_type: Option<String>,
}

/// Why the staging store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StagingError {
    /// The directory is locked by another open store (this or another process).
    #[error("staging store {dir} is locked: {detail}")]
    Locked {
        /// The staging directory.
        dir: String,
        /// Who holds it, if known.
        detail: String,
    },
    /// An I/O, sled or sync error, or a corrupt record.
    #[error("staging store: {0}")]
    Failed(String),
    /// The store could not be opened (nothing was written; the data is as it was).
    #[error("cannot open the staging store in {dir}: {detail}")]
    Open {
        /// The staging directory.
        dir: String,
        /// What failed, and where the data is corrupt, which file and what to do.
        detail: String,
    },
}

/// Settings of a [`StagingStore`].
#[derive(Clone, Debug, Default)]
pub struct StagingOptions {
    /// Fault switch for tests: while set, every sync fails (and poisons the store).
    pub fail_syncs: Option<Arc<AtomicBool>>,
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

#[derive(Clone, PartialEq, Message)]
struct HeaderPb {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct MessagePb {
    #[prost(string, tag = "1")]
    message_id: String,
    #[prost(string, tag = "2")]
    destination: String,
    #[prost(bytes = "vec", tag = "3")]
    payload: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    headers: Vec<HeaderPb>,
    #[prost(string, optional, tag = "5")]
    content_type: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct BatchPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(string, tag = "2")]
    tx_id: String,
    #[prost(string, tag = "3")]
    branch_id: String,
    #[prost(message, repeated, tag = "4")]
    messages: Vec<MessagePb>,
    #[prost(uint64, tag = "5")]
    staged_at_ms: u64,
}

fn encode_batch(tx_id: &str, branch_id: &str, messages: &[StagedMessage]) -> Vec<u8> {
    BatchPb {
        format: FORMAT_VERSION,
        tx_id: tx_id.to_string(),
        branch_id: branch_id.to_string(),
        messages: messages
            .iter()
            .map(|m| MessagePb {
                message_id: m.message_id.clone(),
                destination: m.destination.clone(),
                payload: m.payload.clone(),
                headers: m
                    .headers
                    .iter()
                    .map(|(name, value)| HeaderPb {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                content_type: m.content_type.clone(),
            })
            .collect(),
        staged_at_ms: now_ms(),
    }
    .encode_to_vec()
}

fn decode_batch(bytes: &[u8]) -> Result<BatchPb, StagingError> {
    let batch = BatchPb::decode(bytes)
        .map_err(|e| StagingError::Failed(format!("corrupt staged batch: {e}")))?;
    if batch.format > FORMAT_VERSION {
        return Err(StagingError::Failed(format!(
            "staged batch has format {} but this build reads up to {FORMAT_VERSION}; \
             upgrade before reading this store",
            batch.format
        )));
    }
    Ok(batch)
}

fn messages_from_pb(batch: BatchPb) -> Vec<StagedMessage> {
    batch
        .messages
        .into_iter()
        .map(|m| StagedMessage {
            message_id: m.message_id,
            destination: m.destination,
            payload: m.payload,
            headers: m.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            content_type: m.content_type,
        })
        .collect()
}

fn key(tx_id: &str, branch_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tx_id.len() + 1 + branch_id.len());
    k.extend_from_slice(tx_id.as_bytes());
    k.push(0);
    k.extend_from_slice(branch_id.as_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(String, String)> {
    let at = k.iter().position(|b| *b == 0)?;
    let tx = std::str::from_utf8(&k[..at]).ok()?;
    let branch = std::str::from_utf8(&k[at + 1..]).ok()?;
    Some((tx.to_string(), branch.to_string()))
}

fn check_id(what: &str, id: &str) -> Result<(), StagingError> {
    if id.is_empty() || id.as_bytes().contains(&0) {
        return Err(StagingError::Failed(format!(
            "{what} {id:?} is empty or contains a NUL byte"
        )));
    }
    Ok(())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------

/// The participant-side durable store of staged message batches. See the module docs.
///
/// Share it between resources with an `Arc`. Dropping it closes the store (final flush
/// and sync of lazy removals, lock released).
pub struct StagingStore {
    inner: Arc<Inner>,
}

struct SyncState {
    syncer: Syncer,
    /// Every write with a sequence number up to this one is durable.
    synced_seq: u64,
}

struct Inner {
    dir: PathBuf,
    /// Writes (stages) completed so far; a write takes its number after it is in sled.
    written: AtomicU64,
    sync: Mutex<SyncState>,
    /// Set by the first failed sync; every later stage fails with it.
    failure: Mutex<Option<String>>,
    db_syncs: Arc<AtomicU64>,
    // Field order matters: sled must be closed before the lock is released.
    tree: sled::Tree,
    db: sled::Db,
    _lock: File,
}

impl std::fmt::Debug for StagingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingStore")
            .field("dir", &self.inner.dir)
            .field("failed", &self.is_failed())
            .finish()
    }
}

/// What a store that does not open holds, for its error message.
const HOLDS: &str = "the messages of branches that voted yes, and deleting it loses the events of committed transactions";

fn open_failed(dir: &Path, what: impl std::fmt::Display) -> StagingError {
    StagingError::Open {
        dir: dir.display().to_string(),
        detail: what.to_string(),
    }
}

/// Takes the exclusive lock on `<dir>/LOCK` (see [`twopc_durable::take_lock`]).
fn take_lock(dir: &Path) -> Result<File, StagingError> {
    twopc_durable::take_lock(
        dir,
        LOCK_FILE,
        "another process (or another open StagingStore of this process)",
    )
    .map_err(|e| match e {
        LockError::Locked { detail } => StagingError::Locked {
            dir: dir.display().to_string(),
            detail,
        },
        LockError::Io(what) => open_failed(dir, what),
    })
}

impl StagingStore {
    /// Opens (creating if needed) the store in `<data_dir>/staging` with default options.
    /// Blocking (file I/O and syncs): call it at start-up, or from `spawn_blocking`.
    ///
    /// Fails with [`StagingError::Locked`] at once if another open store (of this or
    /// another process) holds the directory.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<StagingStore, StagingError> {
        StagingStore::open_with(data_dir, StagingOptions::default())
    }

    /// [`StagingStore::open`] with options.
    pub fn open_with(
        data_dir: impl AsRef<Path>,
        opts: StagingOptions,
    ) -> Result<StagingStore, StagingError> {
        let data_dir = data_dir.as_ref();
        let dir = data_dir.join(STAGING_DIR);
        let data_dir_existed = data_dir.exists();
        let existed = dir.exists();
        fs::create_dir_all(&dir)
            .map_err(|e| open_failed(&dir, format!("cannot create it: {e}")))?;
        let lock_file = take_lock(&dir)?;

        let sled_dir = dir.join(SLED_DIR);
        let config = sled::Config::new().flush_every_ms(Some(500));
        let db = open_sled(&sled_dir, config).map_err(|e| open_failed(&dir, e.explained(HOLDS)))?;
        let tree = db
            .open_tree(TREE)
            .map_err(|e| open_failed(&dir, format!("sled: {e}")))?;
        db.flush()
            .map_err(|e| open_failed(&dir, format!("sled flush: {e}")))?;

        // Everything readable now (batches of earlier runs, perhaps never synced before a
        // crash) becomes durable here.
        let mut syncer = Syncer::new(
            sled_dir,
            opts.fail_syncs.clone(),
            "StagingOptions::fail_syncs",
        )
        .map_err(|e| open_failed(&dir, e))?;
        syncer
            .sync_at_open()
            .map_err(|e| open_failed(&dir, format!("sync failed: {e}")))?;
        lock_file
            .sync_all()
            .and_then(|_| sync_dir(&dir))
            .and_then(|_| if existed { Ok(()) } else { sync_dir(data_dir) })
            .and_then(|_| match data_dir.parent() {
                Some(parent) if !data_dir_existed && !parent.as_os_str().is_empty() => {
                    sync_dir(parent)
                }
                _ => Ok(()),
            })
            .map_err(|e| open_failed(&dir, format!("sync failed: {e}")))?;

        let db_syncs = syncer.db_syncs();
        let store = StagingStore {
            inner: Arc::new(Inner {
                dir,
                written: AtomicU64::new(0),
                sync: Mutex::new(SyncState {
                    syncer,
                    synced_seq: 0,
                }),
                failure: Mutex::new(None),
                db_syncs,
                tree,
                db,
                _lock: lock_file,
            }),
        };
        tracing::info!(dir = %store.inner.dir.display(), staged = store.inner.tree.len(), "staging store opened");
        Ok(store)
    }

    /// The staging directory (`<data_dir>/staging`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stores the batch of `(tx_id, branch_id)` (replacing any earlier one) and returns
    /// once it is durable: written, flushed and fdatasynced (see the module docs).
    /// Concurrent calls share syncs.
    ///
    /// Fails if the store has failed a sync before (it stays failed until reopened).
    pub async fn stage(
        &self,
        tx_id: &str,
        branch_id: &str,
        messages: Vec<StagedMessage>,
    ) -> Result<(), StagingError> {
        check_id("tx_id", tx_id)?;
        check_id("branch_id", branch_id)?;
        let value = encode_batch(tx_id, branch_id, &messages);
        let k = key(tx_id, branch_id);
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.stage_blocking(&k, value))
            .await
            .map_err(|e| StagingError::Failed(format!("staging task failed: {e}")))?
    }

    /// The staged batch of `(tx_id, branch_id)`, if any.
    pub fn get(
        &self,
        tx_id: &str,
        branch_id: &str,
    ) -> Result<Option<Vec<StagedMessage>>, StagingError> {
        match self.inner.tree.get(key(tx_id, branch_id)) {
            Ok(Some(bytes)) => Ok(Some(messages_from_pb(decode_batch(&bytes)?))),
            Ok(None) => Ok(None),
            Err(e) => Err(StagingError::Failed(format!("sled read: {e}"))),
        }
    }

    /// Removes the staged batch of `(tx_id, branch_id)` (nothing if there is none).
    /// Lazy: not synced (see the module docs).
    pub fn remove(&self, tx_id: &str, branch_id: &str) -> Result<(), StagingError> {
        self.inner
            .tree
            .remove(key(tx_id, branch_id))
            .map(|_| ())
            .map_err(|e| StagingError::Failed(format!("sled remove: {e}")))
    }

    /// Every staged `(tx_id, branch_id)`, in key order.
    pub fn list(&self) -> Result<Vec<(String, String)>, StagingError> {
        let mut out = Vec::new();
        for item in self.inner.tree.iter().keys() {
            let k = item.map_err(|e| StagingError::Failed(format!("sled read: {e}")))?;
            match split_key(&k) {
                Some(pair) => out.push(pair),
                None => {
                    return Err(StagingError::Failed(format!(
                        "corrupt staging key {:?}",
                        String::from_utf8_lossy(&k)
                    )))
                }
            }
        }
        Ok(out)
    }

    /// How many batches are staged.
    pub fn len(&self) -> usize {
        self.inner.tree.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.inner.tree.is_empty()
    }

    /// fdatasyncs of sled's data file done so far (open included), for tests and metrics.
    pub fn syncs(&self) -> u64 {
        self.inner.db_syncs.load(Ordering::Acquire)
    }

    /// Whether a sync has failed (every later stage fails until the store is reopened).
    pub fn is_failed(&self) -> bool {
        lock(&self.inner.failure).is_some()
    }
}

impl Inner {
    fn stage_blocking(&self, k: &[u8], value: Vec<u8>) -> Result<(), StagingError> {
        if let Some(f) = lock(&self.failure).clone() {
            return Err(StagingError::Failed(format!(
                "the store failed earlier and must be reopened: {f}"
            )));
        }
        self.tree
            .insert(k, value)
            .map_err(|e| StagingError::Failed(format!("sled write: {e}")))?;
        let seq = self.written.fetch_add(1, Ordering::AcqRel) + 1;

        let mut st = lock(&self.sync);
        if let Some(f) = lock(&self.failure).clone() {
            return Err(StagingError::Failed(format!(
                "the store failed earlier and must be reopened: {f}"
            )));
        }
        if st.synced_seq >= seq {
            // A sync that started after our write covered it.
            return Ok(());
        }
        // Everything numbered up to `target` was in sled before this load, so the flush
        // below covers it.
        let target = self.written.load(Ordering::Acquire);
        let result = self
            .db
            .flush()
            .map_err(|e| format!("sled flush: {e}"))
            .and_then(|_| {
                crash_point("participant::staging::before_sync");
                st.syncer.sync().map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => {
                st.synced_seq = target;
                Ok(())
            }
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "staging store sync failed; no more stages until it is reopened");
                *lock(&self.failure) = Some(e.clone());
                Err(StagingError::Failed(e))
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Make lazy removals durable too on a clean shutdown (best effort).
        if lock(&self.failure).is_some() {
            return;
        }
        let st = self.sync.get_mut().unwrap_or_else(|p| p.into_inner());
        let result = self
            .db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| st.syncer.sync().map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::warn!(dir = %self.dir.display(), error = %e, "final flush of the staging store failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> StagedMessage {
        StagedMessage {
            message_id: format!("tx-1:svc:q:{i}"),
            destination: "orders".into(),
            payload: format!("payload {i}").into_bytes(),
            headers: vec![("h".into(), i.to_string())],
            content_type: if i.is_multiple_of(2) {
                Some("application/json".into())
            } else {
                None
            },
        }
    }

    #[tokio::test]
    async fn stage_get_list_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = StagingStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
        let batch: Vec<_> = (0..3).map(msg).collect();
        let before = store.syncs();
        store.stage("tx-1", "svc:q", batch.clone()).await.unwrap();
        assert!(store.syncs() > before, "a stage must fdatasync");
        store.stage("tx-2", "svc:n", vec![msg(7)]).await.unwrap();
        assert_eq!(store.get("tx-1", "svc:q").unwrap(), Some(batch.clone()));
        assert_eq!(store.get("tx-1", "svc:other").unwrap(), None);
        assert_eq!(
            store.list().unwrap(),
            vec![
                ("tx-1".to_string(), "svc:q".to_string()),
                ("tx-2".to_string(), "svc:n".to_string())
            ]
        );
        store.remove("tx-2", "svc:n").unwrap();
        store.remove("tx-2", "svc:n").unwrap();
        drop(store);

        let store = StagingStore::open(dir.path()).unwrap();
        assert_eq!(
            store.list().unwrap(),
            vec![("tx-1".to_string(), "svc:q".to_string())]
        );
        assert_eq!(store.get("tx-1", "svc:q").unwrap(), Some(batch));
    }

    #[tokio::test]
    async fn a_second_open_of_a_locked_directory_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = StagingStore::open(dir.path()).unwrap();
        match StagingStore::open(dir.path()) {
            Err(StagingError::Locked { detail, .. }) => {
                assert!(detail.contains("LOCK"), "{detail}")
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(store);
        StagingStore::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn concurrent_stages_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StagingStore::open(dir.path()).unwrap());
        let before = store.syncs();
        let n = 64;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.stage(&format!("tx-{i}"), "svc:q", vec![msg(i)]).await },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(store.len(), n);
        let syncs = store.syncs() - before;
        // Stages queued behind a running sync find their write covered by the next one.
        assert!(
            syncs >= 1 && syncs < n as u64,
            "{syncs} syncs for {n} stages: no grouping"
        );
    }

    #[tokio::test]
    async fn large_payloads_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = StagingStore::open(dir.path()).unwrap();
        let mut m = msg(0);
        m.payload = vec![7u8; 4 << 20];
        store
            .stage("tx-big", "svc:q", vec![m.clone()])
            .await
            .unwrap();
        drop(store);
        let store = StagingStore::open(dir.path()).unwrap();
        assert_eq!(store.get("tx-big", "svc:q").unwrap(), Some(vec![m]));
    }

    #[tokio::test]
    async fn a_failed_sync_poisons_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let store = StagingStore::open_with(
            dir.path(),
            StagingOptions {
                fail_syncs: Some(flag.clone()),
            },
        )
        .unwrap();
        store.stage("tx-1", "svc:q", vec![msg(0)]).await.unwrap();
        flag.store(true, Ordering::SeqCst);
        let err = store
            .stage("tx-2", "svc:q", vec![msg(1)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(store.is_failed());
        flag.store(false, Ordering::SeqCst);
        let err = store
            .stage("tx-3", "svc:q", vec![msg(2)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("failed earlier"), "{err}");
        // Reads and removals still work.
        assert!(store.get("tx-1", "svc:q").unwrap().is_some());
        store.remove("tx-1", "svc:q").unwrap();
    }

    #[test]
    fn ids_with_nul_are_refused_and_keys_split_back() {
        assert!(check_id("tx_id", "a\0b").is_err());
        assert!(check_id("tx_id", "").is_err());
        assert_eq!(
            split_key(&key("t", "s:r")),
            Some(("t".into(), "s:r".into()))
        );
    }

    #[test]
    fn newer_formats_are_refused() {
        let mut pb = BatchPb::decode(&*encode_batch("t", "b", &[msg(1)])).unwrap();
        pb.format = FORMAT_VERSION + 1;
        assert!(decode_batch(&pb.encode_to_vec()).is_err());
    }
}
