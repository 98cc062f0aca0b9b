//! Operator resolutions (heuristic decisions): judged against what the engine knows,
//! recorded durably (accepted or refused) before anything happens, then carried out. See
//! the engine's module docs for the rules.

use super::*;

/// A judged resolution waiting for its audit record to be durable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct PendingResolution {
    /// The record being forced.
    record: AuditRecord,
    /// `Some`: refused, with this answer. `None`: accepted, to be carried out.
    refusal: Option<TxError>,
    /// The outcome already known at judgement (a finished transaction).
    outcome: Option<Outcome>,
}

/// Operator resolutions (see the module docs).
impl Engine {
    pub(super) fn on_resolve(
        &mut self,
        req: ReqId,
        tx: TxId,
        request: ResolveRequest,
        logged: Option<Outcome>,
        out: &mut Out,
    ) {
        let valid = crate::types::validate_resolve_reason(&request.reason)
            .and_then(|()| crate::types::validate_operator(&request.operator));
        if let Err(msg) = valid {
            let reply = Err(TxError::InvalidArgument(msg));
            out.reply(req, reply);
            return;
        }
        if let Some(why) = &self.halted {
            // Nothing can be recorded; a restart settles every outcome from the log.
            let reply = Err(TxError::Unavailable(format!(
                "cannot record a resolution of transaction {tx}: the coordinator halted ({why}); \
                 restart it, and the decision log settles the outcome"
            )));
            out.reply(req, reply);
            return;
        }
        let judged = match self.txs.get(&tx) {
            Some(_) => self.judge_live(tx, &request, out),
            None => match (self.provenance(&tx), logged) {
                (Provenance::Unknown | Provenance::Live, _) => {
                    let reply = Err(self.gone(&tx, "resolve"));
                    out.reply(req, reply);
                    return;
                }
                (_, None) => {
                    out.reply(req, Ok(ReplyOk::NotLive));
                    return;
                }
                (_, Some(outcome)) => judge_finished(tx, &request, outcome),
            },
        };
        let Judged {
            prior_state,
            refusal,
            contradicts,
            branches,
            detail,
            outcome,
        } = judged;
        let record = AuditRecord {
            tx,
            decision: request.decision,
            operator: request.operator,
            reason: request.reason,
            force: request.force,
            at_ms: 0,
            prior_state,
            accepted: refusal.is_none(),
            contradicts,
            branches,
            detail,
        };
        self.resolutions.insert(
            req,
            PendingResolution {
                record: record.clone(),
                refusal,
                outcome,
            },
        );
        out.push(Command::ForceAudit { req, record });
    }

    /// Judges a resolution of a transaction held in memory. An accepted ABORT of an
    /// undecided transaction decides the abort here and now.
    fn judge_live(&mut self, tx: TxId, request: &ResolveRequest, out: &mut Out) -> Judged {
        let entry = self.txs.get(&tx).expect("caller checked it is live");
        let state = entry.state;
        let prior_state = state.name().to_string();
        let decision = request.decision;
        let refuse = |msg: String| Judged::refused(&prior_state, msg);
        let pending = pending_ids(entry);
        let accept = |contradicts: bool, branches: Vec<String>, detail: String| {
            Judged::accepted(&prior_state, contradicts, branches, detail)
        };
        match (state, decision) {
            (TxState::Preparing, _) if entry.protocol.is_one_phase() => {
                let branches = entry
                    .branches
                    .iter()
                    .map(|b| b.spec.branch_id.clone())
                    .collect();
                accept(
                    false,
                    branches,
                    format!(
                        "one-phase commit: its single participant decides, so the operator's \
                         word is taken: the branch is heuristically {} and the transaction \
                         finishes {}",
                        past(decision),
                        outcome_name(decision)
                    ),
                )
            }
            (TxState::Active | TxState::Preparing, HeuristicDecision::Commit) => refuse(format!(
                "transaction {tx} is {}: it is undecided, and only the votes of its branches \
                 can make it COMMIT (even with force); resolve it to ABORT instead",
                state.name()
            )),
            (TxState::Active | TxState::Preparing, HeuristicDecision::Abort) => {
                self.abort_undecided(tx, request, &prior_state, out)
            }
            (TxState::Deciding, _) => refuse(format!(
                "transaction {tx} is DECIDING: its COMMIT decision is being made durable right \
                 now; retry in a moment"
            )),
            (TxState::InDoubt, _) => refuse(format!(
                "transaction {tx} is in doubt: the decision log failed while recording its \
                 outcome; restart the coordinator"
            )),
            (TxState::Committing, HeuristicDecision::Commit) => accept(
                false,
                pending,
                "the branches still owing a commit acknowledgement are heuristically committed \
                 (no more retries; a later commit tier never sent its commit gets one, best \
                 effort); the transaction finishes COMMITTED"
                    .into(),
            ),
            (TxState::Aborting, HeuristicDecision::Abort) => accept(
                false,
                pending,
                "the branches still owing an abort acknowledgement are heuristically aborted \
                 (no more retries); the transaction finishes ABORTED"
                    .into(),
            ),
            (TxState::Committing, HeuristicDecision::Abort) if !request.force => refuse(format!(
                "transaction {tx} is COMMITTING: its COMMIT decision is durable (outcome \
                 COMMITTED), so resolving it to ABORT contradicts it; set force (--force) to \
                 record the contradiction and stop committing its branches anyway"
            )),
            (TxState::Aborting, HeuristicDecision::Commit) if !request.force => refuse(format!(
                "transaction {tx} is ABORTING: it is aborted (outcome ABORTED), so resolving it \
                 to COMMIT contradicts it; set force (--force) to record the contradiction and \
                 stop aborting its branches anyway"
            )),
            (TxState::Committing, HeuristicDecision::Abort) => accept(
                true,
                pending,
                "FORCED against the durable COMMIT decision: the branches still owing a commit \
                 acknowledgement are heuristically aborted (no more commits sent); the decision \
                 log still says COMMITTED and participants that ask are told so"
                    .into(),
            ),
            (TxState::Aborting, HeuristicDecision::Commit) => accept(
                true,
                pending,
                "FORCED against the abort: the branches still owing an abort acknowledgement \
                 are heuristically committed (no more aborts sent); the outcome stays ABORTED \
                 and participants that ask are told so"
                    .into(),
            ),
        }
    }

    /// An accepted ABORT of an undecided transaction: decided here and now (as Abort
    /// would), so no COMMIT can be decided while the record is being written.
    fn abort_undecided(
        &mut self,
        tx: TxId,
        request: &ResolveRequest,
        prior_state: &str,
        out: &mut Out,
    ) -> Judged {
        let why = format!(
            "resolved to ABORT by operator {}: {}",
            request.operator, request.reason
        );
        self.decide_abort(tx, why, AbortCause::Operator, out);
        let branches = self.txs.get(&tx).map(pending_ids).unwrap_or_default();
        Judged {
            outcome: Some(Outcome::Aborted),
            ..Judged::accepted(
                prior_state,
                false,
                branches,
                "aborted (an abort went to every branch); branches that had not \
                 acknowledged when this record became durable are heuristically \
                 aborted; participants that ask are told ABORTED"
                    .into(),
            )
        }
    }

    pub(super) fn on_audit_durable(&mut self, req: ReqId, lsn: Lsn, at_ms: u64, out: &mut Out) {
        let Some(pending) = self.resolutions.remove(&req) else {
            return;
        };
        let mut record = pending.record;
        record.at_ms = at_ms;
        // The caller hears of the resolution, accepted or refused, once its record is
        // durable.
        if let Some(refusal) = pending.refusal {
            out.reply_once_durable(req, Err(refusal), Some(lsn));
            return;
        }
        let tx = record.tx;
        let (heuristic_branches, finished) = self.apply_resolution(tx, record.decision, lsn, out);
        let (state, outcome) = match self.txs.get(&tx) {
            Some(e) => (Some(e.state), e.outcome()),
            None => (None, finished.or(pending.outcome)),
        };
        let report = ResolveReport {
            record,
            state,
            outcome,
            heuristic_branches,
        };
        out.reply_once_durable(req, Ok(ReplyOk::Resolved(report)), Some(lsn));
    }

    pub(super) fn on_audit_failed(&mut self, req: ReqId, error: String, out: &mut Out) {
        self.halt(&error, out);
        if let Some(pending) = self.resolutions.remove(&req) {
            let reply = Err(TxError::Unavailable(format!(
                "the resolution of transaction {} could not be recorded ({error}), so no branch \
                 was marked heuristic; the coordinator takes no new work until restarted",
                pending.record.tx
            )));
            out.reply(req, reply);
        }
    }

    /// Carries out an accepted resolution now that its record is durable: marks the
    /// branches still owing an answer heuristically committed/aborted and finishes the
    /// transaction. Returns the marked branches and the outcome it finished with.
    fn apply_resolution(
        &mut self,
        tx: TxId,
        decision: HeuristicDecision,
        audit_lsn: Lsn,
        out: &mut Out,
    ) -> (Vec<String>, Option<Outcome>) {
        let Some(entry) = self.txs.get_mut(&tx) else {
            return (Vec::new(), None); // finished on its own meanwhile
        };
        let declared = match decision {
            HeuristicDecision::Commit => BranchState::Committed,
            HeuristicDecision::Abort => BranchState::Aborted,
        };
        let mut marked = Vec::new();
        match entry.state {
            // Committed by its branch, the outcome being synced: that finishes it.
            TxState::Committing if entry.protocol.is_one_phase() => {
                (marked, Some(Outcome::Committed))
            }
            TxState::Committing => {
                let lsn = entry.decision_lsn;
                let tier = entry.lowest_open_tier();
                for (i, b) in entry.branches.iter_mut().enumerate() {
                    if b.state != BranchState::Prepared {
                        continue;
                    }
                    let never_sent = tier.is_some_and(|t| b.spec.commit_order > t);
                    if decision == HeuristicDecision::Commit && never_sent && !b.in_flight {
                        // Its tier was never reached: one commit, best effort (the lower
                        // tiers are acknowledged or declared committed by now).
                        send(out, tx, i, b, Message::Commit { one_phase: false }, lsn);
                    }
                    b.state = declared;
                    b.in_flight = false;
                    marked.push(b.spec.branch_id.clone());
                }
                self.drive_commit(tx, out);
                (marked, Some(Outcome::Committed))
            }
            TxState::Aborting => {
                for b in entry.branches.iter_mut() {
                    let owes = b.abort_must_ack
                        && matches!(b.state, BranchState::Preparing | BranchState::Prepared);
                    if owes {
                        b.state = declared;
                        marked.push(b.spec.branch_id.clone());
                    } else if b.in_flight && b.state == BranchState::Preparing {
                        // A courtesy abort still on its way: no need to wait for it.
                        b.state = BranchState::Aborted;
                    }
                    b.in_flight = false;
                }
                self.finish_abort_if_done(tx, out);
                (marked, Some(Outcome::Aborted))
            }
            TxState::Preparing if entry.protocol.is_one_phase() => {
                let (marked, outcome) = declare_one_phase(tx, entry, decision, audit_lsn, out);
                self.txs.remove(&tx);
                out.push(Command::Finished { tx, outcome });
                (marked, Some(outcome))
            }
            // Undecided ones were aborted when the resolution was accepted; DECIDING and
            // IN_DOUBT ones are refused.
            _ => (Vec::new(), None),
        }
    }
}

/// A one-phase commit (in its participant's hands) resolved by an operator: the branch
/// is declared as `decision` says, the callers answered, and the operator's word replaces
/// the intent on disk (so a restart does not ask the branch again; best effort: the audit
/// record is durable already, at `audit_lsn`: the callers told COMMITTED wait for it).
/// Returns the declared branches and the outcome; the caller forgets the transaction.
fn declare_one_phase(
    tx: TxId,
    entry: &mut TxEntry,
    decision: HeuristicDecision,
    audit_lsn: Lsn,
    out: &mut Out,
) -> (Vec<String>, Outcome) {
    let declared = match decision {
        HeuristicDecision::Commit => BranchState::Committed,
        HeuristicDecision::Abort => BranchState::Aborted,
    };
    let mut marked = Vec::new();
    for b in entry.branches.iter_mut() {
        b.state = declared;
        b.in_flight = false;
        marked.push(b.spec.branch_id.clone());
    }
    let waiters = std::mem::take(&mut entry.waiters);
    let abort_waiters = std::mem::take(&mut entry.abort_waiters);
    let outcome = match decision {
        HeuristicDecision::Commit => {
            out.note(Note::Decided {
                tx,
                outcome: Outcome::Committed,
                cause: None,
            });
            let durable = Some(audit_lsn);
            reply_all(out, waiters, Ok(ReplyOk::Committed), durable);
            reply_all(out, abort_waiters, Err(committed_error(&tx)), durable);
            let specs = entry.branches.iter().map(|b| b.spec.clone()).collect();
            out.push(Command::LogLazy(LazyRecord::OnePhaseCommitted {
                tx,
                branches: specs,
            }));
            Outcome::Committed
        }
        HeuristicDecision::Abort => {
            out.note(Note::Decided {
                tx,
                outcome: Outcome::Aborted,
                cause: Some(AbortCause::Operator),
            });
            entry.state = TxState::Aborting;
            entry.abort_reason = Some("one-phase commit resolved to ABORT by an operator".into());
            let msg = abort_message(&tx, entry);
            reply_all(out, waiters, Err(TxError::Aborted(msg)), None);
            reply_all(out, abort_waiters, Ok(ReplyOk::Aborted), None);
            out.push(Command::LogLazy(LazyRecord::Aborted { tx }));
            Outcome::Aborted
        }
    };
    out.push(Command::Sync { tx });
    (marked, outcome)
}

/// A judged resolution, before it becomes an [`AuditRecord`].
struct Judged {
    prior_state: String,
    refusal: Option<TxError>,
    contradicts: bool,
    branches: Vec<String>,
    detail: String,
    outcome: Option<Outcome>,
}

impl Judged {
    /// Refused (a FAILED_PRECONDITION with `msg`, which is also the record's detail).
    fn refused(prior_state: &str, msg: String) -> Judged {
        Judged {
            prior_state: prior_state.to_string(),
            detail: msg.clone(),
            refusal: Some(TxError::FailedPrecondition(msg)),
            contradicts: false,
            branches: Vec::new(),
            outcome: None,
        }
    }

    /// Accepted: `branches` are to be declared, `detail` says what happens.
    fn accepted(
        prior_state: &str,
        contradicts: bool,
        branches: Vec<String>,
        detail: String,
    ) -> Judged {
        Judged {
            prior_state: prior_state.to_string(),
            refusal: None,
            contradicts,
            branches,
            detail,
            outcome: None,
        }
    }
}

/// The ids of the branches of `entry` that still owe an answer.
fn pending_ids(entry: &TxEntry) -> Vec<String> {
    entry
        .pending_branches()
        .iter()
        .map(|b| b.spec.branch_id.clone())
        .collect()
}

/// Judges a resolution of a finished transaction against the outcome the log gives it:
/// there is nothing left to stop, so an accepted one is only recorded.
fn judge_finished(tx: TxId, request: &ResolveRequest, outcome: Outcome) -> Judged {
    let (state, agrees) = match outcome {
        Outcome::Committed => ("COMMITTED", request.decision == HeuristicDecision::Commit),
        Outcome::Aborted => ("ABORTED", request.decision == HeuristicDecision::Abort),
    };
    let why = match outcome {
        Outcome::Committed => "a durable COMMIT decision is logged",
        Outcome::Aborted => "no COMMIT decision is logged: presumed abort",
    };
    let (refusal, contradicts, detail) = if agrees {
        (
            None,
            false,
            format!("the transaction already finished {state}; nothing left to do: recorded"),
        )
    } else if !request.force {
        let msg = format!(
            "transaction {tx} is {state} ({why}), so resolving it to {} contradicts it; set \
             force (--force) to record the contradiction anyway",
            request.decision.name()
        );
        (Some(TxError::FailedPrecondition(msg.clone())), false, msg)
    } else {
        (
            None,
            true,
            format!(
                "FORCED against the outcome {state} ({why}): recorded; the coordinator has \
                 finished it already, the decision log is unchanged and participants that ask \
                 are told {state}"
            ),
        )
    };
    Judged {
        prior_state: state.to_string(),
        refusal,
        contradicts,
        branches: Vec::new(),
        detail,
        outcome: Some(outcome),
    }
}

fn past(decision: HeuristicDecision) -> &'static str {
    match decision {
        HeuristicDecision::Commit => "committed",
        HeuristicDecision::Abort => "aborted",
    }
}

fn outcome_name(decision: HeuristicDecision) -> &'static str {
    match decision {
        HeuristicDecision::Commit => "COMMITTED",
        HeuristicDecision::Abort => "ABORTED",
    }
}
