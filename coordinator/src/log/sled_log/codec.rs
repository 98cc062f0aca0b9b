//! The on-disk records of the sled decision log: the `prost` message of every value, the
//! keys of the `commits`, `preparing` and default trees, the encode and decode functions,
//! and the format-version checks that refuse values written by a newer build.
//!
//! The etcd decision log ([`crate::log::etcd_log`]) stores the very same values under its
//! own keys, so both logs share one encoding and one format version (hence the
//! `pub(in crate::log)` items).

use prost::Message;

use crate::log::{AuditRecord, CommitRecord, Lsn};
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
pub(in crate::log) const BASE_FORMAT: u32 = 1;

/// Key of the record in the `commits` tree that holds the highest LSN ever assigned. It
/// is written in the same atomic sled batch as the commits it numbers, and its length
/// (not 20 bytes) tells it apart from transaction keys.
pub const LAST_LSN_KEY: &[u8] = b"~last_lsn";

pub(in crate::log) const META_KEY: &[u8] = b"meta";
pub(in crate::log) const COMMITS_TREE: &str = "commits";
pub(in crate::log) const PREPARING_TREE: &str = "preparing";
/// Finished records (COMMIT records whose phase two is done, one-phase outcomes), apart
/// from the open ones in `commits`, so recovery reads only what is unfinished and
/// collection reads only what is finished.
pub(in crate::log) const DONE_TREE: &str = "done";
pub(in crate::log) const TX_KEY_LEN: usize = 20;

/// Start of the key, in the `done` tree, of an epoch's low-water mark: the highest
/// sequence number of that epoch whose record was collected (its length, not 20 bytes,
/// tells it apart from transaction keys; it is written in the same atomic sled batch as
/// the removals it covers).
const COLLECTED_PREFIX: &[u8] = b"~collected/";
/// Length of a low-water mark's key: [`COLLECTED_PREFIX`] and a big-endian epoch.
const COLLECTED_KEY_LEN: usize = COLLECTED_PREFIX.len() + 8;

/// Byte after a transaction's key that starts the key of one of its audit records.
pub const AUDIT_TAG: u8 = b'A';
/// Length of an audit record's key: transaction key, [`AUDIT_TAG`], `u32` index.
pub(in crate::log) const AUDIT_KEY_LEN: usize = TX_KEY_LEN + 1 + 4;

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
    /// Written by
    /// [`LazyRecord::OnePhaseCommitted`](crate::log::LazyRecord::OnePhaseCommitted):
    /// not forced, `lsn` is 0.
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
    /// Written by [`LazyRecord::OnePhase`](crate::log::LazyRecord::OnePhase): a one-phase
    /// commit goes to the only branch.
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
pub(in crate::log) struct MetaPb {
    #[prost(uint32, tag = "1")]
    pub(in crate::log) format: u32,
    #[prost(uint32, tag = "2")]
    pub(in crate::log) node_id: u32,
    #[prost(uint64, tag = "3")]
    pub(in crate::log) epoch: u64,
}

/// Value of the [`LAST_LSN_KEY`] record.
#[derive(Clone, PartialEq, Message)]
struct LastLsnPb {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint64, tag = "2")]
    last_lsn: u64,
}

pub(in crate::log) fn tx_key(tx: &TxId) -> [u8; TX_KEY_LEN] {
    let mut key = [0u8; TX_KEY_LEN];
    key[..4].copy_from_slice(&tx.node.to_be_bytes());
    key[4..12].copy_from_slice(&tx.epoch.to_be_bytes());
    key[12..].copy_from_slice(&tx.seq.to_be_bytes());
    key
}

/// Key of audit record number `index` of `tx`.
pub(in crate::log) fn audit_key(tx: &TxId, index: u32) -> [u8; AUDIT_KEY_LEN] {
    let mut key = [0u8; AUDIT_KEY_LEN];
    key[..TX_KEY_LEN].copy_from_slice(&tx_key(tx));
    key[TX_KEY_LEN] = AUDIT_TAG;
    key[TX_KEY_LEN + 1..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The prefix every audit key of `tx` starts with.
pub(in crate::log) fn audit_prefix(tx: &TxId) -> [u8; TX_KEY_LEN + 1] {
    let mut key = [0u8; TX_KEY_LEN + 1];
    key[..TX_KEY_LEN].copy_from_slice(&tx_key(tx));
    key[TX_KEY_LEN] = AUDIT_TAG;
    key
}

pub(in crate::log) fn encode_audit(record: &AuditRecord, lsn: Lsn) -> Vec<u8> {
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

pub(in crate::log) fn decode_audit(bytes: &[u8]) -> Result<(AuditRecord, Lsn), String> {
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

pub(in crate::log) fn check_format(what: &str, format: u32) -> Result<(), String> {
    if format == 0 || format > FORMAT_VERSION {
        return Err(format!(
            "{what} has format version {format}; this build reads versions 1..={FORMAT_VERSION}"
        ));
    }
    Ok(())
}

pub(in crate::log) fn encode_commit(
    record: &CommitRecord,
    lsn: Lsn,
    done: bool,
    one_phase: bool,
) -> Vec<u8> {
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
pub(in crate::log) struct StoredCommit {
    pub(in crate::log) record: CommitRecord,
    /// 0 for a one-phase record.
    pub(in crate::log) lsn: Lsn,
    pub(in crate::log) done: bool,
    pub(in crate::log) one_phase: bool,
}

pub(in crate::log) fn decode_commit(bytes: &[u8]) -> Result<StoredCommit, String> {
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
pub(in crate::log) fn decode_preparing(
    bytes: &[u8],
) -> Result<(TxId, Vec<BranchSpec>, bool), String> {
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

pub(in crate::log) fn encode_preparing(
    tx: &TxId,
    branches: &[BranchSpec],
    one_phase: bool,
) -> Vec<u8> {
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

/// Key of the low-water mark of `epoch` (see [`COLLECTED_PREFIX`]).
pub(in crate::log) fn collected_key(epoch: u64) -> [u8; COLLECTED_KEY_LEN] {
    let mut key = [0u8; COLLECTED_KEY_LEN];
    key[..COLLECTED_PREFIX.len()].copy_from_slice(COLLECTED_PREFIX);
    key[COLLECTED_PREFIX.len()..].copy_from_slice(&epoch.to_be_bytes());
    key
}

/// A low-water mark's value: the sequence number, big-endian.
pub(in crate::log) fn encode_collected(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(in crate::log) fn decode_collected(bytes: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("corrupt low-water mark: {} bytes, not 8", bytes.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

pub(in crate::log) fn decode_last_lsn(bytes: &[u8]) -> Result<Lsn, String> {
    let pb = LastLsnPb::decode(bytes).map_err(|e| format!("corrupt LSN counter: {e}"))?;
    check_format("LSN counter", pb.format)?;
    Ok(pb.last_lsn)
}

pub(in crate::log) fn encode_last_lsn(last_lsn: Lsn) -> Vec<u8> {
    LastLsnPb {
        format: BASE_FORMAT,
        last_lsn,
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{audit, branches, commit};

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
