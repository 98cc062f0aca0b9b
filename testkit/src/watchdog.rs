//! The clean-up watchdog shared by [`PgCluster`](crate::PgCluster) and
//! [`NatsServer`](crate::NatsServer): a tiny shell process in its own process group that
//! waits for EOF on its stdin — we closed the pipe, or our process died, even by SIGKILL —
//! then runs a server-specific script that stops the server and removes its directory.
//! A `static` instance, which is never dropped, is cleaned up this way too.

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use crate::{Result, TestkitError};

/// A running watchdog; [`Watchdog::release`] lets it clean up now.
pub(crate) struct Watchdog {
    child: Child,
    /// The write end of its pipe: closing it triggers the clean-up.
    stdin: ChildStdin,
}

impl Watchdog {
    /// Starts `/bin/sh -c script name root` (`$1` is `root` in the script).
    pub(crate) fn spawn(script: &str, name: &str, root: &Path) -> Result<Watchdog> {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(name)
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| TestkitError::io("starting the clean-up watchdog (/bin/sh)", e))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| TestkitError::Usage("the watchdog has no stdin pipe".into()))?;
        Ok(Watchdog { child, stdin })
    }

    /// Closes the pipe and waits (at most 5 s) for the clean-up to finish.
    pub(crate) fn release(self) {
        let Watchdog { mut child, stdin } = self;
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Locks a mutex, recovering from poisoning (the guarded data stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
