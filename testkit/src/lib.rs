//! # twopc testkit
//!
//! Support for tests and the demo: real services, started privately and thrown away.
//!
//! * [`PgCluster`]: a private PostgreSQL cluster (own data directory, port and socket
//!   directory, `max_prepared_transactions = 64`, `fsync = off`) that can be SIGKILLed
//!   and restarted on the same directory and port — crash recovery keeps its prepared
//!   transactions. Dropping it stops the server and removes the directory; a watchdog
//!   process does the same if the test process dies without dropping it (a `static`
//!   cluster shared by a test binary, a panic=abort, a SIGKILL).
//! * [`EtcdCluster`]: a private etcd cluster of one or three members on loopback (own data
//!   directories and ports), whose members can be SIGKILLed and restarted; cleaned up
//!   like the PostgreSQL cluster, by `Drop` or by a watchdog.
//! * [`participant::TestParticipant`]: a participant without the SDK (unary and batched
//!   calls) whose answers a [`participant::Behaviour`] gives, for tests and benchmarks of
//!   the coordinator alone.
//! * [`amqp::take_all`]: every message a RabbitMQ queue holds, with its message id.
//! * [`wait::eventually`]: a condition awaited, bounded, failing with what it waited for.
//! * [`requests`]: the coordinator requests tests send most (a Commit, a
//!   GetTransaction), with the fields a test does not vary filled in once.
//! * [`free_port`]: a TCP port below 32768 that nothing listens on.
//! * [`unique_name`]: a name no other test (in this or another process) uses, for
//!   per-test databases, queues and streams.
//! * [`prepared_transactions_enabled`]: whether a PostgreSQL server can run
//!   `PREPARE TRANSACTION` (the demo starts a private cluster when it cannot).
//!
//! Everything here reports failures as [`TestkitError`], whose messages name what is
//! missing and how to get it ("initdb not found at ...; install postgresql").

pub mod amqp;
pub mod etcd;
mod launch;
pub mod nats;
pub mod participant;
mod pg;
pub mod proxy;
pub mod requests;
pub mod wait;
mod watchdog;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use etcd::EtcdCluster;
pub use nats::{NatsServer, NatsServerOptions};
pub use pg::{PgCluster, PgClusterOptions};
pub use proxy::{Direction, Fault, FaultProxy, FaultProxyOptions, ProxyStats};

/// What can go wrong starting or driving a test service.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A program the testkit needs is not installed.
    #[error("{name} not found at {}; {hint}", path.display())]
    MissingBinary {
        /// The program (e.g. `initdb`).
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A program ran but failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// What was being done.
        what: String,
        /// Exit status and output (or the tail of the server log).
        detail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}{}", if .detail.is_empty() { String::new() } else { format!("; {}", .detail) })]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        after: Duration,
        /// Diagnostics (the tail of the server log, say).
        detail: String,
    },
    /// A PostgreSQL connection or statement failed.
    #[error("{what}: {source}")]
    Postgres {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No TCP port in the searched range could be bound.
    #[error("no free TCP port found in {from}..{to} on 127.0.0.1")]
    NoFreePort {
        /// First port tried.
        from: u16,
        /// End of the range (exclusive).
        to: u16,
    },
    /// The testkit was used wrongly (a bad database name, a restart of a running server).
    #[error("{0}")]
    Usage(String),
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TestkitError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with [`TestkitError`].
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;

/// Ports handed out are taken from here (below the ephemeral range, which starts at
/// 32768 on Linux, and clear of RabbitMQ's CLI range 35672-35682).
const PORT_RANGE: (u16, u16) = (20000, 32000);

/// A random 64-bit number (std's per-process random hash keys, mixed with the clock and a
/// counter). Not cryptographic; enough to keep concurrent test processes apart.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

/// Ports this process already handed out (never handed out twice, so two clusters
/// started concurrently in one test binary cannot pick the same one).
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A TCP port in 20000..32000 that could be bound on 127.0.0.1 just now and was not
/// handed out before by this process. The search starts at a random port, so concurrent
/// test processes rarely collide; a server that still fails to bind should retry with
/// another port (as [`PgCluster::start`] does).
pub fn try_free_port() -> Result<u16> {
    let (from, to) = PORT_RANGE;
    let span = u64::from(to - from);
    let start = random_u64() % span;
    let mut taken = handed_out().lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..span {
        let port = from + ((start + i) % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    Err(TestkitError::NoFreePort { from, to })
}

/// Like [`try_free_port`].
///
/// # Panics
/// When no port in 20000..32000 is free (the machine is out of ports; nothing a test
/// could do about it).
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// `prefix` + this process id + a per-process counter + a random suffix, e.g.
/// `orders_4711_3_9f2c1a`: unique across tests and concurrent test processes. Lower-case
/// ASCII letters, digits and `_` only (a valid unquoted PostgreSQL identifier, RabbitMQ
/// queue and NATS stream name as long as `prefix` is one); keep `prefix` under 32
/// characters so the name stays within PostgreSQL's 63-byte identifier limit.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{prefix}_{}_{n}_{:06x}",
        std::process::id(),
        random_u64() & 0xff_ffff
    )
}

/// Whether the PostgreSQL server at `url` (libpq key-value or URL form, e.g.
/// `host=127.0.0.1 port=5432 user=postgres dbname=postgres`) has
/// `max_prepared_transactions > 0`, i.e. can run `PREPARE TRANSACTION`. Connecting is
/// bounded by 5 s; an unreachable server is an error (not `false`).
pub async fn prepared_transactions_enabled(url: &str) -> Result<bool> {
    let client = pg::connect(url, Duration::from_secs(5)).await?;
    let row = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .map_err(|source| TestkitError::Postgres {
            what: format!("SHOW max_prepared_transactions on {url}"),
            source,
        })?;
    let value: String = row.try_get(0).map_err(|source| TestkitError::Postgres {
        what: "reading max_prepared_transactions".into(),
        source,
    })?;
    let n: i64 = value.trim().parse().map_err(|_| {
        TestkitError::Usage(format!(
            "max_prepared_transactions on {url} is {value:?}, not a number"
        ))
    })?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_identifiers() {
        let a = unique_name("Orders-DB");
        let b = unique_name("Orders-DB");
        assert_ne!(a, b);
        assert!(a.starts_with("orders_db_"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{a}"
        );
        assert!(a.len() < 63);
    }

    #[test]
    fn free_ports_are_in_range_and_distinct() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!((20000..32000).contains(&p), "{p}");
        }
    }
}
