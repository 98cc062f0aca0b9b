//! The crash-point fault matrix (GUIDE section 6): real `twopc serve` processes killed by
//! fail points (`FAILPOINTS="<point>=return(abort)"`: SIGABRT on the spot, nothing
//! cleaned up), paused with SIGSTOP, or starved of durable storage; real `twopc
//! order-service` processes killed while staging; private PostgreSQL clusters killed
//! with SIGKILL or short of prepared-transaction slots. After every fault the process is
//! restarted WITHOUT the fail point on the same data directory, participants recover,
//! and the outcome is checked from the outside: the coordinator's answer, every
//! participant's resource state, the database, the queue and the staging store.
//!
//! Needs the `failpoints` feature (`cargo test --features failpoints,lab --test
//! fault_crash`); without it this file is empty. The order-service scenarios need
//! RabbitMQ on 127.0.0.1:5672; the PostgreSQL ones start their own clusters.
//!
//! Every scenario has its own coordinator, data directories, ports, database and queue,
//! an overall deadline, bounded waits, and prints the stderr of every process it
//! started when it fails (`TWOPC_TEST_SHOW_LOGS=1` prints them always).
#![cfg(feature = "failpoints")]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use lapin::Connection;
use support::orders::{prepared_gids, OrderWorld, Postgres, Settings, DB_BRANCH, EVENTS_BRANCH};
use support::{
    begin, commit, commit_in_background, declare_durable, expect_status, get_tx, outcome, rabbitmq,
    show_logs, tx_state, wait_until, wait_until_or_tell, with_deadline, Coordinator, MsgKind,
    PrepareScript, ResState, TestParticipant, TwoBranchCommit, AMQP_URL,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use twopc_participant::postgres::PgResource;
use twopc_participant::staging::StagingStore;
use twopc_participant::{OutboxOptions, RabbitResource, Transaction, TwoPc};
use twopc_proto::v1 as pb;
use twopc_testkit::amqp::take_all;
use twopc_testkit::{unique_name, PgCluster};

/// Overall budget of one scenario.
const TEST_DEADLINE: Duration = Duration::from_secs(30);
/// Budget of one wait for a process or for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(15);
/// Counts the one-phase markers left in the database (fences, which settle a lost answer
/// as "not committed", are not markers).
const MARKERS_SQL: &str = "SELECT count(*) FROM twopc_one_phase WHERE NOT fenced";

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A coordinator called `name` whose first start is armed with `failpoints` (none if
/// empty): quick phase-two retries, short transport timeouts and, unless `flags` say
/// otherwise, two-phase even for one branch.
async fn serve(name: &str, failpoints: &str, flags: &[(&str, &str)]) -> Coordinator {
    let mut all = vec![("--one-phase", "false")];
    all.retain(|(k, _)| !flags.iter().any(|(f, _)| f == k));
    all.extend_from_slice(flags);
    Coordinator::start_named(name, failpoints, &all).await
}

// ---------------------------------------------------------------------------------------
// Outside views
// ---------------------------------------------------------------------------------------

/// Waits until the coordinator has finished `tx_id` (COMMITTED or ABORTED) and returns
/// its outcome.
async fn finished_outcome(coord: &Coordinator, tx_id: &str) -> pb::Outcome {
    let mut c = coord.client().await;
    let end = Instant::now() + WAIT;
    loop {
        let r = get_tx(&mut c, tx_id)
            .await
            .unwrap_or_else(|s| panic!("GetTransaction {tx_id}: {s:?}"));
        match tx_state(&r) {
            pb::TxState::Committed | pb::TxState::Aborted => return outcome(&r),
            _ if Instant::now() >= end => {
                panic!("transaction {tx_id} not finished after {WAIT:?}: {r:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One branch: its participant and branch id.
type Br<'a> = (&'a TestParticipant, &'a str);

/// The participants' recovery (each asks the coordinator about every branch it holds
/// prepared), repeated until no branch of `tx_id` in `branches` is prepared any more.
async fn recover_until_settled(coord: &Coordinator, tx_id: &str, branches: &[Br<'_>]) {
    let mut c = coord.client().await;
    let end = Instant::now() + WAIT;
    loop {
        let prepared: Vec<&str> = branches
            .iter()
            .filter(|(p, b)| p.state(tx_id, b) == Some(ResState::Prepared))
            .map(|(_, b)| *b)
            .collect();
        if prepared.is_empty() {
            return;
        }
        if Instant::now() >= end {
            panic!("branches {prepared:?} of {tx_id} are still prepared after {WAIT:?}");
        }
        for (p, _) in branches {
            p.recover(&mut c).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No participant saw a protocol violation.
#[track_caller]
fn assert_no_violations(branches: &[Br<'_>]) {
    for (p, _) in branches {
        assert!(
            p.violations().is_empty(),
            "protocol violations: {:?}",
            p.violations()
        );
    }
}

/// Every branch is aborted or never heard of the transaction; none saw a commit.
#[track_caller]
fn assert_aborted_everywhere(tx_id: &str, branches: &[Br<'_>]) {
    for (p, b) in branches {
        let st = p.state(tx_id, b);
        assert!(
            matches!(st, None | Some(ResState::Aborted)),
            "branch {b} of {tx_id} is {st:?}, expected aborted (or untouched)"
        );
        assert_eq!(
            p.count(tx_id, b, MsgKind::Commit),
            0,
            "branch {b} of {tx_id} received a commit"
        );
    }
    assert_no_violations(branches);
}

#[track_caller]
fn assert_committed_everywhere(tx_id: &str, branches: &[Br<'_>]) {
    for (p, b) in branches {
        assert_eq!(
            p.state(tx_id, b),
            Some(ResState::Committed),
            "branch {b} of {tx_id}"
        );
        assert_eq!(
            p.count(tx_id, b, MsgKind::Abort),
            0,
            "branch {b} of {tx_id} received an abort"
        );
    }
    assert_no_violations(branches);
}

// ---------------------------------------------------------------------------------------
// Coordinator crash points, in-test participants
// ---------------------------------------------------------------------------------------

/// A coordinator armed to die at a crash point, two participants, and a transaction with
/// p1's branch `a` and p2's branch `b` whose Commit killed the coordinator there.
struct KilledCommit {
    coord: Coordinator,
    p1: TestParticipant,
    p2: TestParticipant,
    tx: String,
}

impl KilledCommit {
    /// Arms `point`, begins the transaction, commits it and waits until the coordinator
    /// died showing `needle` (the Commit cannot have succeeded). With `hold_b`, b's
    /// prepare hangs until [`TestParticipant::release`].
    async fn at(name: &str, point: &str, needle: &str, hold_b: bool) -> KilledCommit {
        let mut coord = serve(name, &format!("{point}=return(abort)"), &[]).await;
        let TwoBranchCommit {
            p1,
            p2,
            tx,
            pending,
        } = TwoBranchCommit::start(&coord, hold_b.then_some("b")).await;
        coord.wait_for_crash(needle).await;
        let res = pending.await.expect("commit task");
        assert!(res.is_err(), "Commit cannot succeed at a crash: {res:?}");
        KilledCommit { coord, p1, p2, tx }
    }

    fn branches(&self) -> [Br<'_>; 2] {
        [(&self.p1, "a"), (&self.p2, "b")]
    }

    /// Both branches are prepared and neither got a commit.
    #[track_caller]
    fn assert_prepared_without_commit(&self) {
        for (p, b) in self.branches() {
            assert_eq!(p.state(&self.tx, b), Some(ResState::Prepared), "branch {b}");
            assert_eq!(
                p.count(&self.tx, b, MsgKind::Commit),
                0,
                "branch {b} got a commit"
            );
        }
    }

    /// Restarts the coordinator without the fail point; the participants recover until
    /// nothing is prepared; the transaction is ABORTED, a Commit again answers ABORTED,
    /// and no branch committed.
    async fn restart_expecting_abort(&mut self) {
        self.coord.restart().await;
        let tx = self.tx.as_str();
        recover_until_settled(&self.coord, tx, &self.branches()).await;
        assert_eq!(
            finished_outcome(&self.coord, tx).await,
            pb::Outcome::Aborted
        );
        let mut c = self.coord.client().await;
        expect_status(commit(&mut c, tx, 1_000).await, Code::Aborted, &[tx]);
        assert_aborted_everywhere(tx, &self.branches());
    }

    /// Restarts the coordinator without the fail point; its own recovery (no
    /// participant's) commits both branches (`why` says why it must); the transaction is
    /// COMMITTED and a Commit again answers COMMITTED.
    async fn restart_expecting_commit(&mut self, why: &str) {
        self.coord.restart().await;
        let tx = self.tx.as_str();
        wait_until_or_tell(
            WAIT,
            &format!("the restarted coordinator commits both branches: {why}"),
            || {
                self.branches()
                    .iter()
                    .all(|(p, b)| p.state(tx, b) == Some(ResState::Committed))
            },
            || {
                let states: Vec<_> = self
                    .branches()
                    .iter()
                    .map(|(p, b)| (*b, p.state(tx, b)))
                    .collect();
                format!("; branches {states:?}")
            },
        )
        .await;
        assert_eq!(
            finished_outcome(&self.coord, tx).await,
            pb::Outcome::Committed
        );
        let mut c = self.coord.client().await;
        let again = commit(&mut c, tx, 1_000)
            .await
            .expect("Commit after restart");
        assert_eq!(again.outcome, pb::Outcome::Committed as i32);
        assert_committed_everywhere(tx, &self.branches());
    }
}

/// What a crash point leaves before the restart.
#[derive(Clone, Copy, Debug)]
enum Left {
    /// No message reached a participant.
    Nothing,
    /// `a` is prepared; `b`'s prepare was held (it is released after the crash).
    APrepared,
    /// Both branches are prepared and neither got a commit.
    BothPrepared,
}

/// How the restarted coordinator settles the transaction.
#[derive(Clone, Copy, Debug)]
enum Settles {
    /// Aborted everywhere, with the participants' recovery; every branch prepared before
    /// the crash ends aborted.
    Aborted,
    /// Committed everywhere by the coordinator's own recovery, for the reason given.
    Committed(&'static str),
}

/// One two-branch coordinator crash point: where the coordinator (called `name`) dies,
/// the stderr line that shows it, what is left, and how the restart settles it.
struct CrashPoint {
    name: &'static str,
    point: &'static str,
    needle: &'static str,
    left: Left,
    settles: Settles,
}

/// Runs one [`CrashPoint`] under the scenario deadline.
async fn crash_point(case: CrashPoint) {
    with_deadline(TEST_DEADLINE, async {
        let hold_b = matches!(case.left, Left::APrepared);
        let mut k = KilledCommit::at(case.name, case.point, case.needle, hold_b).await;
        let prepared: Vec<&str> = match case.left {
            Left::Nothing => {
                let (p1, p2) = (&k.p1, &k.p2);
                assert!(
                    p1.received().is_empty() && p2.received().is_empty(),
                    "a message left before the crash: {:?} {:?}",
                    p1.received(),
                    p2.received()
                );
                vec![]
            }
            Left::APrepared => {
                assert_eq!(
                    k.p1.state(&k.tx, "a"),
                    Some(ResState::Prepared),
                    "a prepared"
                );
                // The slow branch finishes its prepare after all (it received it or not).
                k.p2.release("b");
                vec!["a"]
            }
            Left::BothPrepared => {
                k.assert_prepared_without_commit();
                vec!["a", "b"]
            }
        };
        match case.settles {
            Settles::Aborted => {
                k.restart_expecting_abort().await;
                for (p, b) in k.branches() {
                    if prepared.contains(&b) {
                        assert_eq!(p.state(&k.tx, b), Some(ResState::Aborted), "branch {b}");
                    }
                }
            }
            // No participant recovery: the coordinator's own recovery must do it.
            Settles::Committed(why) => k.restart_expecting_commit(why).await,
        }
        if let Left::Nothing = case.left {
            assert!(
                !k.p1.saw(&k.tx, MsgKind::Prepare) && !k.p2.saw(&k.tx, MsgKind::Prepare),
                "a prepare was sent"
            );
        }
    })
    .await;
}

/// Killed after Commit was accepted, before any prepare left: nothing is prepared
/// anywhere, and the transaction is aborted (presumed abort) after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_before_prepare_aborts_every_branch() {
    crash_point(CrashPoint {
        name: "before-prepare",
        point: "coordinator::before_prepare",
        needle: "failpoint coordinator::before_prepare hit",
        left: Left::Nothing,
        settles: Settles::Aborted,
    })
    .await;
}

/// Killed once the first branch prepared, while the other's vote is outstanding: the
/// restarted coordinator (or presumed abort, if its PREPARING record was not flushed yet)
/// aborts the prepared branch, and the late one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_first_prepare_aborts_every_branch() {
    crash_point(CrashPoint {
        name: "after-first-prepare",
        point: "coordinator::after_first_prepare",
        needle: "failpoint coordinator::after_first_prepare hit",
        left: Left::APrepared,
        settles: Settles::Aborted,
    })
    .await;
}

/// Killed with every vote yes, before the COMMIT record was written: aborted everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_all_yes_votes_before_the_decision_aborts_every_branch() {
    crash_point(CrashPoint {
        name: "before-log-decision",
        point: "coordinator::before_log_decision",
        needle: "failpoint hit: aborting",
        left: Left::BothPrepared,
        settles: Settles::Aborted,
    })
    .await;
}

/// Killed between the write of the COMMIT record and its sync: the decision was never
/// reported (Commit got no answer, no branch got a commit). The restarted coordinator
/// settles it one way for every branch.
///
/// Which way: the process died after sled wrote the batch into its data file, before the
/// fdatasync. A process crash does not lose what was written (the kernel's page cache
/// still has it; only a machine crash could lose it), and the restart syncs the log at
/// open, so the COMMIT record is found and recovery commits everywhere. "Not durable"
/// means "could be lost", not "lost": aborting everywhere is not a possible outcome of
/// this fault (the decision not being written at all is
/// `coordinator_killed_after_all_yes_votes_before_the_decision_aborts_every_branch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_between_decision_write_and_sync_settles_one_way_everywhere() {
    crash_point(CrashPoint {
        name: "log-before-sync",
        point: "coordinator::log::before_sync",
        needle: "aborting the process at fail point",
        left: Left::BothPrepared,
        settles: Settles::Committed(
            "the written (unsynced) COMMIT record survives a process crash, so the restart \
             commits",
        ),
    })
    .await;
}

/// Killed after the COMMIT record is durable, before any commit left: the restarted
/// coordinator re-drives phase two and every branch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_the_decision_is_durable_commits_every_branch() {
    crash_point(CrashPoint {
        name: "after-durable",
        point: "coordinator::after_decision_durable",
        needle: "failpoint hit: aborting",
        left: Left::BothPrepared,
        settles: Settles::Committed("the COMMIT record is durable"),
    })
    .await;
}

/// Starts a coordinator with one-phase commits and `action` at the
/// `coordinator::before_one_phase_sync` crash point, begins a one-branch transaction
/// (which syncs its intent in the background), commits it (asking for an answer once the
/// outcome is durable, which syncs the outcome) and waits for the crash (the Commit cannot
/// have been answered).
async fn one_phase_commit_crashing(
    name: &str,
    action: &str,
) -> (Coordinator, TestParticipant, String) {
    let point = "coordinator::before_one_phase_sync";
    let mut coord = serve(
        name,
        &format!("{point}={action}"),
        &[("--one-phase", "true")],
    )
    .await;
    let p1 = TestParticipant::start("p1").await;
    let mut c = coord.client().await;
    let tx = begin(&mut c, vec![p1.branch("a")]).await;
    let res = commit(&mut c, &tx, 5_000).await;
    assert!(
        res.is_err(),
        "Commit cannot be answered at the crash: {res:?}"
    );
    coord.wait_for_crash("aborting the process").await;
    (coord, p1, tx)
}

/// A one-phase commit (one branch) killed after the branch committed and before the
/// outcome's sync: the restarted coordinator finds the synced intent, asks the branch
/// (with an abort, answered "already committed") and answers COMMITTED. Before the intent
/// was synced, a restart knew nothing of the transaction and answered ABORTED (presumed
/// abort) for an order its branch had committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_commit_killed_before_its_outcome_is_durable_is_still_committed() {
    with_deadline(TEST_DEADLINE, async {
        // The first sync (the intent) passes, the second (the outcome) crashes.
        let (mut coord, p1, tx) =
            one_phase_commit_crashing("one-phase-outcome", "1*off->return(abort)").await;
        assert_eq!(
            p1.state(&tx, "a"),
            Some(ResState::Committed),
            "the branch committed in one phase before the crash"
        );
        assert_eq!(p1.count(&tx, "a", MsgKind::Commit), 1);

        coord.restart().await;
        assert_eq!(
            finished_outcome(&coord, &tx).await,
            pb::Outcome::Committed,
            "the restart must not presume abort for a committed one-phase transaction"
        );
        assert_eq!(
            p1.count(&tx, "a", MsgKind::Commit),
            1,
            "the restart does not commit again"
        );
        assert!(
            p1.count(&tx, "a", MsgKind::Abort) >= 1,
            "the restart asked the branch with an abort"
        );
        let mut c = coord.client().await;
        let again = commit(&mut c, &tx, 1_000)
            .await
            .expect("Commit after restart");
        assert_eq!(again.outcome, pb::Outcome::Committed as i32);
        // Committed, asked with an abort that undid nothing ("already committed").
        assert_eq!(p1.state(&tx, "a"), Some(ResState::Committed));
        assert_no_violations(&[(&p1, "a")]);
    })
    .await;
}

/// A one-branch transaction killed before its intent (written when the branch enlisted)
/// is durable: no commit was sent, and the restart aborts it, whether the intent was lost
/// (presumed abort) or reached the disk anyway (the branch is asked with an abort and has
/// nothing committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_commit_killed_before_its_intent_is_durable_settles_one_way() {
    with_deadline(TEST_DEADLINE, async {
        let mut coord = serve(
            "one-phase-intent",
            "coordinator::before_one_phase_sync=return(abort)",
            &[("--one-phase", "true")],
        )
        .await;
        let p1 = TestParticipant::start("p1").await;
        let mut c = coord.client().await;
        let tx = begin(&mut c, vec![]).await;
        // The enlist writes the intent and starts its sync: the crash point fires there
        // (the Enlist may or may not be answered first).
        let _ = c
            .enlist(pb::EnlistRequest {
                tx_id: tx.clone(),
                branch: Some(p1.branch("a")),
            })
            .await;
        let res = commit(&mut c, &tx, 5_000).await;
        assert!(res.is_err(), "the coordinator is gone: {res:?}");
        coord.wait_for_crash("aborting the process").await;
        assert_eq!(
            p1.count(&tx, "a", MsgKind::Commit),
            0,
            "no commit goes out before the intent is durable"
        );

        coord.restart().await;
        assert_eq!(finished_outcome(&coord, &tx).await, pb::Outcome::Aborted);
        assert_aborted_everywhere(&tx, &[(&p1, "a")]);
    })
    .await;
}

/// Killed in phase two after the database tier (commit_order 0) acknowledged, before the
/// broker tier (commit_order 10) got its commit: the restart finishes phase two, again
/// tier by tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_between_commit_tiers_finishes_in_tier_order() {
    with_deadline(TEST_DEADLINE, async {
        let point = "coordinator::between_tiers";
        let mut coord = serve("between-tiers", &format!("{point}=return(abort)"), &[]).await;
        let db = TestParticipant::start("db").await;
        let mq = TestParticipant::start("mq").await;
        let mut c = coord.client().await;
        let tx = begin(
            &mut c,
            vec![
                db.branch_ordered("rows", 0),
                mq.branch_ordered("events", 10),
            ],
        )
        .await;
        let pending = commit_in_background(&c, &tx, 5_000);
        coord
            .wait_for_crash(&format!("failpoint {point} hit"))
            .await;
        let _ = pending.await;
        assert_eq!(
            db.state(&tx, "rows"),
            Some(ResState::Committed),
            "tier 0 committed"
        );
        assert_eq!(
            mq.state(&tx, "events"),
            Some(ResState::Prepared),
            "tier 10 waits"
        );
        assert_eq!(
            mq.count(&tx, "events", MsgKind::Commit),
            0,
            "tier 10 got a commit"
        );

        coord.restart().await;
        wait_until(
            WAIT,
            "the restarted coordinator commits the broker tier",
            || mq.state(&tx, "events") == Some(ResState::Committed),
        )
        .await;
        assert_eq!(finished_outcome(&coord, &tx).await, pb::Outcome::Committed);
        let branches = [(&db, "rows"), (&mq, "events")];
        assert_committed_everywhere(&tx, &branches);
        // Before and after the crash, every commit of the lower tier came before any
        // commit of the higher one.
        let last_db = db
            .messages(&tx, "rows")
            .iter()
            .filter(|m| m.kind == MsgKind::Commit)
            .map(|m| m.at)
            .max()
            .expect("tier 0 commits");
        let first_mq = mq
            .messages(&tx, "events")
            .iter()
            .filter(|m| m.kind == MsgKind::Commit)
            .map(|m| m.at)
            .min()
            .expect("tier 10 commits");
        assert!(
            last_db < first_mq,
            "tier 10 was committed before tier 0 finished"
        );
        assert!(
            db.count(&tx, "rows", MsgKind::Commit) >= 2,
            "the restart re-drives tier 0 before tier 10: {:?}",
            db.kinds(&tx, "rows")
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Decision log failure and a paused coordinator
// ---------------------------------------------------------------------------------------

/// The sync of the COMMIT record fails: Commit answers UNAVAILABLE, health goes
/// NOT_SERVING, Begin is refused and nothing is committed; the restart (without the
/// fault) settles the in-doubt transaction the same way on every branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_log_sync_failure_halts_and_the_restart_settles_the_transaction() {
    with_deadline(TEST_DEADLINE, async {
        let point = "coordinator::log::before_sync";
        let mut coord = serve("sync-fails", &format!("{point}=return(error)"), &[]).await;
        let p1 = TestParticipant::start("p1").await;
        let p2 = TestParticipant::start("p2").await;
        let mut c = coord.client().await;
        assert_eq!(coord.health("").await, ServingStatus::Serving as i32);
        let tx = begin(&mut c, vec![p1.branch("a"), p2.branch("b")]).await;
        expect_status(
            commit(&mut c, &tx, 5_000).await,
            Code::Unavailable,
            &[tx.as_str(), "decision log failed"],
        );
        for service in ["", "twopc.v1.Coordinator"] {
            assert_eq!(
                coord.health(service).await,
                ServingStatus::NotServing as i32,
                "health of {service:?} after the log failed"
            );
        }
        expect_status(
            c.begin(pb::BeginRequest {
                timeout_ms: 0,
                branches: vec![p1.branch("c")],
            })
            .await,
            Code::Unavailable,
            &["not taking new transactions"],
        );
        let view = get_tx(&mut c, &tx).await.expect("GetTransaction");
        assert_eq!(outcome(&view), pb::Outcome::Unspecified, "{view:?}");
        // Commit again: still in doubt, still nothing sent.
        expect_status(
            commit(&mut c, &tx, 500).await,
            Code::Unavailable,
            &[tx.as_str()],
        );
        let branches = [(&p1, "a"), (&p2, "b")];
        for (p, b) in &branches {
            assert_eq!(p.state(&tx, b), Some(ResState::Prepared), "branch {b}");
            assert_eq!(
                p.count(&tx, b, MsgKind::Commit),
                0,
                "branch {b} got a commit"
            );
            assert_eq!(
                p.count(&tx, b, MsgKind::Abort),
                0,
                "branch {b} got an abort"
            );
        }
        assert!(coord.is_running());

        coord.restart().await;
        let end = Instant::now() + WAIT;
        while coord.health("").await != ServingStatus::Serving as i32 {
            assert!(Instant::now() < end, "SERVING again after the restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        recover_until_settled(&coord, &tx, &branches).await;
        let decided = finished_outcome(&coord, &tx).await;
        let expected = match decided {
            pb::Outcome::Committed => ResState::Committed,
            pb::Outcome::Aborted => ResState::Aborted,
            other => panic!("undecided after recovery: {other:?}"),
        };
        for (p, b) in &branches {
            assert_eq!(p.state(&tx, b), Some(expected), "branch {b} vs {decided:?}");
        }
        let mut c = coord.client().await;
        let again = commit(&mut c, &tx, 1_000).await;
        match decided {
            pb::Outcome::Committed => assert!(again.is_ok(), "{again:?}"),
            _ => {
                expect_status(again, Code::Aborted, &[tx.as_str()]);
            }
        }
        assert_no_violations(&branches);
        // New work is accepted again.
        let tx2 = begin(&mut c, vec![p1.branch("x"), p2.branch("y")]).await;
        commit(&mut c, &tx2, 5_000)
            .await
            .expect("Commit after the restart");
    })
    .await;
}

/// SIGSTOP for longer than the participants' patience and every coordinator timeout
/// (prepare, transaction and RPC timeouts of 500 ms, a 2 s pause), while one branch is
/// prepared and the other's vote is on its way; then SIGCONT. The transaction settles
/// the same way everywhere, the Commit answer agrees, and nothing stays prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_paused_past_every_timeout_settles_consistently() {
    with_deadline(TEST_DEADLINE, async {
        let coord = serve(
            "sigstop",
            "",
            &[
                ("--prepare-timeout-ms", "500"),
                ("--tx-timeout-ms", "500"),
                ("--rpc-timeout-ms", "500"),
            ],
        )
        .await;
        let TwoBranchCommit {
            p1,
            p2,
            tx,
            pending,
        } = TwoBranchCommit::start(&coord, Some("b")).await;
        wait_until(WAIT, "a is prepared and b received its prepare", || {
            p1.state(&tx, "a") == Some(ResState::Prepared)
                && p2.count(&tx, "b", MsgKind::Prepare) == 1
        })
        .await;

        coord.signal(libc::SIGSTOP);
        let paused = Instant::now();
        // b prepares and votes yes while the coordinator cannot listen.
        p2.release("b");
        wait_until_or_tell(
            WAIT,
            "b is prepared",
            || p2.state(&tx, "b") == Some(ResState::Prepared),
            || {
                format!(
                    "; b is {:?}, got {:?} (SIGSTOP {:?} ago); the coordinator's log:\n{}",
                    p2.state(&tx, "b"),
                    p2.messages(&tx, "b")
                        .iter()
                        .map(|m| match m.at.checked_duration_since(paused) {
                            Some(after) => format!("{:?} {after:?} after SIGSTOP", m.kind),
                            None => format!("{:?} {:?} before", m.kind, paused - m.at),
                        })
                        .collect::<Vec<_>>(),
                    paused.elapsed(),
                    coord.stderr_log()
                )
            },
        )
        .await;
        // The participants lose patience: they ask, get no answer, and stay in doubt.
        let mut impatient = coord.impatient_client(Duration::from_millis(300));
        for p in [&p1, &p2] {
            let report = p.recover(&mut impatient).await;
            assert!(
                report.committed.is_empty()
                    && report.aborted.is_empty()
                    && report.in_doubt.len() == 1,
                "a stopped coordinator cannot answer: {report:?}"
            );
        }
        // The fault itself lasts 2 s (longer than every timeout above).
        let rest = Duration::from_secs(2).saturating_sub(paused.elapsed());
        tokio::time::sleep(rest).await;
        coord.signal(libc::SIGCONT);

        let branches = [(&p1, "a"), (&p2, "b")];
        recover_until_settled(&coord, &tx, &branches).await;
        let decided = finished_outcome(&coord, &tx).await;
        let expected = match decided {
            pb::Outcome::Committed => ResState::Committed,
            pb::Outcome::Aborted => ResState::Aborted,
            other => panic!("undecided: {other:?}"),
        };
        wait_until(WAIT, "every branch follows the decision", || {
            branches
                .iter()
                .all(|(p, b)| p.state(&tx, b) == Some(expected))
        })
        .await;
        let answer = tokio::time::timeout(WAIT, pending)
            .await
            .expect("the Commit call answers after SIGCONT")
            .expect("commit task");
        match &answer {
            Ok(_) => assert_eq!(decided, pb::Outcome::Committed, "OK but {decided:?}"),
            Err(s) if s.code() == Code::Aborted => {
                assert_eq!(decided, pb::Outcome::Aborted, "ABORTED but {decided:?}")
            }
            Err(s) => panic!("Commit answered {s:?}; the outcome is {decided:?}"),
        }
        match decided {
            pb::Outcome::Committed => assert_committed_everywhere(&tx, &branches),
            _ => assert_aborted_everywhere(&tx, &branches),
        }
        eprintln!("paused coordinator: transaction {tx} settled {decided:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// PostgreSQL faults, in-process SDK
// ---------------------------------------------------------------------------------------

/// Creates a database named after `prefix` in `cluster`, runs `schema` in it and returns
/// its name with a connection to it.
async fn database(
    cluster: &PgCluster,
    prefix: &str,
    schema: &str,
) -> (String, tokio_postgres::Client) {
    let db_name = unique_name(prefix);
    cluster
        .create_database(&db_name)
        .await
        .expect("create database");
    let db = cluster.connect(&db_name).await.expect("connect");
    db.batch_execute(schema).await.expect("schema");
    (db_name, db)
}

/// Prints (the end of) a cluster's server log when the scenario fails.
struct PgLogOnFailure(PathBuf);

impl Drop for PgLogOnFailure {
    fn drop(&mut self) {
        if show_logs() {
            let log = std::fs::read(&self.0).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(8_000)..];
            eprintln!(
                "----- postgres log -----\n{}",
                String::from_utf8_lossy(tail)
            );
        }
    }
}

/// The participant SDK of service `service`, talking to `coord` (recovery every 200 ms).
async fn sdk(coord: &Coordinator, service: &str) -> TwoPc {
    TwoPc::builder(coord.url())
        .service(service)
        .recovery_interval(Duration::from_millis(200))
        .start()
        .await
        .expect("SDK start")
}

/// [`sdk`] with the PostgreSQL resource "db" on `url` (a pool of 4 connections).
async fn sdk_with_postgres(
    coord: &Coordinator,
    service: &str,
    url: &str,
) -> (TwoPc, Arc<PgResource>) {
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        url.parse().expect("pg config"),
        tokio_postgres::NoTls,
    ))
    .max_size(4)
    .build()
    .expect("pool");
    let sdk = sdk(coord, service).await;
    let db = sdk
        .register(PgResource::new("db", pool).await.expect("PgResource"))
        .expect("register");
    (sdk, db)
}

/// A private cluster, the guard that prints its log when the scenario fails, and a new
/// database (`prefix` made unique) with `schema`: its name and a connection.
async fn private_database(
    prefix: &str,
    schema: &str,
) -> (PgCluster, PgLogOnFailure, String, tokio_postgres::Client) {
    let cluster = support::orders::private_cluster(&[]).await;
    let log = PgLogOnFailure(cluster.log_path().to_path_buf());
    let (db_name, db) = database(&cluster, prefix, schema).await;
    (cluster, log, db_name, db)
}

/// The world of the one-phase order scenarios: a private PostgreSQL with an `orders`
/// table, a durable queue, a coordinator started with `failpoints`, and an in-process SDK
/// (service "f1p") whose PostgreSQL resource "db" stages its events in the database for
/// the RabbitMQ resource "mq".
struct OnePhaseWorld {
    coord: Coordinator,
    sdk: TwoPc,
    pg: Arc<PgResource>,
    rabbit: Arc<RabbitResource>,
    db: tokio_postgres::Client,
    queue: String,
    amqp: Connection,
    channel: lapin::Channel,
    _staging: tempfile::TempDir,
    _log: PgLogOnFailure,
    _cluster: PgCluster,
}

impl OnePhaseWorld {
    async fn start(name: &str, failpoints: &str) -> OnePhaseWorld {
        let (cluster, log, db_name, db) = private_database(
            "fault_1p_order",
            "CREATE TABLE orders (id text PRIMARY KEY)",
        )
        .await;
        let queue = unique_name("fault_1p_events");
        let (amqp, channel) = rabbitmq().await;
        declare_durable(&channel, &queue).await;
        let coord = serve(name, failpoints, &[("--one-phase", "true")]).await;
        let staging_dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(StagingStore::open(staging_dir.path()).expect("staging store"));
        let sdk = sdk(&coord, "f1p").await;
        let rabbit = sdk
            .register(Arc::new(
                RabbitResource::connect("mq", AMQP_URL, store)
                    .await
                    .expect("RabbitMQ resource"),
            ))
            .expect("register mq");
        let pg = sdk
            .register(
                PgResource::from_url("db", &cluster.url(&db_name), 4)
                    .await
                    .expect("PgResource"),
            )
            .expect("register db");
        pg.enable_outbox(rabbit.clone(), OutboxOptions::default())
            .await
            .expect("enable_outbox");
        OnePhaseWorld {
            coord,
            sdk,
            pg,
            rabbit,
            db,
            queue,
            amqp,
            channel,
            _staging: staging_dir,
            _log: log,
            _cluster: cluster,
        }
    }

    /// Writes order `id` and stages its event in `tx`'s database branch.
    async fn place(&self, tx: &Transaction, id: &str) {
        let branch = tx.postgres(&self.pg).await.expect("branch");
        branch
            .execute("INSERT INTO orders VALUES ($1)", &[&id])
            .await
            .expect("insert");
        branch
            .publish(
                &*self.rabbit,
                &self.queue,
                format!("{{\"order\":\"{id}\"}}").into_bytes(),
            )
            .await
            .expect("publish");
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// The message ids of the events in the queue, once there is at least one (bounded).
    async fn events(&self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut events = Vec::new();
        while events.is_empty() {
            assert!(Instant::now() < deadline, "no OrderCreated within {WAIT:?}");
            let taken = take_all(&self.channel, &self.queue)
                .await
                .expect("basic.get");
            events.extend(taken.into_iter().map(|m| m.message_id));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        events
    }

    async fn cleanup(self) {
        self.sdk.shutdown().await;
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.amqp.close(200, "test done".into()).await;
    }
}

/// The dual write itself, committed in one phase: an order row and its OrderCreated event
/// staged in the same PostgreSQL transaction (the outbox of the PostgreSQL branch,
/// RabbitMQ behind it). The SDK is answered COMMITTED before the outcome is durable, and
/// the coordinator is killed when the SDK's Barrier arrives, before the sync that would
/// make the outcome durable (and let the participant drop its one-phase marker). The
/// restarted coordinator asks the participant with an abort, which it answers from its
/// marker ("already committed"), and reports COMMITTED; the row and exactly one event
/// exist. Before the intent was synced, the restart presumed abort here and reported
/// ABORTED for an order that was committed and published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_order_killed_before_its_outcome_is_durable_is_reported_committed() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = OnePhaseWorld::start(
            "one-phase-order",
            "coordinator::before_barrier_sync=return(abort)",
        )
        .await;
        let tx = w.sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        w.place(&tx, "o1").await;
        tx.commit()
            .await
            .expect("answered before the outcome is durable");
        w.coord.wait_for_crash("aborting the process").await;
        assert_eq!(
            w.count(MARKERS_SQL).await,
            1,
            "the marker stays until a Barrier succeeds"
        );
        assert_eq!(
            w.count("SELECT count(*) FROM orders").await,
            1,
            "the branch committed in one phase before the crash"
        );

        w.coord.restart().await;
        assert_eq!(
            finished_outcome(&w.coord, &tx_id).await,
            pb::Outcome::Committed,
            "the restart must not presume abort for a committed, published order"
        );
        assert_eq!(
            w.events().await,
            vec![format!("{tx_id}:f1p:db:0")],
            "exactly one event"
        );
        w.cleanup().await;
    })
    .await;
}

/// A local transaction (`begin_local`): the SDK commits the order itself, and the
/// coordinator is killed when the report of that commit arrives. The restarted
/// coordinator finds the intent (durable before the SDK committed: its Barrier saw to
/// that), asks the participant with an abort, which answers from its state that it had
/// committed, and reports COMMITTED; the SDK's retried report is answered the same way,
/// so the marker goes after a Barrier of the new epoch. One row, one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_order_whose_report_kills_the_coordinator_is_reported_committed() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = OnePhaseWorld::start(
            "local-order",
            "coordinator::before_local_commit_record=return(abort)",
        )
        .await;
        let tx = w.sdk.begin_local(&*w.pg).await.expect("begin_local");
        let tx_id = tx.id().to_string();
        w.place(&tx, "o1").await;
        tx.commit().await.expect("committed here");
        w.coord.wait_for_crash("aborting the process").await;
        assert_eq!(w.count("SELECT count(*) FROM orders").await, 1);
        assert_eq!(
            w.count(MARKERS_SQL).await,
            1,
            "the marker stays until the coordinator has the outcome durably"
        );

        w.coord.restart_on_same_address().await;
        assert_eq!(
            finished_outcome(&w.coord, &tx_id).await,
            pb::Outcome::Committed,
            "the restart must not presume abort for an order its participant committed"
        );
        assert_eq!(
            w.events().await,
            vec![format!("{tx_id}:f1p:db:0")],
            "exactly one event"
        );
        let deadline = Instant::now() + WAIT;
        while w.count(MARKERS_SQL).await != 0 {
            assert!(
                Instant::now() < deadline,
                "the marker is not forgotten after the restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        w.cleanup().await;
    })
    .await;
}

/// PostgreSQL is SIGKILLed after both database branches ran PREPARE TRANSACTION (their
/// transactions are waiting for a gate branch's vote). After the restart the gids are
/// still there; then one transaction commits and the other aborts, and each gid is
/// finished the coordinator's way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_after_prepare_keeps_the_gid_and_follows_the_decision() {
    with_deadline(TEST_DEADLINE, async {
        let (cluster, _log, db_name, setup) =
            private_database("fault_pgkill", "CREATE TABLE t (id text PRIMARY KEY)").await;
        drop(setup);

        let coord = serve("pg-kill", "", &[("--prepare-timeout-ms", "20000")]).await;
        let gate = TestParticipant::start("gate").await;
        gate.script("g1", PrepareScript::Hang);
        gate.script("g2", PrepareScript::Hang);
        let (sdk, db) = sdk_with_postgres(&coord, "pgk", &cluster.url(&db_name)).await;
        let mut c = coord.client().await;

        // Two transactions: a row each, plus a gate branch that holds its vote.
        let mut txs = Vec::new();
        for (row, g) in [("r1", "g1"), ("r2", "g2")] {
            let tx = sdk.begin().await.expect("begin");
            let branch = tx.postgres(&db).await.expect("database branch");
            branch
                .execute("INSERT INTO t (id) VALUES ($1)", &[&row])
                .await
                .expect("insert");
            c.enlist(pb::EnlistRequest {
                tx_id: tx.id().to_string(),
                branch: Some(gate.branch_ordered(g, 5)),
            })
            .await
            .expect("enlist the gate");
            let tx_id = tx.id().to_string();
            let gid = branch.gid().to_string();
            drop(branch);
            let commit = tokio::spawn(tx.commit());
            txs.push((tx_id, gid, g, row, commit));
        }
        let watcher = cluster.connect(&db_name).await.expect("connect");
        let want: Vec<String> = {
            let mut v: Vec<String> = txs.iter().map(|t| t.1.clone()).collect();
            v.sort();
            v
        };
        let end = Instant::now() + WAIT;
        while prepared_gids(&watcher).await != want {
            assert!(
                Instant::now() < end,
                "both branches prepared: {:?}",
                prepared_gids(&watcher).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(watcher);

        // Power cut of the database, then crash recovery.
        let cl = &cluster;
        tokio::task::block_in_place(|| cl.kill9()).expect("kill9");
        assert!(!cluster.is_running());
        tokio::task::block_in_place(|| cl.start_again()).expect("start_again");
        let check = cluster
            .connect(&db_name)
            .await
            .expect("connect after restart");
        assert_eq!(
            prepared_gids(&check).await,
            want,
            "prepared gids survive the kill"
        );
        let rows: i64 = check
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, 0, "prepared rows are not visible");

        // tx 1: the gate votes yes -> COMMIT. tx 2: the application aborts it.
        let (tx1, _, g1, _, commit1) = txs.remove(0);
        let (tx2, _, g2, _, commit2) = txs.remove(0);
        gate.release(g1);
        c.abort(pb::AbortRequest {
            tx_id: tx2.clone(),
            reason: "the application gave up".into(),
        })
        .await
        .expect("Abort");
        gate.release(g2);
        let r1 = tokio::time::timeout(WAIT, commit1)
            .await
            .expect("commit 1 answers")
            .expect("task");
        assert!(r1.is_ok(), "tx 1 commits: {r1:?}");
        let r2 = tokio::time::timeout(WAIT, commit2)
            .await
            .expect("commit 2 answers")
            .expect("task");
        assert!(
            matches!(r2, Err(twopc_participant::Error::Aborted(_))),
            "tx 2 aborted: {r2:?}"
        );
        assert_eq!(finished_outcome(&coord, &tx1).await, pb::Outcome::Committed);
        assert_eq!(finished_outcome(&coord, &tx2).await, pb::Outcome::Aborted);
        let end = Instant::now() + WAIT;
        while !prepared_gids(&check).await.is_empty() {
            assert!(
                Instant::now() < end,
                "gids left: {:?}",
                prepared_gids(&check).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rows: Vec<String> = check
            .query("SELECT id FROM t ORDER BY id", &[])
            .await
            .expect("rows")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, vec!["r1".to_string()], "committed row only");
        assert_eq!(gate.state(&tx1, g1), Some(ResState::Committed));
        assert_ne!(gate.state(&tx2, g2), Some(ResState::Committed));
        assert!(gate.violations().is_empty(), "{:?}", gate.violations());
        sdk.shutdown().await;
    })
    .await;
}

/// PostgreSQL is SIGKILLed while a branch's PREPARE TRANSACTION is running (a deferred
/// constraint trigger makes PREPARE slow). The branch loses its connection mid-PREPARE: it
/// votes no, the transaction aborts, and whatever PostgreSQL kept after its crash recovery
/// (no gid, or a gid whose PREPARE did reach the WAL) is rolled back by participant
/// recovery: no row, no gid, the other branch aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_during_prepare_aborts_and_leaves_nothing() {
    with_deadline(TEST_DEADLINE, async {
        let (cluster, _log, db_name, setup) = private_database(
            "fault_pgprep",
            "CREATE TABLE t (id text PRIMARY KEY);
             CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_at_prepare AFTER INSERT ON t
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_check();",
        )
        .await;
        drop(setup);

        let coord = serve("pg-kill-prepare", "", &[("--prepare-timeout-ms", "20000")]).await;
        let other = TestParticipant::start("other").await;
        let (sdk, db) = sdk_with_postgres(&coord, "pgp", &cluster.url(&db_name)).await;
        let mut c = coord.client().await;

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let branch = tx.postgres(&db).await.expect("database branch");
        branch
            .execute("INSERT INTO t (id) VALUES ('r1')", &[])
            .await
            .expect("insert");
        let gid = branch.gid().to_string();
        drop(branch);
        c.enlist(pb::EnlistRequest {
            tx_id: tx_id.clone(),
            branch: Some(other.branch("o")),
        })
        .await
        .expect("enlist the other branch");
        let commit = tokio::spawn(tx.commit());

        // Wait until PREPARE TRANSACTION is running (stuck in the deferred trigger).
        let watcher = cluster.connect(&db_name).await.expect("connect");
        let end = Instant::now() + WAIT;
        loop {
            let running: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE state = 'active' AND query LIKE '%PREPARE TRANSACTION%' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if running > 0 {
                break;
            }
            assert!(Instant::now() < end, "PREPARE TRANSACTION never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(watcher);

        // Kill the database mid-PREPARE, then let it recover.
        let cl = &cluster;
        tokio::task::block_in_place(|| cl.kill9()).expect("kill9");
        tokio::task::block_in_place(|| cl.start_again()).expect("start_again");

        let r = tokio::time::timeout(WAIT, commit)
            .await
            .expect("commit answers")
            .expect("task");
        match &r {
            Err(twopc_participant::Error::Aborted(msg)) => {
                assert!(msg.contains("pgp:db"), "the database branch is named: {msg}")
            }
            other => panic!("a PREPARE cut off by a crash must abort, got {other:?}"),
        }
        assert_eq!(finished_outcome(&coord, &tx_id).await, pb::Outcome::Aborted);

        // Nothing left: no gid (recovery rolls back one that survived), no row.
        let check = cluster.connect(&db_name).await.expect("connect after restart");
        let end = Instant::now() + WAIT;
        loop {
            sdk.recover_now().await;
            let left = prepared_gids(&check).await;
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < end, "gid {gid} left after recovery: {left:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rows: i64 = check
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, 0, "no row of an aborted transaction");
        let end = Instant::now() + WAIT;
        while other.state(&tx_id, "o") == Some(ResState::Prepared) {
            assert!(Instant::now() < end, "the other branch never got its abort");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(other.state(&tx_id, "o"), Some(ResState::Committed));
        assert!(other.violations().is_empty(), "{:?}", other.violations());
        sdk.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// The order-service process
// ---------------------------------------------------------------------------------------

/// An order-service world (see [`OrderWorld`]) on a private PostgreSQL cluster with
/// `pg_settings`; its coordinator is two-phase even for one branch unless
/// `coordinator_flags` say otherwise.
async fn order_world(
    name: &str,
    pg_settings: &[(&str, &str)],
    coordinator_flags: &[(&str, &str)],
) -> OrderWorld {
    let mut flags = vec![("--one-phase", "false")];
    flags.retain(|(k, _)| !coordinator_flags.iter().any(|(f, _)| f == k));
    flags.extend_from_slice(coordinator_flags);
    OrderWorld::start(Settings {
        name,
        postgres: Postgres::Private(pg_settings),
        coordinator_flags: &flags,
        service_timeout_ms: 10_000,
        recovery_interval_ms: 200,
        wait: WAIT,
    })
    .await
}

/// The order service dies while staging its OrderCreated (the batch is written to the
/// staging store's files, not yet fdatasynced), with the database branch preparing in
/// parallel. The coordinator aborts (a vote is missing); after a restart with
/// `--recover` nothing of the order is left: no row, no event, nothing staged or
/// prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_service_killed_while_staging_aborts_the_order_and_leaves_nothing() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = order_world("staging-crash", &[], &[]).await;
        let point = "participant::staging::before_sync";
        let run = w
            .run(&["--place", "o1"], &format!("{point}=return(abort)"))
            .await;
        run.assert_aborted_by_failpoint(point);

        // The batch was written before the crash (the fail point is after sled's write).
        let staged = w.staged().await;
        assert_eq!(staged.len(), 1, "one staged batch: {staged:?}");
        let (tx_id, branch) = staged[0].clone();
        assert_eq!(branch, EVENTS_BRANCH);
        let r = w
            .wait_for(&tx_id, "is decided", |r| {
                outcome(r) != pb::Outcome::Unspecified
            })
            .await;
        assert_eq!(
            outcome(&r),
            pb::Outcome::Aborted,
            "the coordinator aborts the order: {r:?}"
        );

        let run = w.run(&["--recover"], "").await;
        run.assert_success("--recover");
        assert!(
            run.stdout
                .contains(&format!("in doubt {tx_id} {EVENTS_BRANCH}")),
            "{:?}",
            run.stdout
        );
        assert_eq!(
            finished_outcome(&w.coord, &tx_id).await,
            pb::Outcome::Aborted
        );
        w.assert_nothing_left("o1", &[]).await;
        w.cleanup().await;
    })
    .await;
}

/// Every prepared-transaction slot of PostgreSQL is taken by other transactions: the
/// database branch votes no with PostgreSQL's message, the order aborts, and nothing of
/// it is committed or left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_prepared_transactions_exhausted_votes_no_and_aborts_the_order() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = order_world("max-prepared", &[("max_prepared_transactions", "2")], &[]).await;
        w.db.batch_execute("CREATE TABLE filler (n int)")
            .await
            .expect("filler table");
        for n in 1..=2 {
            w.db.batch_execute(&format!(
                "BEGIN; INSERT INTO filler VALUES ({n}); PREPARE TRANSACTION 'filler_{n}'"
            ))
            .await
            .expect("fill a prepared-transaction slot");
        }
        let fillers = vec!["filler_1".to_string(), "filler_2".to_string()];
        assert_eq!(w.prepared_gids().await, fillers);

        let run = w.run(&["--place", "o1"], "").await;
        run.assert_success("--place");
        let placed = run
            .stdout
            .iter()
            .find(|l| l.starts_with("placed o1 "))
            .unwrap_or_else(|| panic!("no outcome line: {:?}", run.stdout))
            .clone();
        assert!(placed.starts_with("placed o1 aborted: "), "{placed}");
        for needle in [
            DB_BRANCH,
            "voted no",
            "maximum number of prepared transactions reached",
        ] {
            assert!(
                placed.contains(needle),
                "{placed:?} does not mention {needle:?}"
            );
        }
        let tx_id = placed
            .split("transaction ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no transaction id in {placed:?}"))
            .to_string();

        // Whatever the first run had no time to finish (the broker branch's abort), a
        // restart does.
        let run = w.run(&["--recover"], "").await;
        run.assert_success("--recover");
        assert_eq!(
            finished_outcome(&w.coord, &tx_id).await,
            pb::Outcome::Aborted
        );
        // Only the fillers are prepared.
        w.assert_nothing_left("o1", &fillers).await;
        w.cleanup().await;
    })
    .await;
}

/// An order-service world (one-phase on, transaction timeout `tx_timeout_ms`) whose
/// service placed order o1 with its event staged in the database and died right after
/// its local commit, before reporting it (a fail point aborts it there).
async fn killed_after_its_local_commit(name: &str, tx_timeout_ms: &str) -> OrderWorld {
    let mut w = order_world(
        name,
        &[],
        &[("--one-phase", "true"), ("--tx-timeout-ms", tx_timeout_ms)],
    )
    .await;
    let point = "participant::after_local_commit_before_report";
    let run = w
        .run(
            &["--place", "o1", "--stage-events", "database"],
            &format!("{point}=return(abort)"),
        )
        .await;
    // The local commit may have printed `placed o1 committed` before the fail point.
    run.assert_died_at(point);
    w
}

/// `order-service --recover` after a kill right after a local commit: the commit its
/// one-phase marker remembers is listed, reported (the coordinator records COMMITTED) and
/// counted in `recovered N`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_service_recover_reports_and_counts_an_unreported_local_commit() {
    with_deadline(TEST_DEADLINE, async {
        // A long transaction timeout: only the recovery run can tell the coordinator.
        let mut w = killed_after_its_local_commit("local-commit-recover", "60000").await;
        let run = w
            .run(&["--recover", "--stage-events", "database"], "")
            .await;
        run.assert_success("--recover");
        let tx_id = run.recovered_one("committed in one phase, not reported ", DB_BRANCH);
        let mut c = w.coord.client().await;
        let r = get_tx(&mut c, &tx_id).await.expect("GetTransaction");
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        assert!(w.order_row("o1").await.is_some());
        w.cleanup().await;
    })
    .await;
}

/// The order service commits an order with its event staged in the database
/// (`--stage-events database`: `begin_local`, the one-phase commit runs in the service)
/// and dies right after the commit, before reporting it to the coordinator, which holds
/// the transaction in its participant's hands. The restarted service reports the commit
/// its one-phase marker remembers (recovery at start) — or, should the transaction timeout
/// come first, answers the coordinator's abort with "already committed" from that marker
/// — so the coordinator records COMMITTED (not ABORTED for an order that exists). The row
/// stays and its event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_service_killed_after_its_local_commit_is_reported_committed() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = killed_after_its_local_commit("local-commit-crash", "1000").await;
        assert!(
            w.order_row("o1").await.is_some(),
            "committed before the crash"
        );
        let markers: Vec<String> =
            w.db.query("SELECT gid FROM twopc_one_phase WHERE NOT fenced", &[])
                .await
                .expect("markers")
                .iter()
                .map(|r| r.get(0))
                .collect();
        assert_eq!(markers.len(), 1, "the one-phase marker: {markers:?}");
        let mut c = w.coord.client().await;
        let listed = c
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
            .expect("ListTransactions")
            .into_inner()
            .transactions;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let tx_id = listed[0].tx_id.clone();
        assert_eq!(listed[0].state, pb::TxState::Preparing as i32, "{listed:?}");

        // The service comes back; the coordinator's abort (after the timeout) learns the
        // commit from it.
        let mut service = w.serve(&["--stage-events", "database"]);
        let end = Instant::now() + WAIT;
        let outcome_now = loop {
            let r = get_tx(&mut c, &tx_id).await.expect("GetTransaction");
            if outcome(&r) != pb::Outcome::Unspecified || Instant::now() > end {
                break outcome(&r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut events = Vec::new();
        let end = Instant::now() + WAIT;
        while events.is_empty() && Instant::now() < end {
            events = w.drain().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = service.kill();
        let _ = service.wait();
        assert_eq!(
            outcome_now,
            pb::Outcome::Committed,
            "the coordinator must learn the committed order from its participant"
        );
        // At least once, always under the one message id (a consumer deduplicates by it):
        // the relay may have published before the crash and the sweep again after it.
        let expected = format!("{tx_id}:{DB_BRANCH}:0");
        assert!(
            !events.is_empty() && events.iter().all(|(id, _)| *id == expected),
            "the event of {tx_id}: {events:?}"
        );
        assert!(w.order_row("o1").await.is_some());
        w.cleanup().await;
    })
    .await;
}
