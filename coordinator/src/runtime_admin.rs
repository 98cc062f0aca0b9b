//! The runtime's side of the Admin service: operator resolutions and the reads behind
//! `ListTransactions` / `ShowTransaction`.
//!
//! A child module of [`crate::runtime`] (it reaches the runtime's private state), kept in
//! its own file so the protocol runtime stays readable:
//!
//! * [`Runtime::resolve_tx`] feeds [`Event::Resolve`] to the engine; for a transaction the
//!   engine no longer holds it reads the outcome from the log and asks again, so the
//!   engine judges every resolution in one place;
//! * [`Command::ForceAudit`](crate::engine::Command::ForceAudit) is carried out here:
//!   the record gets its wall-clock time and goes to the log's writer; its durability
//!   comes back as [`Event::AuditDurable`] (or [`Event::AuditFailed`]);
//! * recovery skips transactions an operator has resolved (an accepted audit record):
//!   whatever lazy record would have said so may have been lost in a crash, but the
//!   audit record was forced before the resolution took effect.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use super::{unexpected, Inner, Runtime};
use crate::engine::{Event, ReplyOk, ReqId, ResolveReport, ResolveRequest, TxError};
use crate::log::{AuditRecord, DecisionLog, LazyRecord, LogError, Recovered, StoredDecision};
use crate::transport::Transport;
use crate::types::{HeuristicDecision, TxId};

fn log_unavailable(e: LogError) -> TxError {
    TxError::Unavailable(format!("cannot read the decision log: {e}"))
}

impl<L: DecisionLog, T: Transport> Runtime<L, T> {
    /// Admin `Resolve`: judges, records (forced) and carries out an operator's heuristic
    /// decision for `tx`. See [`crate::engine`] for the semantics.
    pub async fn resolve_tx(
        &self,
        tx: TxId,
        request: ResolveRequest,
    ) -> Result<ResolveReport, TxError> {
        let first = {
            let request = request.clone();
            self.request(|req| Event::Resolve {
                req,
                tx,
                request,
                logged: None,
            })
            .await?
        };
        let reply = match first {
            ReplyOk::NotLive => {
                // Not live is final: what the log says now is what it will say. A forgotten
                // transaction has no outcome left to judge a resolution against.
                let outcome = self.finished(&tx)?;
                self.request(|req| Event::Resolve {
                    req,
                    tx,
                    request,
                    logged: Some(outcome),
                })
                .await?
            }
            other => other,
        };
        match reply {
            ReplyOk::Resolved(mut report) => {
                if report.state.is_none() && report.outcome.is_none() {
                    report.outcome = Some(self.finished(&tx)?);
                }
                info!(
                    %tx,
                    decision = report.record.decision.name(),
                    operator = %report.record.operator,
                    contradicts = report.record.contradicts,
                    branches = ?report.heuristic_branches,
                    "heuristic resolution recorded and carried out"
                );
                Ok(report)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The durable audit records of `tx`, oldest first.
    pub fn audits(&self, tx: &TxId) -> Result<Vec<AuditRecord>, TxError> {
        self.inner.log.audits(tx).map_err(log_unavailable)
    }

    /// Whether an operator resolution was accepted for `tx`.
    pub fn is_heuristic(&self, tx: &TxId) -> Result<bool, TxError> {
        Ok(self.audits(tx)?.iter().any(|a| a.accepted))
    }

    /// The COMMIT decision the log holds for `tx`, if any (for showing the branches of a
    /// finished transaction).
    pub fn logged_decision(&self, tx: &TxId) -> Result<Option<StoredDecision>, TxError> {
        self.inner.log.decision(tx).map_err(log_unavailable)
    }

    /// The engine's clock (ms), the time base of ages and [`crate::engine::BranchEntry`]
    /// attempt times.
    pub fn now_ms(&self) -> u64 {
        self.inner.now_ms()
    }

    /// Drops from `rec` every transaction with an accepted resolution: it was finished
    /// by the operator (the lazy record saying so may have been lost), and re-driving it
    /// would retry the very branches the operator declared resolved.
    pub(super) fn without_resolved(&self, rec: Recovered) -> Result<Recovered, LogError> {
        let log = &self.inner.log;
        let epoch = log.epoch();
        let resolved = |tx: &TxId| -> Result<bool, LogError> {
            Ok(log.audits(tx)?.iter().any(|a| a.accepted))
        };
        let mut kept = Recovered::default();
        for c in rec.commits {
            if resolved(&c.tx)? {
                info!(tx = %c.tx, "recovery: resolved by an operator; not re-driven");
                log.record_lazy(epoch, LazyRecord::Done { tx: c.tx })?;
            } else {
                kept.commits.push(c);
            }
        }
        for (tx, branches) in rec.undecided {
            if resolved(&tx)? {
                info!(%tx, "recovery: resolved by an operator; not aborted again");
                log.record_lazy(epoch, LazyRecord::Aborted { tx })?;
            } else {
                kept.undecided.push((tx, branches));
            }
        }
        for (tx, branch) in rec.one_phase {
            // The operator's word is the outcome; its record may have been lost with the
            // lazy write that followed the audit, so it is written again from the audit.
            let accepted = log.audits(&tx)?.into_iter().rfind(|a| a.accepted);
            match accepted.map(|a| a.decision) {
                Some(HeuristicDecision::Commit) => {
                    info!(%tx, "recovery: one-phase commit resolved to COMMIT by an operator; not asked again");
                    log.record_lazy(
                        epoch,
                        LazyRecord::OnePhaseCommitted {
                            tx,
                            branches: vec![branch],
                        },
                    )?;
                }
                Some(HeuristicDecision::Abort) => {
                    info!(%tx, "recovery: one-phase commit resolved to ABORT by an operator; not asked again");
                    log.record_lazy(epoch, LazyRecord::Aborted { tx })?;
                }
                None => kept.one_phase.push((tx, branch)),
            }
        }
        Ok(kept)
    }
}

impl<L: DecisionLog, T: Transport> Inner<L, T> {
    /// Carries out [`crate::engine::Command::ForceAudit`].
    pub(super) fn force_audit(self: &Arc<Self>, req: ReqId, mut record: AuditRecord) {
        record.at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let at_ms = record.at_ms;
        let epoch = self.log.epoch();
        let me = self.clone();
        tokio::spawn(async move {
            let tx = record.tx;
            let accepted = record.accepted;
            let ev = match me.log.force_audit(epoch, record).await {
                Ok(lsn) => {
                    if !accepted {
                        warn!(%tx, "resolution refused (recorded)");
                    }
                    Event::AuditDurable { req, lsn, at_ms }
                }
                Err(e) => {
                    error!(%tx, error = %e, "could not make an audit record durable");
                    Event::AuditFailed {
                        req,
                        error: e.to_string(),
                    }
                }
            };
            me.dispatch(ev);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::{AbortAck, CommitAck, EngineConfig, Outcome, RpcResult, Vote};
    use crate::log::{CommitRecord, MemoryLog};
    use crate::runtime::RuntimeOptions;
    use crate::types::{BranchKind, BranchSpec, HeuristicDecision};

    /// Every participant votes yes; commits to branch "gone" always fail.
    struct OneDeadBranch;

    impl Transport for OneDeadBranch {
        async fn prepare(&self, _: &str, _: TxId, _: &str) -> RpcResult<Vote> {
            Ok(Vote::Yes)
        }
        async fn commit(&self, _: &str, _: TxId, branch: &str, _: bool) -> RpcResult<CommitAck> {
            if branch == "gone" {
                Err("connection refused".into())
            } else {
                Ok(CommitAck::Committed)
            }
        }
        async fn abort(&self, _: &str, _: TxId, _: &str) -> RpcResult<AbortAck> {
            Ok(AbortAck::Aborted)
        }
    }

    fn spec(id: &str) -> BranchSpec {
        BranchSpec {
            branch_id: id.into(),
            endpoint: "http://127.0.0.1:7001".into(),
            commit_order: 0,
            kind: BranchKind::Database,
        }
    }

    fn runtime(log: MemoryLog) -> Runtime<MemoryLog, OneDeadBranch> {
        let opts = RuntimeOptions {
            engine: EngineConfig {
                retry_initial_ms: 5,
                retry_max_ms: 20,
                ..EngineConfig::default()
            },
            commit_wait: Duration::ZERO,
            retention: None,
        };
        Runtime::new(opts, Arc::new(log), OneDeadBranch)
    }

    fn ask(decision: HeuristicDecision, force: bool) -> ResolveRequest {
        ResolveRequest {
            decision,
            operator: "bob".into(),
            reason: "host gone".into(),
            force,
        }
    }

    #[tokio::test]
    async fn resolving_a_stuck_commit_records_then_finishes_and_finished_ones_are_only_recorded() {
        let rt = runtime(MemoryLog::new());
        rt.recover().expect("recover");
        let t = rt
            .begin(0, vec![spec("ok"), spec("gone")])
            .await
            .expect("begin");
        let res = rt
            .commit(t, Some(Duration::ZERO), false)
            .await
            .expect("commit");
        assert!(res.pending.contains(&"gone".to_string()), "{res:?}");
        // Retried a few times.
        for _ in 0..200 {
            if rt.get(t).ok().and_then(|v| v.live).is_some_and(|e| {
                e.branches
                    .iter()
                    .any(|b| b.spec.branch_id == "gone" && b.attempts >= 3)
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let err = rt
            .resolve_tx(t, ask(HeuristicDecision::Abort, false))
            .await
            .expect_err("contradicts the durable COMMIT");
        assert!(
            matches!(&err, TxError::FailedPrecondition(m) if m.contains("COMMITTED")),
            "{err:?}"
        );
        let report = rt
            .resolve_tx(t, ask(HeuristicDecision::Commit, false))
            .await
            .expect("resolve");
        assert_eq!(report.heuristic_branches, vec!["gone".to_string()]);
        assert_eq!(
            (report.state, report.outcome),
            (None, Some(Outcome::Committed))
        );
        assert!(report.record.at_ms > 1_600_000_000_000, "{report:?}");
        let audits = rt.audits(&t).expect("audits");
        assert_eq!(
            audits.iter().map(|a| a.accepted).collect::<Vec<_>>(),
            vec![false, true],
            "every use is recorded, refusals included"
        );
        assert!(rt.is_heuristic(&t).expect("read"));
        let view = rt.get(t).expect("get");
        assert!(view.live.is_none());
        assert_eq!(view.known.outcome(), Some(Outcome::Committed));

        // A finished transaction: COMMIT is only recorded; a forced ABORT is recorded as
        // contradicting and changes nothing.
        let again = rt
            .resolve_tx(t, ask(HeuristicDecision::Commit, false))
            .await
            .expect("recorded");
        assert!(again.heuristic_branches.is_empty());
        let forced = rt
            .resolve_tx(t, ask(HeuristicDecision::Abort, true))
            .await
            .expect("forced");
        assert!(forced.record.contradicts);
        assert_eq!(forced.outcome, Some(Outcome::Committed));
        assert_eq!(rt.audits(&t).expect("audits").len(), 4);
        let unknown = TxId { seq: 999, ..t };
        assert!(matches!(
            rt.resolve_tx(unknown, ask(HeuristicDecision::Abort, false))
                .await,
            Err(TxError::NotFound(_))
        ));
    }

    /// An operator's COMMIT resolution of `tx`, judged in `prior_state` (forced exactly
    /// when it `contradicts` the known outcome).
    fn commit_audit(tx: TxId, prior_state: &str, accepted: bool, contradicts: bool) -> AuditRecord {
        AuditRecord {
            tx,
            decision: HeuristicDecision::Commit,
            operator: "bob".into(),
            reason: "host gone".into(),
            force: contradicts,
            at_ms: 1,
            prior_state: prior_state.into(),
            accepted,
            contradicts,
            branches: vec!["gone".into()],
            detail: String::new(),
        }
    }

    /// Transaction `seq` of the log's node and epoch.
    fn tx_of(log: &MemoryLog, seq: u64) -> TxId {
        TxId {
            node: log.node_id(),
            epoch: log.epoch(),
            seq,
        }
    }

    #[tokio::test]
    async fn an_operators_commit_of_a_one_phase_commit_is_its_outcome_without_its_record() {
        let log = MemoryLog::new();
        let e = log.epoch();
        let tx = |seq| tx_of(&log, seq);
        let (one_phase, contradicted) = (tx(1), tx(2));
        // Only the audit records reached the disk (no intent, no outcome record).
        log.force_audit(e, commit_audit(one_phase, "PREPARING", true, false))
            .await
            .expect("audit");
        log.force_audit(e, commit_audit(contradicted, "ABORTED", true, true))
            .await
            .expect("audit");
        let rt = runtime(log.reopen());
        rt.recover().expect("recover");
        assert_eq!(
            rt.get(one_phase).expect("get").known.outcome(),
            Some(Outcome::Committed),
            "the operator's COMMIT of a one-phase commit is its outcome"
        );
        assert_eq!(
            rt.get(contradicted).expect("get").known.outcome(),
            Some(Outcome::Aborted),
            "a forced COMMIT against an ABORTED outcome is recorded, never the outcome"
        );
    }

    #[tokio::test]
    async fn recovery_skips_transactions_an_operator_resolved() {
        let log = MemoryLog::new();
        let e = log.epoch();
        let tx = |seq| tx_of(&log, seq);
        let (resolved, refused, undecided) = (tx(1), tx(2), tx(3));
        let (one_phase, one_phase_open) = (tx(4), tx(5));
        for t in [resolved, refused] {
            log.force_commit(
                e,
                CommitRecord {
                    tx: t,
                    branches: vec![spec("gone")],
                    decided_at_ms: 1,
                },
            )
            .await
            .expect("force");
        }
        log.record_lazy(
            e,
            LazyRecord::Preparing {
                tx: undecided,
                branches: vec![spec("gone")],
            },
        )
        .expect("lazy");
        for t in [one_phase, one_phase_open] {
            log.record_lazy(
                e,
                LazyRecord::OnePhase {
                    tx: t,
                    branch: spec("gone"),
                },
            )
            .expect("lazy");
        }
        // The audit records are durable, the lazy records that finished them were lost.
        log.force_audit(e, commit_audit(resolved, "COMMITTING", true, false))
            .await
            .expect("audit");
        log.force_audit(e, commit_audit(refused, "COMMITTING", false, false))
            .await
            .expect("audit");
        log.force_audit(e, commit_audit(undecided, "COMMITTING", true, false))
            .await
            .expect("audit");
        log.force_audit(e, commit_audit(one_phase, "COMMITTING", true, false))
            .await
            .expect("audit");
        let log = log.reopen();
        assert_eq!(
            log.recover().expect("recover").one_phase.len(),
            2,
            "the one-phase intents are on disk"
        );

        let rt = runtime(log);
        assert_eq!(
            rt.recover().expect("recover"),
            (1, 0),
            "only the refused one is re-driven"
        );
        assert!(rt.get(refused).expect("get").live.is_some());
        assert_eq!(
            rt.get(resolved).expect("get").live.map(|e| e.state),
            None,
            "resolved: not re-driven"
        );
        assert_eq!(
            rt.logged_decision(&resolved).expect("read").map(|d| d.done),
            Some(true),
            "marked done"
        );
        assert_eq!(
            rt.get(undecided).expect("get").known.outcome(),
            Some(Outcome::Aborted)
        );
        assert_eq!(
            rt.get(one_phase).expect("get").live.map(|e| e.state),
            None,
            "a resolved one-phase commit: its branch is not asked again"
        );
        assert_eq!(
            rt.get(one_phase).expect("get").known.outcome(),
            Some(Outcome::Committed),
            "the operator's COMMIT is the outcome, though the record after the audit was lost"
        );
        assert_eq!(
            rt.get(one_phase_open).expect("get").live.map(|e| e.state),
            Some(crate::engine::TxState::Preparing),
            "an open one-phase intent: its branch is asked again"
        );
    }
}
