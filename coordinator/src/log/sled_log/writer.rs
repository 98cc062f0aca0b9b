//! The writer thread of the sled decision log: group commit. It takes a request, gathers
//! everything else queued (waiting a little for company when busy), writes the queued lazy
//! records and the batch's forced records, flushes, syncs once between the fail points,
//! and answers every waiter.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::sync::oneshot;
use twopc_durable::Syncer;

use super::codec::{
    audit_key, audit_prefix, decode_commit, encode_audit, encode_commit, encode_last_lsn, tx_key,
    LAST_LSN_KEY,
};
use super::trees::Trees;
use super::{lock, Shared};
use crate::log::{AuditRecord, CommitRecord, LogError, Lsn};
use crate::types::{BranchSpec, TxId};

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

/// How long an idle writer thread leaves queued lazy records unwritten (a busy one writes
/// them before each batch); sled's background flush
/// ([`SledLogOptions::flush_every_ms`](super::SledLogOptions::flush_every_ms)) then takes
/// them to the disk.
const LAZY_APPLY_INTERVAL: Duration = Duration::from_millis(20);

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

pub(super) type Reply = oneshot::Sender<Result<Lsn, LogError>>;

/// What a forced write carries.
pub(super) enum Item {
    /// A COMMIT decision (write-once, idempotent for the same branches).
    Commit(CommitRecord),
    /// An audit record (always appended).
    Audit(AuditRecord),
    /// No record: make everything written so far durable
    /// ([`DecisionLog::sync`](crate::log::DecisionLog::sync)).
    Sync,
}

pub(super) struct Request {
    pub(super) item: Item,
    pub(super) reply: Reply,
}

/// A COMMIT decision of a batch, unpacked from its [`Request`].
struct CommitRequest {
    record: CommitRecord,
    reply: Reply,
}

pub(super) struct Writer {
    pub(super) db: sled::Db,
    /// Its trees (the COMMIT decisions go to `commits`, queued lazy records to both).
    pub(super) trees: Trees,
    pub(super) syncer: Syncer,
    pub(super) shared: Arc<Shared>,
    pub(super) last_lsn: Lsn,
    /// [`SledLogOptions::group_commit_delay_us`](super::SledLogOptions::group_commit_delay_us).
    pub(super) delay: Duration,
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
    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) -> Syncer {
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
            let existing = match self.trees.find_commit(&key) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{branches, commit, tx_of};
    use crate::log::{DecisionLog, SledLog, SledLogOptions};

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
}
