//! [`ConfiguredLog`]: the decision log `twopc serve` was told to open, sled or etcd, as one
//! type. The runtime and the server are generic over [`DecisionLog`], whose async methods
//! keep it from being a trait object; an enum that forwards every call keeps the choice
//! in one place ([`ServeConfig::open_log`](crate::config::ServeConfig::open_log)) and
//! everything else unchanged.

use super::{
    AuditRecord, Collected, CommitRecord, DecisionLog, EtcdLog, Kept, LazyRecord, LogError,
    LogStats, Lsn, Recovered, SledLog, StoredDecision,
};
use crate::types::TxId;

/// One of the decision logs (see the module docs).
#[derive(Debug)]
pub enum ConfiguredLog {
    /// The embedded log in a data directory.
    Sled(SledLog),
    /// The log on an etcd cluster.
    Etcd(EtcdLog),
}

impl ConfiguredLog {
    /// Where the log lives, for messages: the data directory, or etcd's endpoints and the
    /// shard's owner key.
    pub fn place(&self) -> String {
        match self {
            ConfiguredLog::Sled(l) => l.dir().display().to_string(),
            ConfiguredLog::Etcd(l) => l.place().to_string(),
        }
    }
}

/// Forwards a call to whichever log this is.
macro_rules! forward {
    ($self:ident, $log:ident => $call:expr) => {
        match $self {
            ConfiguredLog::Sled($log) => $call,
            ConfiguredLog::Etcd($log) => $call,
        }
    };
}

impl DecisionLog for ConfiguredLog {
    fn epoch(&self) -> u64 {
        forward!(self, l => l.epoch())
    }

    fn node_id(&self) -> u32 {
        forward!(self, l => l.node_id())
    }

    async fn force_commit(&self, epoch: u64, record: CommitRecord) -> Result<Lsn, LogError> {
        forward!(self, l => l.force_commit(epoch, record).await)
    }

    fn record_lazy(&self, epoch: u64, record: LazyRecord) -> Result<(), LogError> {
        forward!(self, l => l.record_lazy(epoch, record))
    }

    async fn sync(&self, epoch: u64) -> Result<Lsn, LogError> {
        forward!(self, l => l.sync(epoch).await)
    }

    fn decision(&self, tx: &TxId) -> Result<Option<StoredDecision>, LogError> {
        forward!(self, l => l.decision(tx))
    }

    fn recover(&self) -> Result<Recovered, LogError> {
        forward!(self, l => l.recover())
    }

    fn durable_lsn(&self) -> Lsn {
        forward!(self, l => l.durable_lsn())
    }

    fn stats(&self) -> LogStats {
        forward!(self, l => l.stats())
    }

    fn is_failed(&self) -> bool {
        forward!(self, l => l.is_failed())
    }

    async fn force_audit(&self, epoch: u64, record: AuditRecord) -> Result<Lsn, LogError> {
        forward!(self, l => l.force_audit(epoch, record).await)
    }

    fn audits(&self, tx: &TxId) -> Result<Vec<AuditRecord>, LogError> {
        forward!(self, l => l.audits(tx))
    }

    fn collect(&self, below: &TxId, limit: usize) -> Result<Collected, LogError> {
        forward!(self, l => l.collect(below, limit))
    }

    fn collected(&self, tx: &TxId) -> Result<bool, LogError> {
        forward!(self, l => l.collected(tx))
    }

    fn kept(&self) -> Result<Kept, LogError> {
        forward!(self, l => l.kept())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{self, Subject, SuiteOptions};
    use crate::log::SledLogOptions;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_configured_sled_log_passes_the_conformance_suite() {
        conformance::run_all(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let flag = Arc::new(AtomicBool::new(false));
                let opts = SledLogOptions {
                    fail_syncs: Some(flag.clone()),
                    ..Default::default()
                };
                let log = ConfiguredLog::Sled(
                    SledLog::open(&dir.path().join("data"), opts).expect("open"),
                );
                Subject::new(log, move |_: &ConfiguredLog| {
                    flag.store(true, Ordering::SeqCst)
                })
                .keep_alive(dir)
            },
            SuiteOptions::default(),
        )
        .await;
    }
}
