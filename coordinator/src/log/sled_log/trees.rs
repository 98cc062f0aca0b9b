//! The sled trees of the decision log and the lazy records written to them: the queue
//! the writer thread (or a reader) writes in order, leaving out inserts that a COMMIT of
//! the same batch or a later record of the same queue makes unneeded. A COMMIT record
//! whose phase two is done moves from `commits` to `done` (copied, then removed), so
//! `commits` holds only what recovery must finish.

use std::collections::{HashMap, HashSet};

use super::codec::{decode_commit, encode_commit, encode_preparing, tx_key};
use super::{lock, Shared};
use crate::log::{CommitRecord, LazyRecord, LogError};
use crate::types::TxId;

/// The sled trees lazy records go to.
#[derive(Clone)]
pub(super) struct Trees {
    /// Open COMMIT records (phase two not done), the LSN counter and audit records.
    pub(super) commits: sled::Tree,
    /// Preparing records and one-phase intents.
    pub(super) preparing: sled::Tree,
    /// Finished records and the low-water marks of collection.
    pub(super) done: sled::Tree,
}

pub(super) fn sled_error(shared: &Shared, what: &str, e: sled::Error) -> LogError {
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
    /// The stored COMMIT record under `key`, open or finished.
    pub(super) fn find_commit(&self, key: &[u8]) -> sled::Result<Option<sled::IVec>> {
        match self.commits.get(key)? {
            Some(v) => Ok(Some(v)),
            None => self.done.get(key),
        }
    }

    /// Moves the COMMIT record under `key` to the `done` tree as `value` (marked done):
    /// first the copy, then the removal, so a crash never leaves it in neither tree. A
    /// crash between the two leaves it in both: the open copy is what reads and recovery
    /// find first (phase two runs once more, which only costs work), and the next `Done`
    /// moves it again. Not one sled transaction: those cost more than the whole rest of a
    /// two-phase decision.
    fn move_to_done(&self, key: &[u8], value: Vec<u8>) -> sled::Result<()> {
        self.done.insert(key, value)?;
        self.commits.remove(key)?;
        Ok(())
    }

    /// Moves every record of `commits` already marked done (written by a build that
    /// kept finished records there) to the `done` tree. Returns how many moved.
    pub(super) fn move_finished(&self, shared: &Shared) -> Result<u64, LogError> {
        let mut moved = 0;
        for item in self.commits.iter() {
            let (key, value) =
                item.map_err(|e| sled_error(shared, "sled scan of commit records", e))?;
            if key.len() != super::codec::TX_KEY_LEN {
                continue;
            }
            let stored = decode_commit(&value).map_err(|m| shared.poison(m))?;
            if stored.done {
                self.move_to_done(&key, value.to_vec())
                    .map_err(|e| sled_error(shared, "sled move of a finished record", e))?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Writes the queued lazy records, oldest first, leaving out the inserts
    /// [`skipped_inserts`] finds unneeded. A sled failure poisons the log; the records
    /// not yet written are dropped with it (a poisoned log writes nothing more).
    pub(super) fn apply_queued(
        &self,
        shared: &Shared,
        committing: &HashSet<TxId>,
    ) -> Result<(), LogError> {
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
                let key = tx_key(&tx);
                let open = self
                    .commits
                    .get(key)
                    .map_err(|e| sled_error(shared, "sled read of a commit record", e))?;
                // Absent: already moved (a repeated Done), or never written.
                if let Some(old) = open {
                    let stored = decode_commit(&old)
                        .map_err(|m| shared.poison(format!("commit {tx}: {m}")))?;
                    let value = encode_commit(&stored.record, stored.lsn, true, stored.one_phase);
                    self.move_to_done(&key, value).map_err(|e| {
                        sled_error(shared, &format!("sled move of finished commit {tx}"), e)
                    })?;
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
                // Insert only if absent: never overwrite an existing decision. Finished
                // at once: it goes to the `done` tree.
                let key = tx_key(&tx);
                let open = self
                    .commits
                    .contains_key(key)
                    .map_err(|e| sled_error(shared, "sled read of a commit record", e))?;
                if !open {
                    let _ = self
                        .done
                        .compare_and_swap(key, None as Option<&[u8]>, Some(value))
                        .map_err(|e| sled_error(shared, "sled write of a one-phase record", e))?;
                }
                self.preparing
                    .remove(tx_key(&tx))
                    .map_err(|e| sled_error(shared, "sled removal of a preparing record", e))?;
            }
        }
        Ok(())
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{branches, commit, tx_of};
    use crate::log::{Collected, DecisionLog, SledLog, SledLogOptions, StoredDecision};
    use std::time::Duration;

    fn open(dir: &std::path::Path) -> SledLog {
        SledLog::open(dir, SledLogOptions::default()).expect("open")
    }

    /// Recovery reads only `commits`: a finished record leaves it for `done`, where
    /// collection finds it; a collection and its low-water mark survive a reopen.
    #[tokio::test]
    async fn finished_records_leave_the_open_ones_and_collection_survives_a_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        let e = log.epoch();
        let (finished, open_one) = (tx_of(&log, 1), tx_of(&log, 2));
        for tx in [finished, open_one] {
            log.force_commit(e, commit(tx, branches(2, "f"), 10))
                .await
                .expect("force");
        }
        log.record_lazy(e, LazyRecord::Done { tx: finished })
            .expect("done");
        log.sync(e).await.expect("sync");
        let key = |tx: &TxId| tx_key(tx);
        assert!(log
            .trees
            .commits
            .get(key(&finished))
            .expect("get")
            .is_none());
        assert!(log.trees.done.get(key(&finished)).expect("get").is_some());
        assert!(log
            .trees
            .commits
            .get(key(&open_one))
            .expect("get")
            .is_some());
        assert_eq!(
            log.collect(&tx_of(&log, 3), 10).expect("collect"),
            Collected {
                records: 1,
                more: false
            }
        );
        drop(log);

        let log = open(&dir);
        assert_eq!(log.decision(&finished).expect("decision"), None);
        assert!(log.collected(&finished).expect("collected"));
        assert!(log.decision(&open_one).expect("decision").is_some());
        assert_eq!(
            log.recover().expect("recover").commits.len(),
            1,
            "the open record is still recovered"
        );
    }

    /// A data directory that kept finished records among the open ones (marked done)
    /// has them moved to `done` at open, where reads and collection find them.
    #[tokio::test]
    async fn finished_records_kept_among_the_open_ones_move_at_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let log = open(&dir);
        let e = log.epoch();
        let old = commit(tx_of(&log, 1), branches(2, "m"), 10);
        let lsn = log.force_commit(e, old.clone()).await.expect("force");
        // As such a build wrote it: the done flag set in place.
        log.trees
            .commits
            .insert(tx_key(&old.tx), encode_commit(&old, lsn, true, false))
            .expect("insert");
        drop(log);

        let log = open(&dir);
        assert!(log
            .trees
            .commits
            .get(tx_key(&old.tx))
            .expect("get")
            .is_none());
        assert_eq!(
            log.decision(&old.tx).expect("decision"),
            Some(StoredDecision {
                record: old.clone(),
                done: true
            })
        );
        assert!(log.recover().expect("recover").commits.is_empty());
        assert_eq!(
            log.collect(&tx_of(&log, u64::MAX), 10)
                .expect("collect")
                .records,
            1
        );
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
        let log = SledLog::open(dir.path(), SledLogOptions::default()).expect("open");
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
        let log = SledLog::open(dir.path(), SledLogOptions::default()).expect("open");
        let recovered = log.recover().expect("recover");
        assert!(recovered.commits.is_empty(), "t1 was marked done");
        assert!(recovered.undecided.is_empty());
    }
}
