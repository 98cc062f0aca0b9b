//! Helpers of the process-level integration tests.
//!
//! * [`Coordinator`]: a real `twopc serve` process on `127.0.0.1:0` with its own data
//!   directory (a temp dir unless one is given), stderr captured in a log file that is
//!   printed when a test fails; it can be SIGKILLed, SIGTERMed, paused with a signal,
//!   killed by a fail point armed for its first start (`FAILPOINTS`, with the
//!   `failpoints` feature) and restarted on the same data directory (and, if asked, the
//!   same address). [`clean_command`] is how every child process of a test starts: none
//!   of the test run's `TWOPC_*` variables, `FAILPOINTS` exactly as given, no core file.
//! * `orders` (with the `lab` feature): the order service's world, a PostgreSQL orders
//!   database, a RabbitMQ queue, a coordinator and runs of the `twopc-lab order-service`
//!   process.
//! * [`TestParticipant`]: the testkit's participant server (unary calls and the batched
//!   `ParticipantExchange` stream, which the coordinator prefers) answering with a model of
//!   the resource it guards (per `(tx, branch)`: prepared / committed / aborted), with
//!   scriptable votes and phase-two behaviour per branch id and a record of every message
//!   received. It can be "crashed" (listener and every connection dropped at once) and
//!   restarted on the same port, keeping its resource state like a durable participant
//!   would.
//! * [`wait_until`] / [`eventually`]: polling with short intervals instead of fixed sleeps.
//!
//! Set `TWOPC_TEST_SHOW_LOGS=1` to print the stderr log of every process a test started
//! even when the test passes (with `--nocapture`); a failing test prints them anyway.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{
    Answer, Behaviour, CrashHandle, Services, TestParticipant as KitParticipant,
};
use twopc_testkit::requests;

#[cfg(feature = "lab")]
pub mod orders;

/// How long a coordinator may take to print its listening line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// How long a coordinator armed with a fail point may take to die of it.
pub const CRASH_DEADLINE: Duration = Duration::from_secs(15);

/// Flags every test coordinator gets unless the test gives the same flag itself: quick
/// phase-two retries and short transport timeouts, so recovery paths run in well under a
/// second.
const DEFAULT_FLAGS: &[(&str, &str)] = &[
    ("--retry-initial-ms", "20"),
    ("--retry-max-ms", "200"),
    ("--rpc-timeout-ms", "2000"),
    ("--connect-timeout-ms", "500"),
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `deadline`.
pub async fn wait_until(deadline: Duration, what: &str, cond: impl FnMut() -> bool) {
    wait_until_or_tell(deadline, what, cond, String::new).await
}

/// [`wait_until`], whose panic also prints what `tell` says of the state it waited on.
pub async fn wait_until_or_tell(
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    tell: impl Fn() -> String,
) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= end {
            panic!(
                "timed out after {deadline:?} waiting until {what}{}",
                tell()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`] for a condition that must await (an RPC, say). (Not every test
/// binary that includes this module uses it.)
#[allow(unused_imports)]
pub use twopc_testkit::wait::eventually;

/// Runs a test body with an overall deadline, so a hang fails the test instead of the run.
pub async fn with_deadline<T>(deadline: Duration, body: impl Future<Output = T>) -> T {
    match tokio::time::timeout(deadline, body).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {deadline:?}"),
    }
}

/// Asserts that `res` is an error with `code` whose message contains every needle.
#[track_caller]
pub fn expect_status<T: std::fmt::Debug>(
    res: Result<T, Status>,
    code: Code,
    needles: &[&str],
) -> Status {
    let status = match res {
        Ok(v) => panic!("expected {code:?} (mentioning {needles:?}), got OK: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        code,
        "expected {code:?} (mentioning {needles:?}), got {:?}: {:?}",
        status.code(),
        status.message()
    );
    for n in needles {
        assert!(
            status.message().contains(n),
            "{code:?} message {:?} does not mention {n:?}",
            status.message()
        );
    }
    status
}

// ---------------------------------------------------------------------------------------
// Coordinator process
// ---------------------------------------------------------------------------------------

/// A running `twopc serve` process.
pub struct Coordinator {
    /// Names the process in its logs (empty: unnamed).
    name: String,
    /// Holds the stderr logs (and the data directory unless one was given).
    root: tempfile::TempDir,
    data_dir: PathBuf,
    flags: Vec<(String, String)>,
    /// Extra environment variables of every start (`start_with_env`).
    env: Vec<(String, String)>,
    child: Option<Child>,
    addr: SocketAddr,
    /// Bound address of the metrics endpoint (when started with `--metrics-listen`).
    metrics_addr: Option<SocketAddr>,
    /// stderr log of every start, in order.
    logs: Vec<PathBuf>,
}

/// What a `twopc serve` that was expected to exit did.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

fn merge_flags(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut flags: Vec<(String, String)> = DEFAULT_FLAGS
        .iter()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    flags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    flags
}

/// A command for the program `exe` with a clean environment: no `TWOPC_*` variable of the
/// test run (flags given by a test must win over it), `FAILPOINTS` exactly as given (none
/// if empty), `NO_COLOR`, stdin closed, and no core file if the test aborts it on purpose.
pub fn clean_command(exe: &str, failpoints: &str) -> Command {
    let mut cmd = Command::new(exe);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TWOPC_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("FAILPOINTS");
    if !failpoints.is_empty() {
        cmd.env("FAILPOINTS", failpoints);
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    // SAFETY: setrlimit(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    cmd
}

/// `twopc serve --listen 127.0.0.1:0 --data-dir DATA_DIR` and nothing else (no flags,
/// stdout and stderr inherited), for a test that drives the process itself.
pub fn bare_serve_command(data_dir: &Path) -> Command {
    let mut cmd = clean_command(env!("CARGO_BIN_EXE_twopc"), "");
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    cmd
}

fn serve_command(
    data_dir: &Path,
    listen: &str,
    flags: &[(String, String)],
    env: &[(String, String)],
    failpoints: &str,
) -> Command {
    let mut cmd = clean_command(env!("CARGO_BIN_EXE_twopc"), failpoints);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.env("RUST_LOG", "info,twopc_coordinator=debug")
        .arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir);
    for (k, v) in flags {
        cmd.arg(k).arg(v);
    }
    cmd
}

/// A fresh temp dir named after `name`.
fn temp_root(name: &str) -> tempfile::TempDir {
    let prefix = if name.is_empty() {
        "twopc-test-".to_string()
    } else {
        format!("twopc-test-{name}-")
    };
    tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir()
        .expect("create temp dir")
}

/// Waits (polling every 10 ms) until `child` exits; kills it and panics with `what` and
/// `tell()` once `deadline` has passed.
pub async fn wait_for_exit(
    child: &mut Child,
    deadline: Duration,
    what: &str,
    tell: impl FnOnce() -> String,
) -> ExitStatus {
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {deadline:?}; {}", tell());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Coordinator {
    /// Starts a coordinator on a fresh temp data directory; `flags` override the defaults.
    pub async fn start(flags: &[(&str, &str)]) -> Coordinator {
        let root = temp_root("");
        let data_dir = root.path().join("data");
        Self::launch("", root, data_dir, flags, &[], "").await
    }

    /// [`start`](Self::start) with extra environment variables (e.g. `TWOPC_CLIENT_TOKEN`).
    pub async fn start_with_env(flags: &[(&str, &str)], env: &[(&str, &str)]) -> Coordinator {
        let root = temp_root("");
        let data_dir = root.path().join("data");
        Self::launch("", root, data_dir, flags, env, "").await
    }

    /// Starts a coordinator on `data_dir` (logs still go to a fresh temp dir).
    pub async fn start_in(data_dir: &Path, flags: &[(&str, &str)]) -> Coordinator {
        let root = temp_root("");
        Self::launch("", root, data_dir.to_path_buf(), flags, &[], "").await
    }

    /// [`start`](Self::start) of a coordinator called `name` (in its logs) whose first
    /// start runs with `FAILPOINTS=failpoints` (none if empty); restarts run without.
    pub async fn start_named(name: &str, failpoints: &str, flags: &[(&str, &str)]) -> Coordinator {
        let root = temp_root(name);
        let data_dir = root.path().join("data");
        Self::launch(name, root, data_dir, flags, &[], failpoints).await
    }

    async fn launch(
        name: &str,
        root: tempfile::TempDir,
        data_dir: PathBuf,
        flags: &[(&str, &str)],
        env: &[(&str, &str)],
        failpoints: &str,
    ) -> Coordinator {
        let mut c = Coordinator {
            name: name.to_string(),
            root,
            data_dir,
            flags: merge_flags(flags),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: None,
            logs: Vec::new(),
        };
        c.spawn("127.0.0.1:0", failpoints).await;
        c
    }

    async fn spawn(&mut self, listen: &str, failpoints: &str) {
        assert!(
            self.child.is_none(),
            "coordinator {} is still running",
            self.name
        );
        let log_path = self
            .root
            .path()
            .join(format!("coordinator-{}.stderr.log", self.logs.len() + 1));
        let log = File::create(&log_path).expect("create coordinator log file");
        self.logs.push(log_path);
        let mut child = serve_command(&self.data_dir, listen, &self.flags, &self.env, failpoints)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn twopc serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (line_tx, line_rx) = oneshot::channel::<io::Result<String>>();
        let wants_metrics = self.flags.iter().any(|(k, _)| k == "--metrics-listen");
        let (metrics_tx, metrics_rx) = oneshot::channel::<io::Result<String>>();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let res = reader.read_line(&mut line).map(|_| line);
            let _ = line_tx.send(res);
            // With --metrics-listen, the metrics line comes second.
            if wants_metrics {
                let mut line = String::new();
                let res = reader.read_line(&mut line).map(|_| line);
                let _ = metrics_tx.send(res);
            }
            // Keep draining so a later write to stdout never fails with EPIPE.
            let _ = io::copy(&mut reader, &mut io::sink());
        });
        self.child = Some(child);
        let line = match tokio::time::timeout(STARTUP_DEADLINE, line_rx).await {
            Ok(Ok(Ok(line))) if !line.is_empty() => line,
            other => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                self.kill9();
                panic!(
                    "twopc serve {} did not print its listening line within {STARTUP_DEADLINE:?} \
                     (got {other:?}, exit status {status:?}); stderr:\n{}",
                    self.name,
                    self.stderr_log()
                );
            }
        };
        let addr = line
            .trim_end()
            .strip_prefix("twopc listening on ")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        assert_eq!(
            line,
            format!("twopc listening on {addr}\n"),
            "the listening line must be exact"
        );
        assert!(
            addr.ip().is_loopback() && addr.port() != 0,
            "bad bound address {addr}"
        );
        self.addr = addr;
        self.metrics_addr = None;
        if wants_metrics {
            let line = match tokio::time::timeout(STARTUP_DEADLINE, metrics_rx).await {
                Ok(Ok(Ok(line))) if !line.is_empty() => line,
                other => {
                    self.kill9();
                    panic!(
                        "twopc serve did not print its metrics line (got {other:?}); stderr:\n{}",
                        self.stderr_log()
                    );
                }
            };
            let addr = line
                .strip_suffix('\n')
                .and_then(|l| l.strip_prefix("twopc metrics on "))
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .unwrap_or_else(|| panic!("unexpected second stdout line {line:?}"));
            assert!(
                addr.ip().is_loopback() && addr.port() != 0,
                "bad metrics address {addr}"
            );
            self.metrics_addr = Some(addr);
        }
    }

    /// Runs `twopc serve` on `data_dir`, expecting it to exit on its own within `deadline`
    /// (killed and a panic otherwise).
    pub async fn run_expecting_exit(
        data_dir: &Path,
        flags: &[(&str, &str)],
        deadline: Duration,
    ) -> Exited {
        let started = Instant::now();
        let mut child = serve_command(data_dir, "127.0.0.1:0", &merge_flags(flags), &[], "")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twopc serve");
        let drain = |mut r: Box<dyn Read + Send>| {
            let reader = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            });
            // Read once the process has exited (or was killed).
            move || reader.join().unwrap_or_default()
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout")));
        let err = drain(Box::new(child.stderr.take().expect("stderr")));
        let what = format!("twopc serve on {}", data_dir.display());
        let outputs = std::cell::Cell::new(Some((out, err)));
        let read_outputs = || {
            let (out, err) = outputs.take().expect("outputs are read once");
            (out(), err())
        };
        let status = wait_for_exit(&mut child, deadline, &what, || {
            let (out, err) = read_outputs();
            format!("stdout {out:?}, stderr {err:?}")
        })
        .await;
        let elapsed = started.elapsed();
        let (stdout, stderr) = read_outputs();
        Exited {
            status,
            stdout,
            stderr,
            elapsed,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The bound address of the current process.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the current process's metrics endpoint (started with
    /// `--metrics-listen`; panics otherwise).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("coordinator was not started with --metrics-listen")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id of the current process.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("coordinator is not running")
            .id()
    }

    /// Whether the current process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A connected channel to the current process.
    pub async fn channel(&self) -> Channel {
        let ep = Endpoint::from_shared(self.url())
            .expect("coordinator url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15));
        match tokio::time::timeout(Duration::from_secs(5), ep.connect()).await {
            Ok(Ok(ch)) => ch,
            other => panic!(
                "cannot connect to the coordinator at {}: {other:?}",
                self.url()
            ),
        }
    }

    /// A connected Coordinator client.
    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel().await)
    }

    /// A client that gives up on every RPC after `patience` (connects lazily, so it can be
    /// made while the coordinator does not answer).
    pub fn impatient_client(&self, patience: Duration) -> CoordinatorClient<Channel> {
        let ep = Endpoint::from_shared(self.url())
            .expect("coordinator url")
            .connect_timeout(patience)
            .timeout(patience);
        CoordinatorClient::new(ep.connect_lazy())
    }

    /// The gRPC health status of `service` ("" for the whole server).
    pub async fn health(&self, service: &str) -> i32 {
        HealthClient::new(self.channel().await)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
            .into_inner()
            .status
    }

    /// SIGKILL (no cleanup at all), then reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the running process (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child, which has not been reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}): {}", io::Error::last_os_error());
    }

    /// SIGTERM, then wait up to `deadline` for the exit status (panics if it does not exit).
    pub async fn sigterm(&mut self, deadline: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("coordinator is not running");
        let what = format!("coordinator {} (after SIGTERM)", self.name);
        wait_for_exit(&mut child, deadline, &what, || {
            format!("stderr:\n{}", self.stderr_log())
        })
        .await
    }

    /// Waits (bounded by [`CRASH_DEADLINE`]) until the process exits on its own and checks
    /// that it died of SIGABRT with `needle` (the fail point's message) in the stderr of
    /// its last start.
    pub async fn wait_for_crash(&mut self, needle: &str) {
        let mut child = self.child.take().expect("coordinator is not running");
        let what = format!(
            "coordinator {} (expected to die at {needle:?}; was target/debug/twopc relinked \
             without --features failpoints by a concurrent cargo run?)",
            self.name
        );
        let status = wait_for_exit(&mut child, CRASH_DEADLINE, &what, || {
            format!("stderr:\n{}", self.stderr_log())
        })
        .await;
        let stderr = self.stderr_log();
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "coordinator {} should die of SIGABRT at {needle:?}, got {status:?}; stderr:\n{stderr}",
            self.name
        );
        let last = self.logs.last().map(|p| read_log(p)).unwrap_or_default();
        assert!(
            last.contains(needle),
            "the last coordinator run does not show {needle:?}; stderr:\n{stderr}"
        );
    }

    /// Starts a new process on the same data directory with the same flags and no fail
    /// point (SIGKILLing the current one first if it still runs). The address changes.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn("127.0.0.1:0", "").await;
    }

    /// As [`restart`](Self::restart), on the same address (for clients that keep their
    /// URL).
    pub async fn restart_on_same_address(&mut self) {
        self.kill9();
        let listen = self.addr.to_string();
        self.spawn(&listen, "").await;
    }

    /// stderr of every start so far.
    pub fn stderr_log(&self) -> String {
        let mut all = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            all.push_str(&format!(
                "----- coordinator {}start #{} ({}) -----\n",
                if self.name.is_empty() {
                    String::new()
                } else {
                    format!("{} ", self.name)
                },
                i + 1,
                p.display()
            ));
            all.push_str(&read_log(p));
        }
        all
    }
}

/// What one run of the `twopc tx` CLI did.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `twopc tx ARGS` (then `--coordinator URL` when given) as an operator would, with
/// `env` as its only `TWOPC_*` variables and no `RUST_LOG`; panics if it takes over 30 s.
pub async fn twopc_tx(url: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_twopc"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TWOPC_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .arg("tx")
        .args(args);
    if let Some(url) = url {
        cmd.arg("--coordinator").arg(url);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("twopc tx {args:?} did not finish within 30 s"))
        .expect("run twopc tx");
    CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The services a server lists through gRPC reflection.
pub async fn reflected_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let msg = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection call")
        .into_inner()
        .message()
        .await
        .expect("reflection answer")
        .expect("one reflection message");
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// A log file's text (or why it cannot be read).
pub fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("<unreadable: {e}>\n"))
}

/// Whether logs of the processes a test started are printed: when the test fails, or
/// always with `TWOPC_TEST_SHOW_LOGS` set.
pub fn show_logs() -> bool {
    std::thread::panicking() || std::env::var_os("TWOPC_TEST_SHOW_LOGS").is_some()
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
        if show_logs() {
            eprintln!(
                "coordinator {} data dir {}\n{}",
                self.name,
                self.data_dir.display(),
                self.stderr_log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Test participant
// ---------------------------------------------------------------------------------------

/// How a participant answers a Prepare for a branch id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrepareScript {
    /// Prepare and vote yes (the default).
    Yes,
    /// Roll back and vote no with this reason (a one-phase commit is refused with it).
    No(String),
    /// Nothing to commit.
    ReadOnly,
    /// Vote yes after this delay.
    Late(Duration),
    /// Do not answer until [`TestParticipant::release`] is called for the branch, then
    /// prepare and vote yes. The prepare completes even if the caller has gone away.
    Hang,
}

/// The kind of a message a participant received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgKind {
    Prepare,
    Commit,
    Abort,
}

/// One message a participant received.
#[derive(Clone, Debug)]
pub struct Received {
    pub tx_id: String,
    pub branch_id: String,
    pub kind: MsgKind,
    pub one_phase: bool,
    pub at: Instant,
}

/// The participant's resource state for one `(tx, branch)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResState {
    Prepared,
    Committed,
    Aborted,
    ReadOnly,
}

/// What [`TestParticipant::recover`] did.
#[derive(Clone, Debug, Default)]
pub struct RecoverReport {
    pub committed: Vec<(String, String)>,
    pub aborted: Vec<(String, String)>,
    /// Still prepared: no outcome yet, or the coordinator could not be asked.
    pub in_doubt: Vec<(String, String, String)>,
}

#[derive(Default)]
struct Model {
    scripts: HashMap<String, PrepareScript>,
    refuse_commits: HashSet<String>,
    crash_on_commit: HashSet<String>,
    released: HashSet<String>,
    received: Vec<Received>,
    resources: HashMap<(String, String), ResState>,
    /// Committed branches that were committed in one phase (an abort of one is how a
    /// restarted coordinator asks what became of it).
    one_phase: HashSet<(String, String)>,
    violations: Vec<String>,
}

impl Model {
    fn record(&mut self, tx_id: &str, branch_id: &str, kind: MsgKind, one_phase: bool) {
        self.received.push(Received {
            tx_id: tx_id.to_string(),
            branch_id: branch_id.to_string(),
            kind,
            one_phase,
            at: Instant::now(),
        });
    }
}

struct Shared {
    name: String,
    model: Mutex<Model>,
    /// Bumped on every release, waking hanging prepares.
    releases: watch::Sender<u64>,
    /// Crashes the server (set once it runs).
    crash: OnceLock<CrashHandle>,
}

impl Shared {
    fn crash(&self) {
        if let Some(c) = self.crash.get() {
            c.crash();
        }
    }

    async fn wait_released(&self, branch_id: &str) {
        let mut rx = self.releases.subscribe();
        loop {
            if lock(&self.model).released.contains(branch_id) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The prepare itself, after any scripted delay: decides the vote from the script and
    /// the resource's state, and makes the state change.
    fn finish_prepare(
        &self,
        tx_id: &str,
        branch_id: &str,
        script: &PrepareScript,
    ) -> pb::PrepareResponse {
        let mut m = lock(&self.model);
        let key = (tx_id.to_string(), branch_id.to_string());
        let (vote, reason) = match (m.resources.get(&key).copied(), script) {
            (Some(ResState::Aborted), _) => {
                (pb::Vote::No, "branch was already rolled back".to_string())
            }
            (Some(ResState::Committed), _) => (pb::Vote::Yes, String::new()),
            (Some(ResState::ReadOnly), _) => (pb::Vote::ReadOnly, String::new()),
            (_, PrepareScript::No(reason)) => {
                m.resources.insert(key, ResState::Aborted);
                (pb::Vote::No, reason.clone())
            }
            (_, PrepareScript::ReadOnly) => {
                m.resources.insert(key, ResState::ReadOnly);
                (pb::Vote::ReadOnly, String::new())
            }
            (_, PrepareScript::Yes | PrepareScript::Late(_) | PrepareScript::Hang) => {
                m.resources.insert(key, ResState::Prepared);
                (pb::Vote::Yes, String::new())
            }
        };
        pb::PrepareResponse {
            vote: vote as i32,
            reason,
        }
    }
}

/// The resource model answers every call, unary or in the batched stream alike, so
/// scripts, records and the resource state behave the same whichever way the coordinator
/// calls.
impl Behaviour for Shared {
    fn answer_prepare(self: Arc<Self>, r: pb::PrepareRequest) -> Answer<pb::PrepareResponse> {
        Box::pin(async move {
            let script = {
                let mut m = lock(&self.model);
                m.record(&r.tx_id, &r.branch_id, MsgKind::Prepare, false);
                m.scripts
                    .get(&r.branch_id)
                    .cloned()
                    .unwrap_or(PrepareScript::Yes)
            };
            // The prepare runs in its own task: like a real resource, it completes even if
            // the coordinator hangs up (or dies) while it is in progress.
            let shared = self.clone();
            let work = tokio::spawn(async move {
                match &script {
                    PrepareScript::Late(d) => tokio::time::sleep(*d).await,
                    PrepareScript::Hang => shared.wait_released(&r.branch_id).await,
                    _ => {}
                }
                shared.finish_prepare(&r.tx_id, &r.branch_id, &script)
            });
            work.await
                .map_err(|e| Status::internal(format!("prepare task failed: {e}")))
        })
    }

    fn commit(&self, r: &pb::CommitBranchRequest) -> Result<pb::CommitBranchResponse, Status> {
        let mut m = lock(&self.model);
        m.record(&r.tx_id, &r.branch_id, MsgKind::Commit, r.one_phase);
        if m.crash_on_commit.remove(&r.branch_id) {
            drop(m);
            self.crash();
            return Err(Status::unavailable(format!(
                "participant {} crashed",
                self.name
            )));
        }
        if m.refuse_commits.contains(&r.branch_id) {
            return Err(Status::unavailable(format!(
                "test script: commits of branch {} are refused for now",
                r.branch_id
            )));
        }
        let key = (r.tx_id.clone(), r.branch_id.clone());
        let current = m.resources.get(&key).copied();
        let name = &self.name;
        let violation = match (current, r.one_phase) {
            (Some(ResState::Committed), _) => None,
            (Some(ResState::Prepared), _) => {
                m.resources.insert(key, ResState::Committed);
                None
            }
            (None, true) => {
                if let Some(PrepareScript::No(reason)) = m.scripts.get(&r.branch_id).cloned() {
                    m.resources.insert(key, ResState::Aborted);
                    return Ok(pb::CommitBranchResponse {
                        committed: false,
                        reason,
                    });
                }
                m.one_phase.insert(key.clone());
                m.resources.insert(key, ResState::Committed);
                None
            }
            (Some(ResState::Aborted), true) => {
                return Ok(pb::CommitBranchResponse {
                    committed: false,
                    reason: "branch was already rolled back".into(),
                });
            }
            (None, false) => Some(format!(
                "{name}: commit of never-prepared branch {}/{}",
                r.tx_id, r.branch_id
            )),
            (Some(ResState::Aborted), false) => Some(format!(
                "{name}: commit of aborted branch {}/{}",
                r.tx_id, r.branch_id
            )),
            (Some(ResState::ReadOnly), _) => Some(format!(
                "{name}: commit of read-only branch {}/{}",
                r.tx_id, r.branch_id
            )),
        };
        if let Some(v) = violation {
            m.violations.push(v.clone());
            return Err(Status::failed_precondition(v));
        }
        Ok(pb::CommitBranchResponse {
            committed: true,
            reason: String::new(),
        })
    }

    fn abort(&self, r: &pb::AbortBranchRequest) -> Result<pb::AbortBranchResponse, Status> {
        let mut m = lock(&self.model);
        m.record(&r.tx_id, &r.branch_id, MsgKind::Abort, false);
        let key = (r.tx_id.clone(), r.branch_id.clone());
        if m.resources.get(&key) == Some(&ResState::Committed) && m.one_phase.contains(&key) {
            return Ok(pb::AbortBranchResponse {
                result: pb::AbortResult::AlreadyCommitted as i32,
            });
        }
        if m.resources.get(&key) == Some(&ResState::Committed) {
            let v = format!(
                "{}: abort of committed branch {}/{}",
                self.name, r.tx_id, r.branch_id
            );
            m.violations.push(v.clone());
            return Err(Status::failed_precondition(v));
        }
        // Aborting an unknown branch is a success; remembering it makes a late prepare vote no.
        m.resources.insert(key, ResState::Aborted);
        Ok(pb::AbortBranchResponse {
            result: pb::AbortResult::Aborted as i32,
        })
    }
}

/// An in-test participant server. See the module docs.
pub struct TestParticipant {
    shared: Arc<Shared>,
    server: KitParticipant,
}

impl TestParticipant {
    /// Starts a participant on `127.0.0.1:<free port>`; `name` appears in its messages.
    pub async fn start(name: &str) -> TestParticipant {
        let (releases, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            model: Mutex::new(Model::default()),
            releases,
            crash: OnceLock::new(),
        });
        let server = KitParticipant::start(shared.clone(), Services::UnaryAndStream)
            .await
            .unwrap_or_else(|e| panic!("start test participant {name}: {e}"));
        let _ = shared.crash.set(server.crash_handle());
        TestParticipant { shared, server }
    }

    /// `http://127.0.0.1:PORT`: what branches enlist as their participant_endpoint.
    pub fn endpoint(&self) -> String {
        self.server.endpoint.clone()
    }

    /// The bound address (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// A branch of this participant (commit_order 0, kind DATABASE).
    pub fn branch(&self, branch_id: &str) -> pb::Branch {
        self.branch_ordered(branch_id, 0)
    }

    /// A branch of this participant in commit tier `commit_order`.
    pub fn branch_ordered(&self, branch_id: &str, commit_order: u32) -> pb::Branch {
        pb::Branch {
            branch_id: branch_id.to_string(),
            participant_endpoint: self.endpoint(),
            commit_order,
            kind: pb::BranchKind::Database as i32,
        }
    }

    /// How to answer prepares of `branch_id` from now on.
    pub fn script(&self, branch_id: &str, script: PrepareScript) {
        lock(&self.shared.model)
            .scripts
            .insert(branch_id.to_string(), script);
    }

    /// Lets hanging prepares of `branch_id` (and future ones) answer.
    pub fn release(&self, branch_id: &str) {
        lock(&self.shared.model)
            .released
            .insert(branch_id.to_string());
        self.shared.releases.send_modify(|n| *n += 1);
    }

    /// While `refuse` is set, commits of `branch_id` fail with UNAVAILABLE.
    pub fn refuse_commits(&self, branch_id: &str, refuse: bool) {
        let mut m = lock(&self.shared.model);
        if refuse {
            m.refuse_commits.insert(branch_id.to_string());
        } else {
            m.refuse_commits.remove(branch_id);
        }
    }

    /// The next commit of `branch_id` crashes the participant (listener and connections
    /// dropped) before it commits anything.
    pub fn crash_on_commit(&self, branch_id: &str) {
        lock(&self.shared.model)
            .crash_on_commit
            .insert(branch_id.to_string());
    }

    /// Whether the server is down (crashed or stopped).
    pub fn is_down(&self) -> bool {
        self.server.is_down()
    }

    /// Crashes the server: the listener and every open connection are dropped at once.
    /// The resource state survives (as it would on disk).
    pub async fn stop(&mut self) {
        self.server.crash().await;
    }

    /// Serves again on the same port (after [`stop`](Self::stop) or a scripted crash).
    pub async fn restart(&mut self) {
        self.server.restart().await;
    }

    /// Every message received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.model).received.clone()
    }

    /// Messages received for one branch, in order.
    pub fn messages(&self, tx_id: &str, branch_id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.tx_id == tx_id && r.branch_id == branch_id)
            .collect()
    }

    /// Kinds of the messages received for one branch, in order.
    pub fn kinds(&self, tx_id: &str, branch_id: &str) -> Vec<MsgKind> {
        self.messages(tx_id, branch_id)
            .into_iter()
            .map(|r| r.kind)
            .collect()
    }

    /// How many messages of `kind` arrived for one branch.
    pub fn count(&self, tx_id: &str, branch_id: &str, kind: MsgKind) -> usize {
        self.messages(tx_id, branch_id)
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    }

    /// Whether a message of `kind` arrived for any branch of `tx_id`.
    pub fn saw(&self, tx_id: &str, kind: MsgKind) -> bool {
        lock(&self.shared.model)
            .received
            .iter()
            .any(|r| r.tx_id == tx_id && r.kind == kind)
    }

    /// The resource state of one branch (`None`: never heard of it).
    pub fn state(&self, tx_id: &str, branch_id: &str) -> Option<ResState> {
        lock(&self.shared.model)
            .resources
            .get(&(tx_id.to_string(), branch_id.to_string()))
            .copied()
    }

    /// Protocol violations seen (commit after abort, abort after commit, commit of an
    /// unprepared or read-only branch).
    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared.model).violations.clone()
    }

    /// A participant's recovery: for every branch held prepared, ask the coordinator for
    /// the outcome and commit or abort locally. Undecided ones stay prepared.
    pub async fn recover(&self, client: &mut CoordinatorClient<Channel>) -> RecoverReport {
        let mut prepared: Vec<(String, String)> = lock(&self.shared.model)
            .resources
            .iter()
            .filter(|(_, s)| **s == ResState::Prepared)
            .map(|(k, _)| k.clone())
            .collect();
        prepared.sort();
        let mut report = RecoverReport::default();
        for (tx_id, branch_id) in prepared {
            let resp = client.get_transaction(requests::get(&tx_id)).await;
            let outcome = match resp {
                Ok(r) => pb::Outcome::try_from(r.into_inner().outcome)
                    .unwrap_or(pb::Outcome::Unspecified),
                Err(s) => {
                    report.in_doubt.push((
                        tx_id,
                        branch_id,
                        format!("{:?}: {}", s.code(), s.message()),
                    ));
                    continue;
                }
            };
            let to = match outcome {
                pb::Outcome::Committed => ResState::Committed,
                pb::Outcome::Aborted => ResState::Aborted,
                pb::Outcome::Unspecified => {
                    report
                        .in_doubt
                        .push((tx_id, branch_id, "outcome not decided yet".into()));
                    continue;
                }
                pb::Outcome::Forgotten => {
                    report
                        .in_doubt
                        .push((tx_id, branch_id, "outcome no longer kept".into()));
                    continue;
                }
            };
            let mut m = lock(&self.shared.model);
            let key = (tx_id.clone(), branch_id.clone());
            if m.resources.get(&key) == Some(&ResState::Prepared) {
                m.resources.insert(key, to);
            }
            match to {
                ResState::Committed => report.committed.push((tx_id, branch_id)),
                _ => report.aborted.push((tx_id, branch_id)),
            }
        }
        report
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        self.shared.crash();
    }
}

// ---------------------------------------------------------------------------------------

// Small RPC helpers
// ---------------------------------------------------------------------------------------

/// Begin with `branches`; returns the tx id.
pub async fn begin(client: &mut CoordinatorClient<Channel>, branches: Vec<pb::Branch>) -> String {
    client
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches,
        })
        .await
        .expect("Begin")
        .into_inner()
        .tx_id
}

/// Commit waiting up to `wait_ms` for phase two (0: the coordinator's default wait).
pub async fn commit(
    client: &mut CoordinatorClient<Channel>,
    tx_id: &str,
    wait_ms: u64,
) -> Result<pb::CommitResponse, Status> {
    client
        .commit(requests::commit_waiting(
            tx_id,
            (wait_ms > 0).then_some(wait_ms),
        ))
        .await
        .map(Response::into_inner)
}

/// Starts Commit of `tx_id` (waiting up to `wait_ms` for phase two) in the background:
/// the test goes on while it runs, and looks at its answer later, if at all (the
/// coordinator may die meanwhile).
pub fn commit_in_background(
    client: &CoordinatorClient<Channel>,
    tx_id: &str,
    wait_ms: u64,
) -> JoinHandle<Result<pb::CommitResponse, Status>> {
    let mut c = client.clone();
    let tx_id = tx_id.to_string();
    tokio::spawn(async move { commit(&mut c, &tx_id, wait_ms).await })
}

/// A coordinator started with `flags`, a test participant "p" and a client of the
/// coordinator: the start of most single-participant tests.
pub async fn coordinator_with_participant(
    flags: &[(&str, &str)],
) -> (Coordinator, TestParticipant, CoordinatorClient<Channel>) {
    let coord = Coordinator::start(flags).await;
    let p = TestParticipant::start("p").await;
    let client = coord.client().await;
    (coord, p, client)
}

/// Two participants, `p1` holding branch `a` and `p2` branch `b`, and a transaction of
/// both whose Commit (waiting up to 5 s for phase two) runs in the background.
pub struct TwoBranchCommit {
    pub p1: TestParticipant,
    pub p2: TestParticipant,
    pub tx: String,
    pub pending: JoinHandle<Result<pb::CommitResponse, Status>>,
}

impl TwoBranchCommit {
    /// Starts the participants, begins the transaction on `coord` and starts its Commit;
    /// `held` names the branch (`"a"` or `"b"`) whose prepare hangs until released.
    pub async fn start(coord: &Coordinator, held: Option<&str>) -> TwoBranchCommit {
        let p1 = TestParticipant::start("p1").await;
        let p2 = TestParticipant::start("p2").await;
        match held {
            Some("a") => p1.script("a", PrepareScript::Hang),
            Some("b") => p2.script("b", PrepareScript::Hang),
            Some(other) => panic!("no branch {other:?} (a or b)"),
            None => {}
        }
        let mut c = coord.client().await;
        let tx = begin(&mut c, vec![p1.branch("a"), p2.branch("b")]).await;
        let pending = commit_in_background(&c, &tx, 5_000);
        TwoBranchCommit {
            p1,
            p2,
            tx,
            pending,
        }
    }
}

/// Waits (up to `deadline`) until the coordinator's view of `tx_id` satisfies `cond`
/// (described by `what`); returns that view.
pub async fn wait_view(
    client: &CoordinatorClient<Channel>,
    deadline: Duration,
    tx_id: &str,
    what: &str,
    cond: impl Fn(&pb::GetTransactionResponse) -> bool,
) -> pb::GetTransactionResponse {
    let last = Arc::new(Mutex::new(None));
    let cond = &cond;
    eventually(deadline, &format!("{what} (tx {tx_id})"), || {
        let mut c = client.clone();
        let last = last.clone();
        async move {
            let Ok(v) = get_tx(&mut c, tx_id).await else {
                return false;
            };
            let ok = cond(&v);
            *lock(&last) = Some(v);
            ok
        }
    })
    .await;
    let view = lock(&last).take().expect("a view");
    view
}

/// Waits (up to `deadline`) until the coordinator reports `tx_id` in `state` (e.g.
/// COMMITTED once phase two is over); returns that view.
pub async fn wait_tx_state(
    client: &CoordinatorClient<Channel>,
    deadline: Duration,
    tx_id: &str,
    state: pb::TxState,
) -> pb::GetTransactionResponse {
    wait_view(
        client,
        deadline,
        tx_id,
        &format!("the transaction is {state:?}"),
        |v| tx_state(v) == state,
    )
    .await
}

/// GetTransaction.
pub async fn get_tx(
    client: &mut CoordinatorClient<Channel>,
    tx_id: &str,
) -> Result<pb::GetTransactionResponse, Status> {
    client
        .get_transaction(requests::get(tx_id))
        .await
        .map(Response::into_inner)
}

/// The outcome in a GetTransaction answer.
pub fn outcome(r: &pb::GetTransactionResponse) -> pb::Outcome {
    pb::Outcome::try_from(r.outcome).unwrap_or(pb::Outcome::Unspecified)
}

/// The state in a GetTransaction answer.
pub fn tx_state(r: &pb::GetTransactionResponse) -> pb::TxState {
    pb::TxState::try_from(r.state).unwrap_or(pb::TxState::Unspecified)
}

/// Splits a tx id into (node, epoch, seq), asserting the documented format.
#[track_caller]
pub fn parse_tx_id(tx_id: &str) -> (String, u64, u64) {
    let parts: Vec<&str> = tx_id.split('-').collect();
    assert_eq!(parts.len(), 3, "tx id {tx_id:?} is not node-epoch-seq");
    assert!(
        parts[0].len() == 8 && parts[0].bytes().all(|b| b.is_ascii_hexdigit()),
        "tx id {tx_id:?}: node is not 8 hex digits"
    );
    let epoch = parts[1]
        .parse()
        .unwrap_or_else(|_| panic!("tx id {tx_id:?}: bad epoch"));
    let seq = parts[2]
        .parse()
        .unwrap_or_else(|_| panic!("tx id {tx_id:?}: bad seq"));
    (parts[0].to_string(), epoch, seq)
}

// ---------------------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------------------

/// The machine's RabbitMQ.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A connection to the machine's RabbitMQ and a channel on it.
pub async fn rabbitmq() -> (lapin::Connection, lapin::Channel) {
    let amqp = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ connect timed out")
    .unwrap_or_else(|e| panic!("RabbitMQ at {AMQP_URL} (start rabbitmq-server): {e}"));
    let channel = amqp.create_channel().await.expect("AMQP channel");
    (amqp, channel)
}

/// Declares `queue` durable, as the SDK does; returns how many messages it holds.
pub async fn declare_durable(channel: &lapin::Channel, queue: &str) -> u32 {
    twopc_testkit::amqp::declare_durable(channel, queue)
        .await
        .expect("queue.declare")
}
