//! sled made durable, shared by the coordinator's decision log and the participant SDK's
//! staging store.
//!
//! sled 0.34's `flush()` ends with `sync_file_range`, which neither forces the drive's
//! cache nor persists file metadata (sled issues #1351, #1452). A store that promises
//! durability therefore, after every `flush()`:
//!
//! * `fdatasync`s every blob file that is new or has grown since its last sync (blobs
//!   first: the data file may point at them), then sled's `db` file;
//! * `fsync`s the `blobs` directory and sled's own directory whenever their listing
//!   changed (new or removed files), so those entries survive a crash too.
//!
//! [`Syncer`] does exactly that; [`Syncer::sync_at_open`] also syncs sled's `conf`, which
//! sled writes without syncing, and both directories unconditionally. [`take_lock`] takes
//! the exclusive `LOCK` file of a data directory (one process per directory), and
//! [`open_sled`] opens sled: it first puts right what a kill can leave half-written in
//! sled's directory (see [`repair`]: a torn snapshot bricked the store for good), then
//! waits while a just-dropped instance of this process still lets go of sled's own lock.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod repair;

pub use repair::Repair;

/// An `io::Error` mapper that says what failed on which path.
pub fn ctx<'a>(what: &str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    let what = what.to_string();
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The names in `dir`, sorted (none if it does not exist).
pub fn sorted_listing(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                names.push(entry?.file_name());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok(names)
}

/// fsync of a directory, so entries created or renamed in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx("fsync of directory", dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Makes what sled flushed durable: see the crate docs.
pub struct Syncer {
    sled_dir: PathBuf,
    db_file: File,
    /// Names in the sled directory when it was last fsynced.
    dir_listing: Vec<OsString>,
    /// Names in `blobs` when it was last fsynced.
    blob_listing: Vec<OsString>,
    /// Blob files and the length they had when last synced.
    synced_blobs: HashMap<OsString, u64>,
    fail_syncs: Option<Arc<AtomicBool>>,
    /// Names the switch in the message of an injected failure.
    fail_switch: &'static str,
    db_syncs: Arc<AtomicU64>,
    blob_syncs: Arc<AtomicU64>,
}

impl Syncer {
    /// A syncer of the sled instance in `sled_dir` (its `db` file must exist: open sled
    /// first). While `fail_syncs` is set every sync fails, naming `fail_switch` (for tests
    /// of what a failed sync does).
    pub fn new(
        sled_dir: PathBuf,
        fail_syncs: Option<Arc<AtomicBool>>,
        fail_switch: &'static str,
    ) -> io::Result<Syncer> {
        let db_path = sled_dir.join("db");
        let db_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db_path)
            .map_err(ctx("cannot open sled data file", &db_path))?;
        Ok(Syncer {
            sled_dir,
            db_file,
            dir_listing: Vec::new(),
            blob_listing: Vec::new(),
            synced_blobs: HashMap::new(),
            fail_syncs,
            fail_switch,
            db_syncs: Arc::new(AtomicU64::new(0)),
            blob_syncs: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Counts `fdatasync`s of sled's data file (shared, for tests and stats).
    pub fn db_syncs(&self) -> Arc<AtomicU64> {
        self.db_syncs.clone()
    }

    /// Counts `fdatasync`s of blob files (shared, for tests).
    pub fn blob_syncs(&self) -> Arc<AtomicU64> {
        self.blob_syncs.clone()
    }

    fn injected_failure(&self) -> io::Result<()> {
        match &self.fail_syncs {
            Some(flag) if flag.load(Ordering::SeqCst) => Err(io::Error::other(format!(
                "injected sync failure ({} is set)",
                self.fail_switch
            ))),
            _ => Ok(()),
        }
    }

    /// Everything sled flushed so far is durable when this returns `Ok`.
    pub fn sync(&mut self) -> io::Result<()> {
        self.sync_inner(false)
    }

    /// [`Syncer::sync`]; `all_dirs` fsyncs both directories even if their listing did
    /// not change.
    fn sync_inner(&mut self, all_dirs: bool) -> io::Result<()> {
        self.injected_failure()?;
        // Blobs first: the data file may point at them.
        let blobs_dir = self.sled_dir.join("blobs");
        let blob_listing = sorted_listing(&blobs_dir)?;
        for name in &blob_listing {
            let path = blobs_dir.join(name);
            let file = match File::open(&path) {
                Ok(f) => f,
                // Removed by sled's blob GC since the listing: nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ctx("cannot open sled blob", &path)(e)),
            };
            let len = file
                .metadata()
                .map_err(ctx("cannot stat sled blob", &path))?
                .len();
            if self.synced_blobs.get(name) != Some(&len) {
                file.sync_data()
                    .map_err(ctx("fdatasync of sled blob", &path))?;
                self.synced_blobs.insert(name.clone(), len);
                self.blob_syncs.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.synced_blobs
            .retain(|name, _| blob_listing.binary_search(name).is_ok());

        let db_path = self.sled_dir.join("db");
        self.db_file
            .sync_data()
            .map_err(ctx("fdatasync of sled data file", &db_path))?;
        self.db_syncs.fetch_add(1, Ordering::AcqRel);

        if all_dirs || blob_listing != self.blob_listing {
            if blobs_dir.exists() {
                sync_dir(&blobs_dir)?;
            }
            self.blob_listing = blob_listing;
        }
        let dir_listing = sorted_listing(&self.sled_dir)?;
        if all_dirs || dir_listing != self.dir_listing {
            sync_dir(&self.sled_dir)?;
            self.dir_listing = dir_listing;
        }
        Ok(())
    }

    /// The sync done at open: also `conf`, which sled writes without syncing, and both
    /// directories whatever their listing.
    pub fn sync_at_open(&mut self) -> io::Result<()> {
        self.injected_failure()?;
        let conf = self.sled_dir.join("conf");
        match File::open(&conf) {
            Ok(f) => f.sync_all().map_err(ctx("fsync of sled config", &conf))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ctx("cannot open sled config", &conf)(e)),
        }
        self.sync_inner(true)
    }
}

/// Why [`take_lock`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Another holder has the lock; `detail` names the file and the holder's pid.
    Locked {
        /// What to tell the operator.
        detail: String,
    },
    /// The lock file could not be opened or locked.
    Io(String),
}

/// Takes the exclusive lock on `<dir>/<file>` and writes our pid into it. `others` says
/// who else could hold it, for the message (e.g. "another coordinator").
pub fn take_lock(dir: &Path, file: &str, others: &str) -> Result<File, LockError> {
    let path = dir.join(file);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| LockError::Io(format!("cannot open {}: {e}", path.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" (holder pid {holder})")
            };
            return Err(LockError::Locked {
                detail: format!(
                    "{} is exclusively locked{who}; is {others} using this data directory?",
                    path.display()
                ),
            });
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(LockError::Io(format!(
                "cannot lock {}: {e}",
                path.display()
            )));
        }
    }
    // Best effort: the pid only helps the message a second opener prints.
    let _ = lock
        .set_len(0)
        .and_then(|_| lock.rewind())
        .and_then(|_| writeln!(lock, "{}", std::process::id()));
    Ok(lock)
}

/// Why [`open_sled`] failed.
#[derive(Debug, Clone)]
pub struct OpenError {
    /// What went wrong, in words.
    pub detail: String,
    /// The file sled most likely could not read, where sled found its data corrupt
    /// (see [`repair::diagnose`]); `None` for I/O and lock errors.
    pub file: Option<PathBuf>,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)?;
        if let Some(file) = &self.file {
            write!(f, " (the file it could not read: {})", file.display())?;
        }
        Ok(())
    }
}

impl OpenError {
    /// What to tell the operator: the error and, where sled found the data corrupt, what
    /// to do and never to do with a directory that `holds` (what would be lost with it).
    pub fn explained(&self, holds: &str) -> String {
        if self.file.is_none() {
            return self.to_string();
        }
        format!(
            "{self}. Keep this directory as it is: it holds {holds}. Copy it aside and follow \
             \"A store that does not open\" in docs/operations.md"
        )
    }
}

/// Opens the sled store in `sled_dir` with `config` (its path is set here).
///
/// First puts right what a kill can have left half-written there
/// ([`repair::repair_interrupted_writes`], each change logged as a warning), then opens
/// sled, retrying briefly while its own file lock is still held by the background threads
/// of a just-dropped instance of this process (the caller's `LOCK` excludes everyone
/// else).
pub fn open_sled(sled_dir: &Path, config: sled::Config) -> Result<sled::Db, OpenError> {
    let repairs = repair::repair_interrupted_writes(sled_dir).map_err(|e| OpenError {
        detail: format!("cannot put right what a crash left half-written: {e}"),
        file: None,
    })?;
    for repair in repairs {
        tracing::warn!(dir = %sled_dir.display(), "{repair}");
    }
    let config = config.path(sled_dir);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(db) => return Ok(db),
            Err(e @ sled::Error::Corruption { .. }) => {
                return Err(OpenError {
                    detail: format!("sled: {e}"),
                    file: Some(repair::diagnose(sled_dir)),
                })
            }
            Err(e) => {
                return Err(OpenError {
                    detail: format!("sled: {e}"),
                    file: None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = take_lock(dir.path(), "LOCK", "someone else").expect("first lock");
        match take_lock(dir.path(), "LOCK", "someone else") {
            Err(LockError::Locked { detail }) => {
                assert!(detail.contains("exclusively locked"), "{detail}");
                assert!(detail.contains(&std::process::id().to_string()), "{detail}");
                assert!(detail.contains("is someone else using"), "{detail}");
            }
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn syncs_count_and_injected_failures_name_the_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled_dir = dir.path().join("sled");
        let db = open_sled(&sled_dir, sled::Config::new()).expect("open sled");
        let fail = Arc::new(AtomicBool::new(false));
        let mut s = Syncer::new(sled_dir, Some(fail.clone()), "Opts::fail_syncs").expect("syncer");
        s.sync_at_open().expect("sync at open");
        db.insert(b"k", b"v".to_vec()).expect("insert");
        db.flush().expect("flush");
        s.sync().expect("sync");
        assert_eq!(s.db_syncs().load(Ordering::Acquire), 2);
        fail.store(true, Ordering::SeqCst);
        let e = s.sync().expect_err("injected failure");
        assert!(e.to_string().contains("Opts::fail_syncs is set"), "{e}");
    }

    fn snapshots(sled_dir: &Path) -> Vec<String> {
        sorted_listing(sled_dir)
            .expect("list")
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .filter(|n| n.starts_with("snap."))
            .collect()
    }

    /// A store with history: three opens, each writing keys, so sled has written snapshots.
    fn store_with_history(sled_dir: &Path) {
        for round in 0u32..3 {
            let db = open_sled(sled_dir, sled::Config::new()).expect("open sled");
            for i in 0u32..50 {
                db.insert(format!("{round}-{i}"), i.to_be_bytes().to_vec())
                    .expect("insert");
            }
            db.flush().expect("flush");
        }
    }

    fn assert_history(db: &sled::Db) {
        for round in 0u32..3 {
            for i in 0u32..50 {
                let v = db.get(format!("{round}-{i}")).expect("get");
                assert_eq!(v.as_deref(), Some(&i.to_be_bytes()[..]), "key {round}-{i}");
            }
        }
    }

    #[test]
    fn a_torn_snapshot_left_by_a_kill_no_longer_bricks_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled_dir = dir.path().join("sled");
        store_with_history(&sled_dir);
        let newest = snapshots(&sled_dir).pop().expect("sled wrote a snapshot");
        // A kill while the next open wrote its snapshot: an empty file with a higher lsn.
        let lsn = u64::from_str_radix(newest.trim_start_matches("snap."), 16).expect("lsn");
        let torn = sled_dir.join(format!("snap.{:016X}.generating", lsn + 4096));
        fs::write(&torn, b"").expect("write torn snapshot");
        // sled alone takes it for the newest snapshot and refuses to start.
        let refused = sled::Config::new().path(&sled_dir).open();
        assert!(
            matches!(refused, Err(sled::Error::Corruption { .. })),
            "sled opened a store with a torn snapshot: {refused:?}"
        );
        let db = open_sled(&sled_dir, sled::Config::new()).expect("open after a torn snapshot");
        assert_history(&db);
        assert!(!torn.exists(), "the torn snapshot is removed");
    }

    #[test]
    fn a_complete_snapshot_a_kill_kept_from_its_rename_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled_dir = dir.path().join("sled");
        store_with_history(&sled_dir);
        // A kill after the sync and before the rename: only the `.generating` name is left
        // of the newest snapshot (and, after a power loss, perhaps of any).
        for name in snapshots(&sled_dir) {
            fs::rename(
                sled_dir.join(&name),
                sled_dir.join(format!("{name}.generating")),
            )
            .expect("rename");
        }
        let db = open_sled(&sled_dir, sled::Config::new()).expect("open");
        assert_history(&db);
        assert!(
            snapshots(&sled_dir)
                .iter()
                .all(|n| !n.ends_with(".generating")),
            "{:?}",
            snapshots(&sled_dir)
        );
    }

    #[test]
    fn a_corrupt_snapshot_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled_dir = dir.path().join("sled");
        store_with_history(&sled_dir);
        let newest = sled_dir.join(snapshots(&sled_dir).pop().expect("snapshot"));
        // Not something a kill leaves (a renamed snapshot was synced first): left as it is.
        fs::write(&newest, b"garbage that is not a snapshot").expect("write");
        let err = open_sled(&sled_dir, sled::Config::new()).expect_err("corrupt snapshot");
        assert_eq!(err.file.as_deref(), Some(newest.as_path()), "{err}");
        assert!(
            err.to_string().contains("the file it could not read"),
            "{err}"
        );
        let told = err.explained("everything");
        assert!(
            told.contains("Keep this directory as it is: it holds everything"),
            "{told}"
        );
        assert!(newest.exists(), "a corrupt final snapshot is never removed");
    }
}
