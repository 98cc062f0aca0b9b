//! [`MemoryLog`]: an in-memory [`DecisionLog`] for tests and the model checker.
//!
//! It keeps two images of its "disk": everything written so far, and what the last sync
//! made durable. A forced commit writes and then syncs at once (one sync per forced
//! decision, so group commit is trivial: every batch has one decision; an audit record is
//! forced the same way); a lazy record only reaches the durable image with the next sync
//! (or an explicit [`MemoryLog::flush`]).
//! [`MemoryLog::reopen`] simulates a crash and restart: the new handle sees only the
//! durable image and a bumped epoch, and the old handle is fenced from then on (its writes
//! fail with [`LogError::Fenced`]), which models a zombie coordinator.
//! [`MemoryLog::set_fail_syncs`] and [`MemoryLog::poison`] inject failures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    AuditRecord, Collected, CommitRecord, DecisionLog, Kept, LazyRecord, LogError, LogStats, Lsn,
    Recovered, StoredDecision,
};
use crate::types::{BranchSpec, TxId};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stored COMMIT record.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    record: CommitRecord,
    /// 0 for a one-phase record (never forced).
    lsn: Lsn,
    done: bool,
    one_phase: bool,
}

/// The contents of the simulated disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Image {
    commits: BTreeMap<TxId, Entry>,
    /// Preparing records, and one-phase intents (`true`).
    preparing: BTreeMap<TxId, (Vec<BranchSpec>, bool)>,
    /// Audit records per transaction with their LSNs, in the order forced (append-only).
    audits: BTreeMap<TxId, Vec<(Lsn, AuditRecord)>>,
    /// Low-water marks of collection: per epoch, the highest sequence number whose record
    /// was collected. Changed with the removals, in the same image.
    collected: BTreeMap<u64, u64>,
    last_lsn: Lsn,
}

/// The simulated data directory, shared by every handle opened on it.
#[derive(Debug)]
struct Storage {
    node_id: u32,
    /// The epoch of the newest open.
    epoch: u64,
    /// Everything written.
    current: Image,
    /// What survives a crash: `current` as of the last successful sync.
    durable: Image,
}

/// An in-memory decision log. See the module docs.
#[derive(Debug)]
pub struct MemoryLog {
    storage: Arc<Mutex<Storage>>,
    node_id: u32,
    epoch: u64,
    durable_lsn: AtomicU64,
    stats: Mutex<LogStats>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    fail_syncs: AtomicBool,
}

impl Default for MemoryLog {
    fn default() -> Self {
        MemoryLog::new()
    }
}

impl MemoryLog {
    /// Node id used by [`MemoryLog::new`].
    pub const DEFAULT_NODE_ID: u32 = 0x6d65_6d30;

    /// A fresh, empty log: node [`MemoryLog::DEFAULT_NODE_ID`], epoch 1.
    pub fn new() -> MemoryLog {
        MemoryLog::with_node_id(MemoryLog::DEFAULT_NODE_ID)
    }

    /// A fresh, empty log with the given node id, epoch 1.
    pub fn with_node_id(node_id: u32) -> MemoryLog {
        let storage = Storage {
            node_id,
            epoch: 1,
            current: Image::default(),
            durable: Image::default(),
        };
        MemoryLog::handle(Arc::new(Mutex::new(storage)), node_id, 1, 0)
    }

    fn handle(storage: Arc<Mutex<Storage>>, node_id: u32, epoch: u64, durable: Lsn) -> MemoryLog {
        MemoryLog {
            storage,
            node_id,
            epoch,
            durable_lsn: AtomicU64::new(durable),
            stats: Mutex::new(LogStats::default()),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            fail_syncs: AtomicBool::new(false),
        }
    }

    /// Simulates a crash and restart on the same storage: the returned handle sees only
    /// what was synced (lazy records written since the last sync are lost, forced
    /// decisions are kept), has the next epoch, fresh stats and is not poisoned. This
    /// handle stays usable for reads, but its writes are fenced from now on.
    pub fn reopen(&self) -> MemoryLog {
        let mut storage = lock(&self.storage);
        storage.current = storage.durable.clone();
        storage.epoch += 1;
        let (node, epoch, durable) = (storage.node_id, storage.epoch, storage.durable.last_lsn);
        drop(storage);
        MemoryLog::handle(self.storage.clone(), node, epoch, durable)
    }

    /// Like [`MemoryLog::reopen`] after a clean shutdown: everything written (lazy records
    /// included) is flushed first, as [`super::SledLog`] does when dropped.
    pub fn reopen_after_clean_shutdown(&self) -> MemoryLog {
        self.flush();
        self.reopen()
    }

    /// Makes everything written so far durable, as a background flush of a file-backed
    /// log would. Not counted as a sync in [`LogStats`].
    pub fn flush(&self) {
        let mut storage = lock(&self.storage);
        storage.durable = storage.current.clone();
    }

    /// Fault injection: while `on`, every sync fails, which poisons the log.
    pub fn set_fail_syncs(&self, on: bool) {
        self.fail_syncs.store(on, Ordering::SeqCst);
    }

    /// Poisons the log as a failed write would: every later write (and read) returns
    /// [`LogError::Failed`] with `msg`.
    pub fn poison(&self, msg: impl Into<String>) -> LogError {
        let mut slot = lock(&self.failure);
        if slot.is_none() {
            *slot = Some(msg.into());
        }
        self.failed.store(true, Ordering::Release);
        LogError::Failed(slot.clone().unwrap_or_default())
    }

    fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(
            lock(&self.failure)
                .clone()
                .unwrap_or_else(|| "unknown failure".into()),
        )
    }

    /// Checks poisoning, then the caller's epoch against this handle's and the storage's.
    fn check_write(&self, epoch: u64, storage: &Storage) -> Result<(), LogError> {
        if let Some(msg) = self.failure() {
            return Err(LogError::Failed(msg));
        }
        if epoch != self.epoch {
            return Err(LogError::Fenced {
                caller: epoch,
                current: self.epoch,
            });
        }
        if storage.epoch != self.epoch {
            return Err(LogError::Fenced {
                caller: epoch,
                current: storage.epoch,
            });
        }
        Ok(())
    }

    fn check_read(&self) -> Result<(), LogError> {
        match self.failure() {
            Some(msg) => Err(LogError::Failed(msg)),
            None => Ok(()),
        }
    }

    /// Writes (into `current`) and syncs one decision.
    fn force(&self, epoch: u64, record: CommitRecord) -> Result<Lsn, LogError> {
        let mut storage = lock(&self.storage);
        self.check_write(epoch, &storage)?;
        let tx = record.tx;
        let mut done = false;
        if let Some(existing) = storage.current.commits.get(&tx) {
            if existing.record.branches != record.branches {
                return Err(LogError::Conflict { tx });
            }
            if !existing.one_phase {
                // Forced earlier, so synced (a failed sync poisons the handle that made it).
                return Ok(existing.lsn);
            }
            done = existing.done;
        }
        let lsn = storage.current.last_lsn + 1;
        storage.current.last_lsn = lsn;
        let record = match storage.current.commits.get(&tx) {
            Some(existing) => existing.record.clone(),
            None => record,
        };
        storage.current.commits.insert(
            tx,
            Entry {
                record,
                lsn,
                done,
                one_phase: false,
            },
        );
        // The sync.
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(self.poison("injected sync failure (MemoryLog::set_fail_syncs)"));
        }
        storage.durable = storage.current.clone();
        drop(storage);
        self.durable_lsn.fetch_max(lsn, Ordering::AcqRel);
        let mut stats = lock(&self.stats);
        stats.syncs += 1;
        stats.batches += 1;
        stats.decisions += 1;
        stats.max_batch = stats.max_batch.max(1);
        Ok(lsn)
    }

    /// Appends (into `current`) and syncs one audit record.
    fn force_audit_now(&self, epoch: u64, record: AuditRecord) -> Result<Lsn, LogError> {
        let mut storage = lock(&self.storage);
        self.check_write(epoch, &storage)?;
        let lsn = storage.current.last_lsn + 1;
        storage.current.last_lsn = lsn;
        storage
            .current
            .audits
            .entry(record.tx)
            .or_default()
            .push((lsn, record));
        // The sync.
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(self.poison("injected sync failure (MemoryLog::set_fail_syncs)"));
        }
        storage.durable = storage.current.clone();
        drop(storage);
        self.durable_lsn.fetch_max(lsn, Ordering::AcqRel);
        lock(&self.stats).syncs += 1;
        Ok(lsn)
    }
}

impl DecisionLog for MemoryLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn node_id(&self) -> u32 {
        self.node_id
    }

    async fn force_commit(&self, epoch: u64, record: CommitRecord) -> Result<Lsn, LogError> {
        self.force(epoch, record)
    }

    fn record_lazy(&self, epoch: u64, record: LazyRecord) -> Result<(), LogError> {
        let mut storage = lock(&self.storage);
        self.check_write(epoch, &storage)?;
        let image = &mut storage.current;
        match record {
            LazyRecord::Preparing { tx, branches } => {
                image.preparing.insert(tx, (branches, false));
            }
            LazyRecord::OnePhase { tx, branch } => {
                image.preparing.insert(tx, (vec![branch], true));
            }
            LazyRecord::Aborted { tx } => {
                image.preparing.remove(&tx);
            }
            LazyRecord::Done { tx } => {
                if let Some(entry) = image.commits.get_mut(&tx) {
                    entry.done = true;
                }
                image.preparing.remove(&tx);
            }
            LazyRecord::OnePhaseCommitted { tx, branches } => {
                image.commits.entry(tx).or_insert_with(|| Entry {
                    record: CommitRecord {
                        tx,
                        branches,
                        // Stamped when written, as the sled log does.
                        decided_at_ms: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                            .unwrap_or(0),
                    },
                    lsn: 0,
                    done: true,
                    one_phase: true,
                });
                image.preparing.remove(&tx);
            }
        }
        Ok(())
    }

    fn decision(&self, tx: &TxId) -> Result<Option<StoredDecision>, LogError> {
        self.check_read()?;
        let storage = lock(&self.storage);
        let durable = storage.durable.last_lsn;
        Ok(storage
            .current
            .commits
            .get(tx)
            .filter(|e| e.lsn <= durable)
            .map(|e| StoredDecision {
                record: e.record.clone(),
                done: e.done,
            }))
    }

    fn recover(&self) -> Result<Recovered, LogError> {
        self.check_read()?;
        let storage = lock(&self.storage);
        let durable = storage.durable.last_lsn;
        let image = &storage.current;
        let mut commits: Vec<&Entry> = image
            .commits
            .values()
            .filter(|e| !e.done && e.lsn <= durable)
            .collect();
        commits.sort_by_key(|e| e.lsn);
        let mut undecided = Vec::new();
        let mut one_phase = Vec::new();
        let open = image
            .preparing
            .iter()
            .filter(|(tx, _)| image.commits.get(tx).is_none_or(|e| e.lsn > durable));
        for (tx, (branches, is_one_phase)) in open {
            match (is_one_phase, branches.first()) {
                (true, Some(branch)) => one_phase.push((*tx, branch.clone())),
                _ => undecided.push((*tx, branches.clone())),
            }
        }
        Ok(Recovered {
            commits: commits.into_iter().map(|e| e.record.clone()).collect(),
            undecided,
            one_phase,
        })
    }

    fn durable_lsn(&self) -> Lsn {
        self.durable_lsn.load(Ordering::Acquire)
    }

    fn stats(&self) -> LogStats {
        *lock(&self.stats)
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    async fn sync(&self, epoch: u64) -> Result<Lsn, LogError> {
        let mut storage = lock(&self.storage);
        self.check_write(epoch, &storage)?;
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(self.poison("injected sync failure (MemoryLog::set_fail_syncs)"));
        }
        storage.durable = storage.current.clone();
        let lsn = storage.durable.last_lsn;
        self.durable_lsn.fetch_max(lsn, Ordering::AcqRel);
        drop(storage);
        lock(&self.stats).syncs += 1;
        Ok(lsn)
    }

    async fn force_audit(&self, epoch: u64, record: AuditRecord) -> Result<Lsn, LogError> {
        self.force_audit_now(epoch, record)
    }

    fn audits(&self, tx: &TxId) -> Result<Vec<AuditRecord>, LogError> {
        self.check_read()?;
        let storage = lock(&self.storage);
        let durable = storage.durable.last_lsn;
        Ok(storage
            .current
            .audits
            .get(tx)
            .map(|records| {
                records
                    .iter()
                    .filter(|(lsn, _)| *lsn <= durable)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn collect(&self, below: &TxId, limit: usize) -> Result<Collected, LogError> {
        self.check_read()?;
        let mut storage = lock(&self.storage);
        let image = &mut storage.current;
        let old: Vec<TxId> = image
            .commits
            .range(..*below)
            .filter(|(_, e)| e.done)
            .map(|(tx, _)| *tx)
            .take(limit.saturating_add(1))
            .collect();
        let more = old.len() > limit;
        let mut collected = Collected { records: 0, more };
        for tx in old.into_iter().take(limit) {
            image.commits.remove(&tx);
            collected.records += 1;
            let mark = image.collected.entry(tx.epoch).or_insert(0);
            *mark = (*mark).max(tx.seq);
        }
        Ok(collected)
    }

    fn kept(&self) -> Result<Kept, LogError> {
        self.check_read()?;
        let storage = lock(&self.storage);
        let commits = &storage.current.commits;
        Ok(Kept {
            records: commits.len() as u64,
            oldest_decided_at_ms: commits.values().map(|e| e.record.decided_at_ms).min(),
        })
    }

    fn collected(&self, tx: &TxId) -> Result<bool, LogError> {
        self.check_read()?;
        let storage = lock(&self.storage);
        if tx.node != storage.node_id {
            return Ok(false);
        }
        Ok(storage
            .current
            .collected
            .get(&tx.epoch)
            .is_some_and(|mark| tx.seq <= *mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{self, Subject, SuiteOptions};
    use crate::types::BranchKind;

    fn branch(id: &str) -> BranchSpec {
        BranchSpec {
            branch_id: id.into(),
            endpoint: "http://127.0.0.1:7001".into(),
            commit_order: 0,
            kind: BranchKind::Database,
        }
    }

    fn tx(log: &MemoryLog, seq: u64) -> TxId {
        TxId {
            node: log.node_id(),
            epoch: log.epoch(),
            seq,
        }
    }

    #[tokio::test]
    async fn memory_log_passes_the_conformance_suite() {
        conformance::run_all(
            || Subject::new(MemoryLog::new(), |log: &MemoryLog| log.set_fail_syncs(true)),
            SuiteOptions {
                expect_group_commit: false,
                ..SuiteOptions::default()
            },
        )
        .await;
    }

    /// A crash undoes a collection not yet synced whole: its records are back and its
    /// low-water mark with them; once synced, both stay.
    #[tokio::test]
    async fn a_crash_keeps_a_collection_whole_or_not_at_all() {
        let log = MemoryLog::new();
        let e = log.epoch();
        let tx = TxId {
            node: log.node_id(),
            epoch: e,
            seq: 1,
        };
        let record = CommitRecord {
            tx,
            branches: vec![branch("c")],
            decided_at_ms: 10,
        };
        log.force_commit(e, record).await.expect("force");
        log.record_lazy(e, LazyRecord::Done { tx }).expect("done");
        log.sync(e).await.expect("sync");
        assert_eq!(
            log.collect(&TxId { seq: 2, ..tx }, 10)
                .expect("collect")
                .records,
            1
        );
        let crashed = log.reopen();
        assert!(crashed.decision(&tx).expect("decision").is_some());
        assert!(!crashed.collected(&tx).expect("collected"));
        let e = crashed.epoch();
        assert_eq!(
            crashed
                .collect(&TxId { seq: 2, ..tx }, 10)
                .expect("collect")
                .records,
            1
        );
        crashed.sync(e).await.expect("sync");
        let restarted = crashed.reopen();
        assert_eq!(restarted.decision(&tx).expect("decision"), None);
        assert!(restarted.collected(&tx).expect("collected"));
    }

    #[tokio::test]
    async fn reopen_keeps_only_synced_state_and_fences_the_old_handle() {
        let log = MemoryLog::new();
        assert_eq!(log.epoch(), 1);
        let e = log.epoch();
        let committed = CommitRecord {
            tx: tx(&log, 1),
            branches: vec![branch("a")],
            decided_at_ms: 7,
        };
        let lsn = log.force_commit(e, committed.clone()).await.expect("force");
        // Written after the last sync: lost by a crash.
        log.record_lazy(e, LazyRecord::Done { tx: committed.tx })
            .expect("done");
        log.record_lazy(
            e,
            LazyRecord::Preparing {
                tx: tx(&log, 2),
                branches: vec![branch("b")],
            },
        )
        .expect("preparing");

        let next = log.reopen();
        assert_eq!(next.epoch(), 2);
        assert_eq!(next.node_id(), log.node_id());
        assert_eq!(next.durable_lsn(), lsn);
        assert_eq!(
            next.decision(&committed.tx).expect("read"),
            Some(StoredDecision {
                record: committed.clone(),
                done: false
            })
        );
        let rec = next.recover().expect("recover");
        assert_eq!(rec.commits, vec![committed.clone()]);
        assert!(rec.undecided.is_empty());

        // The old handle is a zombie now.
        let err = log
            .force_commit(
                e,
                CommitRecord {
                    tx: tx(&log, 3),
                    branches: vec![],
                    decided_at_ms: 0,
                },
            )
            .await
            .expect_err("fenced");
        assert!(
            matches!(
                err,
                LogError::Fenced {
                    caller: 1,
                    current: 2
                }
            ),
            "{err:?}"
        );
        assert!(matches!(
            log.record_lazy(e, LazyRecord::Aborted { tx: tx(&log, 2) }),
            Err(LogError::Fenced { .. })
        ));

        // LSNs continue across restarts.
        let t = TxId {
            node: next.node_id(),
            epoch: next.epoch(),
            seq: 1,
        };
        let lsn2 = next
            .force_commit(
                next.epoch(),
                CommitRecord {
                    tx: t,
                    branches: vec![],
                    decided_at_ms: 0,
                },
            )
            .await
            .expect("force");
        assert!(lsn2 > lsn);
    }

    #[tokio::test]
    async fn clean_reopen_and_flush_keep_lazy_records() {
        let log = MemoryLog::with_node_id(42);
        let e = log.epoch();
        let t = tx(&log, 1);
        log.record_lazy(
            e,
            LazyRecord::Preparing {
                tx: t,
                branches: vec![branch("a")],
            },
        )
        .expect("preparing");
        let next = log.reopen_after_clean_shutdown();
        assert_eq!(next.node_id(), 42);
        assert_eq!(
            next.recover().expect("recover").undecided,
            vec![(t, vec![branch("a")])]
        );

        let e = next.epoch();
        let t2 = TxId {
            node: 42,
            epoch: e,
            seq: 1,
        };
        next.record_lazy(
            e,
            LazyRecord::OnePhaseCommitted {
                tx: t2,
                branches: vec![branch("x")],
            },
        )
        .expect("one phase");
        next.flush();
        let third = next.reopen();
        assert_eq!(third.epoch(), 3);
        let d = third.decision(&t2).expect("read").expect("kept");
        assert!(d.done);
    }

    #[tokio::test]
    async fn poison_stops_writes_and_reads() {
        let log = MemoryLog::new();
        let e = log.epoch();
        log.poison("disk on fire");
        assert!(log.is_failed());
        let err = log
            .force_commit(
                e,
                CommitRecord {
                    tx: tx(&log, 1),
                    branches: vec![],
                    decided_at_ms: 0,
                },
            )
            .await
            .expect_err("poisoned");
        assert!(
            matches!(&err, LogError::Failed(m) if m.contains("disk on fire")),
            "{err:?}"
        );
        assert!(matches!(
            log.decision(&tx(&log, 1)),
            Err(LogError::Failed(_))
        ));
        // A restart clears the poison (a new process).
        let next = log.reopen();
        assert!(!next.is_failed());
        assert_eq!(next.decision(&tx(&log, 1)).expect("read"), None);
    }
}
