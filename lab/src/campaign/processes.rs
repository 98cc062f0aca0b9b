//! The campaign's processes: the coordinator (`twopc serve`) as a child on a fixed port and
//! data directory, killed, paused and restarted; and a real `twopc-lab order-service` process
//! of the campaign's participant, killed again and again while it starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use twopc_participant::staging::StagingStore;

use super::{Env, SERVICE};

/// The coordinator as a child process on a fixed port and data directory.
pub(super) struct CoordinatorProc {
    pub(super) exe: PathBuf,
    pub(super) addr: SocketAddr,
    pub(super) data_dir: PathBuf,
    pub(super) log: PathBuf,
    pub(super) broken: bool,
    /// `--one-phase` of the next start.
    pub(super) one_phase: bool,
    /// `--decision-retention-ms` of every start.
    pub(super) retention_ms: u64,
    /// `FAILPOINTS` of the next start only (taken by it).
    pub(super) arm: Option<String>,
    pub(super) child: Option<Child>,
    /// How long the last full start took to listen (kills while it starts spread over it).
    pub(super) start_took: Duration,
}

impl CoordinatorProc {
    /// Starts it and waits until it listens.
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        let spawned = Instant::now();
        self.spawn()?;
        // Ready when the port answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not listen on {} within 20 s (see {})",
                    self.addr,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.start_took = spawned.elapsed();
        Ok(())
    }

    /// Starts it and SIGKILLs it after each of `at` (fractions of a full start's time),
    /// leaving it dead. Returns the kills that struck before it listened.
    pub(super) async fn kill_while_starting(&mut self, at: &[f64]) -> anyhow::Result<usize> {
        let mut landed = 0;
        for fraction in at {
            self.kill9();
            self.spawn()?;
            tokio::time::sleep(self.start_took.mul_f64(*fraction)).await;
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(1)).is_err() {
                landed += 1;
            }
            self.kill9();
        }
        Ok(landed)
    }

    /// Starts the process (without waiting for it to listen).
    pub(super) fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["serve", "--listen", &self.addr.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--prepare-timeout-ms",
                "1500",
                "--tx-timeout-ms",
                "5000",
                "--rpc-timeout-ms",
                "1000",
            ])
            .args([
                "--connect-timeout-ms",
                "500",
                "--retry-initial-ms",
                "20",
                "--retry-max-ms",
                "200",
            ])
            .args(["--commit-wait-ms", "1000"])
            .args(["--one-phase", if self.one_phase { "true" } else { "false" }])
            .args(["--decision-retention-ms", &self.retention_ms.to_string()])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.broken {
            cmd.env("TWOPC_UNSAFE_COMMIT_BEFORE_DURABLE", "1");
        }
        if let Some(failpoints) = self.arm.take() {
            cmd.env("FAILPOINTS", failpoints);
        }
        self.child = Some(cmd.spawn().context("spawn twopc serve")?);
        Ok(())
    }

    pub(super) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(super) fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with the pid of our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Restarts it if it is not running; returns whether it had exited (or was killed).
    pub(super) fn ensure_running(&mut self) -> anyhow::Result<bool> {
        let alive = match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        };
        if !alive {
            self.kill9();
            self.start()?;
        }
        Ok(!alive)
    }

    /// Restarts it armed to abort itself in the middle of its first collection of finished
    /// decision records (a retention after the start), and waits up to `within` for that.
    /// Returns whether it died there; if not, it is SIGKILLed at the end of the wait.
    pub(super) async fn kill_in_collection(&mut self, within: Duration) -> anyhow::Result<bool> {
        self.kill9();
        self.arm = Some("coordinator::during_collection=return(abort)".into());
        self.start()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.kill9();
        Ok(false)
    }

    /// A clean stop (SIGTERM: the decision log is flushed and synced, lazy records
    /// included); SIGKILL if it has not exited within 10 s.
    pub(super) fn stop(&mut self) {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        if let Some(c) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill9();
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill9();
    }
}

/// Kills a real `twopc-lab order-service` process of the campaign's participant (same service,
/// data directory, database, broker and port) while it starts, once after each of `at`
/// (fractions of a full start's time). The first call makes one full start (until it says
/// it is ready) to learn that time. The participant must be stopped. Returns the kills
/// that struck before the process was ready; fails if a process exits by itself (it
/// could not start: a store a kill bricked, say).
pub(super) async fn kill_order_service_while_starting(
    env: &Env,
    start_took: &mut Option<Duration>,
    at: &[f64],
) -> anyhow::Result<usize> {
    // The participant just let go of its staging store; the process needs its lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match StagingStore::open(&env.data_dir) {
            Ok(store) => break drop(store),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let spawn = || -> anyhow::Result<(Child, std::sync::mpsc::Receiver<String>)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&env.order_service_log)?;
        let mut child = Command::new(&env.exe)
            .arg("order-service")
            .args(["--coordinator", &env.coordinator_url])
            .args(["--listen", &env.participant_addr.to_string()])
            .arg("--data-dir")
            .arg(&env.data_dir)
            .args(["--postgres-url", &env.db_url])
            .args(["--amqp-url", &env.broker_url])
            .args(["--queue", &env.queue, "--service", SERVICE])
            .args([
                "--stage-events",
                "database",
                "--recovery-interval-ms",
                "300",
            ])
            .args(["--outbox-sweep-interval-ms", "200"])
            .args(["--outbox-sweep-after-ms", "500"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn twopc-lab order-service")?;
        let stdout = child.stdout.take().context("order-service stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok((child, lines))
    };
    let kill = |mut child: Child| -> anyhow::Result<()> {
        let exited = child.try_wait()?;
        let _ = child.kill();
        let _ = child.wait();
        match exited {
            Some(status) => bail!(
                "twopc-lab order-service exited by itself while it started ({status}; see {})",
                env.order_service_log.display()
            ),
            None => Ok(()),
        }
    };
    let full_start = match *start_took {
        Some(took) => took,
        None => {
            let spawned = Instant::now();
            let (child, lines) = spawn()?;
            let ready = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while let Ok(line) =
                    lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    if line.starts_with("order-service ready") {
                        return true;
                    }
                }
                false
            })
            .await?;
            let took = spawned.elapsed();
            kill(child)?;
            if !ready {
                bail!(
                    "twopc-lab order-service did not say it was ready within 20 s (see {})",
                    env.order_service_log.display()
                );
            }
            *start_took = Some(took);
            took
        }
    };
    let mut landed = 0;
    for fraction in at {
        let (child, lines) = spawn()?;
        tokio::time::sleep(full_start.mul_f64(*fraction)).await;
        if !lines
            .try_iter()
            .any(|l| l.starts_with("order-service ready"))
        {
            landed += 1;
        }
        kill(child)?;
    }
    Ok(landed)
}

/// The `twopc` server binary: `--twopc-bin`, or the one next to this binary.
pub(crate) fn twopc_binary(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locate this binary (to find twopc next to it)")?
            .with_file_name(format!("twopc{}", std::env::consts::EXE_SUFFIX)),
    };
    if !path.is_file() {
        bail!(
            "no twopc binary at {} (--twopc-bin / TWOPC_BIN): build it with `cargo build --bin twopc` \
             (with the same profile and features as this one)",
            path.display()
        );
    }
    Ok(path)
}
