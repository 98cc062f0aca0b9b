//! The etcd keys of one cluster and shard, and the checks of the names they are built from.
//!
//! ```text
//! /twopc/v1/<cluster>/node_id                       the cluster's node id (8 hex digits), created once
//! /twopc/v1/<cluster>/shard/<s>/owner               the owner: leased, its create_revision is the epoch
//! /twopc/v1/<cluster>/shard/<s>/lsn                 the highest LSN assigned (sled's LSN counter value)
//! /twopc/v1/<cluster>/shard/<s>/tx/<tx>             a COMMIT record or one-phase outcome (write-once)
//! /twopc/v1/<cluster>/shard/<s>/done/<tx>           empty: phase two of <tx> finished
//! /twopc/v1/<cluster>/shard/<s>/prep/<tx>           a Preparing record or one-phase intent
//! /twopc/v1/<cluster>/shard/<s>/audit/<tx>/<lsn>    an audit record, forced at <lsn> (16 hex digits)
//! /twopc/v1/<cluster>/shard/<s>/collected/<epoch>   low-water mark of an epoch (16 hex digits)
//! ```
//!
//! `<tx>` is the sled log's 20-byte transaction key (node, epoch, seq, big-endian) in 40
//! lower-case hex digits, so keys sort in transaction order exactly like sled's do. The
//! done flag is a key of its own rather than a rewrite of the COMMIT record: the record
//! stays write-once (`If version == 0 Then Put`), and marking a transaction finished is a
//! blind, idempotent write that needs no read first.

use crate::log::sled_log::codec::tx_key;
use crate::types::TxId;

/// Longest accepted cluster name, in bytes.
pub const MAX_CLUSTER_NAME_LEN: usize = 64;

/// Why a cluster name cannot be used as a key prefix, or `None` when it can: 1 to 64
/// ASCII letters, digits, `-`, `_` or `.` (never `.` or `..` alone).
pub fn cluster_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the etcd cluster name is empty".into());
    }
    if name.len() > MAX_CLUSTER_NAME_LEN {
        return Some(format!(
            "the etcd cluster name is {} bytes long; at most {MAX_CLUSTER_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some(format!("the etcd cluster name {name:?} is not allowed"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Some(format!(
            "the etcd cluster name {name:?} contains {bad:?}; use ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    None
}

/// The keys of one shard of one cluster (see the module docs).
#[derive(Clone, Debug)]
pub(super) struct Keys {
    /// `/twopc/v1/<cluster>/`.
    cluster: String,
    /// `/twopc/v1/<cluster>/shard/<s>/`.
    shard: String,
}

/// 40 hex digits of the transaction's sled key: sorts in [`TxId`] order.
fn tx_hex(tx: &TxId) -> String {
    let mut s = String::with_capacity(40);
    for b in tx_key(tx) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The smallest key strictly greater than every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Keys {
    /// The keys of shard `shard` of `cluster` (a name [`cluster_name_problem`] accepts).
    pub(super) fn new(cluster: &str, shard: u32) -> Keys {
        let cluster = format!("/twopc/v1/{cluster}/");
        Keys {
            shard: format!("{cluster}shard/{shard}/"),
            cluster,
        }
    }

    /// The cluster's node id.
    pub(super) fn node_id(&self) -> Vec<u8> {
        format!("{}node_id", self.cluster).into_bytes()
    }

    /// The shard's owner key.
    pub(super) fn owner(&self) -> Vec<u8> {
        format!("{}owner", self.shard).into_bytes()
    }

    /// The LSN counter.
    pub(super) fn lsn(&self) -> Vec<u8> {
        format!("{}lsn", self.shard).into_bytes()
    }

    /// Start of every COMMIT record key.
    pub(super) fn tx_prefix(&self) -> Vec<u8> {
        format!("{}tx/", self.shard).into_bytes()
    }

    /// The COMMIT record (or one-phase outcome) of `tx`.
    pub(super) fn tx(&self, tx: &TxId) -> Vec<u8> {
        format!("{}tx/{}", self.shard, tx_hex(tx)).into_bytes()
    }

    /// Start of every done flag key.
    pub(super) fn done_prefix(&self) -> Vec<u8> {
        format!("{}done/", self.shard).into_bytes()
    }

    /// The done flag of `tx`.
    pub(super) fn done(&self, tx: &TxId) -> Vec<u8> {
        format!("{}done/{}", self.shard, tx_hex(tx)).into_bytes()
    }

    /// Start of every Preparing record / one-phase intent key.
    pub(super) fn prep_prefix(&self) -> Vec<u8> {
        format!("{}prep/", self.shard).into_bytes()
    }

    /// The Preparing record or one-phase intent of `tx`.
    pub(super) fn prep(&self, tx: &TxId) -> Vec<u8> {
        format!("{}prep/{}", self.shard, tx_hex(tx)).into_bytes()
    }

    /// Start of the audit record keys of `tx`.
    pub(super) fn audit_prefix(&self, tx: &TxId) -> Vec<u8> {
        format!("{}audit/{}/", self.shard, tx_hex(tx)).into_bytes()
    }

    /// The audit record of `tx` forced at `lsn` (LSNs are unique, and their fixed-width
    /// hex sorts in the order records were forced).
    pub(super) fn audit(&self, tx: &TxId, lsn: u64) -> Vec<u8> {
        format!("{}audit/{}/{lsn:016x}", self.shard, tx_hex(tx)).into_bytes()
    }

    /// The low-water mark of `epoch`.
    pub(super) fn collected(&self, epoch: u64) -> Vec<u8> {
        format!("{}collected/{epoch:016x}", self.shard).into_bytes()
    }

    /// The COMMIT record key that matches a done flag or prep key of `prefix`.
    pub(super) fn tx_of(&self, prefix: &[u8], key: &[u8]) -> Option<Vec<u8>> {
        let suffix = key.strip_prefix(prefix)?;
        let mut tx = self.tx_prefix();
        tx.extend_from_slice(suffix);
        Some(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout_and_sort_in_transaction_order() {
        let k = Keys::new("prod", 0);
        assert_eq!(k.owner(), b"/twopc/v1/prod/shard/0/owner");
        assert_eq!(k.node_id(), b"/twopc/v1/prod/node_id");
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
        assert!(k.tx(&a) < k.tx(&b));
        assert!(k.tx(&a).starts_with(&k.tx_prefix()));
        assert_eq!(
            String::from_utf8_lossy(&k.tx(&a)),
            "/twopc/v1/prod/shard/0/tx/00000001\
             0000000000000002\
             000000000000012c"
        );
        assert!(k.audit(&a, 9) < k.audit(&a, 10));
        assert!(k.audit(&a, 0xff).starts_with(&k.audit_prefix(&a)));
        assert_eq!(k.tx_of(&k.done_prefix(), &k.done(&a)), Some(k.tx(&a)));
        assert_eq!(k.tx_of(&k.prep_prefix(), &k.prep(&b)), Some(k.tx(&b)));
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }

    #[test]
    fn cluster_names_are_checked() {
        assert_eq!(cluster_name_problem("default"), None);
        assert_eq!(cluster_name_problem("eu-west.1_a"), None);
        for bad in ["", "a/b", "..", "sp ace", &"x".repeat(65)] {
            assert!(cluster_name_problem(bad).is_some(), "{bad:?}");
        }
    }
}
