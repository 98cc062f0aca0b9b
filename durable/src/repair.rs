//! What a kill can leave half-written in a sled 0.34 directory, and how it is put right
//! before sled reads it.
//!
//! sled writes two kinds of file outside its crash-safe log (`db`):
//!
//! * `conf`, once, when the store is created: the bytes, then a CRC, without a sync. A
//!   kill between the two leaves a file sled cannot parse. Nothing else has been written
//!   by then (sled writes `conf` before it opens its log), so the torn file is removed
//!   and sled writes it again from the same (fixed) parameters.
//! * a snapshot of its page table, at every open that finds log entries newer than the
//!   last snapshot: written to `snap.<lsn>.generating`, synced, renamed to `snap.<lsn>`,
//!   then the older snapshots are removed (no directory sync anywhere). At open, sled
//!   reads the file whose name sorts last among `snap.*`, *including* `.generating`
//!   ones, and refuses to start if it is torn. A kill while the snapshot is written
//!   therefore bricked the store for good. [`repair_interrupted_writes`] finishes or
//!   undoes such a write first: a `.generating` file whose trailing CRC matches was
//!   complete and synced (sled was about to rename it), so it gets the rename sled
//!   would have done; any other one is removed (sled removes older snapshots only after
//!   the rename, so the snapshot it was replacing is still there). The directory is
//!   then fsynced, so neither the repair nor sled's earlier rename can be undone by a
//!   power loss.
//!
//! sled 0.34.7 writes snapshots only while it opens (its periodic snapshots are gone:
//! `Config::snapshot_after_ops` is documented as doing nothing). Blob files and the
//! segments of `db` carry CRCs and are cut back to the last whole entry by sled itself.
//!
//! [`diagnose`] names the file a failed open most likely choked on, for the operator.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{ctx, sorted_listing, sync_dir};

/// The name sled gives its settings file.
const CONF: &str = "conf";
/// The prefix of sled's snapshot files.
const SNAP_PREFIX: &str = "snap.";
/// The suffix of a snapshot still being written.
const GENERATING: &str = ".generating";

/// One change [`repair_interrupted_writes`] made, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// A torn snapshot (a kill while it was written) was removed.
    RemovedTornSnapshot(PathBuf),
    /// A complete snapshot that a kill kept from being renamed got its final name.
    FinishedSnapshot {
        /// The `.generating` file.
        from: PathBuf,
        /// Its final name.
        to: PathBuf,
    },
    /// A torn `conf` (a kill while the store was first created) was removed; sled
    /// writes it again.
    RemovedTornConf(PathBuf),
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::RemovedTornSnapshot(p) => write!(
                f,
                "removed {}: a snapshot left half-written by a crash (the previous \
                 snapshot and the log still hold everything)",
                p.display()
            ),
            Repair::FinishedSnapshot { from, to } => write!(
                f,
                "renamed {} to {}: a complete snapshot a crash kept from being renamed",
                from.display(),
                to.display()
            ),
            Repair::RemovedTornConf(p) => write!(
                f,
                "removed {}: settings left half-written by a crash while the store was \
                 created (they are written again)",
                p.display()
            ),
        }
    }
}

/// Whether `bytes` end in the length and CRC sled appends to a snapshot, and the CRC
/// matches what precedes them (`<payload> <len: u64> <crc32(payload): u32>`).
fn snapshot_is_complete(bytes: &[u8]) -> bool {
    let Some(payload_len) = bytes.len().checked_sub(12) else {
        return false;
    };
    if payload_len == 0 {
        return false;
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[bytes.len() - 4..]);
    crc32fast::hash(&bytes[..payload_len]) == u32::from_le_bytes(crc)
}

/// Whether `bytes` are a whole sled `conf`: `<settings> <crc32(settings): u32>`.
fn conf_is_complete(bytes: &[u8]) -> bool {
    let Some(payload_len) = bytes.len().checked_sub(4) else {
        return false;
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[payload_len..]);
    crc32fast::hash(&bytes[..payload_len]) == u32::from_le_bytes(crc)
}

fn read(path: &Path) -> io::Result<Vec<u8>> {
    fs::read(path).map_err(ctx("cannot read", path))
}

/// Puts right what a kill can leave half-written in the sled directory `sled_dir` (see
/// the module docs), before sled opens it. Returns what it changed (nothing, almost
/// always); the caller logs it. A directory that does not exist yet needs nothing.
pub fn repair_interrupted_writes(sled_dir: &Path) -> io::Result<Vec<Repair>> {
    let names = sorted_listing(sled_dir).map_err(ctx("cannot list", sled_dir))?;
    let mut repairs = Vec::new();

    for name in &names {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(SNAP_PREFIX) else {
            continue;
        };
        let Some(lsn) = rest.strip_suffix(GENERATING) else {
            continue;
        };
        let from = sled_dir.join(name);
        let to = sled_dir.join(format!("{SNAP_PREFIX}{lsn}"));
        let final_exists = to.try_exists().map_err(ctx("cannot stat", &to))?;
        if !final_exists && snapshot_is_complete(&read(&from)?) {
            fs::rename(&from, &to).map_err(ctx("cannot rename", &from))?;
            repairs.push(Repair::FinishedSnapshot { from, to });
        } else {
            fs::remove_file(&from).map_err(ctx("cannot remove", &from))?;
            repairs.push(Repair::RemovedTornSnapshot(from));
        }
    }

    let conf = sled_dir.join(CONF);
    match fs::read(&conf) {
        // sled itself takes a file of 8 bytes or fewer for a missing one.
        Ok(bytes) if bytes.len() > 8 && !conf_is_complete(&bytes) => {
            fs::remove_file(&conf).map_err(ctx("cannot remove", &conf))?;
            repairs.push(Repair::RemovedTornConf(conf));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx("cannot read", &conf)(e)),
    }

    if !repairs.is_empty() {
        sync_dir(sled_dir)?;
    }
    Ok(repairs)
}

/// The file in `sled_dir` that a failed open most likely choked on: a torn `conf`, else
/// a torn newest snapshot, else sled's log `db`.
pub fn diagnose(sled_dir: &Path) -> PathBuf {
    let conf = sled_dir.join(CONF);
    if let Ok(bytes) = fs::read(&conf) {
        if bytes.len() > 8 && !conf_is_complete(&bytes) {
            return conf;
        }
    }
    let newest_snapshot = sorted_listing(sled_dir)
        .unwrap_or_default()
        .into_iter()
        .rfind(|n| n.to_str().is_some_and(|n| n.starts_with(SNAP_PREFIX)));
    if let Some(name) = newest_snapshot {
        let path = sled_dir.join(name);
        if fs::read(&path).is_ok_and(|b| !snapshot_is_complete(&b)) {
            return path;
        }
    }
    sled_dir.join("db")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_trailer(payload: &[u8]) -> Vec<u8> {
        let mut bytes = payload.to_vec();
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes
    }

    #[test]
    fn a_snapshot_is_complete_only_with_its_trailer() {
        let whole = with_trailer(b"page table");
        assert!(snapshot_is_complete(&whole));
        for cut in 0..whole.len() {
            assert!(!snapshot_is_complete(&whole[..cut]), "cut at {cut}");
        }
        let mut flipped = whole.clone();
        flipped[0] ^= 1;
        assert!(!snapshot_is_complete(&flipped));
    }

    #[test]
    fn torn_generating_files_go_and_complete_ones_are_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        fs::write(d.join("snap.0000000000000010"), with_trailer(b"old")).expect("write");
        fs::write(d.join("snap.0000000000000020.generating"), b"").expect("write");
        fs::write(
            d.join("snap.0000000000000030.generating"),
            with_trailer(b"new"),
        )
        .expect("write");
        let repairs = repair_interrupted_writes(d).expect("repair");
        assert_eq!(
            repairs,
            vec![
                Repair::RemovedTornSnapshot(d.join("snap.0000000000000020.generating")),
                Repair::FinishedSnapshot {
                    from: d.join("snap.0000000000000030.generating"),
                    to: d.join("snap.0000000000000030"),
                },
            ]
        );
        let left: Vec<_> = sorted_listing(d).expect("list");
        assert_eq!(left, vec!["snap.0000000000000010", "snap.0000000000000030"]);
        assert_eq!(
            fs::read(d.join("snap.0000000000000030")).expect("read"),
            with_trailer(b"new")
        );
        assert!(repair_interrupted_writes(d).expect("again").is_empty());
    }

    #[test]
    fn a_generating_file_beside_its_final_name_is_removed_whatever_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        fs::write(d.join("snap.0000000000000030"), with_trailer(b"final")).expect("write");
        fs::write(
            d.join("snap.0000000000000030.generating"),
            with_trailer(b"other"),
        )
        .expect("write");
        let repairs = repair_interrupted_writes(d).expect("repair");
        assert_eq!(
            repairs,
            vec![Repair::RemovedTornSnapshot(
                d.join("snap.0000000000000030.generating")
            )]
        );
        assert_eq!(
            fs::read(d.join("snap.0000000000000030")).expect("read"),
            with_trailer(b"final")
        );
    }

    #[test]
    fn a_torn_conf_goes_and_a_whole_or_short_one_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("conf");
        let mut whole = b"segment_size: 524288\n".to_vec();
        whole.extend_from_slice(&crc32fast::hash(&whole).to_le_bytes());
        fs::write(&conf, &whole).expect("write");
        assert!(repair_interrupted_writes(dir.path())
            .expect("repair")
            .is_empty());
        fs::write(&conf, b"short").expect("write");
        assert!(repair_interrupted_writes(dir.path())
            .expect("repair")
            .is_empty());
        fs::write(&conf, &whole[..whole.len() - 4]).expect("write");
        assert_eq!(diagnose(dir.path()), conf);
        assert_eq!(
            repair_interrupted_writes(dir.path()).expect("repair"),
            vec![Repair::RemovedTornConf(conf.clone())]
        );
        assert!(!conf.exists());
    }

    #[test]
    fn a_missing_directory_needs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repairs = repair_interrupted_writes(&dir.path().join("absent")).expect("repair");
        assert!(repairs.is_empty());
    }

    #[test]
    fn diagnose_names_a_torn_newest_snapshot_else_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        fs::write(d.join("snap.0000000000000010"), with_trailer(b"ok")).expect("write");
        assert_eq!(diagnose(d), d.join("db"));
        fs::write(d.join("snap.0000000000000020"), b"torn").expect("write");
        assert_eq!(diagnose(d), d.join("snap.0000000000000020"));
    }
}
