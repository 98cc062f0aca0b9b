//! End-to-end tests against the real `twopc serve` process: in-test gRPC participants,
//! crashes (SIGKILL) and restarts of the coordinator and of participants, bad input over
//! gRPC, health, reflection and graceful shutdown.
//!
//! Every test has its own data directory and ports and an overall deadline, and
//! synchronizes by polling observable state, never by fixed sleeps.

mod support;

use std::time::{Duration, Instant};

use support::{
    begin, commit, eventually, expect_status, get_tx, outcome, parse_tx_id, reflected_services,
    tx_state, wait_tx_state, wait_until, with_deadline, Coordinator, MsgKind, PrepareScript,
    ResState, TestParticipant, TwoBranchCommit,
};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::requests;

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(25);
/// Budget of one wait for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(10);

fn assert_no_violations(ps: &[&TestParticipant]) {
    for p in ps {
        assert!(
            p.violations().is_empty(),
            "protocol violations: {:?}",
            p.violations()
        );
    }
}

/// Two participants and a transaction with pa's branch `a` and pb's branch `b`, whose
/// Commit runs in the background while `a`'s prepare hangs (until released) and `b` is
/// prepared: the coordinator is in the middle of phase one, undecided.
struct MidPrepare {
    pa: TestParticipant,
    pb_: TestParticipant,
    tx: String,
    pending_commit: JoinHandle<Result<pb::CommitResponse, Status>>,
}

impl MidPrepare {
    async fn start(coord: &Coordinator) -> MidPrepare {
        let TwoBranchCommit {
            p1: pa,
            p2: pb_,
            tx,
            pending,
        } = TwoBranchCommit::start(coord, Some("a")).await;
        wait_until(WAIT, "branch a received its prepare", || {
            pa.count(&tx, "a", MsgKind::Prepare) == 1
        })
        .await;
        wait_until(WAIT, "branch b prepared", || {
            pb_.state(&tx, "b") == Some(ResState::Prepared)
        })
        .await;
        MidPrepare {
            pa,
            pb_,
            tx,
            pending_commit: pending,
        }
    }
}

/// `tx` is aborted: Commit answers ABORTED, GetTransaction says so, no branch got a
/// commit and no participant saw a protocol violation.
async fn assert_aborted_without_a_commit(
    c: &mut CoordinatorClient<Channel>,
    tx: &str,
    pa: &TestParticipant,
    pb_: &TestParticipant,
) {
    expect_status(commit(c, tx, 1_000).await, Code::Aborted, &[tx]);
    let view = get_tx(c, tx).await.expect("GetTransaction");
    assert_eq!(outcome(&view), pb::Outcome::Aborted, "{view:?}");
    assert!(
        !pa.saw(tx, MsgKind::Commit) && !pb_.saw(tx, MsgKind::Commit),
        "a commit was sent"
    );
    assert_no_violations(&[pa, pb_]);
}

// 1 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_branches_voting_yes_commit() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let db = TestParticipant::start("db").await;
        let mq = TestParticipant::start("mq").await;
        let mut c = coord.client().await;

        // One branch at Begin, the other by Enlist (twice: re-enlisting is idempotent).
        let tx = begin(&mut c, vec![db.branch_ordered("orders", 0)]).await;
        let (_, epoch, seq) = parse_tx_id(&tx);
        assert!(epoch >= 1 && seq >= 1, "tx id {tx}");
        for _ in 0..2 {
            c.enlist(pb::EnlistRequest {
                tx_id: tx.clone(),
                branch: Some(mq.branch_ordered("events", 10)),
            })
            .await
            .expect("Enlist");
        }
        let active = get_tx(&mut c, &tx).await.expect("GetTransaction");
        assert_eq!(tx_state(&active), pb::TxState::Active);
        assert_eq!(active.branches.len(), 2, "{active:?}");
        let listed = c
            .list_transactions(pb::ListTransactionsRequest {
                state: pb::TxState::Active as i32,
                min_age_ms: 0,
                limit: 0,
            })
            .await
            .expect("ListTransactions")
            .into_inner();
        let summary = listed
            .transactions
            .iter()
            .find(|t| t.tx_id == tx)
            .expect("the active tx is listed");
        assert_eq!(summary.branch_count, 2, "{summary:?}");

        let resp = commit(&mut c, &tx, 5_000).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert!(
            resp.pending_branches.is_empty(),
            "pending: {:?}",
            resp.pending_branches
        );

        assert_eq!(db.state(&tx, "orders"), Some(ResState::Committed));
        assert_eq!(mq.state(&tx, "events"), Some(ResState::Committed));
        assert_eq!(
            db.kinds(&tx, "orders"),
            vec![MsgKind::Prepare, MsgKind::Commit]
        );
        assert_eq!(
            mq.kinds(&tx, "events"),
            vec![MsgKind::Prepare, MsgKind::Commit]
        );
        assert!(db
            .received()
            .iter()
            .chain(mq.received().iter())
            .all(|r| !r.one_phase));
        // commit_order: the database tier is acknowledged before the broker gets its commit.
        let db_commit = db.messages(&tx, "orders")[1].at;
        let mq_commit = mq.messages(&tx, "events")[1].at;
        assert!(
            db_commit <= mq_commit,
            "tier 10 was committed before tier 0"
        );

        let view = wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Committed).await;
        assert_eq!(outcome(&view), pb::Outcome::Committed);
        assert_eq!(view.tx_id, tx);

        // Commit is idempotent.
        let again = commit(&mut c, &tx, 1_000).await.expect("repeated Commit");
        assert_eq!(again.outcome, pb::Outcome::Committed as i32);
        assert!(again.pending_branches.is_empty());
        assert_eq!(db.count(&tx, "orders", MsgKind::Commit), 1);
        assert_no_violations(&[&db, &mq]);
    })
    .await;
}

// 2 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_vote_aborts_every_branch() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let p1 = TestParticipant::start("p1").await;
        let p2 = TestParticipant::start("p2").await;
        p2.script(
            "stock",
            PrepareScript::No("insufficient stock for sku-17".into()),
        );
        let mut c = coord.client().await;

        let tx = begin(&mut c, vec![p1.branch("payment"), p2.branch("stock")]).await;
        let st = expect_status(
            commit(&mut c, &tx, 5_000).await,
            Code::Aborted,
            &["stock", "insufficient stock for sku-17"],
        );
        assert!(
            st.message().contains(&tx),
            "abort message should name the transaction: {:?}",
            st.message()
        );

        wait_until(WAIT, "the yes branch is aborted", || {
            p1.state(&tx, "payment") == Some(ResState::Aborted)
        })
        .await;
        assert_eq!(p2.state(&tx, "stock"), Some(ResState::Aborted));
        assert_eq!(
            p1.kinds(&tx, "payment"),
            vec![MsgKind::Prepare, MsgKind::Abort]
        );
        assert!(
            !p1.saw(&tx, MsgKind::Commit) && !p2.saw(&tx, MsgKind::Commit),
            "a commit was sent"
        );

        let view = get_tx(&mut c, &tx).await.expect("GetTransaction");
        assert_eq!(outcome(&view), pb::Outcome::Aborted, "{view:?}");
        wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Aborted).await;
        // Commit stays ABORTED.
        expect_status(
            commit(&mut c, &tx, 1_000).await,
            Code::Aborted,
            &[tx.as_str()],
        );
        assert_no_violations(&[&p1, &p2]);
    })
    .await;
}

// 3 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_votes_commit_missing_votes_abort_at_prepare_timeout() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[
            ("--prepare-timeout-ms", "500"),
            ("--rpc-timeout-ms", "1500"),
        ])
        .await;
        let p1 = TestParticipant::start("p1").await;
        let p2 = TestParticipant::start("p2").await;
        let mut c = coord.client().await;

        // A vote well within the prepare timeout still counts.
        p1.script("slow", PrepareScript::Late(Duration::from_millis(200)));
        let tx1 = begin(&mut c, vec![p1.branch("slow"), p2.branch("fast")]).await;
        let resp = commit(&mut c, &tx1, 5_000)
            .await
            .expect("Commit with a late vote");
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
        assert_eq!(p1.state(&tx1, "slow"), Some(ResState::Committed));
        assert_eq!(p2.state(&tx1, "fast"), Some(ResState::Committed));

        // A vote that never comes aborts the transaction at the prepare timeout.
        p1.script("stuck", PrepareScript::Hang);
        let tx2 = begin(&mut c, vec![p1.branch("stuck"), p2.branch("ready")]).await;
        let started = Instant::now();
        let res = commit(&mut c, &tx2, 5_000).await;
        let took = started.elapsed();
        expect_status(res, Code::Aborted, &["stuck", "timed out"]);
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(1_400),
            "Commit answered after {took:?}; the prepare timeout is 500 ms"
        );
        wait_until(WAIT, "the yes branch is aborted", || {
            p2.state(&tx2, "ready") == Some(ResState::Aborted)
        })
        .await;
        // The silent branch gets its abort once the coordinator gives up on the prepare RPC.
        wait_until(WAIT, "the silent branch is aborted", || {
            p1.state(&tx2, "stuck") == Some(ResState::Aborted)
        })
        .await;
        p1.release("stuck");
        assert!(
            !p1.saw(&tx2, MsgKind::Commit) && !p2.saw(&tx2, MsgKind::Commit),
            "a commit was sent"
        );
        let view = get_tx(&mut c, &tx2).await.expect("GetTransaction");
        assert_eq!(outcome(&view), pb::Outcome::Aborted, "{view:?}");
        assert_no_violations(&[&p1, &p2]);
    })
    .await;
}

// 4 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_branch_commits_in_one_phase() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let p = TestParticipant::start("p").await;
        let mut c = coord.client().await;

        let tx = begin(&mut c, vec![p.branch("only")]).await;
        let resp = commit(&mut c, &tx, 5_000).await.expect("Commit");
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
        let msgs = p.messages(&tx, "only");
        assert_eq!(msgs.len(), 1, "expected exactly one message, got {msgs:?}");
        assert_eq!(msgs[0].kind, MsgKind::Commit);
        assert!(msgs[0].one_phase, "the commit must say one_phase");
        assert_eq!(p.state(&tx, "only"), Some(ResState::Committed));
        let view = wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Committed).await;
        assert_eq!(outcome(&view), pb::Outcome::Committed);

        // The participant decides a one-phase commit: a refusal aborts the transaction.
        p.script(
            "refuses",
            PrepareScript::No("unique constraint orders_pkey".into()),
        );
        let tx2 = begin(&mut c, vec![p.branch("refuses")]).await;
        expect_status(
            commit(&mut c, &tx2, 5_000).await,
            Code::Aborted,
            &["refuses", "unique constraint orders_pkey"],
        );
        assert_eq!(p.kinds(&tx2, "refuses"), vec![MsgKind::Commit]);
        let view = get_tx(&mut c, &tx2).await.expect("GetTransaction");
        assert_eq!(outcome(&view), pb::Outcome::Aborted);

        // --one-phase false: the single branch goes through prepare and commit.
        let two_phase = Coordinator::start(&[("--one-phase", "false")]).await;
        let mut c2 = two_phase.client().await;
        let tx3 = begin(&mut c2, vec![p.branch("only")]).await;
        commit(&mut c2, &tx3, 5_000).await.expect("Commit");
        assert_eq!(
            p.kinds(&tx3, "only"),
            vec![MsgKind::Prepare, MsgKind::Commit]
        );
        assert!(p.messages(&tx3, "only").iter().all(|m| !m.one_phase));
        assert_eq!(p.state(&tx3, "only"), Some(ResState::Committed));
        assert_no_violations(&[&p]);
    })
    .await;
}

// 5 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_branches_get_no_phase_two() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let p1 = TestParticipant::start("p1").await;
        let p2 = TestParticipant::start("p2").await;
        p2.script("lookup", PrepareScript::ReadOnly);
        p2.script("lookup2", PrepareScript::ReadOnly);
        p1.script("audit", PrepareScript::ReadOnly);
        let mut c = coord.client().await;

        let tx = begin(&mut c, vec![p1.branch("write"), p2.branch("lookup")]).await;
        let resp = commit(&mut c, &tx, 5_000).await.expect("Commit");
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
        assert_eq!(
            p1.kinds(&tx, "write"),
            vec![MsgKind::Prepare, MsgKind::Commit]
        );
        assert_eq!(p1.state(&tx, "write"), Some(ResState::Committed));
        wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Committed).await;

        // Every branch read-only: committed with nothing to deliver.
        let tx2 = begin(&mut c, vec![p1.branch("audit"), p2.branch("lookup2")]).await;
        let resp = commit(&mut c, &tx2, 5_000)
            .await
            .expect("Commit of a read-only transaction");
        assert!(resp.pending_branches.is_empty(), "{resp:?}");

        // Checked last, after everything else has had its chance to arrive.
        assert_eq!(
            p2.kinds(&tx, "lookup"),
            vec![MsgKind::Prepare],
            "read-only branch got phase two"
        );
        assert_eq!(p1.kinds(&tx2, "audit"), vec![MsgKind::Prepare]);
        assert_eq!(p2.kinds(&tx2, "lookup2"), vec![MsgKind::Prepare]);
        assert_no_violations(&[&p1, &p2]);
    })
    .await;
}

// 6 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_dies_after_preparing_gets_its_commit_after_restart() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let p1 = TestParticipant::start("p1").await;
        let mut p2 = TestParticipant::start("p2").await;
        // p2 votes yes, then dies when its commit arrives, before committing anything.
        p2.crash_on_commit("ledger");
        let mut c = coord.client().await;

        let tx = begin(&mut c, vec![p1.branch("orders"), p2.branch("ledger")]).await;
        let resp = commit(&mut c, &tx, 700).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert_eq!(resp.pending_branches, vec!["ledger".to_string()]);
        assert!(p2.is_down(), "p2 should have crashed on its commit");
        assert_eq!(p2.state(&tx, "ledger"), Some(ResState::Prepared));
        assert_eq!(p1.state(&tx, "orders"), Some(ResState::Committed));

        let view = get_tx(&mut c, &tx).await.expect("GetTransaction");
        assert_eq!(tx_state(&view), pb::TxState::Committing, "{view:?}");
        assert_eq!(outcome(&view), pb::Outcome::Committed);
        let ledger = requests::branch_of(&view, "ledger").expect("ledger branch in the view");
        assert_eq!(ledger.state, pb::BranchState::Prepared as i32, "{ledger:?}");
        assert!(
            ledger.attempts >= 1 && !ledger.last_error.is_empty(),
            "{ledger:?}"
        );

        // Back on the same port: the coordinator's retries get through.
        let endpoint = p2.endpoint();
        p2.restart().await;
        assert_eq!(p2.endpoint(), endpoint);
        wait_until(WAIT, "the restarted participant commits", || {
            p2.state(&tx, "ledger") == Some(ResState::Committed)
        })
        .await;
        assert!(
            p2.count(&tx, "ledger", MsgKind::Commit) >= 2,
            "{:?}",
            p2.kinds(&tx, "ledger")
        );
        let view = wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Committed).await;
        assert_eq!(outcome(&view), pb::Outcome::Committed);
        assert!(!p1.saw(&tx, MsgKind::Abort) && !p2.saw(&tx, MsgKind::Abort));
        assert_no_violations(&[&p1, &p2]);
    })
    .await;
}

// 7 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_before_the_decision_is_durable_aborts() {
    with_deadline(TEST_DEADLINE, async {
        let mut coord = Coordinator::start(&[("--prepare-timeout-ms", "20000")]).await;
        let MidPrepare {
            pa,
            pb_,
            tx,
            pending_commit,
        } = MidPrepare::start(&coord).await;
        let (node, epoch, _) = parse_tx_id(&tx);

        coord.kill9();
        let res = pending_commit.await.expect("commit task");
        assert!(
            res.is_err(),
            "Commit cannot succeed when the coordinator dies undecided: {res:?}"
        );

        coord.restart().await;
        let mut c = coord.client().await;
        // The stuck prepare finishes now (its vote goes nowhere): a is prepared too, unless
        // the recovered coordinator's abort got there first.
        pa.release("a");

        let what = "every branch resolved to aborted";
        eventually(WAIT, what, || {
            let (pa, pb_) = (&pa, &pb_);
            let mut c = c.clone();
            let tx = tx.clone();
            async move {
                pa.recover(&mut c).await;
                pb_.recover(&mut c).await;
                pa.state(&tx, "a") == Some(ResState::Aborted)
                    && pb_.state(&tx, "b") == Some(ResState::Aborted)
            }
        })
        .await;

        assert_aborted_without_a_commit(&mut c, &tx, &pa, &pb_).await;
        c.abort(pb::AbortRequest {
            tx_id: tx.clone(),
            reason: String::new(),
        })
        .await
        .expect("Abort of an aborted transaction is an idempotent success");

        // The new start has a new epoch on the same node.
        let tx2 = begin(&mut c, vec![]).await;
        let (node2, epoch2, _) = parse_tx_id(&tx2);
        assert_eq!(node2, node);
        assert!(epoch2 > epoch, "epoch did not grow: {tx} then {tx2}");
        assert_no_violations(&[&pa, &pb_]);
    })
    .await;
}

// 8 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_decision_is_durable_commits_after_restart() {
    with_deadline(TEST_DEADLINE, async {
        let mut coord = Coordinator::start(&[]).await;
        let p1 = TestParticipant::start("p1").await;
        let p2 = TestParticipant::start("p2").await;
        p1.refuse_commits("x", true);
        p2.refuse_commits("y", true);
        let mut c = coord.client().await;

        let tx = begin(&mut c, vec![p1.branch("x"), p2.branch("y")]).await;
        let resp = commit(&mut c, &tx, 300).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        let mut pending = resp.pending_branches.clone();
        pending.sort();
        assert_eq!(pending, vec!["x".to_string(), "y".to_string()]);
        // A commit reaching a participant proves the decision is durable.
        wait_until(WAIT, "a commit attempt reached a participant", || {
            p1.saw(&tx, MsgKind::Commit) || p2.saw(&tx, MsgKind::Commit)
        })
        .await;

        coord.kill9();
        p1.refuse_commits("x", false);
        p2.refuse_commits("y", false);
        let seen_before = p1.count(&tx, "x", MsgKind::Commit) + p2.count(&tx, "y", MsgKind::Commit);
        coord.restart().await;

        wait_until(WAIT, "recovery commits both branches", || {
            p1.state(&tx, "x") == Some(ResState::Committed)
                && p2.state(&tx, "y") == Some(ResState::Committed)
        })
        .await;
        assert!(
            p1.count(&tx, "x", MsgKind::Commit) + p2.count(&tx, "y", MsgKind::Commit) > seen_before
        );
        let view = wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Committed).await;
        assert_eq!(outcome(&view), pb::Outcome::Committed);
        let mut c = coord.client().await;
        let again = commit(&mut c, &tx, 1_000)
            .await
            .expect("Commit after restart");
        assert_eq!(again.outcome, pb::Outcome::Committed as i32);
        expect_status(
            c.abort(pb::AbortRequest {
                tx_id: tx.clone(),
                reason: "too late".into(),
            })
            .await,
            Code::FailedPrecondition,
            &["COMMITTED"],
        );
        assert!(
            !p1.saw(&tx, MsgKind::Abort) && !p2.saw(&tx, MsgKind::Abort),
            "an abort was sent"
        );
        assert_no_violations(&[&p1, &p2]);
    })
    .await;
}

// 9 ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_on_the_same_data_dir_fails_fast() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let second =
            Coordinator::run_expecting_exit(coord.data_dir(), &[], Duration::from_secs(10)).await;
        assert!(
            !second.status.success(),
            "second coordinator exited with {:?}",
            second.status
        );
        assert!(
            second.elapsed < Duration::from_secs(5),
            "took {:?} to fail",
            second.elapsed
        );
        assert!(
            !second.stdout.contains("listening"),
            "second coordinator said it listens: {:?}",
            second.stdout
        );
        let stderr = second.stderr.to_lowercase();
        assert!(
            stderr.contains("locked"),
            "stderr does not mention the lock: {:?}",
            second.stderr
        );
        assert!(
            second
                .stderr
                .contains(&coord.data_dir().display().to_string()),
            "stderr does not name the data directory {}: {:?}",
            coord.data_dir().display(),
            second.stderr
        );
        // The first one is unaffected.
        let mut c = coord.client().await;
        begin(&mut c, vec![]).await;
    })
    .await;
}

// 10 --------------------------------------------------------------------------------------

/// GetTransaction without the fields that change by themselves.
fn stable_view(mut r: pb::GetTransactionResponse) -> pb::GetTransactionResponse {
    r.age_ms = 0;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_right_codes() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[("--max-branches", "3")]).await;
        let p = TestParticipant::start("p").await;
        let mut c = coord.client().await;

        // A committed transaction and an active one, to check nothing changes them.
        let done = begin(&mut c, vec![p.branch("d1"), p.branch("d2")]).await;
        commit(&mut c, &done, 5_000).await.expect("Commit");
        wait_tx_state(&coord.client().await, WAIT, &done, pb::TxState::Committed).await;
        let active = begin(&mut c, vec![p.branch("a1"), p.branch("a2")]).await;
        let done_before = stable_view(get_tx(&mut c, &done).await.expect("get"));
        let active_before = stable_view(get_tx(&mut c, &active).await.expect("get"));
        let (node, epoch, seq) = parse_tx_id(&active);

        // Transaction ids.
        let long = "a".repeat(65);
        let bad_ids: Vec<(&str, Vec<&str>)> = vec![
            ("", vec!["tx_id", "empty"]),
            ("not-a-tx", vec!["tx_id", "not-a-tx"]),
            ("5f3a09c1-7", vec!["tx_id", "5f3a09c1-7"]),
            ("5F3A09C1-7-42", vec!["tx_id", "5F3A09C1-7-42"]),
            (long.as_str(), vec!["tx_id", "65"]),
        ];
        for (id, needles) in &bad_ids {
            let id = id.to_string();
            expect_status(get_tx(&mut c, &id).await, Code::InvalidArgument, needles);
            expect_status(commit(&mut c, &id, 0).await, Code::InvalidArgument, needles);
            expect_status(
                c.abort(pb::AbortRequest {
                    tx_id: id.clone(),
                    reason: String::new(),
                })
                .await,
                Code::InvalidArgument,
                needles,
            );
            expect_status(
                c.enlist(pb::EnlistRequest {
                    tx_id: id.clone(),
                    branch: Some(p.branch("e")),
                })
                .await,
                Code::InvalidArgument,
                needles,
            );
        }

        // Well-formed ids this coordinator never issued.
        let unknown = [
            format!("{node}-{epoch}-{}", seq + 1000),
            format!("{node}-{}-1", epoch + 5),
            format!(
                "{}-{epoch}-1",
                if node == "00000001" {
                    "00000002"
                } else {
                    "00000001"
                }
            ),
        ];
        for id in &unknown {
            expect_status(get_tx(&mut c, id).await, Code::NotFound, &[id.as_str()]);
            expect_status(commit(&mut c, id, 0).await, Code::NotFound, &[id.as_str()]);
            expect_status(
                c.abort(pb::AbortRequest {
                    tx_id: id.clone(),
                    reason: String::new(),
                })
                .await,
                Code::NotFound,
                &[id.as_str()],
            );
            expect_status(
                c.enlist(pb::EnlistRequest {
                    tx_id: id.clone(),
                    branch: Some(p.branch("e")),
                })
                .await,
                Code::NotFound,
                &[id.as_str()],
            );
        }

        // Abort after COMMIT, Enlist after Commit.
        expect_status(
            c.abort(pb::AbortRequest {
                tx_id: done.clone(),
                reason: "changed my mind".into(),
            })
            .await,
            Code::FailedPrecondition,
            &["COMMITTED", done.as_str()],
        );
        expect_status(
            c.enlist(pb::EnlistRequest {
                tx_id: done.clone(),
                branch: Some(p.branch("late")),
            })
            .await,
            Code::FailedPrecondition,
            &[done.as_str()],
        );

        // Same branch id, other fields.
        let mut other_order = p.branch("a1");
        other_order.commit_order = 7;
        let mut other_endpoint = p.branch("a2");
        other_endpoint.participant_endpoint = "http://127.0.0.1:1".into();
        for b in [other_order, other_endpoint] {
            expect_status(
                c.enlist(pb::EnlistRequest {
                    tx_id: active.clone(),
                    branch: Some(b.clone()),
                })
                .await,
                Code::AlreadyExists,
                &[b.branch_id.as_str()],
            );
        }
        let mut dup = p.branch("x");
        dup.commit_order = 3;
        expect_status(
            c.begin(pb::BeginRequest {
                timeout_ms: 0,
                branches: vec![p.branch("x"), dup],
            })
            .await,
            Code::AlreadyExists,
            &["\"x\""],
        );

        // The same branch twice with the same fields is one branch.
        let twice = begin(&mut c, vec![p.branch("same"), p.branch("same")]).await;
        let view = get_tx(&mut c, &twice).await.expect("get");
        assert_eq!(view.branches.len(), 1, "{view:?}");

        // Malformed endpoints and branch ids.
        for endpoint in [
            "localhost",
            "ftp://x:1",
            "127.0.0.1:7001",
            "http://host-without-port",
            "http://h:1/path",
            "",
        ] {
            let mut b = p.branch("e1");
            b.participant_endpoint = endpoint.to_string();
            let needles: Vec<&str> = if endpoint.is_empty() {
                vec!["participant_endpoint"]
            } else {
                vec!["participant_endpoint", endpoint]
            };
            expect_status(
                c.enlist(pb::EnlistRequest {
                    tx_id: active.clone(),
                    branch: Some(b.clone()),
                })
                .await,
                Code::InvalidArgument,
                &needles,
            );
            expect_status(
                c.begin(pb::BeginRequest {
                    timeout_ms: 0,
                    branches: vec![b],
                })
                .await,
                Code::InvalidArgument,
                &needles,
            );
        }
        let long_branch = "b".repeat(65);
        for (id, needles) in [
            ("", vec!["branch_id", "empty"]),
            ("has space", vec!["branch_id", "has space"]),
            ("slash/no", vec!["branch_id", "slash/no"]),
            (long_branch.as_str(), vec!["branch_id", "65"]),
        ] {
            expect_status(
                c.enlist(pb::EnlistRequest {
                    tx_id: active.clone(),
                    branch: Some(p.branch(id)),
                })
                .await,
                Code::InvalidArgument,
                &needles,
            );
        }
        let mut bad_kind = p.branch("k");
        bad_kind.kind = 99;
        expect_status(
            c.enlist(pb::EnlistRequest {
                tx_id: active.clone(),
                branch: Some(bad_kind),
            })
            .await,
            Code::InvalidArgument,
            &["kind", "99"],
        );
        expect_status(
            c.enlist(pb::EnlistRequest {
                tx_id: active.clone(),
                branch: None,
            })
            .await,
            Code::InvalidArgument,
            &["branch"],
        );

        // More than --max-branches (3).
        expect_status(
            c.begin(pb::BeginRequest {
                timeout_ms: 0,
                branches: vec![
                    p.branch("m1"),
                    p.branch("m2"),
                    p.branch("m3"),
                    p.branch("m4"),
                ],
            })
            .await,
            Code::InvalidArgument,
            &["3", "max-branches"],
        );
        c.enlist(pb::EnlistRequest {
            tx_id: active.clone(),
            branch: Some(p.branch("a3")),
        })
        .await
        .expect("the third branch fits");
        expect_status(
            c.enlist(pb::EnlistRequest {
                tx_id: active.clone(),
                branch: Some(p.branch("a4")),
            })
            .await,
            Code::InvalidArgument,
            &["3", "max-branches"],
        );

        // Out-of-range request fields.
        expect_status(
            c.commit(requests::commit_waiting(&active, Some(600_001)))
                .await,
            Code::InvalidArgument,
            &["phase_two_wait_ms", "600001"],
        );
        expect_status(
            c.abort(pb::AbortRequest {
                tx_id: active.clone(),
                reason: "r".repeat(1025),
            })
            .await,
            Code::InvalidArgument,
            &["reason", "1025"],
        );
        expect_status(
            c.begin(pb::BeginRequest {
                timeout_ms: 24 * 3600 * 1000 + 1,
                branches: vec![],
            })
            .await,
            Code::InvalidArgument,
            &["timeout_ms"],
        );
        expect_status(
            c.list_transactions(pb::ListTransactionsRequest {
                state: 0,
                min_age_ms: 0,
                limit: 10_001,
            })
            .await,
            Code::InvalidArgument,
            &["limit", "10001"],
        );
        expect_status(
            c.list_transactions(pb::ListTransactionsRequest {
                state: 42,
                min_age_ms: 0,
                limit: 0,
            })
            .await,
            Code::InvalidArgument,
            &["state", "42"],
        );

        // Nothing of the above changed a record (a3 was a legitimate enlist).
        let done_after = stable_view(get_tx(&mut c, &done).await.expect("get"));
        assert_eq!(done_after, done_before);
        let active_after = stable_view(get_tx(&mut c, &active).await.expect("get"));
        let mut expected = active_before.clone();
        expected.branches.push(pb::BranchStatus {
            branch: Some(p.branch("a3")),
            state: pb::BranchState::Enlisted as i32,
            attempts: 0,
            last_error: String::new(),
        });
        assert_eq!(active_after, expected);
        assert_eq!(tx_state(&active_after), pb::TxState::Active);
        assert_eq!(
            p.received().iter().filter(|r| r.tx_id == active).count(),
            0,
            "messages sent for an active tx"
        );

        // And the active transaction still works.
        let resp = commit(&mut c, &active, 5_000)
            .await
            .expect("Commit of the active transaction");
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
        for b in ["a1", "a2", "a3"] {
            assert_eq!(p.state(&active, b), Some(ResState::Committed), "branch {b}");
        }
        assert_no_violations(&[&p]);
    })
    .await;
}

// 11 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(&[]).await;
        let channel = coord.channel().await;

        let mut health = HealthClient::new(channel.clone());
        for service in ["", "twopc.v1.Coordinator"] {
            let resp = health
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
                .into_inner();
            assert_eq!(
                resp.status,
                ServingStatus::Serving as i32,
                "health of {service:?}"
            );
        }
        expect_status(
            health
                .check(HealthCheckRequest {
                    service: "no.such.Service".into(),
                })
                .await,
            Code::NotFound,
            &[],
        );

        let services = reflected_services(channel).await;
        assert!(
            services.iter().any(|s| s == "twopc.v1.Coordinator"),
            "services: {services:?}"
        );
        assert!(
            services.iter().any(|s| s == "grpc.health.v1.Health"),
            "services: {services:?}"
        );
    })
    .await;
}

// 12 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly() {
    with_deadline(TEST_DEADLINE, async {
        let mut coord = Coordinator::start(&[]).await;
        let mut c = coord.client().await;
        let open = begin(&mut c, vec![]).await;
        drop(c);

        let status = coord.sigterm(Duration::from_secs(10)).await;
        assert!(
            status.success(),
            "exit status after SIGTERM: {status:?}\n{}",
            coord.stderr_log()
        );
        assert_eq!(status.code(), Some(0));

        // The lock was released: a new start on the same directory works, and the
        // transaction left open by the old epoch is presumed aborted.
        coord.restart().await;
        let mut c = coord.client().await;
        let view = get_tx(&mut c, &open)
            .await
            .expect("GetTransaction of the old epoch's transaction");
        assert_eq!(outcome(&view), pb::Outcome::Aborted, "{view:?}");
        assert_eq!(tx_state(&view), pb::TxState::Aborted, "{view:?}");
        expect_status(
            commit(&mut c, &open, 0).await,
            Code::Aborted,
            &[open.as_str(), "presumed abort"],
        );
    })
    .await;
}

// 13 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_prepare_then_restart_the_coordinator_aborts_the_undecided_transaction() {
    with_deadline(TEST_DEADLINE, async {
        let mut coord = Coordinator::start(&[
            ("--prepare-timeout-ms", "20000"),
            ("--rpc-timeout-ms", "20000"),
        ])
        .await;
        let MidPrepare {
            pa,
            pb_,
            tx,
            pending_commit,
        } = MidPrepare::start(&coord).await;
        // The application gives up on its Commit call, then the coordinator is stopped.
        pending_commit.abort();
        let _ = pending_commit.await;
        let status = coord.sigterm(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status after SIGTERM: {status:?}");

        // A clean shutdown leaves the PREPARING record on disk: the restarted coordinator
        // aborts the transaction itself, without any participant asking.
        coord.restart().await;
        wait_until(
            WAIT,
            "the coordinator's recovery aborts both branches",
            || {
                pa.state(&tx, "a") == Some(ResState::Aborted)
                    && pb_.state(&tx, "b") == Some(ResState::Aborted)
            },
        )
        .await;
        assert!(
            pa.count(&tx, "a", MsgKind::Abort) >= 1 && pb_.count(&tx, "b", MsgKind::Abort) >= 1
        );
        pa.release("a");
        let mut c = coord.client().await;
        assert_aborted_without_a_commit(&mut c, &tx, &pa, &pb_).await;
    })
    .await;
}
