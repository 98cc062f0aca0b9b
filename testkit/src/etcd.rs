//! [`EtcdCluster`]: a private, throwaway etcd cluster of one or three members on loopback.
//!
//! Each member is an `etcd` child process of the test with its own data directory in a
//! fresh temp directory and its own client and peer ports below 32768 (from
//! [`try_free_port`]). Start-up is bounded and waits until every member answers
//! `GET /health` with `"health":"true"` (a quorum and a leader exist). A three-member
//! cluster on loopback starts in about a second. [`EtcdCluster::kill9`] and
//! [`EtcdCluster::start_again`] crash and restart one member by its pid, on the same
//! ports and data directory.
//!
//! Clean-up: [`Drop`] kills every member and removes the directory. Like
//! [`NatsServer`](crate::NatsServer), a watchdog shell (in its own process group) waits
//! for this process to go away for whatever reason and then kills the members (pids from
//! the `*.pid` files this module writes, checked against their command line) and removes
//! the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::watchdog::{lock, Watchdog};
use crate::{random_u64, try_free_port, Result, TestkitError};

/// Environment variable naming the `etcd` binary (else `/usr/bin/etcd`, else `etcd` on
/// `PATH`).
pub const ETCD_ENV: &str = "TWOPC_ETCD";

/// How many times [`EtcdCluster::start`] picks new ports when a member cannot bind.
const PORT_ATTEMPTS: usize = 3;

/// One member: its name, ports, data directory and process.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
    process: Mutex<Option<Child>>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A private etcd cluster on 127.0.0.1, no auth, no TLS.
///
/// Methods take `&self`, so a cluster can be shared by the tests of one binary. Start,
/// [`kill9`](Self::kill9), [`start_again`](Self::start_again) and `Drop` block the calling
/// thread briefly (bounded waits); [`start`](Self::start) runs on tokio's blocking pool.
pub struct EtcdCluster {
    /// Owns (and on drop removes) the directory; taken in `Drop`.
    dir: Option<TempDir>,
    binary: PathBuf,
    members: Vec<Member>,
    /// `--initial-cluster` of every member.
    initial_cluster: String,
    /// `--initial-cluster-token`: keeps members of concurrent test clusters apart.
    token: String,
    start_timeout: Duration,
    /// The clean-up watchdog (see the module docs).
    watchdog: Mutex<Option<Watchdog>>,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Starts a cluster of `members` (1 or 3, say) on tokio's blocking pool.
    pub async fn start(members: usize) -> Result<EtcdCluster> {
        tokio::task::spawn_blocking(move || Self::start_blocking(members))
            .await
            .map_err(|e| TestkitError::Usage(format!("starting etcd panicked: {e}")))?
    }

    /// Starts a cluster of `members`, blocking the calling thread until every member is
    /// healthy (bounded by 20 s).
    pub fn start_blocking(members: usize) -> Result<EtcdCluster> {
        if members == 0 {
            return Err(TestkitError::Usage(
                "an etcd cluster needs at least one member".into(),
            ));
        }
        let binary = find_binary()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::try_start(&binary, members) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| TestkitError::Usage("no start attempt was made".into())))
    }

    fn try_start(binary: &Path, n: usize) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("twopc-etcd-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temp directory for etcd", e))?;
        let root = dir.path().to_path_buf();
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("m{i}");
            members.push(Member {
                client_port: try_free_port()?,
                peer_port: try_free_port()?,
                data_dir: root.join(format!("{name}.etcd")),
                log: root.join(format!("{name}.log")),
                pid_file: root.join(format!("{name}.pid")),
                name,
                process: Mutex::new(None),
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = EtcdCluster {
            binary: binary.to_path_buf(),
            members,
            initial_cluster,
            token: format!("twopc-test-{:016x}", random_u64()),
            start_timeout: Duration::from_secs(20),
            watchdog: Mutex::new(None),
            dir: Some(dir),
        };
        cluster.spawn_watchdog(&root)?;
        for i in 0..n {
            cluster.launch(i)?;
        }
        cluster.wait_healthy((0..n).collect())?;
        Ok(cluster)
    }

    /// The client URLs of every member (`http://127.0.0.1:PORT`), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The last `max_bytes` of member `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize, max_bytes: u64) -> String {
        match self.members.get(i) {
            Some(m) => {
                let len = fs::metadata(&m.log).map(|md| md.len()).unwrap_or(0);
                read_from(&m.log, len.saturating_sub(max_bytes))
            }
            None => String::new(),
        }
    }

    /// SIGKILL member `i`, like a power cut, and reap it.
    pub fn kill9(&self, i: usize) -> Result<()> {
        let member = self.member(i)?;
        let mut process = lock(&member.process);
        let mut child = process
            .take()
            .ok_or_else(|| TestkitError::Usage(format!("kill9: etcd member {i} is not running")))?;
        let _ = child.kill();
        child
            .wait()
            .map_err(|e| TestkitError::io("reaping etcd after SIGKILL", e))?;
        Ok(())
    }

    /// Starts member `i` again on its ports and data directory and waits until it is
    /// healthy.
    pub fn start_again(&self, i: usize) -> Result<()> {
        let running = matches!(
            lock(&self.member(i)?.process)
                .as_mut()
                .map(|c| c.try_wait()),
            Some(Ok(None))
        );
        if running {
            return Err(TestkitError::Usage(format!(
                "start_again: etcd member {i} is already running"
            )));
        }
        self.launch(i)?;
        self.wait_healthy(vec![i])
    }

    fn member(&self, i: usize) -> Result<&Member> {
        self.members.get(i).ok_or_else(|| {
            TestkitError::Usage(format!(
                "no etcd member {i}: the cluster has {}",
                self.members.len()
            ))
        })
    }

    /// Starts member `i` (not waiting for it).
    fn launch(&self, i: usize) -> Result<()> {
        let m = self.member(i)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| TestkitError::io(format!("opening {}", m.log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the log file handle", e))?;
        let state = if m.data_dir.join("member").exists() {
            "existing"
        } else {
            "new"
        };
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--log-level")
            .arg("warn")
            .arg("--logger")
            .arg("zap")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", self.binary.display()), e))?;
        let mut pid = File::create(&m.pid_file)
            .map_err(|e| TestkitError::io(format!("writing {}", m.pid_file.display()), e))?;
        writeln!(pid, "{}", child.id())
            .map_err(|e| TestkitError::io(format!("writing {}", m.pid_file.display()), e))?;
        *lock(&m.process) = Some(child);
        Ok(())
    }

    /// Waits until every member in `which` answers its health check, or one exits.
    fn wait_healthy(&self, which: Vec<usize>) -> Result<()> {
        let deadline = Instant::now() + self.start_timeout;
        let mut waiting = which;
        loop {
            for &i in &waiting {
                let m = self.member(i)?;
                let exited = match lock(&m.process).as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => Some(status.to_string()),
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("not started".into()),
                    Some(Ok(None)) => None,
                };
                if let Some(status) = exited {
                    return Err(TestkitError::Command {
                        what: format!("starting etcd member {i} on port {}", m.client_port),
                        detail: format!("etcd exited ({status}); log: {}", self.log_tail(i, 4096)),
                    });
                }
            }
            waiting.retain(|&i| !self.members.get(i).is_some_and(|m| healthy(m.client_port)));
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestkitError::Timeout {
                    what: format!("etcd members {waiting:?} to be healthy"),
                    after: self.start_timeout,
                    detail: format!("log of the first: {}", self.log_tail(waiting[0], 4096)),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the clean-up watchdog (see the module docs).
    fn spawn_watchdog(&self, root: &Path) -> Result<()> {
        // $1 = root. Wait for EOF on stdin (this process closed the pipe or died), kill
        // every member still running with a data directory under root, remove root.
        const SCRIPT: &str = r#"
cat >/dev/null
for pidfile in "$1"/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(head -n 1 "$pidfile")
  if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/"; then
    kill -KILL "$pid" 2>/dev/null
  fi
done
rm -rf -- "$1"
"#;
        *lock(&self.watchdog) = Some(Watchdog::spawn(SCRIPT, "twopc-etcd-watchdog", root)?);
        Ok(())
    }
}

impl Drop for EtcdCluster {
    /// Kills every member and removes the directory.
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(mut child) = lock(&m.process).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        drop(self.dir.take());
        if let Some(watchdog) = lock(&self.watchdog).take() {
            watchdog.release();
        }
    }
}

/// Whether the member on `port` answers `GET /health` with `"health":"true"` (each step
/// bounded by 500 ms).
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
    {
        return false;
    }
    let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = stream.take(64 * 1024).read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// The binary: `$TWOPC_ETCD`, `/usr/bin/etcd`, or `etcd` on `PATH`.
fn find_binary() -> Result<PathBuf> {
    let missing = |path: &Path, extra: String| {
        TestkitError::MissingBinary {
        name: "etcd".into(),
        path: path.to_path_buf(),
        hint: format!(
            "install etcd (Debian/Ubuntu: apt-get install etcd-server) or set {ETCD_ENV} to its path{extra}"
        ),
    }
    };
    if let Some(path) = std::env::var_os(ETCD_ENV).map(PathBuf::from) {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(missing(&path, String::new()))
        };
    }
    let usual = Path::new("/usr/bin/etcd");
    if usual.is_file() {
        return Ok(usual.to_path_buf());
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            missing(
                Path::new("etcd"),
                format!(" (searched PATH: {})", search.to_string_lossy()),
            )
        })
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_string(&mut s);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_member_starts_answers_and_is_cleaned_up() {
        let cluster = EtcdCluster::start_blocking(1).expect("start etcd");
        let endpoints = cluster.endpoints();
        assert_eq!(endpoints.len(), 1);
        let port: u16 = endpoints[0]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        assert!(healthy(port));
        let root = cluster.dir.as_ref().expect("dir").path().to_path_buf();
        drop(cluster);
        assert!(!root.exists(), "the directory is removed");
        assert!(!healthy(port), "the member is gone");
    }

    #[test]
    fn three_members_survive_one_killed_and_take_it_back() {
        let cluster = EtcdCluster::start_blocking(3).expect("start etcd");
        assert_eq!(cluster.len(), 3);
        cluster.kill9(1).expect("kill");
        // If the killed member led, the others elect a new leader first.
        cluster
            .wait_healthy(vec![0, 2])
            .expect("a quorum remains and elects a leader");
        assert!(cluster.kill9(1).is_err(), "not running");
        cluster.start_again(1).expect("restart");
        assert!(healthy(cluster.members[1].client_port));
    }
}
