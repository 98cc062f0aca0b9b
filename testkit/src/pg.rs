//! [`PgCluster`]: a private, throwaway PostgreSQL cluster.
//!
//! `initdb` into a fresh temp directory, then `postgres` as a child process of the test
//! on a free port below 32768, with its own Unix socket directory and
//! `max_prepared_transactions = 64`, `fsync = off` (a SIGKILL of the server loses
//! nothing with `fsync = off`: the kernel keeps what was written; only a machine crash
//! would). Start-up is bounded and waits for the server to report "ready" in
//! `postmaster.pid`, the way `pg_ctl start -w` does.
//!
//! PostgreSQL refuses to run as root. When the test runs as root, the directory is
//! handed to the `postgres` user and every PostgreSQL program runs with that user's uid
//! and gid (the equivalent of `runuser -u postgres --`, without needing `runuser`).
//!
//! Clean-up: [`Drop`] stops the server (immediate shutdown) and removes the directory.
//! A cluster kept in a `static` is never dropped, and a test process can die by SIGKILL,
//! so each cluster also starts a small watchdog shell (in its own process group, so a
//! Ctrl-C of the test run does not reach it) that blocks reading a pipe from this
//! process: when the process goes away, for whatever reason, the pipe closes and the
//! watchdog stops the server and removes the directory.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio_postgres::NoTls;

use crate::launch::{read_from, Launch, Program};
use crate::watchdog::{lock, Watchdog};
use crate::{Result, TestkitError};

/// Where Debian/Ubuntu install PostgreSQL's server programs (one directory per major
/// version).
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// How a [`PgCluster`] is set up. `Default` gives what the tests need.
#[derive(Clone, Debug)]
pub struct PgClusterOptions {
    /// Directory holding `initdb` and `postgres`. Default: `$TWOPC_PG_BIN`, else the
    /// newest `/usr/lib/postgresql/<version>/bin`.
    pub bin_dir: Option<PathBuf>,
    /// Extra `-c name=value` server settings (after the built-in ones, so they win).
    pub settings: Vec<(String, String)>,
    /// Bound on `initdb` and on each start-up (default 60 s).
    pub start_timeout: Duration,
}

impl Default for PgClusterOptions {
    fn default() -> Self {
        PgClusterOptions {
            bin_dir: None,
            settings: Vec::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// A private PostgreSQL cluster on `127.0.0.1:<port()>`, user `postgres`, trust auth.
///
/// Methods take `&self` so a cluster can be shared (in a `static`, say) by the tests of
/// one binary. [`start`](Self::start) is async (it runs `initdb`, about a second, on
/// tokio's blocking pool); [`start_blocking`](Self::start_blocking) is the same for
/// synchronous code. [`kill9`](Self::kill9), [`start_again`](Self::start_again),
/// [`stop`](Self::stop) and `Drop` block the calling thread briefly (bounded waits).
pub struct PgCluster {
    /// Owns (and on drop removes) the directory; taken in `Drop`.
    dir: Option<TempDir>,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    port: u16,
    /// uid/gid to run PostgreSQL programs as (when this process is root).
    run_as: Option<(u32, u32)>,
    settings: Vec<(String, String)>,
    start_timeout: Duration,
    /// The running postmaster, if any.
    server: Mutex<Option<Child>>,
    /// The clean-up watchdog (see the module docs).
    watchdog: Mutex<Option<Watchdog>>,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl PgCluster {
    /// Creates and starts a cluster with [`PgClusterOptions::default`] (see
    /// [`start_with_blocking`](Self::start_with_blocking)), on tokio's blocking pool.
    pub async fn start() -> Result<PgCluster> {
        Self::start_with(PgClusterOptions::default()).await
    }

    /// [`start_with_blocking`](Self::start_with_blocking) on tokio's blocking pool.
    pub async fn start_with(opts: PgClusterOptions) -> Result<PgCluster> {
        tokio::task::spawn_blocking(move || Self::start_with_blocking(opts))
            .await
            .map_err(|e| {
                TestkitError::Usage(format!("starting the PostgreSQL cluster panicked: {e}"))
            })?
    }

    /// Creates and starts a cluster with [`PgClusterOptions::default`], blocking the
    /// calling thread (for a `static` initialised from synchronous code).
    pub fn start_blocking() -> Result<PgCluster> {
        Self::start_with_blocking(PgClusterOptions::default())
    }

    /// Creates and starts a cluster: `initdb`, pick a free port, start the server, wait
    /// (bounded) until it accepts connections. A port that turns out to be taken is
    /// replaced by another one (up to 5 tries). Blocks the calling thread (about a
    /// second and a half).
    pub fn start_with_blocking(opts: PgClusterOptions) -> Result<PgCluster> {
        let bin = find_bin_dir(opts.bin_dir.as_deref())?;
        for program in ["initdb", "postgres"] {
            let path = bin.join(program);
            if !path.is_file() {
                return Err(missing(program, &path));
            }
        }
        let run_as = if unsafe_geteuid() == 0 {
            Some(lookup_user("postgres").ok_or_else(|| {
                TestkitError::Usage(
                    "running as root, but there is no `postgres` user to run PostgreSQL as (it refuses to run as \
                     root): install postgresql (it creates the user) or run the tests as a normal user"
                        .into(),
                )
            })?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("twopc-pg-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp directory for the cluster", e))?;
        let root = dir.path().to_path_buf();
        let sock = root.join("sock");
        fs::create_dir(&sock)
            .map_err(|e| TestkitError::io(format!("creating {}", sock.display()), e))?;
        if let Some((uid, gid)) = run_as {
            for p in [&root, &sock] {
                chown(p, Some(uid), Some(gid)).map_err(|e| {
                    TestkitError::io(format!("handing {} to the postgres user", p.display()), e)
                })?;
            }
        }
        let mut cluster = PgCluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            sock,
            bin,
            port: 0,
            run_as,
            settings: opts.settings,
            start_timeout: opts.start_timeout,
            server: Mutex::new(None),
            watchdog: Mutex::new(None),
            dir: Some(dir),
        };
        cluster.spawn_watchdog(&root)?;
        cluster.initdb()?;
        POSTGRES.on_a_free_port(|port| {
            cluster.port = port;
            cluster.launch()
        })?;
        Ok(cluster)
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection string for database `db`:
    /// `host=127.0.0.1 port=<port> user=postgres dbname=<db>` (trust auth, no password).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }

    /// The server log (stdout and stderr of every start).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `max_bytes` of the server log, for failure messages.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        read_tail(&self.log, max_bytes)
    }

    /// Whether the server process is running (started and not yet stopped or killed).
    pub fn is_running(&self) -> bool {
        let mut server = lock(&self.server);
        match server.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Connects to database `db` (bounded by 10 s). The connection task is spawned on
    /// the current tokio runtime, so call this from inside one.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client> {
        connect(&self.url(db), Duration::from_secs(10)).await
    }

    /// Creates database `name` (1-63 characters of `a-z`, `0-9`, `_`; see
    /// [`crate::unique_name`]).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(TestkitError::Usage(format!(
                "database name {name:?} must be 1-63 characters of a-z 0-9 _ (see unique_name)"
            )));
        }
        let client = self.connect("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|source| TestkitError::Postgres {
                what: format!("CREATE DATABASE {name}"),
                source,
            })
    }

    /// Kills the server like a power cut: SIGKILL to the postmaster (pid read from
    /// `postmaster.pid`) and to every backend it had, then waits (bounded) until they
    /// are gone. Nothing is shut down cleanly; [`start_again`](Self::start_again) runs
    /// crash recovery, which keeps prepared transactions.
    pub fn kill9(&self) -> Result<()> {
        let mut server = lock(&self.server);
        let pid = read_postmaster_pid(&self.data)
            .or_else(|| server.as_ref().map(|c| c.id() as i32))
            .ok_or_else(|| TestkitError::Usage("kill9: the server is not running".into()))?;
        let backends = children_of(pid);
        send_signal(pid, libc::SIGKILL);
        for b in &backends {
            send_signal(*b, libc::SIGKILL);
        }
        if let Some(mut child) = server.take() {
            // Reaps the postmaster (it is our child), so its pid is free and
            // postmaster.pid is recognisably stale for the next start.
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !backends.iter().all(|b| is_gone(*b)) {
            if Instant::now() >= deadline {
                return Err(TestkitError::Timeout {
                    what: format!("the backends of postmaster {pid} to die after SIGKILL"),
                    after: Duration::from_secs(10),
                    detail: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts the server again on the same directory and port, after
    /// [`kill9`](Self::kill9) or [`stop`](Self::stop). After a kill this runs crash
    /// recovery; prepared transactions survive it. Fails if the port was taken
    /// meanwhile.
    pub fn start_again(&self) -> Result<()> {
        if self.is_running() {
            return Err(TestkitError::Usage(
                "start_again: the server is already running".into(),
            ));
        }
        POSTGRES.restarted(self.port, self.launch())
    }

    /// Stops the server cleanly (fast shutdown: SIGINT, bounded wait, SIGKILL after
    /// 30 s). The directory stays; [`start_again`](Self::start_again) restarts it.
    pub fn stop(&self) -> Result<()> {
        self.shut_down(libc::SIGINT, Duration::from_secs(30))
    }

    /// Sends `signal` to the postmaster and waits up to `patience` for it to exit, then
    /// SIGKILLs it.
    fn shut_down(&self, signal: i32, patience: Duration) -> Result<()> {
        let mut server = lock(&self.server);
        let Some(mut child) = server.take() else {
            return Ok(());
        };
        send_signal(child.id() as i32, signal);
        let deadline = Instant::now() + patience;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TestkitError::Timeout {
                        what: "postgres to shut down (it was SIGKILLed)".into(),
                        after: patience,
                        detail: self.log_tail(2000),
                    });
                }
                Err(e) => return Err(TestkitError::io("waiting for postgres to exit", e)),
            }
        }
    }

    /// A command for a PostgreSQL program, run as the postgres user when we are root.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        // A cwd the postgres user can enter, and no inherited PG* settings.
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir.path());
        }
        for var in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("LC_ALL", "C");
        cmd
    }

    fn initdb(&self) -> Result<()> {
        let mut cmd = self.command("initdb");
        cmd.args([
            "--no-sync",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "-D",
        ])
        .arg(&self.data)
        .stdin(Stdio::null());
        let out = cmd.output().map_err(|e| {
            TestkitError::io(format!("running {}", self.bin.join("initdb").display()), e)
        })?;
        if !out.status.success() {
            return Err(TestkitError::Command {
                what: format!("initdb -D {}", self.data.display()),
                detail: format!(
                    "{}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    /// Starts the postmaster on `self.port` and waits until it reports ready.
    fn launch(&self) -> Result<(), Launch> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.sock);
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1"),
            ("max_prepared_transactions", "64"),
            ("fsync", "off"),
            ("max_connections", "200"),
            ("shared_buffers", "32MB"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        settings.extend(self.settings.iter().cloned());
        for (k, v) in &settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        POSTGRES.server(&self.log, self.start_timeout).launch(
            &self.server,
            &mut cmd,
            self.port,
            |pid| postmaster_ready(&self.data, pid),
        )
    }

    /// Starts the clean-up watchdog (see the module docs).
    fn spawn_watchdog(&self, root: &Path) -> Result<()> {
        // $1 = cluster root. Wait for EOF on stdin (this process closed the pipe or died),
        // stop the postmaster if one still runs on this directory, remove the directory.
        const SCRIPT: &str = r#"
cat >/dev/null
pidfile="$1/data/postmaster.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile")
  if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/data"; then
    kill -QUIT "$pid" 2>/dev/null
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    kill -KILL "$pid" 2>/dev/null
  fi
fi
rm -rf -- "$1"
"#;
        *lock(&self.watchdog) = Some(Watchdog::spawn(SCRIPT, "twopc-pg-watchdog", root)?);
        Ok(())
    }
}

impl Drop for PgCluster {
    /// Stops the server (immediate shutdown) and removes its directory.
    fn drop(&mut self) {
        if let Err(e) = self.shut_down(libc::SIGQUIT, Duration::from_secs(10)) {
            tracing::warn!(error = %e, "stopping the private PostgreSQL cluster");
        }
        drop(self.dir.take());
        if let Some(watchdog) = lock(&self.watchdog).take() {
            watchdog.release();
        }
    }
}

/// How postgres's starts are reported.
const POSTGRES: Program = Program {
    name: "postgres",
    port_taken: &[
        "could not bind",
        "Address already in use",
        "could not create any TCP/IP sockets",
    ],
    serves: "accept connections",
};

/// Connects to `url` with a bounded wait; the connection task runs on the current
/// runtime.
pub(crate) async fn connect(url: &str, timeout: Duration) -> Result<tokio_postgres::Client> {
    let (client, connection) =
        match tokio::time::timeout(timeout, tokio_postgres::connect(url, NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(source)) => {
                return Err(TestkitError::Postgres {
                    what: format!("connecting to {url}"),
                    source,
                })
            }
            Err(_) => {
                return Err(TestkitError::Timeout {
                    what: format!("a connection to {url}"),
                    after: timeout,
                    detail: String::new(),
                })
            }
        };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "testkit PostgreSQL connection ended");
        }
    });
    Ok(client)
}

fn missing(program: &str, path: &Path) -> TestkitError {
    TestkitError::MissingBinary {
        name: program.to_string(),
        path: path.to_path_buf(),
        hint: "install postgresql (Debian/Ubuntu: apt-get install postgresql) or set TWOPC_PG_BIN to the \
               directory holding initdb and postgres"
            .into(),
    }
}

/// The directory of `initdb`/`postgres`: given, `$TWOPC_PG_BIN`, or the newest Debian
/// version directory.
fn find_bin_dir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("TWOPC_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(DEBIAN_PG_ROOT)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").is_file().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => Err(missing(
            "initdb",
            &Path::new(DEBIAN_PG_ROOT).join("<version>/bin/initdb"),
        )),
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// uid and gid of user `name`.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; zeroed is a valid (if meaningless) value that
    // getpwnam_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it and its length is
    // passed; getpwnam_r is the thread-safe variant.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
}

fn send_signal(pid: i32, signal: i32) {
    if pid > 0 {
        // SAFETY: kill has no memory-safety preconditions; a stale pid yields ESRCH.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// First line of `postmaster.pid`.
fn read_postmaster_pid(data: &Path) -> Option<i32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// `postmaster.pid` names `pid` and says "ready" (line 8, PostgreSQL 10+).
fn postmaster_ready(data: &Path, pid: i32) -> bool {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let mut lines = text.lines();
    let file_pid: Option<i32> = lines.next().and_then(|l| l.trim().parse().ok());
    file_pid == Some(pid)
        && text
            .lines()
            .nth(7)
            .map(|s| s.trim() == "ready")
            .unwrap_or(false)
}

/// `(state, ppid)` of a process from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 1..)?;
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| proc_stat(*p).map(|(_, ppid)| ppid == pid).unwrap_or(false))
        .collect()
}

/// Exited (possibly a zombie nobody reaps).
fn is_gone(pid: i32) -> bool {
    match proc_stat(pid) {
        None => true,
        Some((state, _)) => matches!(state, 'Z' | 'X' | 'x'),
    }
}

fn read_tail(path: &Path, max_bytes: u64) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    read_from(path, len.saturating_sub(max_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn cluster() -> PgCluster {
        PgCluster::start()
            .await
            .expect("private PostgreSQL cluster starts")
    }

    #[tokio::test]
    async fn starts_with_prepared_transactions_and_cleans_up() {
        let pg = cluster().await;
        let root = pg
            .data_dir()
            .parent()
            .expect("data dir has a parent")
            .to_path_buf();
        assert!(pg.port() < 32768);
        assert!(crate::prepared_transactions_enabled(&pg.url("postgres"))
            .await
            .expect("SHOW works"));
        let db = crate::unique_name("tk");
        pg.create_database(&db).await.expect("create database");
        let c = pg.connect(&db).await.expect("connect");
        let one: i32 = c.query_one("SELECT 1", &[]).await.expect("select").get(0);
        assert_eq!(one, 1);
        drop(c);
        drop(pg);
        assert!(!root.exists(), "{} removed on drop", root.display());
    }

    #[tokio::test]
    async fn prepared_transaction_survives_kill9_and_restart() {
        let pg = cluster().await;
        let db = crate::unique_name("tk");
        pg.create_database(&db).await.expect("create database");
        let c = pg.connect(&db).await.expect("connect");
        c.batch_execute(
            "CREATE TABLE t (v int); BEGIN; INSERT INTO t VALUES (7); PREPARE TRANSACTION 'tk-gid'",
        )
        .await
        .expect("prepare");
        pg.kill9().expect("kill -9");
        assert!(!pg.is_running());
        assert!(
            c.query_one("SELECT 1", &[]).await.is_err(),
            "connection is gone after kill -9"
        );
        pg.start_again().expect("restart after kill -9");
        let c = pg.connect(&db).await.expect("connect after restart");
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'tk-gid'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 1, "prepared transaction kept by crash recovery");
        c.batch_execute("COMMIT PREPARED 'tk-gid'")
            .await
            .expect("commit prepared");
        let v: i32 = c
            .query_one("SELECT v FROM t", &[])
            .await
            .expect("row")
            .get(0);
        assert_eq!(v, 7);
        pg.stop().expect("stop");
        assert!(!pg.is_running());
        pg.start_again().expect("start after stop");
        assert!(pg.is_running());
    }

    #[test]
    fn a_missing_bin_dir_names_initdb_and_how_to_install() {
        let opts = PgClusterOptions {
            bin_dir: Some(PathBuf::from("/nonexistent/pg/bin")),
            ..Default::default()
        };
        let err = PgCluster::start_with_blocking(opts)
            .expect_err("no binaries there")
            .to_string();
        assert!(
            err.contains("initdb not found at /nonexistent/pg/bin/initdb"),
            "{err}"
        );
        assert!(err.contains("install postgresql"), "{err}");
    }
}
