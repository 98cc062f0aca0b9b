//! The writer task of the etcd decision log: group commit.
//!
//! One task on the log's own runtime owns every write but collection's. It takes a
//! request, drains everything else queued, writes the queued lazy records (in as few
//! fenced transactions as the rules below allow), then the batch's COMMIT decisions and
//! audit records, up to [`MAX_FORCED_PER_TXN`] per fenced transaction together with the
//! LSN counter, and answers every waiter. An etcd transaction that returned is committed
//! by a quorum of members, each of which fsynced its Raft log: that is the sync, and
//! [`LogStats::syncs`](crate::log::LogStats::syncs) counts those transactions.
//!
//! etcd refuses a transaction that writes one key twice, and one with more than
//! `--max-txn-ops` (default 128) operations on a level, nested transactions counted
//! against what their parent leaves; requests are capped at 1.5 MiB. So a transaction
//! holds at most [`MAX_OPS_PER_TXN`] operations and [`MAX_TXN_BYTES`] of keys and values,
//! lazy records that touch a key already in the transaction start the next one (their
//! order is kept), and a batch that decides one transaction twice writes it once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{mpsc, oneshot};

use super::store::{Store, WriteError};
use super::{lock, now_ms, Shared};
use crate::log::sled_log::codec::{
    decode_commit, encode_audit, encode_commit, encode_last_lsn, encode_preparing,
};
use crate::log::{AuditRecord, CommitRecord, LazyRecord, LogError, Lsn};
use crate::types::TxId;

/// Decisions and audit records in one fenced transaction: each decision is one nested
/// transaction of one operation, which with the LSN counter keeps the top level (and the
/// budget it leaves the nested ones) well inside etcd's default of 128.
pub const MAX_FORCED_PER_TXN: usize = 60;
/// Operations on the top level of one transaction of lazy records.
const MAX_OPS_PER_TXN: usize = 60;
/// Bytes of keys and values in one transaction, below etcd's 1.5 MiB request limit.
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// How long an idle writer leaves queued lazy records unwritten.
const LAZY_APPLY_INTERVAL: Duration = Duration::from_millis(20);
/// The value of a done flag (any non-empty value: only its existence counts).
const DONE_VALUE: &[u8] = b"1";

pub(super) type Reply = oneshot::Sender<Result<Lsn, LogError>>;

/// What a request asks the writer for.
pub(super) enum Item {
    /// Force a COMMIT decision (write-once, idempotent for the same branches).
    Commit(CommitRecord),
    /// Force an audit record (always appended).
    Audit(AuditRecord),
    /// Make everything written before it durable, and check the shard is still ours
    /// ([`DecisionLog::sync`](crate::log::DecisionLog::sync)).
    Sync,
    /// Write the queued lazy records (a read does this first, to see them).
    Flush,
}

/// One request and where its answer goes.
pub(super) struct Request {
    pub(super) item: Item,
    pub(super) reply: Reply,
}

/// The writer's state.
pub(super) struct Writer {
    pub(super) store: Arc<Store>,
    pub(super) shared: Arc<Shared>,
    /// The epoch, as reported in [`LogError::Fenced`].
    pub(super) epoch: u64,
    /// The highest LSN assigned (what the LSN counter in etcd holds).
    pub(super) last_lsn: Lsn,
}

/// A forced record of a batch, with its LSN and where its answer goes.
enum Forced {
    Commit {
        record: CommitRecord,
        lsn: Lsn,
        reply: Reply,
        /// Later requests of the same batch for the same transaction.
        followers: Vec<(CommitRecord, Reply)>,
    },
    Audit {
        lsn: Lsn,
        reply: Reply,
    },
}

impl Writer {
    /// Serves requests until the channel closes (the log is dropped), then writes what is
    /// still queued.
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        loop {
            let first = tokio::select! {
                r = rx.recv() => r,
                _ = tokio::time::sleep(LAZY_APPLY_INTERVAL) => {
                    // An error has poisoned the log; the next request hears about it.
                    let _ = self.write_lazy().await;
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            self.serve(batch).await;
        }
        let _ = self.write_lazy().await;
    }

    fn failed(&self) -> Option<LogError> {
        self.shared.failure().map(LogError::Failed)
    }

    /// Poisons the log for `e` and returns what the call that hit it reports.
    fn poison(&self, what: &str, e: WriteError) -> LogError {
        match e {
            WriteError::Fenced { current, owner } => {
                let err = LogError::Fenced {
                    caller: self.epoch,
                    current,
                };
                self.shared.poison(format!(
                    "{what} was fenced: this log owns epoch {} but the shard's owner key now has create revision {current} (owner: {owner})",
                    self.epoch
                ));
                err
            }
            WriteError::Failed(msg) => self.shared.poison(format!("{what}: {msg}")),
        }
    }

    async fn serve(&mut self, batch: Vec<Request>) {
        if let Some(err) = self.failed() {
            for r in batch {
                let _ = r.reply.send(Err(err.clone()));
            }
            return;
        }
        let syncs_before = lock(&self.shared.stats).syncs;
        if let Err(err) = self.write_lazy().await {
            for r in batch {
                let _ = r.reply.send(Err(err.clone()));
            }
            return;
        }
        let mut forced: Vec<Forced> = Vec::new();
        let mut by_tx: HashMap<TxId, usize> = HashMap::new();
        let mut records: Vec<Option<AuditRecord>> = Vec::new();
        let mut after: Vec<(bool, Reply)> = Vec::new();
        for req in batch {
            match req.item {
                Item::Commit(record) => {
                    if let Some(&i) = by_tx.get(&record.tx) {
                        if let Some(Forced::Commit { followers, .. }) = forced.get_mut(i) {
                            followers.push((record, req.reply));
                        }
                        continue;
                    }
                    by_tx.insert(record.tx, forced.len());
                    forced.push(Forced::Commit {
                        record,
                        lsn: 0,
                        reply: req.reply,
                        followers: Vec::new(),
                    });
                    records.push(None);
                }
                Item::Audit(record) => {
                    forced.push(Forced::Audit {
                        lsn: 0,
                        reply: req.reply,
                    });
                    records.push(Some(record));
                }
                Item::Sync => after.push((true, req.reply)),
                Item::Flush => after.push((false, req.reply)),
            }
        }
        let mut pending = forced.into_iter().zip(records).peekable();
        while pending.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while let Some((item, audit)) = pending.next_if(|_| chunk.len() < MAX_FORCED_PER_TXN) {
                bytes += match (&item, &audit) {
                    (Forced::Commit { record, .. }, _) => 200 + 120 * record.branches.len(),
                    (_, Some(a)) => 300 + a.reason.len() + a.detail.len() + a.operator.len(),
                    _ => 0,
                };
                chunk.push((item, audit));
                if bytes > MAX_TXN_BYTES {
                    break;
                }
            }
            if let Err(err) = self.write_forced(chunk).await {
                for (item, _) in pending {
                    fail_forced(item, &err);
                }
                for (_, reply) in after {
                    let _ = reply.send(Err(err.clone()));
                }
                return;
            }
        }
        // A sync that found nothing to write still proves, with a fenced transaction,
        // that the shard is ours and etcd answers.
        let wrote = lock(&self.shared.stats).syncs > syncs_before;
        if !wrote && after.iter().any(|(sync, _)| *sync) {
            match self.store.fenced("the sync", Vec::new()).await {
                Ok(_) => lock(&self.shared.stats).syncs += 1,
                Err(e) => {
                    let err = self.poison("the sync", e);
                    for (_, reply) in after {
                        let _ = reply.send(Err(err.clone()));
                    }
                    return;
                }
            }
        }
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        for (_, reply) in after {
            let _ = reply.send(Ok(durable));
        }
    }

    /// Writes one fenced transaction of forced records and answers them. On failure
    /// the log is poisoned, the chunk answered with the error, which is returned.
    async fn write_forced(
        &mut self,
        chunk: Vec<(Forced, Option<AuditRecord>)>,
    ) -> Result<(), LogError> {
        let mut next = self.last_lsn;
        let mut items = Vec::with_capacity(chunk.len());
        let mut ops = Vec::with_capacity(chunk.len() + 1);
        for (mut item, audit) in chunk {
            next += 1;
            match (&mut item, audit) {
                (Forced::Commit { record, lsn, .. }, _) => {
                    *lsn = next;
                    let key = self.store.keys.tx(&record.tx);
                    let value = encode_commit(record, next, false, false);
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(key.clone(), value, None)])
                            .or_else([TxnOp::get(key, None)]),
                    ));
                }
                (Forced::Audit { lsn, .. }, Some(record)) => {
                    *lsn = next;
                    let key = self.store.keys.audit(&record.tx, next);
                    ops.push(TxnOp::put(key, encode_audit(&record, next), None));
                }
                (Forced::Audit { .. }, None) => {}
            }
            items.push(item);
        }
        ops.insert(
            0,
            TxnOp::put(self.store.keys.lsn(), encode_last_lsn(next), None),
        );
        let responses = match self.store.fenced("a batch of decisions", ops).await {
            Ok(r) => r,
            Err(e) => {
                let err = self.poison("a batch of decisions", e);
                for item in items {
                    fail_forced(item, &err);
                }
                return Err(err);
            }
        };
        self.last_lsn = next;
        self.shared.durable_lsn.fetch_max(next, Ordering::AcqRel);
        let mut decisions = 0u64;
        let mut corrupt = None;
        // Answers are sent once the counters are up to date: a caller that reads the
        // stats after its force returned sees its decision counted.
        let mut answers: Vec<(Reply, Result<Lsn, LogError>)> = Vec::new();
        // responses[0] is the LSN counter's put.
        for (item, response) in items.into_iter().zip(responses.into_iter().skip(1)) {
            match item {
                Forced::Audit { lsn, reply } => answers.push((reply, Ok(lsn))),
                Forced::Commit {
                    record,
                    lsn,
                    reply,
                    followers,
                } => {
                    let answer = match response {
                        TxnOpResponse::Txn(t) if t.succeeded() => {
                            decisions += 1;
                            Ok((lsn, record.branches))
                        }
                        TxnOpResponse::Txn(t) => match t.op_responses().into_iter().next() {
                            Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
                                Some(kv) => match decode_commit(kv.value()) {
                                    Ok(stored) if stored.record.branches != record.branches => {
                                        Err(LogError::Conflict { tx: record.tx })
                                    }
                                    Ok(stored) if stored.one_phase || stored.lsn == 0 => {
                                        // A lazy one-phase outcome, now forced: this batch's
                                        // LSN covers it.
                                        decisions += 1;
                                        Ok((lsn, stored.record.branches))
                                    }
                                    Ok(stored) => Ok((stored.lsn, stored.record.branches)),
                                    Err(m) => {
                                        corrupt.get_or_insert(format!(
                                            "transaction {}: {m}",
                                            record.tx
                                        ));
                                        Err(LogError::Failed(m))
                                    }
                                },
                                None => Err(LogError::Failed(format!(
                                    "etcd answered that the record of {} exists but returned none",
                                    record.tx
                                ))),
                            },
                            _ => Err(LogError::Failed("unexpected etcd answer".into())),
                        },
                        _ => Err(LogError::Failed("unexpected etcd answer".into())),
                    };
                    match answer {
                        Ok((lsn, branches)) => {
                            answers.push((reply, Ok(lsn)));
                            for (r, follower) in followers {
                                answers.push((
                                    follower,
                                    if r.branches == branches {
                                        Ok(lsn)
                                    } else {
                                        Err(LogError::Conflict { tx: r.tx })
                                    },
                                ));
                            }
                        }
                        Err(e) => {
                            for (_, follower) in followers {
                                answers.push((follower, Err(e.clone())));
                            }
                            answers.push((reply, Err(e)));
                        }
                    }
                }
            }
        }
        {
            let mut stats = lock(&self.shared.stats);
            stats.syncs += 1;
            if decisions > 0 {
                stats.decisions += decisions;
                stats.batches += 1;
                stats.max_batch = stats.max_batch.max(decisions);
            }
        }
        let result = match corrupt {
            Some(m) => Err(self.shared.poison(m)),
            None => Ok(()),
        };
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
        result
    }

    /// Writes every queued lazy record, in order, in as few fenced transactions as the
    /// limits allow. A failure poisons the log (the records are lost, which is safe).
    pub(super) async fn write_lazy(&mut self) -> Result<(), LogError> {
        let queued = std::mem::take(&mut *lock(&self.shared.queued));
        if queued.is_empty() {
            return Ok(());
        }
        if let Some(err) = self.failed() {
            return Err(err);
        }
        let mut ops: Vec<TxnOp> = Vec::new();
        let mut touched: HashSet<Vec<u8>> = HashSet::new();
        let mut bytes = 0usize;
        for record in queued {
            let (record_ops, keys, size) = self.lazy_ops(record);
            let clash = keys.iter().any(|k| touched.contains(k));
            if clash || ops.len() + record_ops.len() > MAX_OPS_PER_TXN || bytes > MAX_TXN_BYTES {
                self.write_lazy_txn(std::mem::take(&mut ops)).await?;
                touched.clear();
                bytes = 0;
            }
            ops.extend(record_ops);
            touched.extend(keys);
            bytes += size;
        }
        self.write_lazy_txn(ops).await
    }

    async fn write_lazy_txn(&self, ops: Vec<TxnOp>) -> Result<(), LogError> {
        if ops.is_empty() {
            return Ok(());
        }
        match self.store.fenced("lazy records", ops).await {
            Ok(_) => {
                lock(&self.shared.stats).syncs += 1;
                Ok(())
            }
            Err(e) => Err(self.poison("writing lazy records", e)),
        }
    }

    /// The operations of one lazy record, the keys they touch and their size.
    fn lazy_ops(&self, record: LazyRecord) -> (Vec<TxnOp>, Vec<Vec<u8>>, usize) {
        let keys = &self.store.keys;
        match record {
            LazyRecord::Preparing { tx, branches } => {
                let (k, v) = (keys.prep(&tx), encode_preparing(&tx, &branches, false));
                let size = k.len() + v.len();
                (vec![TxnOp::put(k.clone(), v, None)], vec![k], size)
            }
            LazyRecord::OnePhase { tx, branch } => {
                let (k, v) = (keys.prep(&tx), encode_preparing(&tx, &[branch], true));
                let size = k.len() + v.len();
                (vec![TxnOp::put(k.clone(), v, None)], vec![k], size)
            }
            LazyRecord::Aborted { tx } => {
                let k = keys.prep(&tx);
                let size = k.len();
                (vec![TxnOp::delete(k.clone(), None)], vec![k], size)
            }
            LazyRecord::Done { tx } => {
                // Only a decision can be finished: `Done` creates nothing on its own.
                let (t, d) = (keys.tx(&tx), keys.done(&tx));
                let size = t.len() + d.len();
                let op = TxnOp::txn(
                    Txn::new()
                        .when([Compare::version(t.clone(), CompareOp::Greater, 0)])
                        .and_then([TxnOp::put(d.clone(), DONE_VALUE, None)]),
                );
                (vec![op], vec![t, d], size)
            }
            LazyRecord::OnePhaseCommitted { tx, branches } => {
                let (t, d, p) = (keys.tx(&tx), keys.done(&tx), keys.prep(&tx));
                let record = CommitRecord {
                    tx,
                    branches,
                    decided_at_ms: now_ms(),
                };
                let v = encode_commit(&record, 0, true, true);
                let size = t.len() + d.len() + p.len() + v.len();
                // Never over an existing record (a forced decision stays as it is).
                let op = TxnOp::txn(
                    Txn::new()
                        .when([Compare::version(t.clone(), CompareOp::Equal, 0)])
                        .and_then([
                            TxnOp::put(t.clone(), v, None),
                            TxnOp::put(d.clone(), DONE_VALUE, None),
                        ]),
                );
                (
                    vec![TxnOp::delete(p.clone(), None), op],
                    vec![t, d, p],
                    size,
                )
            }
        }
    }
}

/// Answers a forced record (and its followers) with `err`.
fn fail_forced(item: Forced, err: &LogError) {
    match item {
        Forced::Commit {
            reply, followers, ..
        } => {
            let _ = reply.send(Err(err.clone()));
            for (_, f) in followers {
                let _ = f.send(Err(err.clone()));
            }
        }
        Forced::Audit { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
    }
}
