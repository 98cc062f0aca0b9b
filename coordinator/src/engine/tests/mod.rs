//! Unit tests of the engine: the exact commands for every path, including duplicate and
//! late messages. One file per handler module; the helpers they share are here.

use super::*;
use crate::types::BranchKind;

const NODE: u32 = 0xabc;
const EPOCH: u64 = 3;

fn cfg() -> EngineConfig {
    EngineConfig {
        prepare_timeout_ms: 1_000,
        tx_timeout_ms: 5_000,
        max_tx_timeout_ms: 10_000,
        max_branches: 4,
        retry_initial_ms: 10,
        retry_max_ms: 80,
        one_phase: true,
    }
}

fn spec(id: &str, order: u32) -> BranchSpec {
    BranchSpec {
        branch_id: id.into(),
        endpoint: format!("http://127.0.0.1:{}", 7000 + order),
        commit_order: order,
        kind: if order == 0 {
            BranchKind::Database
        } else {
            BranchKind::Broker
        },
    }
}

fn engine() -> Engine {
    Engine::new(cfg(), NODE, EPOCH)
}

fn tx(seq: u64) -> TxId {
    TxId {
        node: NODE,
        epoch: EPOCH,
        seq,
    }
}

/// Transaction `seq` of the epoch before this engine's (begun before a restart).
fn earlier_epoch(seq: u64) -> TxId {
    TxId {
        node: NODE,
        epoch: EPOCH - 1,
        seq,
    }
}

fn send(
    t: TxId,
    i: usize,
    b: &BranchSpec,
    message: Message,
    requires_durable: Option<Lsn>,
) -> Command {
    Command::Send {
        tx: t,
        branch: i,
        endpoint: b.endpoint.clone(),
        branch_id: b.branch_id.clone(),
        message,
        requires_durable,
    }
}

/// The phase-two commit sent to branch `i` (`b`) of `t` once the log is durable at
/// `requires_durable`.
fn commit_sent(t: TxId, i: usize, b: &BranchSpec, requires_durable: Option<Lsn>) -> Command {
    send(
        t,
        i,
        b,
        Message::Commit { one_phase: false },
        requires_durable,
    )
}

/// The one-phase commit sent to branch `i` (`b`) of `t` once its intent is durable (at
/// [`SYNCED_LSN`]).
fn commit_one_phase_sent(t: TxId, i: usize, b: &BranchSpec) -> Command {
    send(
        t,
        i,
        b,
        Message::Commit { one_phase: true },
        Some(SYNCED_LSN),
    )
}

/// A vote of branch `branch` of `tx`.
fn voted(tx: TxId, branch: usize, vote: RpcResult<Vote>) -> Event {
    Event::Voted { tx, branch, vote }
}

/// A client's Commit of `t` (answered once its outcome is durable).
fn commit_ev(req: ReqId, t: TxId) -> Event {
    Event::Commit {
        req,
        tx: t,
        answer_before_durable: false,
    }
}

/// A client's Abort of `tx`, for `reason`.
fn abort_ev(req: ReqId, tx: TxId, reason: &str) -> Event {
    Event::Abort {
        req,
        tx,
        reason: reason.into(),
    }
}

/// Branch `branch`'s answer to a commit of `tx`.
fn commit_acked(tx: TxId, branch: usize, ack: RpcResult<CommitAck>) -> Event {
    Event::CommitAcked { tx, branch, ack }
}

/// Branch `branch`'s answer to an abort of `tx`.
fn abort_acked(tx: TxId, branch: usize, ack: RpcResult<AbortAck>) -> Event {
    Event::AbortAcked { tx, branch, ack }
}

/// The engine is done with `t`, whose outcome is `outcome`.
fn finished(t: TxId, outcome: Outcome) -> Command {
    Command::Finished { tx: t, outcome }
}

/// A retry of branch `branch` of `t` armed to fire after `after_ms`.
fn retry_armed(t: TxId, branch: usize, after_ms: u64) -> Command {
    Command::ArmTimer {
        tx: t,
        timer: Timer::Retry { branch },
        after_ms,
    }
}

/// The timer `timer` of `t` fired.
fn timer(t: TxId, timer: Timer) -> Event {
    Event::Timer { tx: t, timer }
}

/// The lazy record that `t` committed in one phase on its branch `a`.
fn one_phase_committed(t: TxId, a: &BranchSpec) -> Command {
    Command::LogLazy(LazyRecord::OnePhaseCommitted {
        tx: t,
        branches: vec![a.clone()],
    })
}

/// What the last abort acknowledgement of `t` emits: its lazy ABORTED record, then
/// `Finished`.
fn aborted_and_finished(t: TxId) -> Vec<Command> {
    vec![
        Command::LogLazy(LazyRecord::Aborted { tx: t }),
        finished(t, Outcome::Aborted),
    ]
}

/// What the last commit acknowledgement of `t` emits: its lazy DONE record, then
/// `Finished`.
fn done_and_finished(t: TxId) -> Vec<Command> {
    vec![
        Command::LogLazy(LazyRecord::Done { tx: t }),
        finished(t, Outcome::Committed),
    ]
}

/// The log position every sync of these tests returns ([`synced`]).
const SYNCED_LSN: Lsn = 7;

/// The sync of `t` returned, durable at [`SYNCED_LSN`].
fn synced(t: TxId) -> Event {
    Event::Synced {
        tx: t,
        lsn: SYNCED_LSN,
    }
}

/// An answer that needs nothing durable.
fn reply(req: ReqId, r: Result<ReplyOk, TxError>) -> Command {
    reply_once_durable(req, r, None)
}

/// The answer that `t` was aborted because of `why`.
fn aborted_reply(req: ReqId, t: TxId, why: &str) -> Command {
    reply(
        req,
        Err(TxError::Aborted(format!("transaction {t} aborted: {why}"))),
    )
}

/// Asserts that `cmds` is only the answer to `req` refusing it as a failed precondition,
/// at once, with a message that contains `why`.
#[track_caller]
fn assert_refused(cmds: &[Command], req: ReqId, why: &str) {
    assert!(
        matches!(cmds, [Command::Reply { req: r, reply: Err(TxError::FailedPrecondition(m)), requires_durable: None }]
            if *r == req && m.contains(why)),
        "{cmds:?}"
    );
}

/// The report a resolve answers `req` with once the log is durable at `lsn`; panics on
/// any other command.
#[track_caller]
fn resolved(cmd: &Command, req: ReqId, lsn: Lsn) -> &ResolveReport {
    match cmd {
        Command::Reply {
            req: r,
            reply: Ok(ReplyOk::Resolved(report)),
            requires_durable: Some(l),
        } if *r == req && *l == lsn => report,
        other => panic!("not the resolve answer to {req} durable at {lsn}: {other:?}"),
    }
}

/// An answer that must wait for the log to be durable at `requires_durable`.
fn reply_once_durable(
    req: ReqId,
    r: Result<ReplyOk, TxError>,
    requires_durable: Option<Lsn>,
) -> Command {
    Command::Reply {
        req,
        reply: r,
        requires_durable,
    }
}

/// The id a Begin answered with (its reply comes last).
fn begun(cmds: &[Command]) -> TxId {
    match cmds.last() {
        Some(Command::Reply {
            reply: Ok(ReplyOk::Begun(t)),
            ..
        }) => *t,
        Some(Command::Reply {
            reply: Ok(ReplyOk::BegunLocal(ts)),
            ..
        }) if ts.len() == 1 => ts[0],
        other => panic!("unexpected {other:?}"),
    }
}

/// What enlisting the first branch `a` of `t` emits: its one-phase intent, written and
/// synced in the background.
fn intent_written(t: TxId, a: &BranchSpec) -> Vec<Command> {
    vec![
        Command::LogLazy(LazyRecord::OnePhase {
            tx: t,
            branch: a.clone(),
        }),
        Command::Sync { tx: t },
    ]
}

/// What a one-phase commit of `t` by its branch `a` emits before the client hears of it:
/// the outcome record, synced.
fn outcome_written(t: TxId, a: &BranchSpec) -> Vec<Command> {
    vec![one_phase_committed(t, a), Command::Sync { tx: t }]
}

/// Begins a transaction with the one branch "a" enlisted through Begin: the branch and
/// the transaction.
fn begin_one(e: &mut Engine) -> (BranchSpec, TxId) {
    let a = spec("a", 0);
    let t = begin(e, std::slice::from_ref(&a));
    (a, t)
}

/// Begins a transaction with `branches` enlisted through Begin.
fn begin(e: &mut Engine, branches: &[BranchSpec]) -> TxId {
    let cmds = e.handle(
        0,
        Event::Begin {
            req: 1,
            timeout_ms: 0,
            branches: branches.to_vec(),
        },
    );
    let t = begun(&cmds);
    assert_eq!(
        cmds[0],
        Command::ArmTimer {
            tx: t,
            timer: Timer::TxTimeout,
            after_ms: 5_000
        }
    );
    let rest = &cmds[1..cmds.len() - 1];
    if e.config().one_phase && branches.len() == 1 {
        assert_eq!(
            rest,
            intent_written(t, &branches[0]),
            "the first branch's one-phase intent is written and synced in the background"
        );
    } else {
        assert_eq!(rest, &[]);
    }
    t
}

/// Begins a two-branch transaction and asks (request 10) to commit it: its prepares are
/// out.
fn preparing(e: &mut Engine, a: &BranchSpec, b: &BranchSpec) -> TxId {
    let t = begin(e, &[a.clone(), b.clone()]);
    e.handle(1, commit_ev(10, t));
    t
}

/// Checks that a Commit (request `req`) of `t`, which the engine no longer holds, is
/// answered `NotLive` (the runtime then answers from the log).
#[track_caller]
fn commit_is_not_live(e: &mut Engine, now: u64, req: ReqId, t: TxId) {
    assert_eq!(
        e.handle(now, commit_ev(req, t)),
        vec![reply(req, Ok(ReplyOk::NotLive))]
    );
}

/// Commits a two-branch transaction up to the force of its decision.
fn prepared_pair(e: &mut Engine, a: &BranchSpec, b: &BranchSpec) -> TxId {
    let t = preparing(e, a, b);
    assert!(e.handle(2, voted(t, 0, Ok(Vote::Yes))).is_empty());
    let cmds = e.handle(3, voted(t, 1, Ok(Vote::Yes)));
    assert!(
        matches!(cmds.as_slice(), [Command::ForceCommit(_)]),
        "{cmds:?}"
    );
    t
}

/// Commit of a single-branch transaction (begun with its branch) up to the one-phase
/// commit going out: the intent written at Begin becomes durable while the transaction is
/// active, so the commit goes out at once.
fn one_phase_commit_sent(e: &mut Engine, now: u64, req: ReqId, t: TxId, a: &BranchSpec) {
    one_phase_commit_sent_as(e, now, req, t, a, false)
}

/// [`one_phase_commit_sent`] for a Commit with `answer_before_durable` as given.
fn one_phase_commit_sent_as(
    e: &mut Engine,
    now: u64,
    req: ReqId,
    t: TxId,
    a: &BranchSpec,
    answer_before_durable: bool,
) {
    assert_eq!(
        e.handle(now, synced(t)),
        vec![],
        "the intent became durable while the transaction was active"
    );
    assert_eq!(
        e.handle(
            now,
            Event::Commit {
                req,
                tx: t,
                answer_before_durable
            }
        ),
        vec![commit_one_phase_sent(t, 0, a)],
        "the intent is durable: the one-phase commit goes out at once"
    );
}

/// Feeds recovery one one-phase intent (`tx`, `a`) and checks that the branch is asked
/// with an abort: the client may never have asked to commit, and the answer says what the
/// branch did.
fn recover_intent(e: &mut Engine, now: u64, tx: TxId, a: &BranchSpec) {
    let cmds = e.handle(
        now,
        Event::Recovered(Recovered {
            one_phase: vec![(tx, a.clone())],
            ..Recovered::default()
        }),
    );
    assert_eq!(cmds, vec![send(tx, 0, a, Message::Abort, None)]);
    assert_eq!(
        e.outcome_of(&tx, false),
        Ok(None),
        "undecided until the branch answers"
    );
}

fn ask(decision: HeuristicDecision, force: bool) -> ResolveRequest {
    ResolveRequest {
        decision,
        operator: "alice".into(),
        reason: "participant host decommissioned".into(),
        force,
    }
}

fn resolve_ev(req: ReqId, t: TxId, decision: HeuristicDecision, force: bool) -> Event {
    Event::Resolve {
        req,
        tx: t,
        request: ask(decision, force),
        logged: None,
    }
}

/// The audit record the engine must force for a resolution.
#[allow(clippy::too_many_arguments)]
fn record(
    t: TxId,
    decision: HeuristicDecision,
    force: bool,
    prior: &str,
    accepted: bool,
    contradicts: bool,
    branches: &[&str],
    detail: &str,
) -> AuditRecord {
    AuditRecord {
        tx: t,
        decision,
        operator: "alice".into(),
        reason: "participant host decommissioned".into(),
        force,
        at_ms: 0,
        prior_state: prior.into(),
        accepted,
        contradicts,
        branches: branches.iter().map(|b| b.to_string()).collect(),
        detail: detail.into(),
    }
}

/// The audit record of resolution `req` is durable at `lsn`, stamped `at_ms`.
fn audit_durable(req: ReqId, lsn: Lsn, at_ms: u64) -> Event {
    Event::AuditDurable { req, lsn, at_ms }
}

/// The single ForceAudit of `cmds` (which must hold nothing else unless `others`).
#[track_caller]
fn forced_audit(cmds: &[Command], req: ReqId) -> AuditRecord {
    let audits: Vec<&AuditRecord> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::ForceAudit { req: r, record } if *r == req => Some(record),
            _ => None,
        })
        .collect();
    assert_eq!(audits.len(), 1, "want one ForceAudit for {req}: {cmds:?}");
    audits[0].clone()
}

/// A two-branch transaction in phase two: `a` acknowledged, `b` failing (one retry armed).
fn committing_with_stuck_branch(e: &mut Engine, a: &BranchSpec, b: &BranchSpec) -> TxId {
    let t = prepared_pair(e, a, b);
    e.handle(5, Event::LogDurable { tx: t, lsn: 3 });
    e.handle(6, commit_acked(t, 0, Ok(CommitAck::Committed)));
    assert_eq!(
        e.handle(7, commit_acked(t, 1, Err("connection refused".into())),),
        vec![retry_armed(t, 1, 10)]
    );
    t
}

/// A fresh engine with a database branch `a` and a local transaction of it, begun at 0
/// as request 1 (its intent not synced yet).
fn one_local() -> (Engine, BranchSpec, TxId) {
    let mut e = engine();
    let a = spec("a", 0);
    let t = begin_local(&mut e, 0, 1, &a);
    (e, a, t)
}

/// A fresh engine that recovered, at 0, the one-phase intent of transaction `seq` of the
/// epoch before (on a database branch `a`).
fn one_recovered_intent(seq: u64) -> (Engine, BranchSpec, TxId) {
    let mut e = engine();
    let a = spec("a", 0);
    let old = earlier_epoch(seq);
    recover_intent(&mut e, 0, old, &a);
    (e, a, old)
}

/// Begins a local transaction (BeginLocal) of branch `a` as request `req`: answered
/// at once, its intent written and synced in the background.
fn begin_local(e: &mut Engine, now: u64, req: ReqId, a: &BranchSpec) -> TxId {
    let cmds = e.handle(
        now,
        Event::BeginLocal {
            req,
            timeout_ms: 0,
            branch: a.clone(),
            count: 1,
        },
    );
    let t = begun(&cmds);
    assert_eq!(
        cmds,
        [
            vec![Command::ArmTimer {
                tx: t,
                timer: Timer::TxTimeout,
                after_ms: 5_000
            }],
            intent_written(t, a),
            vec![reply(req, Ok(ReplyOk::BegunLocal(vec![t])))],
        ]
        .concat(),
        "answered before the intent is durable (the participant waits for a Barrier)"
    );
    let entry = e.tx(&t).expect("held");
    assert_eq!(
        entry.state,
        TxState::Preparing,
        "in its participant's hands"
    );
    assert_eq!(
        entry
            .pending_branches()
            .iter()
            .map(|b| b.spec.branch_id.as_str())
            .collect::<Vec<_>>(),
        vec!["a"]
    );
    t
}

/// The answer, record and end of a local transaction its participant answered ABORTED
/// (asked with an abort for the caller `req`).
fn aborted_by_its_branch(t: TxId, req: ReqId) -> Vec<Command> {
    vec![
        reply(req, Ok(ReplyOk::Aborted)),
        Command::LogLazy(LazyRecord::Aborted { tx: t }),
        finished(t, Outcome::Aborted),
    ]
}

/// The outcome record and answers of a one-phase commit finished without a sync.
fn committed_at_once(t: TxId, a: &BranchSpec, req: ReqId) -> Vec<Command> {
    vec![
        one_phase_committed(t, a),
        reply(req, Ok(ReplyOk::Committed)),
        finished(t, Outcome::Committed),
    ]
}

mod begin;
mod local;
mod one_phase;
mod recover;
mod resolve;
mod two_phase;
