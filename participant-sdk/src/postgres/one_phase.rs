//! The one-phase commit of a branch (`COMMIT` on its own connection, with whatever is
//! still unwritten in front of it in one round trip) and how a lost answer is settled:
//! with the outbox, by the commit's marker row or a fence that stops a late `COMMIT`
//! (`twopc_one_phase`); without it, by `txid_status` of the branch's transaction id. Also
//! the markers recovery reports as remembered commits.

use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

use deadpool_postgres::Object;
use tokio_postgres::error::SqlState;

use super::branch::{Deferred, Slot, State, Unwritten};
use super::sql::{
    describe, discard, first_cell, get_conn, gid_for, in_block, insert_for, names_resource,
    parse_gid, prepare_deferred, prepared, run_deferred, take_written, write_rows,
};
use super::{Inner, OP_TIMEOUT};
use crate::lock;
use crate::outbox::{ONE_PHASE_FENCE, ONE_PHASE_MARK};
use crate::resource::{OnePhase, Retry};

/// An open branch's connection and what the one-phase commit needs of its state.
struct Open {
    pub(super) conn: Object,
    pub(super) last_error: Option<String>,
    /// The xid, if a statement learned it.
    pub(super) known: Option<i64>,
    pub(super) begun: bool,
    pub(super) unwritten: Vec<Unwritten>,
    pub(super) deferred: Vec<Deferred>,
}

/// How a one-phase `COMMIT` that did not succeed ended.
enum Ended {
    /// PostgreSQL refused it (the block rolled back): the reason.
    Refused(String),
    /// The answer was lost (connection): the outcome is to be found out.
    Lost,
}

/// Most one-phase markers one recovery pass reports per resource.
const REMEMBERED_BATCH: i64 = 1_000;

/// Outcome of `txid_status`.
enum XidOutcome {
    Committed,
    Aborted,
    Unknown(String),
}

impl Inner {
    /// Whether a one-phase commit of `gid` happened (its marker is there), making sure
    /// that if it did not, it never will: the fence of [`ONE_PHASE_FENCE`] takes the
    /// gid's place, and waits for a commit that inserted its marker but has not ended.
    /// `Err` when PostgreSQL cannot tell now (unreachable, or that commit still running
    /// after [`OP_TIMEOUT`]): the caller retries.
    pub(super) async fn settle_one_phase(&self, gid: &str) -> Result<bool, Retry> {
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
    pub(super) async fn wait_published(&self, tx_id: &str, branch_id: &str) {
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

    pub(super) async fn commit_one_phase(
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
    pub(super) async fn resolve_one_phase(
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

    /// The one-phase markers of this resource's branches older than `older_than` (at most
    /// [`REMEMBERED_BATCH`] per call, oldest first); none while the marker table does not
    /// exist. Not tied to this process's outbox: an earlier process's markers are there
    /// (and reported) whether or not [`PgResource::enable_outbox`] has run yet here.
    pub(super) async fn remembered_commits(
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
}
