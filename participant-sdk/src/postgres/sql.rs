//! The SQL plumbing every step shares: gids (`twopc:<tx_id>:<branch_id>`), opening the
//! block with the first statement ([`in_block`]), writing deferred statements and outbox
//! rows in the same round trip as the statement after them, the per-connection statement
//! cache, pooled connections that are closed rather than returned when in doubt, and work
//! detached from the caller's future (so a timed-out RPC cannot cut it in half).

use deadpool_postgres::{Object, Pool};
use std::future::Future;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage, Statement};

use super::branch::{Deferred, Slot, Unwritten};
use super::{GID_PREFIX, MAX_GID_BYTES, POOL_WAIT};
use crate::lock;
use crate::outbox::{Pending, OUTBOX_INSERT};

/// `twopc:<tx_id>:<branch_id>`, checked to be a safe SQL literal and short enough.
pub(super) fn gid_for(tx_id: &str, branch_id: &str) -> Result<String, String> {
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

/// `(tx_id, branch_id)` of one of our gids.
pub(super) fn parse_gid(gid: &str) -> Option<(String, String)> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let (tx_id, branch_id) = rest.split_once(':')?;
    if tx_id.is_empty() || !branch_id.contains(':') {
        return None;
    }
    Some((tx_id.to_string(), branch_id.to_string()))
}

/// The branch id `<service>:<resource>` names resource `name`.
pub(super) fn names_resource(branch_id: &str, name: &str) -> bool {
    branch_id
        .split_once(':')
        .map(|(_, r)| r == name)
        .unwrap_or(false)
}

/// The database's message with severity and SQLSTATE (and detail), or the client's
/// message for connection errors.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
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
pub(super) fn first_cell(msgs: &[SimpleQueryMessage]) -> Option<Option<String>> {
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
pub(super) async fn in_block<T>(
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
pub(super) fn take_written(
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
pub(super) async fn insert_for(
    conn: &Object,
    unwritten: &[Unwritten],
) -> Result<Option<Statement>, tokio_postgres::Error> {
    match unwritten.is_empty() {
        true => Ok(None),
        false => Ok(Some(prepared(conn, OUTBOX_INSERT).await?)),
    }
}

/// The query a local transaction's block runs as it begins (see [`State::Open`]).
pub(super) const TXID_CURRENT: &str = "SELECT txid_current()";

/// The xid, by `stmt` ([`TXID_CURRENT`]) if given; queued when first polled. `None` without
/// `stmt` or when the query failed (a one-phase commit then asks again).
pub(super) async fn learn_xid_of(conn: &Object, stmt: Option<&Statement>) -> Option<i64> {
    let row = conn.query_one(stmt?, &[]).await.ok()?;
    row.try_get::<_, i64>(0).ok()
}

/// Writes the rows of `items` with `stmt` ([`OUTBOX_INSERT`]; nothing without it): every
/// INSERT is queued, in order, when this future is first polled, so that what the caller
/// queues after it follows in the same round trip. One answer per item.
pub(super) async fn write_rows(
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
pub(super) async fn queue_all<F: Future>(requests: impl IntoIterator<Item = F>) -> Vec<F::Output> {
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
pub(super) async fn prepare_deferred(
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
pub(super) async fn run_deferred(
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
pub(super) const STATEMENT_CACHE: usize = 256;

/// `sql` prepared on `conn`, once per connection: the next run of the same text is one
/// round trip (Bind/Execute) instead of two (Parse/Describe, then Bind/Execute).
pub(super) async fn prepared(conn: &Object, sql: &str) -> Result<Statement, tokio_postgres::Error> {
    if conn.statement_cache.size() >= STATEMENT_CACHE {
        conn.statement_cache.clear();
    }
    conn.prepare_cached(sql).await
}

/// A pooled connection, waiting at most [`POOL_WAIT`].
pub(super) async fn get_conn(pool: &Pool) -> Result<Object, String> {
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
pub(super) fn discard(conn: Object) {
    drop(Object::take(conn));
}

/// Runs `fut` to completion in its own task, so the caller's cancellation (an RPC
/// timeout) cannot interrupt it halfway.
pub(super) async fn detached<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    tokio::spawn(fut)
        .await
        .map_err(|e| format!("internal error in the PostgreSQL adapter: {e}"))
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
}
