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
//!
//! ## Layout
//! `mod.rs` holds the resource (its branches, their bookkeeping and the [`Resource`]
//! methods the coordinator calls); `branch` the application's handle and the branch
//! states; `two_phase` prepare, commit and abort; `one_phase` the one-phase commit and
//! its marker and fence; `sql` the SQL plumbing they share.

mod branch;
mod one_phase;
mod sql;
mod two_phase;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tracing::debug;

use crate::broker::Broker;
use crate::client::{validate_name, BranchCommit, Transaction};
use crate::error::{Error, Result};
use crate::lock;
use crate::outbox::{OutboxOptions, Relay, OUTBOX_DDL};
use crate::resource::{AbortOutcome, BranchKind, OnePhase, Resource, Retry, Vote};

use branch::{OpenConn, Slot, State};
use sql::{describe, detached, first_cell, get_conn, gid_for, names_resource, parse_gid};

pub use branch::{DeferredParams, PgBranch};

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
            (Ok(enlisted), Ok(conn)) => {
                *guard = State::Open {
                    conn,
                    last_error: None,
                    xid: None,
                    begun: false,
                    unwritten: Vec::new(),
                    learn_xid: enlisted.commit == BranchCommit::HereInOnePhase,
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

    /// Runs a commit (two-phase or one-phase) of the branch off the caller's task, then
    /// waits for its messages to be published before answering (see
    /// `wait_published`); a commit that failed answers at once.
    async fn then_published<T: Send + 'static>(
        &self,
        tx_id: &str,
        branch_id: &str,
        commit: impl Future<Output = std::result::Result<T, Retry>> + Send + 'static,
    ) -> std::result::Result<T, Retry> {
        let res = detached(commit).await.map_err(Retry)?;
        self.inner.wait_published(tx_id, branch_id).await;
        res
    }
}

impl Transaction {
    /// Opens `pg`'s branch of this transaction (sugar for [`PgResource::begin`]).
    pub async fn postgres(&self, pg: &PgResource) -> Result<PgBranch> {
        pg.begin(self).await
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
        let commit = inner.commit(tx_id.to_string(), branch_id.to_string());
        self.then_published(tx_id, branch_id, commit).await
    }

    async fn commit_one_phase(&self, tx_id: &str, branch_id: &str) -> Result<OnePhase, Retry> {
        let inner = self.inner.clone();
        let commit = inner.commit_one_phase(tx_id.to_string(), branch_id.to_string());
        self.then_published(tx_id, branch_id, commit).await
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

impl Inner {
    fn slot(&self, key: &Key) -> Option<Arc<Slot>> {
        lock(&self.branches).map.get(key).cloned()
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
}
