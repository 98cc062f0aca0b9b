//! The runtime's answers for transactions the engine no longer holds, and the views behind
//! GetTransaction / ListTransactions.
//!
//! A child module of [`crate::runtime`]. A transaction is answered in one order:
//!
//! 1. the engine, while it holds the transaction in memory;
//! 2. the decision log's COMMIT record (or an operator's accepted COMMIT of a one-phase
//!    commit): COMMITTED;
//! 3. the log's low-water mark of collection ([`DecisionLog::collected`]): the record was
//!    collected after the retention, so the transaction finished and its outcome is no
//!    longer kept: [`Known::Forgotten`], never taken for an abort;
//! 4. presumed abort: ABORTED.
//!
//! An id this coordinator never issued is NOT_FOUND. A Commit or an Abort of a forgotten
//! transaction is refused (FAILED_PRECONDITION, saying so). A participant's report of a
//! local commit of one is accepted: only that report or the branch's own answer can have
//! finished a local transaction, and either said COMMITTED. So is its release of an id it
//! never used: nothing is left to give back.

use super::{lock, unexpected, CommitResult, Runtime};
use crate::engine::{Event, Outcome, Provenance, ReplyOk, TxEntry, TxError, TxState};
use crate::log::{DecisionLog, LogError};
use crate::transport::Transport;
use crate::types::{HeuristicDecision, TxId};

/// What is known of a transaction's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// Not decided yet (the engine holds it).
    Undecided,
    /// Decided.
    Decided(Outcome),
    /// Finished long enough ago that its record was collected: the outcome is no longer
    /// kept. Not an abort: a person must look at what its branches did.
    Forgotten,
}

impl Known {
    /// The outcome, when it is known.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            Known::Decided(outcome) => Some(outcome),
            Known::Undecided | Known::Forgotten => None,
        }
    }
}

/// A snapshot of one transaction for GetTransaction / ListTransactions.
#[derive(Clone, Debug)]
pub struct TxView {
    /// The transaction.
    pub tx: TxId,
    /// In memory: the engine's entry. `None` when answered from the log.
    pub live: Option<TxEntry>,
    /// What is known of its outcome.
    pub known: Known,
    /// Age in ms (live transactions only).
    pub age_ms: u64,
}

/// Why a request about a forgotten transaction cannot be carried out.
pub(super) fn forgotten(tx: &TxId, action: &str) -> TxError {
    TxError::FailedPrecondition(format!(
        "transaction {tx} cannot be {action}: it finished and its record was collected \
         after the decision retention (--decision-retention-ms), so its outcome is no \
         longer kept"
    ))
}

impl<L: DecisionLog, T: Transport> Runtime<L, T> {
    /// The answer to a Commit of a transaction the engine no longer holds, from the log.
    pub(super) async fn answer_finished(
        &self,
        tx: TxId,
        answer_before_durable: bool,
        epoch: u64,
    ) -> Result<CommitResult, TxError> {
        match self.finished(&tx)? {
            Outcome::Committed => {
                // The record may be a one-phase outcome answered early to an earlier call
                // and not synced yet.
                if !answer_before_durable {
                    self.sync_log().await?;
                }
                Ok(CommitResult::finished(epoch))
            }
            Outcome::Aborted => Err(TxError::Aborted(format!(
                "transaction {tx} aborted: no COMMIT decision is recorded for it (presumed abort)"
            ))),
        }
    }

    /// The answer to a report of a local commit of a transaction the engine no longer
    /// holds (see the module docs for a forgotten one).
    pub(super) async fn answer_reported(
        &self,
        tx: TxId,
        answer_before_durable: bool,
        epoch: u64,
    ) -> Result<CommitResult, TxError> {
        match self.known(&tx)? {
            Known::Forgotten => Ok(CommitResult::finished(epoch)),
            _ => self.answer_finished(tx, answer_before_durable, epoch).await,
        }
    }

    /// Runs an abort of `tx` (`event`) and answers like the Abort RPC; `if_forgotten` is
    /// the answer for a transaction whose record was collected.
    pub(super) async fn aborted(
        &self,
        tx: TxId,
        event: impl FnOnce(u64) -> Event,
        if_forgotten: Result<(), TxError>,
    ) -> Result<(), TxError> {
        match self.request(event).await? {
            ReplyOk::Aborted => Ok(()),
            ReplyOk::NotLive => match self.known(&tx)? {
                Known::Forgotten => if_forgotten,
                Known::Decided(Outcome::Committed) => {
                    self.sync_log().await?;
                    Err(TxError::FailedPrecondition(format!(
                        "transaction {tx} cannot be aborted: its outcome is COMMITTED"
                    )))
                }
                Known::Decided(Outcome::Aborted) => Ok(()),
                Known::Undecided => Err(TxError::Unavailable(format!(
                    "transaction {tx} is not decided yet"
                ))),
            },
            other => Err(unexpected(other)),
        }
    }

    /// GetTransaction RPC.
    pub fn get(&self, tx: TxId) -> Result<TxView, TxError> {
        {
            let engine = lock(&self.inner.engine);
            if let Some(e) = engine.tx(&tx) {
                return Ok(self.view(tx, e));
            }
        }
        Ok(TxView {
            tx,
            live: None,
            known: self.known(&tx)?,
            age_ms: 0,
        })
    }

    /// ListTransactions RPC: live transactions, oldest first.
    pub fn list(&self, filter: impl Fn(&TxView) -> bool, limit: usize) -> Vec<TxView> {
        let engine = lock(&self.inner.engine);
        let mut views: Vec<TxView> = engine
            .txs()
            .map(|(tx, e)| self.view(*tx, e))
            .filter(|v| filter(v))
            .collect();
        views.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.tx.cmp(&b.tx)));
        views.truncate(limit);
        views
    }

    fn view(&self, tx: TxId, e: &TxEntry) -> TxView {
        let now = self.inner.now_ms();
        TxView {
            tx,
            live: Some(e.clone()),
            known: e.outcome().map_or(Known::Undecided, Known::Decided),
            age_ms: now.saturating_sub(e.began_at_ms),
        }
    }

    /// The outcome of a transaction the engine no longer holds, for requests that need
    /// one: a forgotten transaction is refused with the reason.
    pub(super) fn finished(&self, tx: &TxId) -> Result<Outcome, TxError> {
        match self.known(tx)? {
            Known::Decided(outcome) => Ok(outcome),
            Known::Forgotten => Err(forgotten(tx, "answered with an outcome")),
            Known::Undecided => Err(TxError::Unavailable(format!(
                "transaction {tx} is not decided yet"
            ))),
        }
    }

    /// What is known of a transaction the engine no longer holds, in the order of the
    /// module docs. Unknown ids are NOT_FOUND; a live one that is still deciding is
    /// UNAVAILABLE (only callers that found it not live come here).
    pub(super) fn known(&self, tx: &TxId) -> Result<Known, TxError> {
        // Read the log first: if the engine forgets the transaction meanwhile, the record
        // it answered from (a COMMIT written before the forget) is already visible.
        let unreadable =
            |e: LogError| TxError::Unavailable(format!("cannot read the decision log: {e}"));
        let log = &self.inner.log;
        let (log_has_commit, collected) = match lock(&self.inner.engine).provenance(tx) {
            Provenance::Unknown => (false, false),
            _ => {
                let has_commit = log.decision(tx).map_err(unreadable)?.is_some()
                    // An operator's accepted COMMIT of a one-phase commit (judged while
                    // PREPARING: only a one-phase commit can be resolved to COMMIT there)
                    // is its outcome, even if the record written after the audit was lost.
                    || log.audits(tx).map_err(unreadable)?.iter().any(|a| {
                        a.accepted
                            && a.decision == HeuristicDecision::Commit
                            && a.prior_state == TxState::Preparing.name()
                    });
                (
                    has_commit,
                    !has_commit && log.collected(tx).map_err(unreadable)?,
                )
            }
        };
        let outcome = lock(&self.inner.engine).outcome_of(tx, log_has_commit)?;
        Ok(match outcome {
            // Held again (impossible) or still deciding: the engine's word.
            None => Known::Undecided,
            Some(_) if collected => {
                self.inner.metrics.collection.forgotten_answered();
                Known::Forgotten
            }
            Some(outcome) => Known::Decided(outcome),
        })
    }
}
