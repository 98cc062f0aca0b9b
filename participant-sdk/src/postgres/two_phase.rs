//! The two-phase steps the coordinator drives: prepare (deferred statements and outbox
//! rows first, then `SELECT txid_current_if_assigned(); PREPARE TRANSACTION` in one round
//! trip), `COMMIT PREPARED`, abort (of an open, prepared or unknown branch) and the
//! in-doubt listing recovery asks for.

use std::sync::Arc;
use tracing::{debug, warn};

use deadpool_postgres::Object;
use tokio_postgres::error::SqlState;
use tokio_postgres::SimpleQueryMessage;

use super::branch::{Deferred, Slot, State, Unwritten};
use super::sql::{
    describe, discard, first_cell, get_conn, gid_for, in_block, insert_for, names_resource,
    parse_gid, prepare_deferred, run_deferred, take_written, write_rows,
};
use super::{Inner, OP_TIMEOUT};
use crate::resource::{AbortOutcome, OnePhase, Retry, Vote};

/// What failed in front of `PREPARE TRANSACTION`.
enum Failed {
    /// A deferred statement.
    Deferred(tokio_postgres::Error),
    /// `BEGIN`, or an outbox row.
    Rows(tokio_postgres::Error),
}

impl Inner {
    /// Runs one phase-two statement on a pooled connection. `Ok(true)`: done;
    /// `Ok(false)`: SQLSTATE 42704, no such prepared transaction.
    pub(super) async fn on_pooled(&self, sql: &str) -> Result<bool, Retry> {
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

    pub(super) async fn prepare(self: Arc<Self>, tx_id: String, branch_id: String) -> Vote {
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

    pub(super) async fn commit(
        self: Arc<Self>,
        tx_id: String,
        branch_id: String,
    ) -> Result<(), Retry> {
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

    /// Aborts a branch and says what became of it. The slot's state lock serialises this
    /// with the branch's commits, so a branch being committed in one phase is answered
    /// once that commit is over, from its outcome.
    pub(super) async fn abort(
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

    pub(super) async fn in_doubt(self: Arc<Self>) -> Result<Vec<(String, String)>, Retry> {
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
