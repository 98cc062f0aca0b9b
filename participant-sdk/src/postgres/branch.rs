//! The application's side of a branch: [`PgBranch`] (its statements, deferred statements
//! and staged messages) and the state every branch of the resource is in ([`State`],
//! shared with the coordinator's side through its [`Slot`]). Statements that would end the
//! transaction block behind the SDK's back are refused here.

use crate::broker::Broker;
use crate::error::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use tokio_postgres::types::ToSql;

use deadpool_postgres::Object;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_postgres::Row;

use super::sql::{
    describe, discard, in_block, insert_for, learn_xid_of, prepare_deferred, prepared,
    run_deferred, take_written, write_rows, TXID_CURRENT,
};
use super::Inner;
use crate::broker::PublishOptions;
use crate::error::Error;
use crate::lock;
use crate::outbox::{encode_headers, Pending};
use crate::staging::StagedMessage;

/// One branch's state, shared by the resource and the application's [`PgBranch`]
/// handles.
pub(super) struct Slot {
    pub(super) tx_id: String,
    pub(super) branch_id: String,
    pub(super) gid: String,
    pub(super) state: Arc<Mutex<State>>,
    /// When the branch was opened: recovery looks at open branches only once they are
    /// this old, to leave the application time to use them.
    pub(super) opened_at: std::time::Instant,
    /// Messages staged in the outbox table by this branch, published once it commits.
    pub(super) outbox: StdMutex<Vec<Pending>>,
    /// How many messages the branch staged (the next one's index; never reused, even
    /// when a savepoint rolled one back).
    pub(super) published: AtomicUsize,
    /// The publishing of those messages, once the branch committed.
    pub(super) publishing: StdMutex<Option<JoinHandle<()>>>,
}

pub(super) enum State {
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
        /// Enlisting said this process commits the branch in one phase
        /// ([`BranchCommit::HereInOnePhase`](crate::BranchCommit::HereInOnePhase)): its
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
pub(super) struct Deferred {
    pub(super) sql: String,
    pub(super) params: DeferredParams,
}

/// A message [`PgBranch::publish`] staged, whose row is not written yet.
pub(super) struct Unwritten {
    pub(super) broker: String,
    pub(super) message: StagedMessage,
    /// `message.headers`, encoded for the row.
    pub(super) headers: Option<String>,
}

/// The connection of an open branch: a transaction is in progress on it. If the branch is
/// dropped while open (its resource dropped, its state replaced without going through
/// prepare/commit/abort), the connection is closed — PostgreSQL rolls the transaction
/// back — and never returned to the pool, where the next user would otherwise run inside
/// this abandoned transaction and commit its writes.
pub(super) struct OpenConn(pub(super) Option<Box<Object>>);

impl OpenConn {
    /// Takes the connection out; the caller now owns finishing its transaction.
    pub(super) fn into_inner(mut self) -> Object {
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
    pub(super) fn is_terminal(&self) -> bool {
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
    pub(super) fn describe(&self) -> String {
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
    pub(super) inner: Arc<Inner>,
    pub(super) slot: Arc<Slot>,
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

    pub(super) fn internal(&self, what: &str) -> Error {
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
    pub(super) async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        kind: Kind,
    ) -> Result<Out> {
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
    pub(super) async fn forget_rolled_back(&self, state: &mut State) -> Result<()> {
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
    /// attached with [`PgResource::enable_outbox`](super::PgResource::enable_outbox). Returns the message id,
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

    pub(super) fn not_open(&self, state: &State) -> Error {
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
    pub(super) fn finish<T>(
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
pub(super) enum Kind {
    Execute,
    Query,
    QueryOne,
}

/// A statement's result, by [`Kind`].
pub(super) enum Out {
    Count(u64),
    Rows(Vec<Row>),
    Row(Row),
}

/// The branch's error record while a statement runs: if the caller drops the statement's
/// future, its outcome is never read and it may have aborted the block, so the branch
/// must then be treated as if a statement had failed (a one-phase commit checks the
/// block first, and a prepare reports this).
pub(super) const UNREAD: &str =
    "a statement was cancelled before its result was read (it may have failed)";

/// The first two keywords of `sql`, upper-cased.
pub(super) fn first_words(sql: &str) -> (String, String) {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    let second = words.next().unwrap_or("").to_ascii_uppercase();
    (first, second)
}

/// `ROLLBACK TO [SAVEPOINT] ...`.
pub(super) fn rolls_back_to_savepoint(sql: &str) -> bool {
    let (first, second) = first_words(sql);
    first == "ROLLBACK" && second == "TO"
}

/// Refuses statements that would end the branch's transaction block behind the SDK's
/// back (checked on the first keyword; `ROLLBACK TO [SAVEPOINT]` is allowed).
pub(super) fn check_statement(sql: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
