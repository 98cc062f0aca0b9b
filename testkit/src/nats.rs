//! [`NatsServer`]: a private, throwaway `nats-server` with JetStream.
//!
//! `nats-server -a 127.0.0.1 -p PORT -js -sd DIR/store` as a child process of the test, on
//! a free port below 32768, with its store, log and pid file in a fresh temp directory.
//! Start-up is bounded and waits until the server accepts a TCP connection and greets it
//! with its `INFO` line announcing JetStream. [`NatsServer::kill9`] and
//! [`NatsServer::start_again`] crash and restart it on the same port and store directory
//! (JetStream recovers its streams from the store).
//!
//! Clean-up: [`Drop`] kills the server and removes the directory. Like
//! [`PgCluster`](crate::PgCluster), each server also starts a small watchdog shell (in its
//! own process group) that blocks reading a pipe from this process: when the process goes
//! away for whatever reason (a `static` never dropped, a panic=abort, a SIGKILL), the pipe
//! closes and the watchdog kills the server (pid from its pid file) and removes the
//! directory.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

use crate::launch::{read_from, Launch, Program};
use crate::watchdog::{lock, Watchdog};
use crate::{Result, TestkitError};

/// Environment variable naming the `nats-server` binary (else it is looked up on `PATH`).
pub const NATS_SERVER_ENV: &str = "TWOPC_NATS_SERVER";

/// How a [`NatsServer`] is set up. `Default` gives what the tests need.
#[derive(Clone, Debug)]
pub struct NatsServerOptions {
    /// The `nats-server` binary. Default: `$TWOPC_NATS_SERVER`, else `nats-server` on
    /// `PATH`.
    pub binary: Option<PathBuf>,
    /// Bound on each start-up (default 10 s; it takes well under a second).
    pub start_timeout: Duration,
}

impl Default for NatsServerOptions {
    fn default() -> Self {
        NatsServerOptions {
            binary: None,
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// A private `nats-server` with JetStream on `127.0.0.1:<port()>`, no auth.
///
/// Methods take `&self` so a server can be shared (in a `static` or an `Arc`) by the tests
/// of one binary. Start, [`kill9`](Self::kill9), [`start_again`](Self::start_again) and
/// `Drop` block the calling thread briefly (bounded waits); [`start`](Self::start) runs on
/// tokio's blocking pool.
pub struct NatsServer {
    /// Owns (and on drop removes) the directory; taken in `Drop`.
    dir: Option<TempDir>,
    /// JetStream's store (`-sd`); kept across restarts.
    store: PathBuf,
    log: PathBuf,
    /// Written by the server (`-P`), read by the watchdog.
    pid_file: PathBuf,
    binary: PathBuf,
    port: u16,
    start_timeout: Duration,
    /// The running server, if any.
    server: Mutex<Option<Child>>,
    /// The clean-up watchdog (see the module docs).
    watchdog: Mutex<Option<Watchdog>>,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("port", &self.port)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl NatsServer {
    /// Starts a server with [`NatsServerOptions::default`] on tokio's blocking pool (see
    /// [`start_with_blocking`](Self::start_with_blocking)).
    pub async fn start() -> Result<NatsServer> {
        Self::start_with(NatsServerOptions::default()).await
    }

    /// [`start_with_blocking`](Self::start_with_blocking) on tokio's blocking pool.
    pub async fn start_with(opts: NatsServerOptions) -> Result<NatsServer> {
        tokio::task::spawn_blocking(move || Self::start_with_blocking(opts))
            .await
            .map_err(|e| TestkitError::Usage(format!("starting nats-server panicked: {e}")))?
    }

    /// Starts a server with [`NatsServerOptions::default`], blocking the calling thread.
    pub fn start_blocking() -> Result<NatsServer> {
        Self::start_with_blocking(NatsServerOptions::default())
    }

    /// Finds the binary, makes the temp directory, picks a free port, starts the server
    /// and waits (bounded) until it accepts clients. A port that turns out to be taken is
    /// replaced by another one (up to 5 tries).
    pub fn start_with_blocking(opts: NatsServerOptions) -> Result<NatsServer> {
        let binary = find_binary(opts.binary.as_deref())?;
        let dir = tempfile::Builder::new()
            .prefix("twopc-nats-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp directory for nats-server", e))?;
        let root = dir.path().to_path_buf();
        let mut server = NatsServer {
            store: root.join("store"),
            log: root.join("nats-server.log"),
            pid_file: root.join("nats-server.pid"),
            binary,
            port: 0,
            start_timeout: opts.start_timeout,
            server: Mutex::new(None),
            watchdog: Mutex::new(None),
            dir: Some(dir),
        };
        server.spawn_watchdog(&root)?;
        NATS.on_a_free_port(|port| {
            server.port = port;
            server.launch()
        })?;
        Ok(server)
    }

    /// The TCP port clients connect to (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, e.g. as the target of a [`FaultProxy`](crate::FaultProxy).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// JetStream's store directory (the same across restarts).
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The server log (stdout and stderr of every start).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `max_bytes` of the server log, for failure messages.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        let len = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        read_from(&self.log, len.saturating_sub(max_bytes))
    }

    /// Whether the server process is running (started and not yet killed).
    pub fn is_running(&self) -> bool {
        match lock(&self.server).as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, like a power cut, and reap the process. The store stays as the server
    /// left it; [`start_again`](Self::start_again) recovers from it.
    pub fn kill9(&self) -> Result<()> {
        let mut server = lock(&self.server);
        let mut child = server
            .take()
            .ok_or_else(|| TestkitError::Usage("kill9: nats-server is not running".into()))?;
        let _ = child.kill();
        child
            .wait()
            .map_err(|e| TestkitError::io("reaping nats-server after SIGKILL", e))?;
        Ok(())
    }

    /// Starts the server again on the same port and store directory, after
    /// [`kill9`](Self::kill9). Fails if the port was taken meanwhile.
    pub fn start_again(&self) -> Result<()> {
        if self.is_running() {
            return Err(TestkitError::Usage(
                "start_again: nats-server is already running".into(),
            ));
        }
        NATS.restarted(self.port, self.launch())
    }

    /// Starts the server on `self.port` and waits until it greets a client.
    fn launch(&self) -> Result<(), Launch> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(&self.store)
            .arg("-P")
            .arg(&self.pid_file);
        NATS.server(&self.log, self.start_timeout)
            .launch(&self.server, &mut cmd, self.port, |_| {
                greets_with_jetstream(self.port)
            })
    }

    /// Starts the clean-up watchdog (see the module docs).
    fn spawn_watchdog(&self, root: &Path) -> Result<()> {
        // $1 = root. Wait for EOF on stdin (this process closed the pipe or died), kill
        // the server if one still runs with this store, remove the directory.
        const SCRIPT: &str = r#"
cat >/dev/null
pidfile="$1/nats-server.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile")
  if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/store"; then
    kill -KILL "$pid" 2>/dev/null
  fi
fi
rm -rf -- "$1"
"#;
        *lock(&self.watchdog) = Some(Watchdog::spawn(SCRIPT, "twopc-nats-watchdog", root)?);
        Ok(())
    }
}

impl Drop for NatsServer {
    /// Kills the server and removes its directory.
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.server).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(self.dir.take());
        if let Some(watchdog) = lock(&self.watchdog).take() {
            watchdog.release();
        }
    }
}

/// How nats-server's starts are reported.
const NATS: Program = Program {
    name: "nats-server",
    port_taken: &["address already in use"],
    serves: "accept clients",
};

/// Whether a client connecting to `port` now is greeted with an `INFO` line that says
/// JetStream is on (each step bounded by 500 ms).
fn greets_with_jetstream(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(64 * 1024));
    match reader.read_line(&mut line) {
        Ok(_) => line.starts_with("INFO ") && line.contains("\"jetstream\":true"),
        Err(_) => false,
    }
}

fn missing(path: &Path, hint_extra: &str) -> TestkitError {
    TestkitError::MissingBinary {
        name: "nats-server".into(),
        path: path.to_path_buf(),
        hint: format!(
            "install nats-server (Debian/Ubuntu: apt-get install nats-server) or set \
             {NATS_SERVER_ENV} to its path{hint_extra}"
        ),
    }
}

/// The binary: given, `$TWOPC_NATS_SERVER`, or `nats-server` on `PATH`.
fn find_binary(given: Option<&Path>) -> Result<PathBuf> {
    let explicit = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(NATS_SERVER_ENV).map(PathBuf::from));
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(missing(&path, ""))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            missing(
                Path::new("nats-server"),
                &format!(" (searched PATH: {})", search.to_string_lossy()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_with_jetstream_survives_kill9_and_cleans_up() {
        let nats = NatsServer::start().await.expect("nats-server starts");
        let root = nats
            .store_dir()
            .parent()
            .expect("store has a parent")
            .to_path_buf();
        assert!(nats.port() < 32768, "{}", nats.port());
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
        assert!(nats.is_running());
        assert!(greets_with_jetstream(nats.port()));
        assert!(
            nats.store_dir().join("jetstream").is_dir(),
            "JetStream uses the private store; log: {}",
            nats.log_tail(4096)
        );

        nats.kill9().expect("kill -9");
        assert!(!nats.is_running());
        assert!(
            TcpStream::connect_timeout(&nats.addr(), Duration::from_millis(500)).is_err(),
            "nothing listens after kill -9"
        );
        assert!(nats.kill9().is_err(), "a second kill9 is a usage error");

        nats.start_again()
            .expect("restart on the same port and store");
        assert!(nats.is_running());
        assert!(greets_with_jetstream(nats.port()));
        assert!(
            nats.start_again().is_err(),
            "start_again of a running server is refused"
        );
        drop(nats);
        assert!(!root.exists(), "{} removed on drop", root.display());
    }

    #[test]
    fn a_missing_binary_is_named_with_how_to_install() {
        let opts = NatsServerOptions {
            binary: Some(PathBuf::from("/nonexistent/bin/nats-server")),
            ..Default::default()
        };
        let err = NatsServer::start_with_blocking(opts)
            .expect_err("no binary there")
            .to_string();
        assert!(
            err.contains("nats-server not found at /nonexistent/bin/nats-server"),
            "{err}"
        );
        assert!(err.contains("apt-get install nats-server"), "{err}");
    }
}
