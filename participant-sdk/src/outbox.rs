//! Messages that commit with a PostgreSQL branch: the database-staged outbox.
//!
//! [`PgBranch::publish`](crate::PgBranch::publish) writes the message into the
//! `twopc_outbox` table on the branch's own connection, inside its open transaction, instead
//! of enlisting a broker branch — not at once, but in front of the branch's next statement
//! or of its `COMMIT` (or `PREPARE TRANSACTION`), in the same round trip, so publishing
//! costs no round trip of its own. The message therefore commits or rolls back with the
//! branch's rows:
//!
//! * when the transaction has no other branch, in **one phase** — no `PREPARE TRANSACTION`,
//!   no prepare round, no sync of a staging store (the coordinator only syncs its one-phase
//!   intent and outcome, shared with every other commit of the moment);
//! * otherwise inside the branch's prepared transaction, like any other row of it.
//!
//! Once the branch has committed, the **relay** of the resource publishes its messages
//! within `publish_linger` (2 ms: what commits meanwhile, and while the previous batch
//! waits for its confirmation, goes in the same batch), in a task of their own (in order,
//! each with its deterministic message id `<tx_id>:<branch_id>:<index>`, waiting for the
//! broker's confirmation), and a relay task
//! deletes the rows the broker confirmed, many per statement. While fewer than
//! `publish_window` committed branches are being published, the commit answers as soon as
//! the database committed; beyond that it waits (at most `publish_wait`) for its own
//! messages, so a busy broker slows the commits down instead of falling ever further
//! behind them. Rows that a crash left behind — committed but not yet published, or
//! published but not yet deleted — are published by the **sweep**: every
//! `sweep_interval` it takes the rows older than `sweep_after` with
//! `FOR UPDATE SKIP LOCKED` (two processes never sweep the same row at once), oldest
//! first, publishes them and deletes them in the same transaction; a row it cannot
//! publish now stays and is passed over. A branch that recovery commits after a restart
//! (its messages are no longer in memory) is swept at once. A `ROLLBACK TO SAVEPOINT`
//! run through the branch forgets the messages whose rows it rolled back.
//!
//! Delivery is at least once, as for broker branches: a crash between the broker's
//! confirmation and the delete publishes a message again, with the same message id, which
//! the broker (NATS JetStream's duplicate window) or the consumer
//! ([`crate::dedup`]) drops. A message the broker refuses stays in the table and is
//! retried by every sweep; [`PgResource::outbox_backlog`](crate::PgResource::outbox_backlog)
//! counts what is waiting.
//!
//! A row's age counts from its insert: a transaction that stays open longer than
//! `sweep_after` may have its messages published twice (same message ids) when a sweep
//! runs right after its commit.
//!
//! Broker names must be unique per database: the sweep of a process takes the rows of the
//! brokers it has attached with
//! [`PgResource::enable_outbox`](crate::PgResource::enable_outbox).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::broker::{Broker, PublishOutcome};
use crate::staging::StagedMessage;
use crate::{crash_point, lock};

/// The table the messages are staged in (created by `enable_outbox` when missing).
pub const OUTBOX_TABLE: &str = "twopc_outbox";

/// `CREATE TABLE IF NOT EXISTS` of [`OUTBOX_TABLE`].
pub(crate) const OUTBOX_DDL: &str = "CREATE TABLE IF NOT EXISTS twopc_outbox (
    id bigserial PRIMARY KEY,
    broker text NOT NULL,
    gid text NOT NULL,
    message_id text NOT NULL,
    destination text NOT NULL,
    payload bytea NOT NULL,
    headers text,
    content_type text,
    staged_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS twopc_one_phase (
    gid text PRIMARY KEY,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    fenced boolean NOT NULL DEFAULT false
);
ALTER TABLE twopc_one_phase ADD COLUMN IF NOT EXISTS fenced boolean NOT NULL DEFAULT false";

/// The statement a one-phase commit runs in front of `COMMIT` (prepared, the gid bound):
/// the marker that tells a repeated one-phase commit after a restart that the first one
/// happened.
pub(crate) const ONE_PHASE_MARK: &str = "INSERT INTO twopc_one_phase (gid) VALUES ($1)";

/// The statement that settles a one-phase commit whose answer was lost (or that a
/// restarted process no longer knows): it inserts a *fence* (a row with `fenced` set) under
/// the gid unless a row is there, and returns the row's `fenced`. `false`: the commit's
/// marker is there, so it committed. `true`: it did not commit, and now never will — a
/// commit still on its way (its statements and `COMMIT` sent on a connection whose answer
/// was lost) fails on the fence when it inserts its marker. A commit that inserted its
/// marker but has not ended yet holds the gid's index entry: the fence waits for its end
/// and then sees its marker (committed) or takes the place (rolled back).
pub(crate) const ONE_PHASE_FENCE: &str = "INSERT INTO twopc_one_phase (gid, fenced) \
    VALUES ($1, true) ON CONFLICT (gid) DO UPDATE SET fenced = twopc_one_phase.fenced \
    RETURNING fenced";

/// The statement [`crate::PgBranch::publish`] runs on the branch's connection.
pub(crate) const OUTBOX_INSERT: &str = "INSERT INTO twopc_outbox \
    (broker, gid, message_id, destination, payload, headers, content_type) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id, txid_current()";

const SELECT_COLUMNS: &str =
    "SELECT id, broker, message_id, destination, payload, headers, content_type FROM twopc_outbox";

const DELETE_ROWS: &str = "DELETE FROM twopc_outbox WHERE id = ANY($1)";

const DELETE_MARKERS: &str = "DELETE FROM twopc_one_phase WHERE gid = ANY($1)";

/// Most rows one sweep query takes.
const SWEEP_BATCH: i64 = 500;

/// Most sweep queries per sweep (the rest waits for the next tick).
const SWEEP_ROUNDS: usize = 20;

/// Most messages published in one batch.
const PUBLISH_BATCH: usize = 512;

/// Most batches being published at once: one, so that what commits while a batch waits
/// for its confirmation forms the next batch (fewer, larger batches cost the broker less
/// per message).
const IN_FLIGHT: usize = 1;

/// Most one-phase markers kept in memory for another delete attempt.
const MAX_UNFORGOTTEN: usize = 100_000;

/// Most rows deleted by one statement.
const DELETE_BATCH: usize = 4096;

/// Settings of the relay of a resource's outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxOptions {
    /// How often the sweep looks for rows left behind. Default 5 s.
    pub sweep_interval: Duration,
    /// How old a row must be before the sweep takes it (the relay publishes a committed
    /// branch's messages within milliseconds; this leaves it the time). Default 10 s.
    pub sweep_after: Duration,
    /// How many committed branches may be publishing at once before a commit waits for
    /// its own messages. Within the window a commit answers as soon as the database
    /// committed; beyond it, the commit answers once the broker confirmed its messages
    /// (or `publish_wait` ran out). This keeps a busy broker from falling ever further
    /// behind the commits: events are delivered within about `publish_window` publishes
    /// of their commit. It also bounds the relay's batches (a branch waiting for a place
    /// is not in one), so it should hold what commits during one publish cycle (the
    /// linger plus the broker's confirmation): at ~9,000 commits/s a window of 64 capped
    /// the order benchmark's throughput ~9% below a window of 256. Default 256.
    pub publish_window: usize,
    /// How long the marker of a one-phase commit is kept when its transaction's owner
    /// never reported the outcome known (it runs in another process, or died before its
    /// Commit returned). While it is kept, a coordinator that lost the answer of the
    /// one-phase commit and asks again after this process restarted is told "committed";
    /// after it, "refused". Default 24 h.
    pub marker_retention: Duration,
    /// The longest a commit waits when the window is full (its messages are published
    /// either way; a broker that is down only delays the answer by this much). Keep it
    /// below the coordinator's RPC timeout. Default 1 s.
    pub publish_wait: Duration,
    /// How long the publisher waits, once a committed branch is there to publish, for
    /// others to join its batch (at most 1 s; zero publishes at once). Under load a
    /// batch of many messages costs the broker far less per message than many batches
    /// of one (RabbitMQ: about 45 µs of CPU per message instead of 70 in the order
    /// benchmark); an idle service delivers its events this much later. Default 2 ms.
    pub publish_linger: Duration,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            sweep_interval: Duration::from_secs(5),
            sweep_after: Duration::from_secs(10),
            publish_window: 256,
            marker_retention: Duration::from_secs(24 * 3600),
            publish_wait: Duration::from_secs(1),
            publish_linger: Duration::from_millis(2),
        }
    }
}

/// A message staged in the table by an open branch, published once the branch commits.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    /// The row's id.
    pub row: i64,
    /// The broker's resource name.
    pub broker: String,
    /// The message.
    pub message: StagedMessage,
}

/// Work for the relay task.
enum Job {
    /// These rows' messages were confirmed: delete the rows.
    Delete(Vec<i64>),
    /// The coordinator knows these one-phase commits: delete their markers.
    Forget(String),
    /// A branch committed by recovery: publish whatever rows it left.
    SweepGid(String),
    /// Look for rows older than `sweep_after` (at start, before the first tick).
    Sweep,
}

/// The handle a resource keeps on its relay. Dropping it stops the relay task.
pub(crate) struct Relay {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Committed branches for the publisher task.
    committed: mpsc::UnboundedSender<Committed>,
}

/// A committed branch on its way to the broker.
struct Committed {
    pending: Vec<Pending>,
    /// Its place in the publish window, given back once its messages are confirmed.
    place: OwnedSemaphorePermit,
    /// Told when its messages are published (if its commit waits for that).
    done: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field(
                "brokers",
                &lock(&self.shared.brokers).keys().collect::<Vec<_>>(),
            )
            .field("options", &self.shared.options)
            .finish()
    }
}

impl Relay {
    /// Starts the relay task of resource `resource` on `pool`.
    pub(crate) fn start(resource: &str, pool: Pool, options: OutboxOptions) -> Relay {
        let shared = Arc::new(Shared {
            resource: resource.to_string(),
            pool,
            brokers: Mutex::default(),
            window: Arc::new(Semaphore::new(options.publish_window)),
            options,
        });
        let (jobs, rx) = mpsc::unbounded_channel();
        let (committed, branches) = mpsc::unbounded_channel();
        tokio::spawn(run(shared.clone(), rx));
        tokio::spawn(publisher(shared.clone(), branches, jobs.clone()));
        Relay {
            shared,
            jobs,
            committed,
        }
    }

    /// The options it runs with.
    pub(crate) fn options(&self) -> &OutboxOptions {
        &self.shared.options
    }

    /// Attaches `broker` (its rows are published and swept from now on) and sweeps once.
    pub(crate) fn attach(&self, broker: Arc<dyn Broker>) {
        lock(&self.shared.brokers).insert(broker.name().to_string(), broker);
        let _ = self.jobs.send(Job::Sweep);
    }

    /// Whether a broker of this name is attached.
    pub(crate) fn has(&self, broker: &str) -> bool {
        lock(&self.shared.brokers).contains_key(broker)
    }

    /// A branch committed with these messages: hand them to the publisher task (which
    /// publishes them with whatever else committed meanwhile), whose relay task then
    /// deletes their rows. While fewer than `publish_window` branches are being
    /// published, returns `None` (the commit answers at once); otherwise returns a task
    /// that waits for a place in the window and then for the messages' confirmation, and
    /// the commit waits for it up to `publish_wait`.
    pub(crate) fn committed(&self, pending: Vec<Pending>) -> Option<JoinHandle<()>> {
        if pending.is_empty() {
            return None;
        }
        if let Ok(place) = self.shared.window.clone().try_acquire_owned() {
            let _ = self.committed.send(Committed {
                pending,
                place,
                done: None,
            });
            return None;
        }
        let window = self.shared.window.clone();
        let publisher = self.committed.clone();
        Some(tokio::spawn(async move {
            let Ok(place) = window.acquire_owned().await else {
                return;
            };
            let (done, published) = oneshot::channel();
            let branch = Committed {
                pending,
                place,
                done: Some(done),
            };
            if publisher.send(branch).is_ok() {
                let _ = published.await;
            }
        }))
    }

    /// The coordinator holds the outcome of branch `gid`: its one-phase marker (if any)
    /// can go.
    pub(crate) fn forget_one_phase(&self, gid: String) {
        let _ = self.jobs.send(Job::Forget(gid));
    }

    /// Recovery committed branch `gid`.
    pub(crate) fn sweep_gid(&self, gid: String) {
        let _ = self.jobs.send(Job::SweepGid(gid));
    }
}

/// What the relay's tasks share.
struct Shared {
    resource: String,
    pool: Pool,
    brokers: Mutex<HashMap<String, Arc<dyn Broker>>>,
    options: OutboxOptions,
    /// One permit per branch whose messages are being published.
    window: Arc<Semaphore>,
}

/// Which rows a sweep takes.
enum Which<'a> {
    Old,
    Gid(&'a str),
}

/// The publisher task: once a committed branch is queued and a batch may start, waits
/// `publish_linger`, then takes every committed branch queued (up to [`PUBLISH_BATCH`]
/// messages) and publishes them in one batch per broker, with up to [`IN_FLIGHT`]
/// batches at once (while they are all busy, the next batch grows).
async fn publisher(
    shared: Arc<Shared>,
    mut branches: mpsc::UnboundedReceiver<Committed>,
    jobs: mpsc::UnboundedSender<Job>,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = branches.recv().await {
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            break;
        };
        if !shared.options.publish_linger.is_zero() {
            tokio::time::sleep(shared.options.publish_linger).await;
        }
        let mut batch = vec![first];
        let mut messages = batch[0].pending.len();
        while messages < PUBLISH_BATCH {
            match branches.try_recv() {
                Ok(b) => {
                    messages += b.pending.len();
                    batch.push(b);
                }
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let all: Vec<Pending> = batch
                .iter()
                .flat_map(|b| b.pending.iter().cloned())
                .collect();
            let confirmed = shared.publish(&all).await;
            drop(slot);
            if !confirmed.is_empty() {
                let _ = jobs.send(Job::Delete(confirmed));
            }
            for branch in batch {
                drop(branch.place);
                if let Some(done) = branch.done {
                    let _ = done.send(());
                }
            }
        });
    }
}

/// The relay task: deletes the rows of confirmed messages (everything queued in one
/// statement) and sweeps, until the [`Relay`] is dropped.
async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut tick = tokio::time::interval(shared.options.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Markers whose delete failed (PostgreSQL unreachable), retried at each tick; beyond
    // MAX_UNFORGOTTEN the oldest are left to `marker_retention`.
    let mut unforgotten: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            job = rx.recv() => {
                let Some(job) = job else { break };
                let mut delete = Vec::new();
                let mut forget = Vec::new();
                let mut sweep_gids = Vec::new();
                let mut sweep_old = false;
                let mut next = Some(job);
                while let Some(job) = next {
                    match job {
                        Job::Delete(rows) => delete.extend(rows),
                        Job::Forget(gid) => forget.push(gid),
                        Job::SweepGid(g) => sweep_gids.push(g),
                        Job::Sweep => sweep_old = true,
                    }
                    next = if delete.len() + forget.len() < DELETE_BATCH {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                shared.delete(delete).await;
                unforgotten.extend(shared.forget(forget).await);
                if unforgotten.len() > MAX_UNFORGOTTEN {
                    let excess = unforgotten.len() - MAX_UNFORGOTTEN;
                    unforgotten.drain(..excess);
                }
                for gid in sweep_gids {
                    shared.sweep(Which::Gid(&gid)).await;
                }
                if sweep_old {
                    shared.sweep(Which::Old).await;
                }
            }
            _ = tick.tick() => {
                shared.sweep(Which::Old).await;
                unforgotten = shared.forget(std::mem::take(&mut unforgotten)).await;
                shared.expire_markers().await;
            }
        }
    }
    debug!(resource = shared.resource, "outbox relay stopped");
}

impl Shared {
    fn broker(&self, name: &str) -> Option<Arc<dyn Broker>> {
        lock(&self.brokers).get(name).cloned()
    }

    /// Publishes `rows` (grouped by broker, in order) and returns the ids of the rows the
    /// broker confirmed.
    async fn publish(&self, rows: &[Pending]) -> Vec<i64> {
        let mut by_broker: Vec<(String, Vec<&Pending>)> = Vec::new();
        for p in rows {
            match by_broker.iter_mut().find(|(b, _)| *b == p.broker) {
                Some((_, v)) => v.push(p),
                None => by_broker.push((p.broker.clone(), vec![p])),
            }
        }
        let mut confirmed = Vec::with_capacity(rows.len());
        for (name, group) in by_broker {
            let Some(broker) = self.broker(&name) else {
                warn!(
                    resource = self.resource,
                    broker = name,
                    rows = group.len(),
                    "outbox rows for a broker that is not attached here stay in the table"
                );
                continue;
            };
            crash_point("participant::outbox::before_publish");
            let messages: Vec<StagedMessage> = group.iter().map(|p| p.message.clone()).collect();
            let timeout = broker.core().options().publish_timeout;
            let outcomes = tokio::time::timeout(
                timeout + Duration::from_secs(1),
                broker.publish_confirmed(&messages, timeout),
            )
            .await
            .unwrap_or_default();
            let mut failed = None;
            for (i, p) in group.iter().enumerate() {
                match outcomes.get(i) {
                    Some(PublishOutcome::Confirmed) => confirmed.push(p.row),
                    Some(PublishOutcome::NotSent(e) | PublishOutcome::Unconfirmed(e)) => {
                        failed.get_or_insert_with(|| e.clone());
                    }
                    None => {
                        failed.get_or_insert_with(|| format!("no confirmation within {timeout:?}"));
                    }
                }
            }
            if let Some(e) = failed {
                warn!(
                    resource = self.resource,
                    broker = name,
                    error = e,
                    "outbox messages not confirmed; the sweep retries them"
                );
            }
        }
        crash_point("participant::outbox::after_publish_before_delete");
        confirmed
    }

    /// Runs `sql` (a prepared `DELETE ... WHERE ... = ANY($1)`) with `keys` on a pooled
    /// connection.
    async fn delete_keys<K>(&self, sql: &str, keys: &[K]) -> Result<u64, String>
    where
        K: tokio_postgres::types::ToSql + Sync,
    {
        let conn = self.pool.get().await.map_err(|e| e.to_string())?;
        let stmt = conn.prepare_cached(sql).await.map_err(|e| e.to_string())?;
        conn.execute(&stmt, &[&keys])
            .await
            .map_err(|e| e.to_string())
    }

    /// Deletes the rows of published messages. A row not deleted (this failed, or the
    /// process died first) is published again by a sweep, with the same message id.
    async fn delete(&self, rows: Vec<i64>) {
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.delete_keys(DELETE_ROWS, &rows).await {
            warn!(
                resource = self.resource,
                error = e,
                "deleting published outbox rows failed; the sweep publishes them again"
            );
        }
    }

    /// Deletes the one-phase markers of `gids`; returns them if that failed (the caller
    /// tries again at the next sweep).
    async fn forget(&self, gids: Vec<String>) -> Vec<String> {
        if gids.is_empty() {
            return gids;
        }
        match self.delete_keys(DELETE_MARKERS, &gids).await {
            Ok(_) => Vec::new(),
            Err(e) => {
                warn!(
                    resource = self.resource,
                    error = e,
                    markers = gids.len(),
                    "deleting one-phase markers failed; retried at the next sweep"
                );
                gids
            }
        }
    }

    /// Deletes one-phase markers older than `marker_retention` (those whose transaction's
    /// owner ran elsewhere, or died before its Commit returned), a bounded number per
    /// call.
    async fn expire_markers(&self) {
        let res = async {
            let conn = self.pool.get().await.map_err(|e| e.to_string())?;
            let age = self.options.marker_retention.as_secs_f64();
            conn.execute(
                "DELETE FROM twopc_one_phase WHERE ctid IN (SELECT ctid FROM twopc_one_phase \
                 WHERE committed_at < clock_timestamp() - make_interval(secs => $1) LIMIT 10000)",
                &[&age],
            )
            .await
            .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = res {
            warn!(
                resource = self.resource,
                error = e,
                "expiring one-phase markers failed"
            );
        }
    }

    /// Publishes and deletes left-behind rows, oldest first (bounded per call). Rows
    /// that cannot be published now (refused, unreadable) are passed over, so they never
    /// hold back the rows behind them.
    async fn sweep(&self, which: Which<'_>) {
        let mut after_id = 0i64;
        for _ in 0..SWEEP_ROUNDS {
            match self.sweep_once(&which, after_id).await {
                Ok(Some(last)) if matches!(which, Which::Old) => after_id = last,
                Ok(_) => return,
                Err(e) => {
                    warn!(resource = self.resource, error = e, "outbox sweep failed");
                    return;
                }
            }
        }
    }

    /// One sweep query over rows with an id above `after_id`: returns the last id it
    /// took when it took a full batch (there may be more).
    async fn sweep_once(&self, which: &Which<'_>, after_id: i64) -> Result<Option<i64>, String> {
        let brokers: Vec<String> = lock(&self.brokers).keys().cloned().collect();
        if brokers.is_empty() {
            return Ok(None);
        }
        let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
        let tx = conn.transaction().await.map_err(|e| e.to_string())?;
        let rows = match which {
            Which::Old => {
                let age = self.options.sweep_after.as_secs_f64();
                tx.query(
                    &format!(
                        "{SELECT_COLUMNS} WHERE broker = ANY($1) AND id > $2 \
                         AND staged_at < clock_timestamp() - make_interval(secs => $3) \
                         ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&brokers, &after_id, &age, &SWEEP_BATCH],
                )
                .await
            }
            Which::Gid(gid) => {
                tx.query(
                    &format!(
                        "{SELECT_COLUMNS} WHERE broker = ANY($1) AND gid = $2 \
                         ORDER BY id FOR UPDATE SKIP LOCKED"
                    ),
                    &[&brokers, gid],
                )
                .await
            }
        }
        .map_err(|e| e.to_string())?;
        let last = rows.last().and_then(|r| r.try_get::<_, i64>(0).ok());
        let mut pending = Vec::with_capacity(rows.len());
        for r in &rows {
            match pending_of(r) {
                Ok(p) => pending.push(p),
                Err(e) => warn!(
                    resource = self.resource,
                    error = e,
                    "an outbox row cannot be read; it stays in the table"
                ),
            }
        }
        let done = if pending.is_empty() {
            Vec::new()
        } else {
            self.publish(&pending).await
        };
        if !done.is_empty() {
            tx.execute(DELETE_ROWS, &[&done])
                .await
                .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        if !rows.is_empty() {
            debug!(
                resource = self.resource,
                taken = rows.len(),
                published = done.len(),
                "outbox sweep"
            );
        }
        Ok(last.filter(|_| rows.len() as i64 >= SWEEP_BATCH))
    }
}

/// The message of one outbox row (the columns of `SELECT_COLUMNS`).
fn pending_of(r: &tokio_postgres::Row) -> Result<Pending, String> {
    let id: i64 = r.try_get(0).map_err(|e| e.to_string())?;
    let headers: Option<String> = r.try_get(5).map_err(|e| e.to_string())?;
    let headers: Vec<(String, String)> = match headers {
        Some(h) => serde_json::from_str(&h)
            .map_err(|e| format!("row {id}: unreadable headers column: {e}"))?,
        None => Vec::new(),
    };
    Ok(Pending {
        row: id,
        broker: r.try_get(1).map_err(|e| e.to_string())?,
        message: StagedMessage {
            message_id: r.try_get(2).map_err(|e| e.to_string())?,
            destination: r.try_get(3).map_err(|e| e.to_string())?,
            payload: r.try_get(4).map_err(|e| e.to_string())?,
            headers,
            content_type: r.try_get(6).map_err(|e| e.to_string())?,
        },
    })
}

/// Encodes message headers for the `headers` column (`NULL` when there are none).
pub(crate) fn encode_headers(headers: &[(String, String)]) -> Option<String> {
    if headers.is_empty() {
        None
    } else {
        serde_json::to_string(headers).ok()
    }
}
