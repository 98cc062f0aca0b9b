//! Starting a private server process and waiting until it serves: what [`PgCluster`]
//! and [`NatsServer`] share. Each picks a free port and tries again on another one when
//! the port turns out to be taken between the pick and the bind; each writes the server's
//! output to a log file that start failures quote.
//!
//! [`PgCluster`]: crate::PgCluster
//! [`NatsServer`]: crate::NatsServer

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::watchdog::lock;
use crate::{try_free_port, Result, TestkitError};

/// Free ports tried before a start gives up.
const PORT_ATTEMPTS: usize = 5;

/// Why a start attempt failed.
pub(crate) enum Launch {
    /// The port is in use: try another one.
    PortTaken(String),
    /// Anything else.
    Failed(TestkitError),
}

/// A server program, as its starts are reported.
pub(crate) struct Program {
    /// Its name in messages (`postgres`, `nats-server`).
    pub(crate) name: &'static str,
    /// What its log says when the port was taken (any of them).
    pub(crate) port_taken: &'static [&'static str],
    /// What it does once started, for the timeout message (`accept clients`).
    pub(crate) serves: &'static str,
}

impl Program {
    /// One server of this program, logging to `log`, that must serve within
    /// `start_timeout` of each start.
    pub(crate) fn server<'a>(&'a self, log: &'a Path, start_timeout: Duration) -> Server<'a> {
        Server {
            program: self,
            log,
            start_timeout,
        }
    }

    /// Calls `launch` with a free port until a start succeeds (up to [`PORT_ATTEMPTS`]
    /// ports, each replacing one that turned out to be taken).
    pub(crate) fn on_a_free_port(
        &self,
        mut launch: impl FnMut(u16) -> Result<(), Launch>,
    ) -> Result<()> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = try_free_port()?;
            match launch(port) {
                Ok(()) => return Ok(()),
                Err(Launch::PortTaken(detail)) => {
                    last_err = Some(TestkitError::Command {
                        what: format!("starting {} on port {port}", self.name),
                        detail,
                    })
                }
                Err(Launch::Failed(e)) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| TestkitError::Usage("no port attempt was made".into())))
    }

    /// What a start on the same `port` again came to: a taken port is an error now.
    pub(crate) fn restarted(&self, port: u16, launched: Result<(), Launch>) -> Result<()> {
        match launched {
            Ok(()) => Ok(()),
            Err(Launch::PortTaken(detail)) => Err(TestkitError::Command {
                what: format!("restarting {} on port {port}", self.name),
                detail,
            }),
            Err(Launch::Failed(e)) => Err(e),
        }
    }
}

/// One server of a [`Program`], as its starts go.
pub(crate) struct Server<'a> {
    program: &'a Program,
    /// Where its stdout and stderr are appended.
    log: &'a Path,
    /// How long a start may take until the server serves.
    start_timeout: Duration,
}

impl Server<'_> {
    /// Spawns `cmd` (its output appended to the log) as the running server in `slot`
    /// and waits until `ready` (given its pid) says it serves on `port`. A server that
    /// exits first is a taken port or a failure, as its log says; one that is not ready
    /// in time is killed.
    pub(crate) fn launch(
        &self,
        slot: &Mutex<Option<Child>>,
        cmd: &mut Command,
        port: u16,
        mut ready: impl FnMut(i32) -> bool,
    ) -> Result<(), Launch> {
        let log_start = fs::metadata(self.log).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .map_err(|e| {
                Launch::Failed(TestkitError::io(
                    format!("opening {}", self.log.display()),
                    e,
                ))
            })?;
        let log2 = log
            .try_clone()
            .map_err(|e| Launch::Failed(TestkitError::io("duplicating the log file handle", e)))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let mut server = lock(slot);
        let child = cmd.spawn().map_err(|e| {
            Launch::Failed(TestkitError::io(
                format!("starting {}", Path::new(cmd.get_program()).display()),
                e,
            ))
        })?;
        let pid = child.id() as i32;
        *server = Some(child);
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let exited = match server.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                *server = None;
                let new_log = read_from(self.log, log_start);
                let detail = format!("{} exited ({status}); log: {new_log}", self.program.name);
                let taken = self.program.port_taken.iter().any(|s| new_log.contains(s));
                return Err(if taken {
                    Launch::PortTaken(detail)
                } else {
                    Launch::Failed(TestkitError::Command {
                        what: format!("starting {} on port {port}", self.program.name),
                        detail,
                    })
                });
            }
            if ready(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(mut child) = server.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(Launch::Failed(TestkitError::Timeout {
                    what: format!(
                        "{} on port {port} to {}",
                        self.program.name, self.program.serves
                    ),
                    after: self.start_timeout,
                    detail: format!("log: {}", read_from(self.log, log_start)),
                }));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What `path` holds from `offset` on (empty if it cannot be read).
pub(crate) fn read_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_string(&mut s);
        }
    }
    s
}
