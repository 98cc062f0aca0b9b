//! Helpers of the process-level integration tests.
//!
//! * [`Coordinator`]: a real `twopc serve` process on `127.0.0.1:0` with its own data
//!   directory (a temp dir unless one is given), stderr captured in a log file that is
//!   printed when a test fails; it can be SIGKILLed, SIGTERMed and restarted on the same
//!   data directory.
//! * [`TestParticipant`]: an in-test gRPC `twopc.v1.Participant` (unary calls and the
//!   batched `ParticipantExchange` stream, which the coordinator prefers) with scriptable votes and
//!   phase-two behaviour per branch id, a record of every message received, and a model of
//!   the resource it guards (per `(tx, branch)`: prepared / committed / aborted). It can be
//!   "crashed" (listener and every connection dropped at once) and restarted on the same
//!   port, keeping its resource state like a durable participant would.
//!
//! Set `TWOPC_TEST_SHOW_LOGS=1` to print every coordinator's stderr log even when the test
//! passes (with `--nocapture`); a failing test prints them anyway.
//! * [`wait_until`] / [`eventually`]: polling with short intervals instead of fixed sleeps.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use twopc_proto::mux;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_proto::v1::participant_exchange_server::{
    ParticipantExchange, ParticipantExchangeServer,
};
use twopc_proto::v1::participant_server::{Participant, ParticipantServer};

/// How long a coordinator may take to print its listening line.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

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

fn serve_command(data_dir: &Path, flags: &[(String, String)], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twopc"));
    // Flags given here must win over whatever the environment of the test run says.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TWOPC_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.env("RUST_LOG", "info,twopc_coordinator=debug")
        .env("NO_COLOR", "1")
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir);
    for (k, v) in flags {
        cmd.arg(k).arg(v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

impl Coordinator {
    /// Starts a coordinator on a fresh temp data directory; `flags` override the defaults.
    pub async fn start(flags: &[(&str, &str)]) -> Coordinator {
        let root = tempfile::Builder::new()
            .prefix("twopc-test-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = root.path().join("data");
        Self::launch(root, data_dir, flags, &[]).await
    }

    /// [`start`](Self::start) with extra environment variables (e.g. `TWOPC_CLIENT_TOKEN`).
    pub async fn start_with_env(flags: &[(&str, &str)], env: &[(&str, &str)]) -> Coordinator {
        let root = tempfile::Builder::new()
            .prefix("twopc-test-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = root.path().join("data");
        Self::launch(root, data_dir, flags, env).await
    }

    /// Starts a coordinator on `data_dir` (logs still go to a fresh temp dir).
    pub async fn start_in(data_dir: &Path, flags: &[(&str, &str)]) -> Coordinator {
        let root = tempfile::Builder::new()
            .prefix("twopc-test-")
            .tempdir()
            .expect("create temp dir");
        Self::launch(root, data_dir.to_path_buf(), flags, &[]).await
    }

    async fn launch(
        root: tempfile::TempDir,
        data_dir: PathBuf,
        flags: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Coordinator {
        let mut c = Coordinator {
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
        c.spawn().await;
        c
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "coordinator is still running");
        let log_path = self
            .root
            .path()
            .join(format!("coordinator-{}.stderr.log", self.logs.len() + 1));
        let log = File::create(&log_path).expect("create coordinator log file");
        self.logs.push(log_path);
        let mut child = serve_command(&self.data_dir, &self.flags, &self.env)
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
                    "twopc serve did not print its listening line within {STARTUP_DEADLINE:?} \
                     (got {other:?}, exit status {status:?}); stderr:\n{}",
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
        let mut child = serve_command(data_dir, &merge_flags(flags), &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twopc serve");
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout")));
        let err = drain(Box::new(child.stderr.take().expect("stderr")));
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if started.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "twopc serve on {} did not exit within {deadline:?}; stdout {:?}, stderr {:?}",
                    data_dir.display(),
                    out.join().unwrap_or_default(),
                    err.join().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let elapsed = started.elapsed();
        Exited {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
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

    /// SIGKILL (no cleanup at all), then reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `deadline` for the exit status (panics if it does not exit).
    pub async fn sigterm(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("coordinator is not running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            io::Error::last_os_error()
        );
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "coordinator did not exit within {deadline:?} of SIGTERM; stderr:\n{}",
                    self.stderr_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a new process on the same data directory with the same flags (SIGKILLing
    /// the current one first if it still runs). The address changes.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// stderr of every start so far.
    pub fn stderr_log(&self) -> String {
        let mut all = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            all.push_str(&format!(
                "----- coordinator start #{} ({}) -----\n",
                i + 1,
                p.display()
            ));
            all.push_str(
                &std::fs::read_to_string(p).unwrap_or_else(|e| format!("<unreadable: {e}>\n")),
            );
        }
        all
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() || std::env::var_os("TWOPC_TEST_SHOW_LOGS").is_some() {
            eprintln!(
                "coordinator data dir {}\n{}",
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
    /// Cancelled when the current server incarnation "crashes".
    token: Mutex<CancellationToken>,
}

impl Shared {
    fn crash(&self) {
        lock(&self.token).cancel();
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

#[derive(Clone)]
struct Svc {
    shared: Arc<Shared>,
    /// Cancelled when this incarnation "crashes": its Exchange streams stop at once.
    stop: CancellationToken,
}

/// The batched stream: every call goes through the unary handler above, so scripts,
/// records and the resource model behave the same whichever way the coordinator calls.
#[tonic::async_trait]
impl ParticipantExchange for Svc {
    type ExchangeStream = mux::OutboundStream<Result<pb::ExchangeResponse, Status>>;

    async fn exchange(
        &self,
        request: Request<tonic::Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let stop = self.stop.clone().cancelled_owned();
        Ok(Response::new(mux::serve_exchange(
            self.clone(),
            request.into_inner(),
            stop,
        )))
    }
}

#[tonic::async_trait]
impl Participant for Svc {
    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let r = request.into_inner();
        let script = {
            let mut m = lock(&self.shared.model);
            m.record(&r.tx_id, &r.branch_id, MsgKind::Prepare, false);
            m.scripts
                .get(&r.branch_id)
                .cloned()
                .unwrap_or(PrepareScript::Yes)
        };
        // The prepare runs in its own task: like a real resource, it completes even if
        // the coordinator hangs up (or dies) while it is in progress.
        let shared = self.shared.clone();
        let work = tokio::spawn(async move {
            match &script {
                PrepareScript::Late(d) => tokio::time::sleep(*d).await,
                PrepareScript::Hang => shared.wait_released(&r.branch_id).await,
                _ => {}
            }
            shared.finish_prepare(&r.tx_id, &r.branch_id, &script)
        });
        match work.await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => Err(Status::internal(format!("prepare task failed: {e}"))),
        }
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        let r = request.into_inner();
        let mut m = lock(&self.shared.model);
        m.record(&r.tx_id, &r.branch_id, MsgKind::Commit, r.one_phase);
        if m.crash_on_commit.remove(&r.branch_id) {
            drop(m);
            self.shared.crash();
            return Err(Status::unavailable(format!(
                "participant {} crashed",
                self.shared.name
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
        let name = &self.shared.name;
        let violation = match (current, r.one_phase) {
            (Some(ResState::Committed), _) => None,
            (Some(ResState::Prepared), _) => {
                m.resources.insert(key, ResState::Committed);
                None
            }
            (None, true) => {
                if let Some(PrepareScript::No(reason)) = m.scripts.get(&r.branch_id).cloned() {
                    m.resources.insert(key, ResState::Aborted);
                    return Ok(Response::new(pb::CommitBranchResponse {
                        committed: false,
                        reason,
                    }));
                }
                m.one_phase.insert(key.clone());
                m.resources.insert(key, ResState::Committed);
                None
            }
            (Some(ResState::Aborted), true) => {
                return Ok(Response::new(pb::CommitBranchResponse {
                    committed: false,
                    reason: "branch was already rolled back".into(),
                }));
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
        Ok(Response::new(pb::CommitBranchResponse {
            committed: true,
            reason: String::new(),
        }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        let r = request.into_inner();
        let mut m = lock(&self.shared.model);
        m.record(&r.tx_id, &r.branch_id, MsgKind::Abort, false);
        let key = (r.tx_id.clone(), r.branch_id.clone());
        if m.resources.get(&key) == Some(&ResState::Committed) && m.one_phase.contains(&key) {
            return Ok(Response::new(pb::AbortBranchResponse {
                result: pb::AbortResult::AlreadyCommitted as i32,
            }));
        }
        if m.resources.get(&key) == Some(&ResState::Committed) {
            let v = format!(
                "{}: abort of committed branch {}/{}",
                self.shared.name, r.tx_id, r.branch_id
            );
            m.violations.push(v.clone());
            return Err(Status::failed_precondition(v));
        }
        // Aborting an unknown branch is a success; remembering it makes a late prepare vote no.
        m.resources.insert(key, ResState::Aborted);
        Ok(Response::new(pb::AbortBranchResponse {
            result: pb::AbortResult::Aborted as i32,
        }))
    }
}

/// A connection that can be cut from outside: once the token is cancelled every read and
/// write fails (and pending ones wake up), so the server drops it like a crashed process.
struct KillableStream {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

fn killed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "test participant crashed")
}

impl KillableStream {
    fn dead(&mut self, cx: &mut Context<'_>) -> bool {
        self.killed.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dead(cx) {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Connected for KillableStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections until the token is cancelled; then drops the listener at once.
struct Incoming {
    listener: Option<TcpListener>,
    token: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for Incoming {
    type Item = io::Result<KillableStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.killed.as_mut().poll(cx).is_ready() {
            this.listener = None;
            return Poll::Ready(None);
        }
        let Some(listener) = this.listener.as_ref() else {
            return Poll::Ready(None);
        };
        match listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => {
                let _ = stream.set_nodelay(true);
                Poll::Ready(Some(Ok(KillableStream {
                    inner: stream,
                    killed: Box::pin(this.token.clone().cancelled_owned()),
                })))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn bind_reuse(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// An in-test participant server. See the module docs.
pub struct TestParticipant {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl TestParticipant {
    /// Starts a participant on `127.0.0.1:<free port>`; `name` appears in its messages.
    pub async fn start(name: &str) -> TestParticipant {
        let listener =
            bind_reuse(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind test participant");
        let addr = listener.local_addr().expect("participant address");
        let (releases, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            model: Mutex::new(Model::default()),
            releases,
            token: Mutex::new(CancellationToken::new()),
        });
        let mut p = TestParticipant {
            shared,
            addr,
            server: None,
        };
        p.serve(listener);
        p
    }

    fn serve(&mut self, listener: TcpListener) {
        let token = CancellationToken::new();
        *lock(&self.shared.token) = token.clone();
        let stream_stop = token.clone();
        let incoming = Incoming {
            listener: Some(listener),
            killed: Box::pin(token.clone().cancelled_owned()),
            token,
        };
        let svc = Svc {
            shared: self.shared.clone(),
            stop: stream_stop,
        };
        self.server = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(svc.clone()))
                .add_service(ParticipantExchangeServer::new(svc))
                .serve_with_incoming(incoming)
                .await;
        }));
    }

    /// `http://127.0.0.1:PORT`: what branches enlist as their participant_endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
        lock(&self.shared.token).is_cancelled()
    }

    async fn reap_server(&mut self) {
        if let Some(handle) = self.server.take() {
            let abort = handle.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), handle)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Crashes the server: the listener and every open connection are dropped at once.
    /// The resource state survives (as it would on disk).
    pub async fn stop(&mut self) {
        self.shared.crash();
        self.reap_server().await;
    }

    /// Serves again on the same port (after [`stop`](Self::stop) or a scripted crash).
    pub async fn restart(&mut self) {
        self.shared.crash();
        self.reap_server().await;
        let end = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind_reuse(self.addr) {
                Ok(l) => break l,
                Err(_) if Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!(
                    "cannot re-bind test participant {} on {}: {e}",
                    self.shared.name, self.addr
                ),
            }
        };
        self.serve(listener);
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
            let resp = client
                .get_transaction(pb::GetTransactionRequest {
                    tx_id: tx_id.clone(),
                })
                .await;
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
        if let Some(h) = self.server.take() {
            h.abort();
        }
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
        .commit(pb::CommitRequest {
            tx_id: tx_id.to_string(),
            phase_two_wait_ms: (wait_ms > 0).then_some(wait_ms),
            branches: Vec::new(),
            answer_before_durable: false,
        })
        .await
        .map(Response::into_inner)
}

/// GetTransaction.
pub async fn get_tx(
    client: &mut CoordinatorClient<Channel>,
    tx_id: &str,
) -> Result<pb::GetTransactionResponse, Status> {
    client
        .get_transaction(pb::GetTransactionRequest {
            tx_id: tx_id.to_string(),
        })
        .await
        .map(Response::into_inner)
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
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue.declare")
        .message_count()
}
