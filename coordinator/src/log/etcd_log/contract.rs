//! [`DecisionLog`] for [`EtcdLog`]: each call of the contract (see [`crate::log`]) as a
//! request to the writer (forced and lazy records, syncs) or a linearizable read of the
//! shard's keys on the etcd runtime (decisions, recovery, audits, collection).

use super::*;

/// The [`TxId`] a `<tx>` key suffix (40 hex digits) names.
pub(super) fn tx_of_suffix(suffix: &[u8]) -> Option<TxId> {
    if suffix.len() != 40 {
        return None;
    }
    let text = std::str::from_utf8(suffix).ok()?;
    Some(TxId {
        node: u32::from_str_radix(&text[..8], 16).ok()?,
        epoch: u64::from_str_radix(&text[8..24], 16).ok()?,
        seq: u64::from_str_radix(&text[24..], 16).ok()?,
    })
}

impl DecisionLog for EtcdLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn node_id(&self) -> u32 {
        self.node_id
    }

    async fn force_commit(&self, epoch: u64, record: CommitRecord) -> Result<Lsn, LogError> {
        self.check_write(epoch)?;
        self.request(Item::Commit(record)).await
    }

    fn record_lazy(&self, epoch: u64, record: LazyRecord) -> Result<(), LogError> {
        self.check_write(epoch)?;
        lock(&self.shared.queued).push(record);
        Ok(())
    }

    async fn sync(&self, epoch: u64) -> Result<Lsn, LogError> {
        self.check_write(epoch)?;
        self.request(Item::Sync).await
    }

    fn decision(&self, tx: &TxId) -> Result<Option<StoredDecision>, LogError> {
        let (tk, dk) = (self.store.keys.tx(tx), self.store.keys.done(tx));
        let responses = self.read(true, move |store| {
            Box::pin(async move {
                store
                    .read_txn(vec![TxnOp::get(tk, None), TxnOp::get(dk, None)])
                    .await
            })
        })?;
        let first = |r: Option<&TxnOpResponse>| match r {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        let Some(bytes) = first(responses.first()) else {
            return Ok(None);
        };
        let done_flag = first(responses.get(1)).is_some();
        let stored = self.decode_or_poison(&bytes)?;
        assert_eq!(
            stored.record.tx, *tx,
            "the record under a transaction's key is another transaction's"
        );
        Ok(Some(StoredDecision {
            record: stored.record,
            done: stored.done || done_flag,
        }))
    }

    fn recover(&self) -> Result<Recovered, LogError> {
        let keys = self.store.keys.clone();
        let (records, done, prep) = self.read(true, move |store| {
            Box::pin(async move {
                let (records, at) = store.scan(keys.tx_prefix(), false, None).await?;
                let (done, _) = store.scan(keys.done_prefix(), true, Some(at)).await?;
                let (prep, _) = store.scan(keys.prep_prefix(), false, Some(at)).await?;
                Ok((records, done, prep))
            })
        })?;
        let keys = &self.store.keys;
        let done: std::collections::HashSet<Vec<u8>> = done
            .iter()
            .filter_map(|kv| keys.tx_of(&keys.done_prefix(), kv.key()))
            .collect();
        let decided: std::collections::HashSet<&[u8]> = records.iter().map(|kv| kv.key()).collect();
        let mut open: Vec<(Lsn, CommitRecord)> = Vec::new();
        for kv in &records {
            let stored = self.decode_or_poison(kv.value())?;
            if !stored.done && !done.contains(kv.key()) {
                open.push((stored.lsn, stored.record));
            }
        }
        open.sort_by_key(|(lsn, _)| *lsn);
        let mut undecided = Vec::new();
        let mut one_phase = Vec::new();
        // Keys sort in TxId order.
        for kv in &prep {
            let decided_already = keys
                .tx_of(&keys.prep_prefix(), kv.key())
                .is_some_and(|t| decided.contains(t.as_slice()));
            if decided_already {
                continue;
            }
            let (tx, branches, is_one_phase) =
                decode_preparing(kv.value()).map_err(|m| self.shared.poison(m))?;
            match (is_one_phase, branches.first()) {
                (true, Some(branch)) => one_phase.push((tx, branch.clone())),
                _ => undecided.push((tx, branches)),
            }
        }
        Ok(Recovered {
            commits: open.into_iter().map(|(_, r)| r).collect(),
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

    async fn force_audit(&self, epoch: u64, record: AuditRecord) -> Result<Lsn, LogError> {
        self.check_write(epoch)?;
        self.request(Item::Audit(record)).await
    }

    fn audits(&self, tx: &TxId) -> Result<Vec<AuditRecord>, LogError> {
        let prefix = self.store.keys.audit_prefix(tx);
        let (kvs, _) = self.read(false, move |store| {
            Box::pin(async move { store.scan(prefix, false, None).await })
        })?;
        let mut records = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let (record, _lsn) = decode_audit(kv.value())
                .map_err(|m| self.shared.poison(format!("transaction {tx}: {m}")))?;
            records.push(record);
        }
        Ok(records)
    }

    fn collect(&self, below: &TxId, limit: usize) -> Result<Collected, LogError> {
        let keys = self.store.keys.clone();
        let (from, to) = (keys.done_prefix(), keys.done(below));
        let want = limit.saturating_add(1);
        let (found, _) = self.read(true, move |store| {
            Box::pin(async move { store.range(from, to, Some(want), true, None).await })
        })?;
        let mut collected = Collected::default();
        let mut victims: Vec<TxId> = Vec::new();
        for kv in &found {
            let Some(tx) = kv
                .key()
                .strip_prefix(keys.done_prefix().as_slice())
                .and_then(tx_of_suffix)
            else {
                return Err(self.shared.poison(format!(
                    "a done flag with a malformed key: {}",
                    String::from_utf8_lossy(kv.key())
                )));
            };
            if victims.len() >= limit {
                collected.more = true;
                break;
            }
            victims.push(tx);
        }
        // Each transaction of deletions raises the marks over what it deleted, so a
        // crash keeps both or neither.
        for chunk in victims.chunks(MAX_FORCED_PER_TXN / 2) {
            let mut marks: BTreeMap<u64, u64> = BTreeMap::new();
            let mut ops = Vec::with_capacity(chunk.len() * 2 + 4);
            for tx in chunk {
                ops.push(TxnOp::delete(keys.tx(tx), None));
                ops.push(TxnOp::delete(keys.done(tx), None));
                let mark = marks.entry(tx.epoch).or_insert(0);
                *mark = (*mark).max(tx.seq);
            }
            for (epoch, seq) in marks {
                if seq > self.low_water_mark(epoch)? {
                    ops.push(TxnOp::put(
                        keys.collected(epoch),
                        encode_collected(seq).to_vec(),
                        None,
                    ));
                }
            }
            let shared = self.shared.clone();
            let epoch = self.epoch;
            let written = self.read(false, move |store| {
                Box::pin(async move {
                    match store.fenced("a collection", ops).await {
                        Ok(_) => Ok(Ok(())),
                        Err(e) => Ok(Err(e)),
                    }
                })
            })?;
            match written {
                Ok(()) => {
                    lock(&shared.stats).syncs += 1;
                    collected.records += chunk.len() as u64;
                }
                Err(WriteError::Fenced { current, owner }) => {
                    shared.poison(format!(
                        "a collection was fenced: this log owns epoch {epoch} but the owner key now has create revision {current} (owner: {owner})"
                    ));
                    return Err(LogError::Fenced {
                        caller: epoch,
                        current,
                    });
                }
                Err(WriteError::Failed(m)) => {
                    return Err(shared.poison(format!("a collection: {m}")))
                }
            }
        }
        Ok(collected)
    }

    fn collected(&self, tx: &TxId) -> Result<bool, LogError> {
        self.check_read()?;
        if tx.node != self.node_id {
            return Ok(false);
        }
        Ok(tx.seq <= self.low_water_mark(tx.epoch)?)
    }

    fn kept(&self) -> Result<Kept, LogError> {
        let prefix = self.store.keys.tx_prefix();
        let (kvs, _) = self.read(true, move |store| {
            Box::pin(async move { store.scan(prefix, false, None).await })
        })?;
        let mut kept = Kept::default();
        for kv in kvs {
            let at = self.decode_or_poison(kv.value())?.record.decided_at_ms;
            kept.records += 1;
            kept.oldest_decided_at_ms = Some(kept.oldest_decided_at_ms.map_or(at, |o| o.min(at)));
        }
        Ok(kept)
    }
}
