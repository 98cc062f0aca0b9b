//! PostgreSQL branches: [`PgResource`] and [`PgBranch`].
//!
//! A [`PgResource`] wraps a `deadpool_postgres` pool on one database. Each transaction
//! that uses it gets one branch: a pooled connection with a `BEGIN` block, on which the
//! application runs its statements ([`PgBranch::execute`], [`PgBranch::query`]). The block
//! is opened by the branch's first statement: `BEGIN` is sent with it, in the same write.
//! The coordinator then drives the branch through the [`Resource`] methods:
//!
//! | step          | SQL                                                          |
//! |---------------|--------------------------------------------------------------|
//! | prepare       | `SELECT txid_current_if_assigned(); PREPARE TRANSACTION '<gid>'` on the branch's connection (one round trip), then the connection goes back to the pool |
//! | commit        | `COMMIT PREPARED '<gid>'` on any pooled connection; SQLSTATE 42704 (no such gid) means already committed |
//! | abort         | `ROLLBACK` on the branch's connection if still open, else `ROLLBACK PREPARED '<gid>'` (42704: nothing left to abort; with the outbox, a branch unknown here is then looked up in `twopc_one_phase`) |
//! | one phase     | `SELECT txid_current_if_assigned()` then `COMMIT` on the branch's connection (just `COMMIT` — with the deferred statements, the outbox rows, the marker and, if no statement ran yet, `BEGIN` in front, in one round trip — when no statement failed or was cancelled and either an outbox insert already returned the transaction id or the outbox's marker settles a lost answer) |
//! | in doubt      | `SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'twopc:%' AND database = current_database()` |
//!
//! The application's statements are prepared once per connection (at most 256 kept per
//! connection), so running the same SQL again is one round trip. A statement whose answer
//! the application does not need before the commit can be queued with
//! [`PgBranch::defer`]: it goes out with the branch's next statement, prepare or commit,
//! so a local transaction that defers its writes commits in one round trip. [`PgBranch::publish`]
//! stages a message in the branch's own transaction instead of enlisting a broker branch
//! (see [`crate::outbox`]).
//!
//! The gid is `twopc:<tx_id>:<branch_id>` (under 200 bytes; never reused, because
//! transaction ids are not), so a prepared transaction can be found and finished from the
//! database alone after any restart.
//!
//! ## Votes
//! * **No** with the database's message and SQLSTATE when the branch cannot be prepared:
//!   a statement failed and left the transaction aborted (rolling back to a savepoint
//!   recovers it, as in plain PostgreSQL), or `PREPARE TRANSACTION` itself failed
//!   (a deferred constraint, a serialization failure, temporary tables / `WITH HOLD`
//!   cursors / `LISTEN`, `max_prepared_transactions` exhausted), or the branch is unknown.
//! * **Read-only** when the branch wrote nothing (no transaction id was assigned): it is
//!   finished at prepare and takes no part in phase two.
//! * The `SELECT txid_current_if_assigned()` in front of `PREPARE TRANSACTION` is what
//!   makes a yes vote trustworthy: in an aborted block PostgreSQL would answer
//!   `PREPARE TRANSACTION` with a silent rollback, not an error.
//!
//! ## Failure handling
//! * Phase-one and phase-two work runs in its own task, so a coordinator RPC that times
//!   out cannot cut a `PREPARE` or `COMMIT PREPARED` in half.
//! * A connection that saw an error (or whose state is uncertain) is closed, never
//!   returned to the pool; closing it rolls back whatever was open on it.
//! * Losing the connection during `PREPARE TRANSACTION` votes no; a later abort then
//!   issues `ROLLBACK PREPARED` in case the prepare did happen (and recovery finds such a
//!   gid anyway). Losing it during a one-phase `COMMIT` is resolved, with the outbox, by
//!   the commit's marker: a *fence* row inserted under the gid unless the marker is there
//!   (waiting for a commit that inserted its marker but has not ended) answers "committed"
//!   or "refused" for good — a `COMMIT` still on its way fails on the fence. Without the
//!   outbox, with `txid_status(xid)`. While PostgreSQL cannot tell yet, the commit answers
//!   "retry".
//! * Connection failures at commit / abort / in-doubt listing are `Err(Retry)`: the
//!   coordinator (or recovery) tries again.
//!
//! ## Limits
//! * A one-phase commit whose reply is lost *and* whose participant process restarts
//!   before the coordinator retries is answered "refused" (the branch is unknown after
//!   the restart) — unless the resource has the outbox ([`PgResource::enable_outbox`]):
//!   then every one-phase `COMMIT` is preceded, in the same transaction, by a marker row
//!   in `twopc_one_phase`, and the repeated commit finds it and answers "committed" (or,
//!   without it, fences the gid and answers "refused": a `COMMIT` the old process sent
//!   that PostgreSQL has not run yet then fails). The marker is deleted once the transaction's owner in this process knows that the
//!   coordinator holds the outcome durably (its Commit answer, followed — when the
//!   coordinator answered before its record was durable — by a `Barrier` of the same
//!   coordinator epoch; see [`crate::client`]), or after
//!   `OutboxOptions::marker_retention`. A restarted coordinator that lost the outcome
//!   asks with an abort instead, which the marker answers "already committed". Without the outbox this is the usual heuristic
//!   hazard of one-phase commit; disable the coordinator's one-phase optimisation if it
//!   matters.
//! * An abort answers [`AbortOutcome::AlreadyCommitted`] for a branch that committed (in
//!   one phase, or a committed prepared branch; nothing is undone) and
//!   [`AbortOutcome::Aborted`] otherwise. A restarted coordinator settles a one-phase
//!   commit this way. A branch this process no longer holds (it restarted, or forgot the
//!   branch among more than 10 000 finished ones) is known to have committed in one phase
//!   only through its marker, so with the outbox; without it such an abort answers
//!   `Aborted` even if the one-phase commit happened — the same hazard as above.
//! * `in_doubt` lists every `twopc:` gid in the database whose branch id names this
//!   resource (`<any service>:<name>`); a gid of another service that uses the same
//!   resource name on the same database is resolved from the coordinator's decision too.
//! * The application must not end the transaction block itself (`COMMIT`, `ROLLBACK`,
//!   `END`, `PREPARE TRANSACTION`, ...): [`PgBranch`] refuses such statements.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, SimpleQueryMessage, Statement};
use tracing::{debug, warn};

use crate::broker::{Broker, PublishOptions};
use crate::client::{validate_name, Transaction};
use crate::error::{Error, Result};
use crate::lock;
use crate::outbox::{
    encode_headers, OutboxOptions, Pending, Relay, ONE_PHASE_FENCE, ONE_PHASE_MARK, OUTBOX_DDL,
    OUTBOX_INSERT,
};
use crate::resource::{AbortOutcome, BranchKind, OnePhase, Resource, Retry, Vote};
use crate::staging::StagedMessage;

/// Every gid this adapter prepares starts with this.
pub const GID_PREFIX: &str = "twopc:";

/// PostgreSQL's limit on a gid is 200 bytes including the terminating NUL.
const MAX_GID_BYTES: usize = 199;

/// How many finished branches are remembered (so a repeated or late prepare / commit /
/// one-phase commit gets the same answer).
const REMEMBER_FINISHED: usize = 10_000;

/// Longest `OutboxOptions::publish_linger`.
const MAX_PUBLISH_LINGER: Duration = Duration::from_secs(1);

/// Largest `OutboxOptions::publish_window`.
const MAX_PUBLISH_WINDOW: usize = 1_000_000;

/// Bound on waiting for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// Bound on one phase-one / phase-two statement.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL database taking part in transactions (branch kind: database).
///
/// Create it with [`PgResource::new`] (or [`PgResource::from_url`]), register it with
/// [`TwoPc::register`](crate::TwoPc::register), and open branches with
/// [`PgResource::begin`] or [`Transaction::postgres`].
pub struct PgResource {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    pool: Pool,
    branches: StdMutex<Branches>,
    /// The relay of messages staged in the database (see [`crate::outbox`]), once
    /// [`PgResource::enable_outbox`] ran.
    outbox: OnceLock<Relay>,
}

type Key = (String, String);

#[derive(Default)]
struct Branches {
    /// Open, prepared and recently finished branches.
    map: HashMap<Key, Arc<Slot>>,
    /// Finished branches, oldest first (bounded; the oldest are forgotten).
    finished: VecDeque<Key>,
}

/// One branch's state, shared by the resource and the application's [`PgBranch`]
/// handles.
struct Slot {
    tx_id: String,
    branch_id: String,
    gid: String,
    state: Arc<Mutex<State>>,
    /// When the branch was opened: recovery looks at open branches only once they are
    /// this old, to leave the application time to use them.
    opened_at: std::time::Instant,
    /// Messages staged in the outbox table by this branch, published once it commits.
    outbox: StdMutex<Vec<Pending>>,
    /// How many messages the branch staged (the next one's index; never reused, even
    /// when a savepoint rolled one back).
    published: AtomicUsize,
    /// The publishing of those messages, once the branch committed.
    publishing: StdMutex<Option<JoinHandle<()>>>,
}

enum State {
    /// Being opened (or the opening was interrupted).
    Opening,
    /// Could not be opened.
    Broken(String),
    /// The branch holds `conn`; statements may run. The transaction block is opened
    /// lazily: `BEGIN` goes out with the first statement (see [`in_block`]).
    Open {
        conn: OpenConn,
        last_error: Option<String>,
        /// The transaction's id, once a statement of the SDK learned it (the outbox
        /// insert returns it, and a local transaction's block asks for it with `BEGIN`):
        /// a one-phase commit then needs no query to learn it.
        xid: Option<i64>,
        /// `BEGIN` ran on `conn`.
        begun: bool,
        /// Messages published but not written yet: their rows go out with the branch's
        /// next statement, or with its commit or prepare, in the same round trip.
        unwritten: Vec<Unwritten>,
        /// The branch belongs to a local transaction (it will commit in one phase): its
        /// block learns the xid as it begins, so the commit needs no query for it.
        learn_xid: bool,
        /// Statements [`PgBranch::defer`] queued, not sent yet: they go out in front of
        /// the branch's next statement, or with its commit or prepare, in the same round
        /// trip.
        deferred: Vec<Deferred>,
    },
    /// `PREPARE TRANSACTION` succeeded; waiting for phase two.
    Prepared,
    /// Voted no. `maybe_prepared`: the connection was lost during `PREPARE TRANSACTION`,
    /// so the gid may exist after all.
    VotedNo {
        reason: String,
        maybe_prepared: bool,
    },
    /// Wrote nothing; finished at prepare.
    ReadOnly,
    /// `COMMIT PREPARED` done.
    Committed,
    /// Committed in one phase.
    OnePhaseCommitted,
    /// One-phase commit refused (rolled back).
    OnePhaseRefused(String),
    /// The connection was lost during a one-phase `COMMIT`. With the outbox its marker
    /// (or a fence, see [`ONE_PHASE_FENCE`]) settles the outcome; without it, `xid`
    /// does once PostgreSQL knows it (`None`: the branch wrote nothing).
    OnePhaseUnknown { xid: Option<i64> },
    /// Rolled back.
    Aborted,
}

/// The parameters of a statement [`PgBranch::defer`] queued: owned, since the statement
/// runs after the call returns.
pub type DeferredParams = Vec<Box<dyn ToSql + Send + Sync>>;

/// A statement [`PgBranch::defer`] queued.
struct Deferred {
    sql: String,
    params: DeferredParams,
}

/// A message [`PgBranch::publish`] staged, whose row is not written yet.
struct Unwritten {
    broker: String,
    message: StagedMessage,
    /// `message.headers`, encoded for the row.
    headers: Option<String>,
}

/// The connection of an open branch: a transaction is in progress on it. If the branch is
/// dropped while open (its resource dropped, its state replaced without going through
/// prepare/commit/abort), the connection is closed — PostgreSQL rolls the transaction
/// back — and never returned to the pool, where the next user would otherwise run inside
/// this abandoned transaction and commit its writes.
struct OpenConn(Option<Box<Object>>);

impl OpenConn {
    /// Takes the connection out; the caller now owns finishing its transaction.
    fn into_inner(mut self) -> Object {
        match self.0.take() {
            Some(c) => *c,
            // Only `Drop` empties it, and nothing runs after `Drop`.
            None => unreachable!("an OpenConn is emptied only by into_inner or drop"),
        }
    }
}

impl std::ops::Deref for OpenConn {
    type Target = Object;
    fn deref(&self) -> &Object {
        match &self.0 {
            Some(c) => c,
            None => unreachable!("an OpenConn is emptied only by into_inner or drop"),
        }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            discard(*conn);
        }
    }
}

impl State {
    fn is_terminal(&self) -> bool {
        matches!(
            self,
            State::Broken(_)
                | State::VotedNo { .. }
                | State::ReadOnly
                | State::Committed
                | State::OnePhaseCommitted
                | State::OnePhaseRefused(_)
                | State::Aborted
        )
    }

    /// Why statements can no longer run (for usage errors).
    fn describe(&self) -> String {
        match self {
            State::Opening => "not open (opening it was interrupted)".into(),
            State::Broken(m) => format!("not open ({m})"),
            State::Open { .. } => "open".into(),
            State::Prepared => "already prepared (the transaction is committing)".into(),
            State::VotedNo { reason, .. } => format!("rolled back at prepare ({reason})"),
            State::ReadOnly => "finished (read-only)".into(),
            State::Committed | State::OnePhaseCommitted => "already committed".into(),
            State::OnePhaseRefused(m) => format!("rolled back at commit ({m})"),
            State::OnePhaseUnknown { .. } => "committing".into(),
            State::Aborted => "aborted".into(),
        }
    }
}

/// A prepared branch of this resource still in the database (for operators: it holds
/// its locks and holds back VACUUM until it is resolved).
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedBranch {
    /// The PostgreSQL gid (`twopc:<tx_id>:<branch_id>`).
    pub gid: String,
    /// The transaction id.
    pub tx_id: String,
    /// The branch id (`<service>:<resource>`).
    pub branch_id: String,
    /// How long ago it was prepared.
    pub age: Duration,
}

impl PgResource {
    /// A resource named `name` (1-64 characters of `A-Za-z0-9._-`; branch ids become
    /// `<service>:<name>`) over `pool`. Connects once to check that the server has
    /// `max_prepared_transactions > 0` and fails with a message saying how to enable it
    /// otherwise.
    pub async fn new(name: &str, pool: Pool) -> Result<Arc<PgResource>> {
        validate_name("resource", name, 64)?;
        let conn = get_conn(&pool)
            .await
            .map_err(|e| Error::resource(name, format!("cannot connect to PostgreSQL: {e}")))?;
        let msgs = conn
            .simple_query("SHOW max_prepared_transactions")
            .await
            .map_err(|e| {
                Error::resource(
                    name,
                    format!("SHOW max_prepared_transactions failed: {}", describe(&e)),
                )
            })?;
        let value = first_cell(&msgs).flatten().unwrap_or_default();
        let n: i64 = value.trim().parse().map_err(|_| {
            Error::resource(
                name,
                format!("SHOW max_prepared_transactions returned {value:?}, not a number"),
            )
        })?;
        if n <= 0 {
            return Err(Error::resource(
                name,
                format!(
                    "max_prepared_transactions is {n} on this PostgreSQL server, so it cannot run PREPARE TRANSACTION \
                     and cannot take part in two-phase commit. Enable it: `ALTER SYSTEM SET max_prepared_transactions \
                     = 64;` (at least the number of transactions that may be prepared at once; max_connections is a \
                     safe choice) and restart PostgreSQL (the setting only changes at server start, e.g. \
                     `pg_ctlcluster 15 main restart`)"
                ),
            ));
        }
        drop(conn);
        Ok(Arc::new(PgResource {
            inner: Arc::new(Inner {
                name: name.to_string(),
                pool,
                branches: StdMutex::new(Branches::default()),
                outbox: OnceLock::new(),
            }),
        }))
    }

    /// [`PgResource::new`] over a new pool of at most `max_connections` connections to
    /// `url` (libpq key-value or URL form, no TLS), e.g.
    /// `host=127.0.0.1 port=5432 user=postgres dbname=orders`.
    pub async fn from_url(
        name: &str,
        url: &str,
        max_connections: usize,
    ) -> Result<Arc<PgResource>> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Usage(format!("PostgreSQL URL {url:?} is malformed: {e}")))?;
        let manager = deadpool_postgres::Manager::new(config, NoTls);
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(|e| Error::resource(name, format!("cannot build a connection pool: {e}")))?;
        Self::new(name, pool).await
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Lets branches of this resource publish through `broker` with
    /// [`PgBranch::publish`]: creates the `twopc_outbox` table if it is missing, starts
    /// the resource's relay (first call; `options` must be the same on later calls) and
    /// sweeps the rows of `broker` that an earlier run left behind. See
    /// [`crate::outbox`].
    pub async fn enable_outbox<B: Broker>(
        &self,
        broker: Arc<B>,
        options: OutboxOptions,
    ) -> Result<()> {
        if options.sweep_interval.is_zero() || options.sweep_after.is_zero() {
            return Err(Error::Usage(
                "outbox sweep_interval and sweep_after must be greater than zero".into(),
            ));
        }
        if !(1..=MAX_PUBLISH_WINDOW).contains(&options.publish_window) {
            return Err(Error::Usage(format!(
                "outbox publish_window must be between 1 and {MAX_PUBLISH_WINDOW}"
            )));
        }
        if options.publish_linger > MAX_PUBLISH_LINGER {
            return Err(Error::Usage(format!(
                "outbox publish_linger must be at most {MAX_PUBLISH_LINGER:?}"
            )));
        }
        let differs = |relay: &Relay| {
            (relay.options() != &options).then(|| {
                Error::Usage(format!(
                    "the outbox of PostgreSQL resource {} already runs with {:?}",
                    self.inner.name,
                    relay.options()
                ))
            })
        };
        if let Some(e) = self.inner.outbox.get().and_then(differs) {
            return Err(e);
        }
        let conn = get_conn(&self.inner.pool)
            .await
            .map_err(|e| Error::resource(&self.inner.name, e))?;
        if let Err(e) = conn.batch_execute(OUTBOX_DDL).await {
            // Two processes creating the table at once: one of them gets a unique
            // violation on the catalog; the table exists either way.
            let raced = e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                || e.code() == Some(&SqlState::DUPLICATE_TABLE);
            if !raced {
                return Err(Error::resource(
                    &self.inner.name,
                    format!(
                        "cannot create the outbox table twopc_outbox: {}",
                        describe(&e)
                    ),
                ));
            }
        }
        drop(conn);
        let relay = self.inner.outbox.get_or_init(|| {
            Relay::start(&self.inner.name, self.inner.pool.clone(), options.clone())
        });
        // A concurrent first call may have started it with other options.
        if let Some(e) = differs(relay) {
            return Err(e);
        }
        relay.attach(broker);
        Ok(())
    }

    /// How many messages wait in the outbox table (committed and not yet confirmed by a
    /// broker, or still part of an open or prepared transaction: those are not counted,
    /// the table's uncommitted rows are invisible).
    pub async fn outbox_backlog(&self) -> Result<i64> {
        let conn = get_conn(&self.inner.pool)
            .await
            .map_err(|e| Error::resource(&self.inner.name, e))?;
        let row = conn
            .query_one("SELECT count(*) FROM twopc_outbox", &[])
            .await
            .map_err(|e| Error::resource(&self.inner.name, describe(&e)))?;
        row.try_get(0)
            .map_err(|e| Error::resource(&self.inner.name, e.to_string()))
    }

    /// Registers a new branch (state `Opening`, locked by the returned guard).
    fn new_slot(
        &self,
        b: &mut Branches,
        key: &Key,
        branch_id: String,
        gid: String,
    ) -> Result<(Arc<Slot>, tokio::sync::OwnedMutexGuard<State>)> {
        let state = Arc::new(Mutex::new(State::Opening));
        let guard = state
            .clone()
            .try_lock_owned()
            .map_err(|_| Error::Usage("a fresh branch lock was taken".into()))?;
        let slot = Arc::new(Slot {
            tx_id: key.0.clone(),
            branch_id,
            gid,
            state,
            opened_at: std::time::Instant::now(),
            outbox: StdMutex::new(Vec::new()),
            published: AtomicUsize::new(0),
            publishing: StdMutex::new(None),
        });
        b.map.insert(key.clone(), slot.clone());
        Ok((slot, guard))
    }

    /// Opens (enlists) this resource's branch of `tx`: enlists it with the coordinator
    /// while it takes a pooled connection (`BEGIN` goes out with the branch's first
    /// statement, so it costs no round trip of its own). There is at most one branch per
    /// transaction and resource: a second call returns a handle on the same branch.
    pub async fn begin(&self, tx: &Transaction) -> Result<PgBranch> {
        let branch_id = tx.branch_id(self);
        let gid = gid_for(tx.id(), &branch_id).map_err(Error::Usage)?;
        let key: Key = (tx.id().to_string(), branch_id.clone());
        let opening = {
            let mut b = lock(&self.inner.branches);
            match b.map.get(&key) {
                Some(slot) => Err(slot.clone()),
                None => Ok(self.new_slot(&mut b, &key, branch_id, gid)?),
            }
        };
        let (slot, mut guard) = match opening {
            Ok(new) => new,
            Err(slot) => {
                // The same branch again (its enlisting is cached; a finished
                // transaction's is refused by the coordinator).
                tx.enlist(self).await?;
                return Ok(PgBranch {
                    inner: self.inner.clone(),
                    slot,
                });
            }
        };
        // Enlisting (a coordinator round trip) and taking a connection at once. `BEGIN`
        // waits for the first statement, which it goes out with (no round trip of its own).
        let opened = async {
            let conn = get_conn(&self.inner.pool).await?;
            // Closed, never pooled, if the branch is dropped while open.
            Ok::<_, String>(OpenConn(Some(Box::new(conn))))
        };
        let (enlisted, opened) = tokio::join!(tx.enlist(self), opened);
        let failure = match (enlisted, opened) {
            (Ok(_), Ok(conn)) => {
                *guard = State::Open {
                    conn,
                    last_error: None,
                    xid: None,
                    begun: false,
                    unwritten: Vec::new(),
                    learn_xid: tx.is_local(),
                    deferred: Vec::new(),
                };
                return Ok(PgBranch {
                    inner: self.inner.clone(),
                    slot,
                });
            }
            (Err(e), _) => e,
            (Ok(_), Err(e)) => {
                Error::resource(&self.inner.name, format!("cannot open a branch: {e}"))
            }
        };
        *guard = State::Broken(failure.to_string());
        drop(guard);
        lock(&self.inner.branches).map.remove(&key);
        Err(failure)
    }

    /// This resource's prepared branches still in the database, oldest first.
    pub async fn prepared(&self) -> Result<Vec<PreparedBranch>> {
        let conn = get_conn(&self.inner.pool)
            .await
            .map_err(|e| Error::resource(&self.inner.name, e))?;
        let rows = conn
            .query(
                "SELECT gid, EXTRACT(EPOCH FROM (now() - prepared))::float8 FROM pg_prepared_xacts \
                 WHERE gid LIKE 'twopc:%' AND database = current_database() ORDER BY prepared",
                &[],
            )
            .await
            .map_err(|e| Error::resource(&self.inner.name, describe(&e)))?;
        let mut out = Vec::new();
        for row in rows {
            let gid: String = row
                .try_get(0)
                .map_err(|e| Error::resource(&self.inner.name, e))?;
            let secs: f64 = row
                .try_get(1)
                .map_err(|e| Error::resource(&self.inner.name, e))?;
            if let Some((tx_id, branch_id)) = parse_gid(&gid) {
                if names_resource(&branch_id, &self.inner.name) {
                    out.push(PreparedBranch {
                        gid,
                        tx_id,
                        branch_id,
                        age: Duration::from_secs_f64(secs.max(0.0)),
                    });
                }
            }
        }
        Ok(out)
    }

    /// How many of this resource's branches are prepared in the database right now.
    pub async fn prepared_count(&self) -> Result<i64> {
        Ok(self.prepared().await?.len() as i64)
    }

    /// Age of this resource's oldest prepared branch, if any (alert when it grows: a
    /// prepared transaction holds locks and holds back VACUUM).
    pub async fn oldest_prepared_age(&self) -> Result<Option<Duration>> {
        Ok(self.prepared().await?.first().map(|p| p.age))
    }
}

impl Transaction {
    /// Opens `pg`'s branch of this transaction (sugar for [`PgResource::begin`]).
    pub async fn postgres(&self, pg: &PgResource) -> Result<PgBranch> {
        pg.begin(self).await
    }
}

/// The application's handle on one open PostgreSQL branch: its statements run on the
/// branch's own connection, inside its `BEGIN` block. Cheap to clone; every handle of a
/// transaction and resource is the same branch.
///
/// Once the branch is prepared or finished, statements fail with [`Error::Usage`]. A
/// failing statement returns [`Error::Resource`] with the database's message and
/// SQLSTATE; the transaction is then aborted in PostgreSQL (unless the application rolls
/// back to a savepoint), so the branch would vote no.
#[derive(Clone)]
pub struct PgBranch {
    inner: Arc<Inner>,
    slot: Arc<Slot>,
}

impl std::fmt::Debug for PgBranch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBranch")
            .field("gid", &self.slot.gid)
            .finish_non_exhaustive()
    }
}

impl PgBranch {
    /// The transaction id.
    pub fn tx_id(&self) -> &str {
        &self.slot.tx_id
    }

    /// The branch id (`<service>:<resource>`).
    pub fn branch_id(&self) -> &str {
        &self.slot.branch_id
    }

    /// The gid it is prepared under.
    pub fn gid(&self) -> &str {
        &self.slot.gid
    }

    /// Runs one statement; returns the number of rows it affected.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        match self.run(sql, params, Kind::Execute).await? {
            Out::Count(n) => Ok(n),
            _ => Err(self.internal("execute")),
        }
    }

    /// Queues a statement whose answer the application does not need before the commit
    /// (an `INSERT`, an `UPDATE` whose row count does not matter): it goes out in front of
    /// the branch's next statement, or with its commit or prepare, in the same round trip
    /// — so a local transaction whose writes are all deferred commits in **one** round
    /// trip to PostgreSQL (`BEGIN`, the statements, the outbox rows, the one-phase marker
    /// and `COMMIT`). Deferred statements run in the order they were queued, in front of
    /// messages published since the last statement.
    ///
    /// A deferred statement that fails fails what it went out with: the next statement
    /// (with the deferred statement's error), or the commit (refused, nothing committed:
    /// [`Error::Aborted`] with the reason), or the prepare (a no
    /// vote). Errors only when the branch is no longer open or the statement would end
    /// the transaction block.
    pub async fn defer(&self, sql: &str, params: DeferredParams) -> Result<()> {
        check_statement(sql)?;
        let mut state = self.slot.state.lock().await;
        let State::Open { deferred, .. } = &mut *state else {
            return Err(self.not_open(&state));
        };
        deferred.push(Deferred {
            sql: sql.to_string(),
            params,
        });
        Ok(())
    }

    /// Runs one query; returns its rows.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        match self.run(sql, params, Kind::Query).await? {
            Out::Rows(rows) => Ok(rows),
            _ => Err(self.internal("query")),
        }
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        match self.run(sql, params, Kind::QueryOne).await? {
            Out::Row(row) => Ok(row),
            _ => Err(self.internal("query_one")),
        }
    }

    fn internal(&self, what: &str) -> Error {
        Error::resource(
            &self.inner.name,
            format!("internal error: {what} got the wrong kind of result"),
        )
    }

    /// Runs one of the application's statements on the branch's connection (prepared once
    /// per connection). The rows of messages published since the last statement go out in
    /// front of it (and, for a local transaction's first statement, `BEGIN` and the query
    /// of the xid), all in one round trip. After a `ROLLBACK TO SAVEPOINT`, forgets the
    /// staged messages whose rows it rolled back.
    async fn run(&self, sql: &str, params: &[&(dyn ToSql + Sync)], kind: Kind) -> Result<Out> {
        check_statement(sql)?;
        let mut state = self.slot.state.lock().await;
        let State::Open {
            conn,
            last_error,
            begun,
            xid,
            unwritten,
            learn_xid,
            deferred,
        } = &mut *state
        else {
            return Err(self.not_open(&state));
        };
        let before = last_error.replace(UNREAD.into());
        let conn: &Object = conn;
        let learn = *learn_xid && !*begun && xid.is_none();
        // Prepared before anything is queued, so that everything goes out in order.
        let ready = async {
            let txid = match learn {
                true => Some(prepared(conn, TXID_CURRENT).await?),
                false => None,
            };
            let later = prepare_deferred(conn, deferred).await?;
            Ok::<_, tokio_postgres::Error>((txid, later, insert_for(conn, unwritten).await?))
        };
        let (txid, later, insert) = match ready.await {
            Ok(stmts) => stmts,
            Err(e) => return self.finish(&mut state, before, Err(e)),
        };
        let writes = std::mem::take(unwritten);
        let queued = std::mem::take(deferred);
        let statement = async {
            let stmt = prepared(conn, sql).await?;
            Ok(match kind {
                Kind::Execute => Out::Count(conn.execute(&stmt, params).await?),
                Kind::Query => Out::Rows(conn.query(&stmt, params).await?),
                Kind::QueryOne => Out::Row(conn.query_one(&stmt, params).await?),
            })
        };
        // The xid query, the deferred statements, the rows, then the statement: `join4`
        // polls them in that order, and each is queued when first polled.
        let all = async {
            Ok(futures::future::join4(
                learn_xid_of(conn, txid.as_ref()),
                run_deferred(conn, &later, &queued),
                write_rows(conn, insert.as_ref(), &self.slot.gid, &writes),
                statement,
            )
            .await)
        };
        let res = match in_block(conn, begun, all).await {
            Err(e) => Err(e),
            // The deferred statement's error, not the "transaction is aborted" it caused.
            Ok((_, Err(e), _, _)) => Err(e),
            Ok((learned, Ok(()), written, out)) => {
                match take_written(&self.slot, writes, written) {
                    Ok(wrote) => {
                        if let Some(x) = wrote.or(learned) {
                            *xid = Some(x);
                        }
                        out
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let out = self.finish(&mut state, before, res)?;
        if rolls_back_to_savepoint(sql) {
            self.forget_rolled_back(&mut state).await?;
        }
        Ok(out)
    }

    /// Keeps only the staged messages whose rows are still in the transaction.
    async fn forget_rolled_back(&self, state: &mut State) -> Result<()> {
        let ids: Vec<i64> = lock(&self.slot.outbox).iter().map(|p| p.row).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let State::Open {
            conn, last_error, ..
        } = state
        else {
            return Ok(());
        };
        let before = last_error.replace(UNREAD.into());
        let res = conn
            .query("SELECT id FROM twopc_outbox WHERE id = ANY($1)", &[&ids])
            .await;
        let rows = self.finish(state, before, res)?;
        let kept: std::collections::HashSet<i64> =
            rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        lock(&self.slot.outbox).retain(|p| kept.contains(&p.row));
        Ok(())
    }

    /// Publishes a message through `broker` as part of this branch: the message is staged
    /// in the `twopc_outbox` table inside the branch's transaction, so it commits or rolls
    /// back with the branch's rows and no broker branch is enlisted (a transaction whose
    /// only branch is this one commits in one phase). Once the branch has committed, the
    /// resource's relay publishes it (see [`crate::outbox`]). `broker` must have been
    /// attached with [`PgResource::enable_outbox`]. Returns the message id,
    /// `<tx_id>:<branch_id>:<index>`.
    ///
    /// The row is written with the branch's next statement, or with its commit (or
    /// prepare), in the same round trip: publishing costs no round trip of its own. A
    /// failure to write it therefore surfaces there: that statement fails with the
    /// insert's error, or the commit is refused (the prepare votes no).
    pub async fn publish<B: Broker>(
        &self,
        broker: &B,
        destination: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<String> {
        self.publish_with(broker, destination, payload, PublishOptions::default())
            .await
    }

    /// [`PgBranch::publish`] with headers and a content type.
    pub async fn publish_with<B: Broker>(
        &self,
        broker: &B,
        destination: &str,
        payload: impl Into<Vec<u8>>,
        options: PublishOptions,
    ) -> Result<String> {
        let attached = self
            .inner
            .outbox
            .get()
            .is_some_and(|relay| relay.has(broker.name()));
        if !attached {
            return Err(Error::Usage(format!(
                "broker {} is not attached to the outbox of PostgreSQL resource {}: call enable_outbox first",
                broker.name(),
                self.inner.name
            )));
        }
        broker.check_destination(destination).map_err(|e| {
            Error::resource(broker.name(), format!("destination {destination:?}: {e}"))
        })?;
        let payload = payload.into();
        let mut state = self.slot.state.lock().await;
        let State::Open { unwritten, .. } = &mut *state else {
            return Err(self.not_open(&state));
        };
        let index = self.slot.published.fetch_add(1, Ordering::Relaxed);
        let message = StagedMessage {
            message_id: format!("{}:{}:{index}", self.slot.tx_id, self.slot.branch_id),
            destination: destination.to_string(),
            payload,
            headers: options.headers,
            content_type: options.content_type,
        };
        let message_id = message.message_id.clone();
        unwritten.push(Unwritten {
            broker: broker.name().to_string(),
            headers: encode_headers(&message.headers),
            message,
        });
        Ok(message_id)
    }

    fn not_open(&self, state: &State) -> Error {
        Error::Usage(format!(
            "branch {} of transaction {} is {}: no more statements can run in it",
            self.slot.branch_id,
            self.slot.tx_id,
            state.describe()
        ))
    }

    /// Ends a statement that [`UNREAD`] marked: success restores the branch's error
    /// record (`before`); a failure is remembered unless an earlier one is (the first
    /// failure is the one the vote reports: later statements of an aborted block only
    /// fail with 25P02).
    fn finish<T>(
        &self,
        state: &mut State,
        before: Option<String>,
        res: Result<T, tokio_postgres::Error>,
    ) -> Result<T> {
        let (record, out) = match res {
            Ok(v) => (before, Ok(v)),
            Err(e) => {
                let msg = describe(&e);
                (
                    Some(before.unwrap_or_else(|| msg.clone())),
                    Err(Error::resource(&self.inner.name, msg)),
                )
            }
        };
        if let State::Open { last_error, .. } = state {
            *last_error = record;
        }
        out
    }
}

/// What an application statement returns.
enum Kind {
    Execute,
    Query,
    QueryOne,
}

/// A statement's result, by [`Kind`].
enum Out {
    Count(u64),
    Rows(Vec<Row>),
    Row(Row),
}

/// The branch's error record while a statement runs: if the caller drops the statement's
/// future, its outcome is never read and it may have aborted the block, so the branch
/// must then be treated as if a statement had failed (a one-phase commit checks the
/// block first, and a prepare reports this).
const UNREAD: &str = "a statement was cancelled before its result was read (it may have failed)";

/// An open branch's connection and what the one-phase commit needs of its state.
struct Open {
    conn: Object,
    last_error: Option<String>,
    /// The xid, if a statement learned it.
    known: Option<i64>,
    begun: bool,
    unwritten: Vec<Unwritten>,
    deferred: Vec<Deferred>,
}

/// What failed in front of `PREPARE TRANSACTION`.
enum Failed {
    /// A deferred statement.
    Deferred(tokio_postgres::Error),
    /// `BEGIN`, or an outbox row.
    Rows(tokio_postgres::Error),
}

/// How a one-phase `COMMIT` that did not succeed ended.
enum Ended {
    /// PostgreSQL refused it (the block rolled back): the reason.
    Refused(String),
    /// The answer was lost (connection): the outcome is to be found out.
    Lost,
}

/// The first two keywords of `sql`, upper-cased.
fn first_words(sql: &str) -> (String, String) {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    let second = words.next().unwrap_or("").to_ascii_uppercase();
    (first, second)
}

/// `ROLLBACK TO [SAVEPOINT] ...`.
fn rolls_back_to_savepoint(sql: &str) -> bool {
    let (first, second) = first_words(sql);
    first == "ROLLBACK" && second == "TO"
}

/// Refuses statements that would end the branch's transaction block behind the SDK's
/// back (checked on the first keyword; `ROLLBACK TO [SAVEPOINT]` is allowed).
fn check_statement(sql: &str) -> Result<()> {
    let (first, second) = first_words(sql);
    let ends_block = match first.as_str() {
        "COMMIT" | "END" | "ABORT" | "BEGIN" | "START" => true,
        "ROLLBACK" => second != "TO",
        "PREPARE" => second == "TRANSACTION",
        _ => false,
    };
    if ends_block {
        return Err(Error::Usage(format!(
            "{first} cannot run in a twopc branch: the transaction block is begun, prepared, committed and rolled \
             back by the SDK (commit or abort the twopc Transaction instead)"
        )));
    }
    Ok(())
}

/// `twopc:<tx_id>:<branch_id>`, checked to be a safe SQL literal and short enough.
fn gid_for(tx_id: &str, branch_id: &str) -> Result<String, String> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    };
    if !safe(tx_id) || tx_id.contains(':') {
        return Err(format!(
            "transaction id {tx_id:?} cannot be part of a PostgreSQL gid"
        ));
    }
    if !safe(branch_id) {
        return Err(format!(
            "branch id {branch_id:?} cannot be part of a PostgreSQL gid"
        ));
    }
    let gid = format!("{GID_PREFIX}{tx_id}:{branch_id}");
    if gid.len() > MAX_GID_BYTES {
        return Err(format!(
            "gid {gid:?} is longer than PostgreSQL's {MAX_GID_BYTES} bytes"
        ));
    }
    Ok(gid)
}

/// Most one-phase markers one recovery pass reports per resource.
const REMEMBERED_BATCH: i64 = 1_000;

/// `(tx_id, branch_id)` of one of our gids.
fn parse_gid(gid: &str) -> Option<(String, String)> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let (tx_id, branch_id) = rest.split_once(':')?;
    if tx_id.is_empty() || !branch_id.contains(':') {
        return None;
    }
    Some((tx_id.to_string(), branch_id.to_string()))
}

/// The branch id `<service>:<resource>` names resource `name`.
fn names_resource(branch_id: &str, name: &str) -> bool {
    branch_id
        .split_once(':')
        .map(|(_, r)| r == name)
        .unwrap_or(false)
}

/// The database's message with severity and SQLSTATE (and detail), or the client's
/// message for connection errors.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                s.push_str("; DETAIL: ");
                s.push_str(detail);
            }
            s
        }
        None => e.to_string(),
    }
}

/// The first column of the first row of a simple query: `None` without a row,
/// `Some(None)` for SQL NULL.
fn first_cell(msgs: &[SimpleQueryMessage]) -> Option<Option<String>> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_string)),
        _ => None,
    })
}

/// Runs `statement` (which uses `conn`) inside the branch's transaction block, opening
/// the block first if `begun` is false. The `BEGIN` is then queued on the connection
/// before `statement` is first polled, and tokio-postgres writes requests in the order they
/// were queued, so both go out together: opening a branch costs no round trip of its own.
///
/// If `BEGIN` fails, the statement's result is dropped and `BEGIN`'s error returned: the
/// branch records it and votes no. (A plain `BEGIN` on a connection taken from the pool
/// fails only when the connection is lost, and then the statement is lost with it.)
async fn in_block<T>(
    conn: &Object,
    begun: &mut bool,
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    if *begun {
        return statement.await;
    }
    let mut begin = std::pin::pin!(conn.batch_execute("BEGIN"));
    // The first poll queues `BEGIN` (and cannot see its answer yet, only a closed client).
    if let std::task::Poll::Ready(res) = futures::poll!(begin.as_mut()) {
        res?;
        *begun = true;
        return statement.await;
    }
    let (began, out) = futures::future::join(begin, statement).await;
    began?;
    *begun = true;
    out
}

/// Records the rows [`write_rows`] wrote among the branch's staged messages; returns the
/// xid their insert returned (`None` without rows), or the first failure. A message whose
/// insert failed is dropped: the failure aborted the block, so the branch cannot commit.
fn take_written(
    slot: &Slot,
    writes: Vec<Unwritten>,
    written: Vec<Result<Row, tokio_postgres::Error>>,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let mut failed = None;
    let mut xid = None;
    let mut outbox = lock(&slot.outbox);
    for (w, res) in writes.into_iter().zip(written) {
        let ids = res.and_then(|row| Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?)));
        match ids {
            Ok((row, tx_xid)) => {
                xid = Some(tx_xid);
                outbox.push(Pending {
                    row,
                    broker: w.broker,
                    message: w.message,
                });
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(xid),
    }
}

/// [`OUTBOX_INSERT`] prepared on `conn` if there are rows to write. Prepared before
/// anything else is queued, so that the rows go out in order.
async fn insert_for(
    conn: &Object,
    unwritten: &[Unwritten],
) -> Result<Option<Statement>, tokio_postgres::Error> {
    match unwritten.is_empty() {
        true => Ok(None),
        false => Ok(Some(prepared(conn, OUTBOX_INSERT).await?)),
    }
}

/// The query a local transaction's block runs as it begins (see [`State::Open`]).
const TXID_CURRENT: &str = "SELECT txid_current()";

/// The xid, by `stmt` ([`TXID_CURRENT`]) if given; queued when first polled. `None` without
/// `stmt` or when the query failed (a one-phase commit then asks again).
async fn learn_xid_of(conn: &Object, stmt: Option<&Statement>) -> Option<i64> {
    let row = conn.query_one(stmt?, &[]).await.ok()?;
    row.try_get::<_, i64>(0).ok()
}

/// Writes the rows of `items` with `stmt` ([`OUTBOX_INSERT`]; nothing without it): every
/// INSERT is queued, in order, when this future is first polled, so that what the caller
/// queues after it follows in the same round trip. One answer per item.
async fn write_rows(
    conn: &Object,
    stmt: Option<&Statement>,
    gid: &str,
    items: &[Unwritten],
) -> Vec<Result<Row, tokio_postgres::Error>> {
    let Some(stmt) = stmt else {
        return Vec::new();
    };
    let params: Vec<[&(dyn ToSql + Sync); 7]> = items
        .iter()
        .map(|u| -> [&(dyn ToSql + Sync); 7] {
            [
                &u.broker,
                &gid,
                &u.message.message_id,
                &u.message.destination,
                &u.message.payload,
                &u.headers,
                &u.message.content_type,
            ]
        })
        .collect();
    queue_all(params.iter().map(|p| conn.query_one(stmt, p))).await
}

/// Runs `requests` (each a request on the same connection), queueing every one, in
/// order, before awaiting any answer: tokio-postgres queues a request when it is first
/// polled, so they go out together, and what the caller queues after this future was
/// first polled follows in the same round trip. Their answers, in order.
async fn queue_all<F: Future>(requests: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut all: Vec<_> = requests
        .into_iter()
        .map(|r| Box::pin(futures::future::maybe_done(r)))
        .collect();
    for r in all.iter_mut() {
        // The first poll queues the request (its answer cannot be there yet).
        let _ = futures::poll!(r.as_mut());
    }
    let mut out = Vec::with_capacity(all.len());
    for mut r in all {
        r.as_mut().await;
        if let Some(answer) = r.as_mut().take_output() {
            out.push(answer);
        }
    }
    out
}

/// The deferred statements of `items`, each prepared on `conn` (once per connection).
/// Prepared before anything else is queued, so that they go out in order.
async fn prepare_deferred(
    conn: &Object,
    items: &[Deferred],
) -> Result<Vec<Statement>, tokio_postgres::Error> {
    let mut stmts = Vec::with_capacity(items.len());
    for d in items {
        stmts.push(prepared(conn, &d.sql).await?);
    }
    Ok(stmts)
}

/// Runs the deferred statements `items` (prepared as `stmts`): every one is queued, in
/// order, when this future is first polled, so that what the caller queues after it
/// follows in the same round trip. The first failure, if any.
async fn run_deferred(
    conn: &Object,
    stmts: &[Statement],
    items: &[Deferred],
) -> Result<(), tokio_postgres::Error> {
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = items
        .iter()
        .map(|d| {
            d.params
                .iter()
                .map(|p| &**p as &(dyn ToSql + Sync))
                .collect()
        })
        .collect();
    let answers = queue_all(
        stmts
            .iter()
            .zip(&params)
            .map(|(stmt, p)| conn.execute(stmt, p)),
    );
    match answers.await.into_iter().find_map(Result::err) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Most statements prepared and kept per connection (beyond, the cache starts over).
const STATEMENT_CACHE: usize = 256;

/// `sql` prepared on `conn`, once per connection: the next run of the same text is one
/// round trip (Bind/Execute) instead of two (Parse/Describe, then Bind/Execute).
async fn prepared(conn: &Object, sql: &str) -> Result<Statement, tokio_postgres::Error> {
    if conn.statement_cache.size() >= STATEMENT_CACHE {
        conn.statement_cache.clear();
    }
    conn.prepare_cached(sql).await
}

/// A pooled connection, waiting at most [`POOL_WAIT`].
async fn get_conn(pool: &Pool) -> Result<Object, String> {
    match tokio::time::timeout(POOL_WAIT, pool.get()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("cannot get a PostgreSQL connection: {e}")),
        Err(_) => Err(format!(
            "no PostgreSQL connection free within {POOL_WAIT:?} (pool exhausted?)"
        )),
    }
}

/// Closes a connection instead of returning it to the pool (closing rolls back whatever
/// was open on it; a connection still busy after a timeout is closed too).
fn discard(conn: Object) {
    drop(Object::take(conn));
}

/// Runs `fut` to completion in its own task, so the caller's cancellation (an RPC
/// timeout) cannot interrupt it halfway.
async fn detached<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    tokio::spawn(fut)
        .await
        .map_err(|e| format!("internal error in the PostgreSQL adapter: {e}"))
}

/// Outcome of `txid_status`.
enum XidOutcome {
    Committed,
    Aborted,
    Unknown(String),
}

impl Inner {
    fn slot(&self, key: &Key) -> Option<Arc<Slot>> {
        lock(&self.branches).map.get(key).cloned()
    }

    /// Whether a one-phase commit of `gid` happened (its marker is there), making sure
    /// that if it did not, it never will: the fence of [`ONE_PHASE_FENCE`] takes the
    /// gid's place, and waits for a commit that inserted its marker but has not ended.
    /// `Err` when PostgreSQL cannot tell now (unreachable, or that commit still running
    /// after [`OP_TIMEOUT`]): the caller retries.
    async fn settle_one_phase(&self, gid: &str) -> Result<bool, Retry> {
        let conn = get_conn(&self.pool).await.map_err(Retry)?;
        let fence = async {
            let stmt = prepared(&conn, ONE_PHASE_FENCE).await?;
            conn.query_one(&stmt, &[&gid]).await?.try_get::<_, bool>(0)
        };
        match tokio::time::timeout(OP_TIMEOUT, fence).await {
            Ok(Ok(fenced)) => Ok(!fenced),
            Ok(Err(e)) => {
                discard(conn);
                Err(Retry(format!(
                    "settling a one-phase commit: {}",
                    describe(&e)
                )))
            }
            Err(_) => {
                // The fence may still go in once the commit it waits for ends: either way
                // the next attempt reads the same outcome.
                discard(conn);
                Err(Retry(format!(
                    "settling a one-phase commit: its COMMIT is still running after {OP_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Waits (up to the outbox's `publish_wait`) for the publishing of the messages of a
    /// branch that just committed; the publishing goes on if the wait runs out.
    async fn wait_published(&self, tx_id: &str, branch_id: &str) {
        let Some(relay) = self.outbox.get() else {
            return;
        };
        let Some(slot) = self.slot(&(tx_id.to_string(), branch_id.to_string())) else {
            return;
        };
        let publishing = lock(&slot.publishing).take();
        if let Some(task) = publishing {
            let _ = tokio::time::timeout(relay.options().publish_wait, task).await;
        }
    }

    /// Moves a branch to `new`, remembering it among the finished ones when it ends. A
    /// branch that committed hands its staged messages to the relay; one that ended
    /// otherwise forgets them (their rows rolled back with it).
    fn set(&self, slot: &Slot, state: &mut State, new: State) {
        let newly_finished = !state.is_terminal() && new.is_terminal();
        if new.is_terminal() {
            let staged = std::mem::take(&mut *lock(&slot.outbox));
            if matches!(new, State::Committed | State::OnePhaseCommitted) {
                if let Some(relay) = self.outbox.get() {
                    *lock(&slot.publishing) = relay.committed(staged);
                }
            }
        }
        *state = new;
        if newly_finished {
            let mut b = lock(&self.branches);
            b.finished
                .push_back((slot.tx_id.clone(), slot.branch_id.clone()));
            while b.finished.len() > REMEMBER_FINISHED {
                if let Some(old) = b.finished.pop_front() {
                    b.map.remove(&old);
                }
            }
        }
    }

    /// Records the end of a branch this process held nothing of (`Aborted`, or committed
    /// in one phase before a restart), so a late `begin` cannot reopen it and a repeated
    /// call gets the same answer.
    fn remember(&self, tx_id: &str, branch_id: &str, gid: String, state: State) {
        let key: Key = (tx_id.to_string(), branch_id.to_string());
        let mut b = lock(&self.branches);
        if b.map.contains_key(&key) {
            return;
        }
        let slot = Arc::new(Slot {
            tx_id: key.0.clone(),
            branch_id: key.1.clone(),
            gid,
            state: Arc::new(Mutex::new(state)),
            opened_at: std::time::Instant::now(),
            outbox: StdMutex::new(Vec::new()),
            published: AtomicUsize::new(0),
            publishing: StdMutex::new(None),
        });
        b.map.insert(key.clone(), slot);
        b.finished.push_back(key);
        while b.finished.len() > REMEMBER_FINISHED {
            if let Some(old) = b.finished.pop_front() {
                b.map.remove(&old);
            }
        }
    }

    /// Runs one phase-two statement on a pooled connection. `Ok(true)`: done;
    /// `Ok(false)`: SQLSTATE 42704, no such prepared transaction.
    async fn on_pooled(&self, sql: &str) -> Result<bool, Retry> {
        let conn = get_conn(&self.pool).await.map_err(Retry)?;
        match tokio::time::timeout(OP_TIMEOUT, conn.batch_execute(sql)).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(false),
            Ok(Err(e)) => {
                if e.as_db_error().is_none() {
                    discard(conn);
                }
                Err(Retry(format!("{sql}: {}", describe(&e))))
            }
            Err(_) => {
                discard(conn);
                Err(Retry(format!("{sql}: no answer within {OP_TIMEOUT:?}")))
            }
        }
    }

    async fn gid_exists(&self, gid: &str) -> Result<bool, String> {
        let conn = get_conn(&self.pool).await?;
        let rows = conn
            .query(
                "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()",
                &[&gid],
            )
            .await
            .map_err(|e| describe(&e))?;
        Ok(!rows.is_empty())
    }

    /// `txid_status(xid)` on a pooled connection.
    async fn xid_outcome(&self, xid: i64) -> XidOutcome {
        let conn = match get_conn(&self.pool).await {
            Ok(c) => c,
            Err(e) => return XidOutcome::Unknown(e),
        };
        match conn
            .simple_query(&format!("SELECT txid_status({xid})"))
            .await
        {
            Ok(msgs) => match first_cell(&msgs).flatten().as_deref() {
                Some("committed") => XidOutcome::Committed,
                Some("aborted") => XidOutcome::Aborted,
                Some(other) => XidOutcome::Unknown(format!("transaction {xid} is {other}")),
                None => {
                    XidOutcome::Unknown(format!("PostgreSQL no longer knows transaction {xid}"))
                }
            },
            // "transaction ID ... is in the future" (22023) after PostgreSQL restarted: the
            // xid never reached the WAL, so its transaction cannot have committed.
            Err(e)
                if e.code() == Some(&SqlState::INVALID_PARAMETER_VALUE)
                    && e.as_db_error()
                        .is_some_and(|d| d.message().contains("in the future")) =>
            {
                XidOutcome::Aborted
            }
            Err(e) => XidOutcome::Unknown(describe(&e)),
        }
    }

    /// Writes the rows of messages not written yet (opening the block if no statement
    /// did); the reason to vote no if that failed.
    async fn write_before_prepare(
        &self,
        slot: &Slot,
        conn: &Object,
        begun: &mut bool,
        deferred: Vec<Deferred>,
        unwritten: Vec<Unwritten>,
    ) -> Result<(), String> {
        if unwritten.is_empty() && deferred.is_empty() {
            return Ok(());
        }
        let write = async {
            let later = prepare_deferred(conn, &deferred)
                .await
                .map_err(Failed::Deferred)?;
            let stmt = insert_for(conn, &unwritten).await.map_err(Failed::Rows)?;
            let (ran, written) = in_block(conn, begun, async {
                Ok(futures::future::join(
                    run_deferred(conn, &later, &deferred),
                    write_rows(conn, stmt.as_ref(), &slot.gid, &unwritten),
                )
                .await)
            })
            .await
            .map_err(Failed::Rows)?;
            ran.map_err(Failed::Deferred)?;
            take_written(slot, unwritten, written)
                .map(drop)
                .map_err(Failed::Rows)
        };
        match tokio::time::timeout(OP_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Failed::Deferred(e))) => {
                Err(format!("a deferred statement failed: {}", describe(&e)))
            }
            Ok(Err(Failed::Rows(e))) => {
                Err(format!("writing the outbox rows failed: {}", describe(&e)))
            }
            Err(_) => Err(format!(
                "writing before PREPARE TRANSACTION: no answer from PostgreSQL within {OP_TIMEOUT:?}"
            )),
        }
    }

    async fn prepare(self: Arc<Self>, tx_id: String, branch_id: String) -> Vote {
        let gid = match gid_for(&tx_id, &branch_id) {
            Ok(g) => g,
            Err(m) => return Vote::No(m),
        };
        let Some(slot) = self.slot(&(tx_id.clone(), branch_id.clone())) else {
            // Not open here: either it was prepared before a restart (then the gid is
            // there: same answer as then), or its work is gone.
            return match self.gid_exists(&gid).await {
                Ok(true) => Vote::Yes,
                Ok(false) => Vote::No(format!(
                    "unknown branch {branch_id} of transaction {tx_id}: never opened here, or this process restarted \
                     before it was prepared (its work was rolled back)"
                )),
                Err(e) => Vote::No(format!("unknown branch {branch_id} of transaction {tx_id}; checking pg_prepared_xacts failed: {e}")),
            };
        };
        let mut state = slot.state.clone().lock_owned().await;
        match std::mem::replace(&mut *state, State::Opening) {
            State::Open {
                conn,
                last_error,
                mut begun,
                unwritten,
                deferred,
                ..
            } => {
                let conn = conn.into_inner();
                // Deferred statements and rows of messages published since the last
                // statement first (a round trip of their own: PREPARE TRANSACTION goes out
                // as a simple query).
                if let Err(reason) = self
                    .write_before_prepare(&slot, &conn, &mut begun, deferred, unwritten)
                    .await
                {
                    discard(conn);
                    let mut st = State::Opening;
                    self.set(
                        &slot,
                        &mut st,
                        State::VotedNo {
                            reason: reason.clone(),
                            maybe_prepared: false,
                        },
                    );
                    *state = st;
                    return Vote::No(reason);
                }
                // A branch that ran no statement has no block yet: open it in the same batch.
                let sql = format!(
                    "{}SELECT txid_current_if_assigned(); PREPARE TRANSACTION '{gid}'",
                    if begun { "" } else { "BEGIN; " }
                );
                let (new, vote) = match tokio::time::timeout(OP_TIMEOUT, conn.simple_query(&sql))
                    .await
                {
                    Ok(Ok(msgs)) => {
                        if matches!(first_cell(&msgs), Some(None)) {
                            // No transaction id: nothing was written. Finish it now.
                            match conn
                                .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                                .await
                            {
                                Ok(()) => (State::ReadOnly, Vote::ReadOnly),
                                Err(e) => {
                                    debug!(gid, error = %describe(&e), "read-only branch stays prepared");
                                    discard(conn);
                                    (State::Prepared, Vote::Yes)
                                }
                            }
                        } else {
                            (State::Prepared, Vote::Yes)
                        }
                    }
                    Ok(Err(e)) if e.as_db_error().is_some() => {
                        discard(conn);
                        let reason = match (
                            e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
                            last_error,
                        ) {
                            (true, Some(first)) => {
                                format!("a statement of the branch failed: {first}")
                            }
                            _ => format!("PREPARE TRANSACTION failed: {}", describe(&e)),
                        };
                        (
                            State::VotedNo {
                                reason: reason.clone(),
                                maybe_prepared: false,
                            },
                            Vote::No(reason),
                        )
                    }
                    outcome => {
                        discard(conn);
                        let why = match outcome {
                            Ok(Err(e)) => describe(&e),
                            _ => format!("no answer within {OP_TIMEOUT:?}"),
                        };
                        let reason = format!(
                            "lost the PostgreSQL connection during PREPARE TRANSACTION: {why}"
                        );
                        (
                            State::VotedNo {
                                reason: reason.clone(),
                                maybe_prepared: true,
                            },
                            Vote::No(reason),
                        )
                    }
                };
                let mut st = State::Opening;
                self.set(&slot, &mut st, new);
                *state = st;
                vote
            }
            other => {
                let vote = match &other {
                    State::Prepared | State::Committed => Vote::Yes,
                    State::ReadOnly => Vote::ReadOnly,
                    State::VotedNo { reason, .. } => Vote::No(reason.clone()),
                    s => Vote::No(format!(
                        "branch {branch_id} of transaction {tx_id} is {}",
                        s.describe()
                    )),
                };
                *state = other;
                vote
            }
        }
    }

    async fn commit(self: Arc<Self>, tx_id: String, branch_id: String) -> Result<(), Retry> {
        let gid = gid_for(&tx_id, &branch_id).map_err(Retry)?;
        let sql = format!("COMMIT PREPARED '{gid}'");
        let Some(slot) = self.slot(&(tx_id.clone(), branch_id.clone())) else {
            // After a yes vote, "no such gid" means it was committed already.
            self.on_pooled(&sql).await?;
            // Committed by recovery: its staged messages are only in the table now.
            if let Some(relay) = self.outbox.get() {
                relay.sweep_gid(gid);
            }
            return Ok(());
        };
        let mut state = slot.state.clone().lock_owned().await;
        match &*state {
            State::Prepared => {
                if !self.on_pooled(&sql).await? {
                    debug!(gid, "COMMIT PREPARED: no such gid, already committed");
                }
                self.set(&slot, &mut state, State::Committed);
                Ok(())
            }
            State::Committed | State::OnePhaseCommitted | State::ReadOnly => Ok(()),
            State::OnePhaseUnknown { xid } => {
                let xid = *xid;
                match self.resolve_one_phase(xid, &slot.gid).await {
                    (new, Ok(OnePhase::Committed)) => {
                        self.set(&slot, &mut state, new);
                        Ok(())
                    }
                    (new, Ok(OnePhase::Refused(_))) => {
                        self.set(&slot, &mut state, new);
                        Err(Retry(format!(
                            "branch {branch_id} of {tx_id} was rolled back: cannot commit"
                        )))
                    }
                    (_, Err(e)) => Err(e),
                }
            }
            other => Err(Retry(format!(
                "branch {branch_id} of transaction {tx_id} is {} and was never prepared: cannot commit it",
                other.describe()
            ))),
        }
    }

    async fn commit_one_phase(
        self: Arc<Self>,
        tx_id: String,
        branch_id: String,
    ) -> Result<OnePhase, Retry> {
        let Some(slot) = self.slot(&(tx_id.clone(), branch_id.clone())) else {
            // A repeated one-phase commit after a restart: with the outbox, the commit left
            // its marker (see `one_phase_open`) if it happened.
            if self.outbox.get().is_some() {
                if let Ok(gid) = gid_for(&tx_id, &branch_id) {
                    if self.settle_one_phase(&gid).await? {
                        return Ok(OnePhase::Committed);
                    }
                }
            }
            return Ok(OnePhase::Refused(format!(
                "unknown branch {branch_id} of transaction {tx_id}: never opened here, or this process restarted and \
                 its open work was rolled back"
            )));
        };
        let mut state = slot.state.clone().lock_owned().await;
        match std::mem::replace(&mut *state, State::Opening) {
            State::Open {
                conn,
                last_error,
                xid,
                begun,
                unwritten,
                deferred,
                ..
            } => {
                let open = Open {
                    conn: conn.into_inner(),
                    last_error,
                    known: xid,
                    begun,
                    unwritten,
                    deferred,
                };
                let (new, answer) = self.one_phase_open(&slot, open).await;
                let mut st = State::Opening;
                self.set(&slot, &mut st, new);
                *state = st;
                answer
            }
            State::OnePhaseUnknown { xid } => {
                let (new, answer) = self.resolve_one_phase(xid, &slot.gid).await;
                *state = State::OnePhaseUnknown { xid };
                self.set(&slot, &mut state, new);
                answer
            }
            State::Prepared => {
                *state = State::Prepared;
                let gid = slot.gid.clone();
                self.on_pooled(&format!("COMMIT PREPARED '{gid}'")).await?;
                self.set(&slot, &mut state, State::Committed);
                Ok(OnePhase::Committed)
            }
            other => {
                let answer = match &other {
                    State::OnePhaseCommitted | State::Committed | State::ReadOnly => {
                        OnePhase::Committed
                    }
                    State::OnePhaseRefused(m) => OnePhase::Refused(m.clone()),
                    State::VotedNo { reason, .. } => OnePhase::Refused(reason.clone()),
                    s => OnePhase::Refused(format!(
                        "branch {branch_id} of transaction {tx_id} is {}",
                        s.describe()
                    )),
                };
                *state = other;
                Ok(answer)
            }
        }
    }

    /// One-phase commit of an open branch: learn its xid, then `COMMIT`. The query that
    /// learns it also tells whether the block is aborted (where PostgreSQL would answer
    /// `COMMIT` with a silent rollback); it is skipped when no statement of the branch
    /// failed (then the block cannot be aborted) and either the xid is `known` or, with
    /// the outbox, the commit's marker will settle a lost answer
    /// ([`Inner::settle_one_phase`]). A branch that ran no statement (`begun` false) opens
    /// its block in that query, or — when it is skipped — with `BEGIN` in front of the
    /// rest. The deferred statements and the rows of messages not written yet go out with
    /// `COMMIT`, in the same round trip: a local transaction whose writes were all
    /// deferred commits in one round trip.
    async fn one_phase_open(&self, slot: &Slot, open: Open) -> (State, Result<OnePhase, Retry>) {
        let Open {
            conn,
            last_error,
            known,
            mut begun,
            unwritten,
            deferred,
        } = open;
        let gid = slot.gid.as_str();
        let marked = self.outbox.get().is_some();
        let refused = |conn: Object, reason: String| {
            discard(conn);
            (
                State::OnePhaseRefused(reason.clone()),
                Ok(OnePhase::Refused(reason)),
            )
        };
        let nothing_to_write = unwritten.is_empty() && deferred.is_empty();
        let xid = match known.filter(|_| last_error.is_none() && begun) {
            Some(xid) => Some(xid),
            // The marker settles a lost answer; `BEGIN` goes out with the rest.
            None if marked && last_error.is_none() => None,
            // Rows still to write need an xid now: the commit's answer may be lost.
            None => match tokio::time::timeout(
                OP_TIMEOUT,
                conn.simple_query(match (begun, nothing_to_write) {
                    (true, true) => "SELECT txid_current_if_assigned()",
                    (false, true) => "BEGIN; SELECT txid_current_if_assigned()",
                    (true, false) => "SELECT txid_current()",
                    (false, false) => "BEGIN; SELECT txid_current()",
                }),
            )
            .await
            {
                Ok(Ok(msgs)) => {
                    begun = true;
                    first_cell(&msgs)
                        .flatten()
                        .and_then(|s| s.parse::<i64>().ok())
                }
                Ok(Err(e)) => {
                    let reason = match (
                        e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
                        last_error,
                    ) {
                        (true, Some(first)) => format!("a statement of the branch failed: {first}"),
                        _ => describe(&e),
                    };
                    return refused(conn, reason);
                }
                Err(_) => {
                    let reason =
                        format!("no answer from PostgreSQL within {OP_TIMEOUT:?}; rolled back");
                    return refused(conn, reason);
                }
            },
        };
        // With the outbox, the commit leaves a marker in the same transaction, so that a
        // repeated one-phase commit after a restart (its first answer lost) learns that it
        // happened instead of refusing an unknown branch. The marker's INSERT is a
        // prepared statement (no parse or plan per commit). The marker, the deferred
        // statements and the rows' INSERT are prepared before anything is queued, so that
        // `COMMIT` can only follow them.
        let ready = async {
            let marker = match marked {
                true => Some(prepared(&conn, ONE_PHASE_MARK).await?),
                false => None,
            };
            let later = prepare_deferred(&conn, &deferred).await?;
            Ok::<_, tokio_postgres::Error>((marker, later, insert_for(&conn, &unwritten).await?))
        };
        let (marker, later, insert) = match tokio::time::timeout(OP_TIMEOUT, ready).await {
            Ok(Ok(stmts)) => stmts,
            // Nothing was sent to commit: the block rolls back with the connection.
            Ok(Err(e)) => return refused(conn, format!("COMMIT failed: {}", describe(&e))),
            Err(_) => {
                let reason =
                    format!("no answer from PostgreSQL within {OP_TIMEOUT:?}; rolled back");
                return refused(conn, reason);
            }
        };
        let commit = async {
            // `BEGIN` if the block is not open yet, the deferred statements, the rows, the
            // marker, then `COMMIT`, in one round trip (`join4` polls in order; each is
            // queued when first polled). If a statement, a row or the marker fails,
            // PostgreSQL answers the aborted block's COMMIT with a rollback, not an error.
            let all = async {
                Ok(futures::future::join4(
                    run_deferred(&conn, &later, &deferred),
                    write_rows(&conn, insert.as_ref(), gid, &unwritten),
                    async {
                        match &marker {
                            Some(stmt) => Some(conn.execute(stmt, &[&gid]).await),
                            None => None,
                        }
                    },
                    conn.batch_execute("COMMIT"),
                )
                .await)
            };
            let (ran, written, marked, committed) = match in_block(&conn, &mut begun, all).await {
                Ok(answers) => answers,
                Err(e) => {
                    // Not a refusal: `BEGIN` on a pooled connection fails only when the
                    // connection is lost, and then everything after it is lost with it.
                    debug!(gid, error = %describe(&e), "BEGIN of a one-phase commit failed");
                    return (Err(Ended::Lost), true);
                }
            };
            let lost_rows = written.len() < unwritten.len() || written.iter().any(|r| r.is_err());
            let failed = take_written(slot, unwritten, written).err();
            if let Err(e) = ran.as_ref() {
                if e.as_db_error().is_some() {
                    let reason = format!("COMMIT failed: a deferred statement: {}", describe(e));
                    return (Err(Ended::Refused(reason)), lost_rows);
                }
            }
            let ended = match (failed, marked, committed) {
                (Some(e), _, _) if e.as_db_error().is_some() => Err(Ended::Refused(format!(
                    "COMMIT failed: outbox row: {}",
                    describe(&e)
                ))),
                (_, Some(Err(e)), _) if e.as_db_error().is_some() => Err(Ended::Refused(format!(
                    "COMMIT failed: one-phase marker: {}",
                    describe(&e)
                ))),
                (_, _, Err(e)) if e.as_db_error().is_some() => {
                    Err(Ended::Refused(format!("COMMIT failed: {}", describe(&e))))
                }
                (None, None | Some(Ok(_)), Ok(())) if ran.is_ok() => Ok(()),
                _ => Err(Ended::Lost),
            };
            (ended, lost_rows)
        };
        match tokio::time::timeout(OP_TIMEOUT, commit).await {
            Ok((Ok(()), _)) => (State::OnePhaseCommitted, Ok(OnePhase::Committed)),
            Ok((Err(Ended::Refused(reason)), _)) => refused(conn, reason),
            outcome => {
                // Rows whose answer was lost are not known here: if the branch committed,
                // the sweep publishes them.
                let unknown_rows = !matches!(outcome, Ok((_, false)));
                discard(conn);
                let (state, answer) = self.resolve_one_phase(xid, gid).await;
                if unknown_rows && matches!(state, State::OnePhaseCommitted) {
                    if let Some(relay) = self.outbox.get() {
                        relay.sweep_gid(gid.to_string());
                    }
                }
                (state, answer)
            }
        }
    }

    /// The outcome of a one-phase `COMMIT` whose answer was lost. With the outbox, the
    /// commit's marker settles it ([`Inner::settle_one_phase`]): present, committed;
    /// absent, rolled back — and fenced, so a `COMMIT` still on its way fails. (The xid
    /// alone is not enough after a crash of PostgreSQL: an xid that never reached its WAL
    /// is handed out again, and `txid_status` then reports another transaction.) Without
    /// the outbox, `txid_status(xid)`; no xid: the branch wrote nothing, so there is
    /// nothing to lose either way.
    async fn resolve_one_phase(
        &self,
        xid: Option<i64>,
        gid: &str,
    ) -> (State, Result<OnePhase, Retry>) {
        let outcome = match (self.outbox.get(), xid) {
            (Some(_), _) => match self.settle_one_phase(gid).await {
                Ok(true) => XidOutcome::Committed,
                Ok(false) => XidOutcome::Aborted,
                Err(Retry(m)) => XidOutcome::Unknown(m),
            },
            (None, Some(xid)) => self.xid_outcome(xid).await,
            (None, None) => XidOutcome::Committed,
        };
        match outcome {
            XidOutcome::Committed => (State::OnePhaseCommitted, Ok(OnePhase::Committed)),
            XidOutcome::Aborted => {
                let reason = "the connection was lost during COMMIT and PostgreSQL rolled the transaction back".to_string();
                (
                    State::OnePhaseRefused(reason.clone()),
                    Ok(OnePhase::Refused(reason)),
                )
            }
            XidOutcome::Unknown(m) => (
                State::OnePhaseUnknown { xid },
                Err(Retry(format!(
                    "outcome of the one-phase COMMIT not known yet: {m}"
                ))),
            ),
        }
    }

    /// Aborts a branch and says what became of it. The slot's state lock serialises this
    /// with the branch's commits, so a branch being committed in one phase is answered
    /// once that commit is over, from its outcome.
    async fn abort(
        self: Arc<Self>,
        tx_id: String,
        branch_id: String,
    ) -> Result<AbortOutcome, Retry> {
        let gid = match gid_for(&tx_id, &branch_id) {
            Ok(g) => g,
            // Nothing can have been prepared or committed under an invalid gid.
            Err(_) => return Ok(AbortOutcome::Aborted),
        };
        let sql = format!("ROLLBACK PREPARED '{gid}'");
        let Some(slot) = self.slot(&(tx_id.clone(), branch_id.clone())) else {
            return self.abort_unknown(&tx_id, &branch_id, gid, &sql).await;
        };
        let mut state = slot.state.clone().lock_owned().await;
        match std::mem::replace(&mut *state, State::Opening) {
            State::Open { conn, .. } => {
                let conn = conn.into_inner();
                match tokio::time::timeout(OP_TIMEOUT, conn.batch_execute("ROLLBACK")).await {
                    Ok(Ok(())) => drop(conn),
                    // Closing the connection rolls back just as well.
                    _ => discard(conn),
                }
                let mut st = State::Opening;
                self.set(&slot, &mut st, State::Aborted);
                *state = st;
                Ok(AbortOutcome::Aborted)
            }
            State::Prepared => {
                *state = State::Prepared;
                self.on_pooled(&sql).await?;
                self.set(&slot, &mut state, State::Aborted);
                Ok(AbortOutcome::Aborted)
            }
            State::VotedNo {
                reason,
                maybe_prepared: true,
            } => {
                *state = State::VotedNo {
                    reason: reason.clone(),
                    maybe_prepared: true,
                };
                self.on_pooled(&sql).await?;
                *state = State::VotedNo {
                    reason,
                    maybe_prepared: false,
                };
                Ok(AbortOutcome::Aborted)
            }
            State::OnePhaseUnknown { xid } => {
                *state = State::OnePhaseUnknown { xid };
                let (new, answer) = self.resolve_one_phase(xid, &slot.gid).await;
                self.set(&slot, &mut state, new);
                match answer {
                    Ok(OnePhase::Committed) => {
                        warn!(
                            tx_id,
                            branch_id, "abort of a branch already committed in one phase"
                        );
                        Ok(AbortOutcome::AlreadyCommitted)
                    }
                    Ok(OnePhase::Refused(_)) => Ok(AbortOutcome::Aborted),
                    Err(e) => Err(e),
                }
            }
            other @ (State::Committed | State::OnePhaseCommitted) => {
                warn!(
                    tx_id,
                    branch_id, "abort of a branch that is already committed: nothing to undo"
                );
                *state = other;
                Ok(AbortOutcome::AlreadyCommitted)
            }
            State::Opening | State::Broken(_) => {
                let mut st = State::Opening;
                self.set(&slot, &mut st, State::Aborted);
                *state = st;
                Ok(AbortOutcome::Aborted)
            }
            other => {
                // Voted no, read-only, refused, aborted: nothing is left.
                *state = other;
                Ok(AbortOutcome::Aborted)
            }
        }
    }

    /// Abort of a branch this process holds nothing of (never opened here, forgotten, or
    /// opened before a restart): rolls back its gid in case it was prepared. If it was not,
    /// with the outbox the one-phase marker tells whether it had committed in one phase
    /// (then it is remembered as committed); without the outbox nothing can tell, and the
    /// answer is `Aborted` (see the module docs, "Limits").
    async fn abort_unknown(
        &self,
        tx_id: &str,
        branch_id: &str,
        gid: String,
        rollback: &str,
    ) -> Result<AbortOutcome, Retry> {
        let was_prepared = self.on_pooled(rollback).await?;
        if !was_prepared && self.outbox.get().is_some() && self.settle_one_phase(&gid).await? {
            warn!(
                tx_id,
                branch_id, "abort of a branch already committed in one phase (its marker is there)"
            );
            self.remember(tx_id, branch_id, gid, State::OnePhaseCommitted);
            return Ok(AbortOutcome::AlreadyCommitted);
        }
        self.remember(tx_id, branch_id, gid, State::Aborted);
        Ok(AbortOutcome::Aborted)
    }

    /// The one-phase markers of this resource's branches older than `older_than` (at most
    /// [`REMEMBERED_BATCH`] per call, oldest first); none while the marker table does not
    /// exist. Not tied to this process's outbox: an earlier process's markers are there
    /// (and reported) whether or not [`PgResource::enable_outbox`] has run yet here.
    async fn remembered_commits(
        self: Arc<Self>,
        older_than: Duration,
    ) -> Result<Vec<(String, String)>, Retry> {
        let conn = get_conn(&self.pool).await.map_err(Retry)?;
        // Fences (see `ONE_PHASE_FENCE`) are not commits.
        let mut not_fenced = "NOT fenced AND";
        if self.outbox.get().is_none() {
            // With the outbox the table exists (`enable_outbox` made it, with its `fenced`
            // column). Without, it is looked up first: no outbox was ever enabled on a
            // database without it (so there is no marker), and querying it would log an
            // error each pass; a table of an earlier version has no column and no fence.
            let found = conn
                .query_one(
                    "SELECT to_regclass('twopc_one_phase') IS NOT NULL, EXISTS (SELECT 1 FROM \
                     information_schema.columns WHERE table_schema = current_schema() \
                     AND table_name = 'twopc_one_phase' AND column_name = 'fenced')",
                    &[],
                )
                .await
                .map_err(|e| Retry(format!("looking for one-phase markers: {}", describe(&e))))?;
            if !found.try_get::<_, bool>(0).unwrap_or(false) {
                return Ok(Vec::new());
            }
            if !found.try_get::<_, bool>(1).unwrap_or(false) {
                not_fenced = "";
            }
        }
        let rows = conn
            .query(
                &format!(
                    "SELECT gid FROM twopc_one_phase \
                     WHERE {not_fenced} committed_at <= clock_timestamp() - make_interval(secs => $1) \
                     ORDER BY committed_at LIMIT $2"
                ),
                &[&older_than.as_secs_f64(), &REMEMBERED_BATCH],
            )
            .await
            .map_err(|e| Retry(format!("listing one-phase markers: {}", describe(&e))))?;
        Ok(rows
            .iter()
            .filter_map(|r| parse_gid(r.get(0)))
            .filter(|(_, branch_id)| names_resource(branch_id, &self.name))
            .collect())
    }

    async fn in_doubt(self: Arc<Self>) -> Result<Vec<(String, String)>, Retry> {
        let conn = get_conn(&self.pool).await.map_err(Retry)?;
        let msgs = conn
            .simple_query(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'twopc:%' AND database = current_database() \
                 ORDER BY prepared",
            )
            .await
            .map_err(|e| Retry(format!("listing prepared transactions: {}", describe(&e))))?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(parse_gid),
                _ => None,
            })
            .filter(|(_, branch_id)| names_resource(branch_id, &self.name))
            .collect())
    }
}

#[tonic::async_trait]
impl Resource for PgResource {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn kind(&self) -> BranchKind {
        BranchKind::Database
    }

    async fn prepare(&self, tx_id: &str, branch_id: &str) -> Vote {
        let inner = self.inner.clone();
        detached(inner.prepare(tx_id.to_string(), branch_id.to_string()))
            .await
            .unwrap_or_else(Vote::No)
    }

    async fn commit(&self, tx_id: &str, branch_id: &str) -> Result<(), Retry> {
        let inner = self.inner.clone();
        let res = detached(inner.commit(tx_id.to_string(), branch_id.to_string()))
            .await
            .map_err(Retry)?;
        self.inner.wait_published(tx_id, branch_id).await;
        res
    }

    async fn commit_one_phase(&self, tx_id: &str, branch_id: &str) -> Result<OnePhase, Retry> {
        let inner = self.inner.clone();
        let res = detached(inner.commit_one_phase(tx_id.to_string(), branch_id.to_string()))
            .await
            .map_err(Retry)?;
        self.inner.wait_published(tx_id, branch_id).await;
        res
    }

    async fn abort(&self, tx_id: &str, branch_id: &str) -> Result<AbortOutcome, Retry> {
        let inner = self.inner.clone();
        detached(inner.abort(tx_id.to_string(), branch_id.to_string()))
            .await
            .map_err(Retry)?
    }

    async fn in_doubt(&self) -> Result<Vec<(String, String)>, Retry> {
        let inner = self.inner.clone();
        detached(inner.in_doubt()).await.map_err(Retry)?
    }

    fn outcome_known(&self, tx_id: &str, branch_id: &str) {
        if let (Some(relay), Ok(gid)) = (self.inner.outbox.get(), gid_for(tx_id, branch_id)) {
            relay.forget_one_phase(gid);
        }
    }

    async fn remembered_commits(&self, older_than: Duration) -> Vec<(String, String)> {
        let inner = self.inner.clone();
        match detached(inner.remembered_commits(older_than)).await {
            Ok(Ok(list)) => list,
            Ok(Err(Retry(e))) | Err(e) => {
                debug!(resource = %self.inner.name, error = %e, "cannot list one-phase markers");
                Vec::new()
            }
        }
    }

    async fn open_branches(&self, older_than: Duration) -> Vec<(String, String)> {
        self.open_branch_list(older_than)
    }
}

impl PgResource {
    /// Branches opened here that have not prepared yet (a transaction is in progress on
    /// their connection), opened at least `older_than` ago.
    pub fn open_branch_list(&self, older_than: Duration) -> Vec<(String, String)> {
        let b = lock(&self.inner.branches);
        b.map
            .values()
            .filter(|slot| slot.opened_at.elapsed() >= older_than)
            // A branch in use right now is not abandoned; look again next time.
            .filter(|slot| matches!(slot.state.try_lock().as_deref(), Ok(State::Open { .. })))
            .map(|slot| (slot.tx_id.clone(), slot.branch_id.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip_and_stay_short() {
        let gid = gid_for("0000abcd-3-17", "orders:db").expect("valid");
        assert_eq!(gid, "twopc:0000abcd-3-17:orders:db");
        assert_eq!(
            parse_gid(&gid),
            Some(("0000abcd-3-17".into(), "orders:db".into()))
        );
        assert!(names_resource("orders:db", "db"));
        assert!(!names_resource("orders:db2", "db"));
        assert!(gid_for("a'b", "s:db").is_err());
        assert!(gid_for("a:b", "s:db").is_err());
        assert!(gid_for(&"x".repeat(64), &"y".repeat(140)).is_err());
        assert_eq!(parse_gid("other:1:s:db"), None);
        assert_eq!(parse_gid("twopc:1:db"), None);
    }

    #[test]
    fn block_ending_statements_are_refused() {
        for sql in [
            "COMMIT",
            " commit;",
            "end",
            "ROLLBACK",
            "rollback prepared 'x'",
            "PREPARE TRANSACTION 'x'",
            "BEGIN",
            "start transaction",
        ] {
            assert!(check_statement(sql).is_err(), "{sql}");
        }
        for sql in [
            "ROLLBACK TO SAVEPOINT a",
            "rollback to a",
            "SAVEPOINT a",
            "PREPARE q AS SELECT 1",
            "INSERT INTO t VALUES (1)",
            "select 1",
        ] {
            assert!(check_statement(sql).is_ok(), "{sql}");
        }
    }
}
