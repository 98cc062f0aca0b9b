//! Network faults between the real coordinator process (`twopc serve`) and in-test
//! participants: messages dropped, delayed, reset and duplicated, per phase and per
//! direction.
//!
//! Every test runs a coordinator with short timeouts and one [`TestParticipant`] holding
//! two branches of each transaction: `a` reached directly, `b` reached through a
//! [`FaultProxy`] (the coordinator is told the proxy's url as `b`'s endpoint), so faults
//! hit exactly one branch. A fault is aimed at one phase by holding `a`'s prepare
//! ([`PrepareScript::Hang`]) until `b` is where the test wants it (seen through
//! GetTransaction), switching the fault on, and only then releasing `a`. The proxy works
//! on bytes and cannot pick out messages, so that timing is what makes a fault hit "the
//! commit" rather than "the prepare". Duplicated messages need a hop that understands
//! gRPC: [`DuplicatingHop`] is a Participant service that forwards every request twice.
//!
//! A blackhole really discards bytes, so when it heals the proxy resets the connections
//! that lost some (see [`twopc_testkit::proxy`]): recovery goes through the coordinator's
//! reconnect, as after a partition that outlasted TCP's retransmissions.
//!
//! After the fault is healed each test checks the outcome from outside: the Commit reply,
//! the coordinator's view (GetTransaction), the participant's resource state and the
//! messages it received, and that the participant saw no protocol violation (commit of an
//! aborted branch and the like). Everything is bounded: one deadline per test, polling
//! with deadlines instead of fixed sleeps, private ports and directories.

mod support;

use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    begin, commit, commit_in_background, expect_status, get_tx, outcome, tx_state, wait_tx_state,
    wait_until, wait_view, with_deadline, Coordinator, MsgKind, PrepareScript, ResState,
    TestParticipant,
};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_proto::v1::participant_client::ParticipantClient;
use twopc_testkit::participant::{Answer, Behaviour, Services, TestParticipant as KitParticipant};
use twopc_testkit::{Direction, Fault, FaultProxy};

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(20);
/// Budget of one wait for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(8);

/// The prepare timeout of the phase-one tests.
const PREPARE_TIMEOUT: Duration = Duration::from_millis(800);

/// Phase one: the prepare timeout (800 ms) fires before a single RPC's timeout (1 s), so
/// a lost prepare or vote is settled by the prepare timeout.
const PREPARE_FLAGS: &[(&str, &str)] = &[
    ("--prepare-timeout-ms", "800"),
    ("--rpc-timeout-ms", "1000"),
    ("--retry-initial-ms", "20"),
    ("--retry-max-ms", "200"),
];

/// Phase two: a generous prepare timeout (the tests hold branch `a`'s prepare while they
/// aim the fault) and short RPC timeouts and retries.
const PHASE_TWO_FLAGS: &[(&str, &str)] = &[
    ("--prepare-timeout-ms", "8000"),
    ("--rpc-timeout-ms", "400"),
    ("--retry-initial-ms", "20"),
    ("--retry-max-ms", "200"),
];

/// How long Commit waits for phase two in the tests where `b` cannot be reached.
const SHORT_PHASE_TWO_WAIT_MS: u64 = 300;

fn branch_state(b: &pb::BranchStatus) -> pb::BranchState {
    pb::BranchState::try_from(b.state).unwrap_or(pb::BranchState::Unspecified)
}

/// The coordinator, one participant, and a fault proxy in front of that participant.
struct Rig {
    /// Kept alive for the test (killed on drop, printing its log if the test failed).
    _coord: Coordinator,
    p: TestParticipant,
    proxy: FaultProxy,
    c: CoordinatorClient<Channel>,
}

impl Rig {
    /// Starts everything and commits one transaction through the proxy, so the
    /// coordinator's connection to it is established before any fault.
    async fn start(flags: &[(&str, &str)]) -> Rig {
        let coord = Coordinator::start(flags).await;
        let p = TestParticipant::start("p").await;
        let proxy = FaultProxy::start(p.addr())
            .await
            .expect("start fault proxy");
        let c = coord.client().await;
        let mut rig = Rig {
            _coord: coord,
            p,
            proxy,
            c,
        };
        let warm = rig.begin_ab().await;
        let resp = commit(&mut rig.c, &warm, 5_000)
            .await
            .expect("Commit through the healthy proxy");
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
        assert_eq!(rig.p.state(&warm, "b"), Some(ResState::Committed));
        assert_eq!(rig.proxy.stats().connections_accepted, 1);
        rig
    }

    /// A phase-two rig and a transaction whose Commit (waiting up to `wait_ms` for phase
    /// two) runs in the background, with `a`'s prepare held and `b`'s yes vote in (the
    /// coordinator has it).
    async fn with_a_held(
        wait_ms: u64,
    ) -> (Rig, String, JoinHandle<Result<pb::CommitResponse, Status>>) {
        let mut rig = Rig::start(PHASE_TWO_FLAGS).await;
        rig.p.script("a", PrepareScript::Hang);
        let tx = rig.begin_ab().await;
        let pending = rig.commit_in_background(&tx, wait_ms);
        rig.wait_branch(&tx, "b", pb::BranchState::Prepared, 1)
            .await;
        (rig, tx, pending)
    }

    /// A branch the coordinator reaches directly.
    fn direct(&self, id: &str) -> pb::Branch {
        self.p.branch(id)
    }

    /// A branch the coordinator reaches through the proxy.
    fn proxied(&self, id: &str) -> pb::Branch {
        pb::Branch {
            participant_endpoint: self.proxy.url(),
            ..self.p.branch(id)
        }
    }

    /// Begin with `a` direct and `b` proxied.
    async fn begin_ab(&mut self) -> String {
        let branches = vec![self.direct("a"), self.proxied("b")];
        begin(&mut self.c, branches).await
    }

    /// Starts Commit in the background (the caller keeps going while it runs).
    fn commit_in_background(
        &self,
        tx: &str,
        wait_ms: u64,
    ) -> JoinHandle<Result<pb::CommitResponse, Status>> {
        commit_in_background(&self.c, tx, wait_ms)
    }

    /// GetTransaction.
    async fn view(&self, tx: &str) -> pb::GetTransactionResponse {
        get_tx(&mut self.c.clone(), tx)
            .await
            .unwrap_or_else(|s| panic!("GetTransaction {tx}: {s:?}"))
    }

    /// Waits until the coordinator reports `tx` in `state`.
    async fn wait_tx_state(&self, tx: &str, state: pb::TxState) -> pb::GetTransactionResponse {
        wait_tx_state(&self.c, WAIT, tx, state).await
    }

    /// Waits until the coordinator sees `branch` of `tx` in `state` with at least
    /// `min_attempts` messages (prepare included) sent to it.
    async fn wait_branch(
        &self,
        tx: &str,
        branch: &str,
        state: pb::BranchState,
        min_attempts: u32,
    ) -> pb::GetTransactionResponse {
        let what = format!("branch {branch} is {state:?} after >= {min_attempts} attempts");
        wait_view(&self.c, WAIT, tx, &what, |v| {
            v.branches.iter().any(|b| {
                b.branch.as_ref().map(|s| s.branch_id.as_str()) == Some(branch)
                    && branch_state(b) == state
                    && b.attempts >= min_attempts
            })
        })
        .await
    }

    /// No protocol violation at the participant, and nothing of `tx` left prepared.
    async fn assert_clean(&self, tx: &str) {
        assert!(
            self.p.violations().is_empty(),
            "protocol violations: {:?}",
            self.p.violations()
        );
        let report = self.p.recover(&mut self.c.clone()).await;
        assert!(
            report.in_doubt.is_empty() && report.committed.is_empty() && report.aborted.is_empty(),
            "branches were left prepared: {report:?}"
        );
        for b in ["a", "b"] {
            assert_ne!(self.p.state(tx, b), Some(ResState::Prepared), "branch {b}");
        }
    }

    /// Commits the participant received for `b` beyond the first: duplicates it had to
    /// absorb.
    fn commit_duplicates(&self, tx: &str, branch: &str) -> usize {
        self.p.count(tx, branch, MsgKind::Commit).saturating_sub(1)
    }
}

// ---------------------------------------------------------------------------------------
// Phase one
// ---------------------------------------------------------------------------------------

/// The prepare to `b` is blackholed: the prepare timeout aborts the transaction, `a`
/// (which prepared) is aborted, and the abort to `b` is retried until the network heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_request_dropped_aborts_after_the_prepare_timeout() {
    with_deadline(TEST_DEADLINE, async {
        let mut rig = Rig::start(PREPARE_FLAGS).await;
        rig.proxy.set(Direction::ClientToServer, Fault::Drop);
        let tx = rig.begin_ab().await;

        let started = Instant::now();
        let st = expect_status(
            commit(&mut rig.c, &tx, 2_000).await,
            Code::Aborted,
            &[tx.as_str(), "prepare timed out", "waiting for branch(es) b"],
        );
        assert!(
            started.elapsed() >= PREPARE_TIMEOUT,
            "ABORTED after {:?}, before the prepare timeout: {st:?}",
            started.elapsed()
        );
        assert!(rig.proxy.stats().client_to_server.bytes_dropped > 0);
        assert_eq!(
            rig.p.count(&tx, "b", MsgKind::Prepare),
            0,
            "the prepare was dropped"
        );
        wait_until(WAIT, "branch a (prepared) is aborted", || {
            rig.p.state(&tx, "a") == Some(ResState::Aborted)
        })
        .await;
        // Whether b prepared is unknown to the coordinator: it keeps sending aborts.
        let v = rig
            .wait_branch(&tx, "b", pb::BranchState::Preparing, 3)
            .await;
        assert_eq!(tx_state(&v), pb::TxState::Aborting, "{v:?}");
        assert_eq!(outcome(&v), pb::Outcome::Aborted, "{v:?}");

        rig.proxy.restore();
        wait_until(WAIT, "the abort reaches branch b", || {
            rig.p.state(&tx, "b") == Some(ResState::Aborted)
        })
        .await;
        rig.wait_tx_state(&tx, pb::TxState::Aborted).await;
        let kinds = rig.p.kinds(&tx, "b");
        assert!(
            !kinds.is_empty() && kinds.iter().all(|k| *k == MsgKind::Abort),
            "b saw {kinds:?}"
        );
        assert!(!rig.p.saw(&tx, MsgKind::Commit), "a commit was sent");
        rig.assert_clean(&tx).await;
    })
    .await;
}

/// `b` votes yes but its vote is blackholed: the prepare timeout aborts; the abort reaches
/// `b` (requests still pass) but its acknowledgements do not, so the coordinator keeps
/// repeating it until the network heals. `b` ends aborted, having absorbed duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_reply_dropped_aborts_and_the_yes_voter_ends_aborted() {
    with_deadline(TEST_DEADLINE, async {
        let mut rig = Rig::start(PREPARE_FLAGS).await;
        rig.proxy.set(Direction::ServerToClient, Fault::Drop);
        let tx = rig.begin_ab().await;

        let started = Instant::now();
        expect_status(
            commit(&mut rig.c, &tx, 2_000).await,
            Code::Aborted,
            &[tx.as_str(), "prepare timed out", "waiting for branch(es) b"],
        );
        assert!(started.elapsed() >= PREPARE_TIMEOUT);
        assert_eq!(rig.p.count(&tx, "b", MsgKind::Prepare), 1);
        assert!(rig.proxy.stats().server_to_client.bytes_dropped > 0);
        wait_until(WAIT, "the aborts reach both branches", || {
            rig.p.state(&tx, "a") == Some(ResState::Aborted)
                && rig.p.state(&tx, "b") == Some(ResState::Aborted)
        })
        .await;
        // A participant asking the coordinator (as after a restart) learns ABORTED.
        let v = rig.view(&tx).await;
        assert_eq!(outcome(&v), pb::Outcome::Aborted, "{v:?}");
        // The acknowledgements are lost: the abort is repeated, and absorbed.
        wait_until(WAIT, "b receives the abort again", || {
            rig.p.count(&tx, "b", MsgKind::Abort) >= 2
        })
        .await;
        assert_eq!(tx_state(&rig.view(&tx).await), pb::TxState::Aborting);

        rig.proxy.restore();
        rig.wait_tx_state(&tx, pb::TxState::Aborted).await;
        assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Aborted));
        assert!(!rig.p.saw(&tx, MsgKind::Commit), "a commit was sent");
        eprintln!(
            "duplicate aborts absorbed by b: {}",
            rig.p.count(&tx, "b", MsgKind::Abort) - 1
        );
        rig.assert_clean(&tx).await;
    })
    .await;
}

/// Every message to `b` (or every answer from it) delayed by less than the prepare timeout
/// and the RPC timeout: transactions commit, or abort on a no vote, just later, with no
/// message repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_delayed_below_the_timeout_commits() {
    with_deadline(TEST_DEADLINE, async {
        let mut rig = Rig::start(PREPARE_FLAGS).await;
        let delay = Duration::from_millis(300);
        for dir in Direction::BOTH {
            rig.proxy.restore();
            rig.proxy.set(dir, Fault::Delay(delay));
            let delayed_before = rig.proxy.stats().direction(dir).chunks_delayed;

            // Commit path: prepare and commit (or their answers) delayed.
            let tx = rig.begin_ab().await;
            let started = Instant::now();
            let resp = commit(&mut rig.c, &tx, 5_000)
                .await
                .unwrap_or_else(|s| panic!("{dir:?}: Commit over a slow network: {s:?}"));
            assert!(
                started.elapsed() >= delay,
                "{dir:?}: the delay had no effect"
            );
            assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
            assert!(resp.pending_branches.is_empty(), "{dir:?}: {resp:?}");
            assert!(rig.proxy.stats().direction(dir).chunks_delayed > delayed_before);
            for b in ["a", "b"] {
                assert_eq!(
                    rig.p.state(&tx, b),
                    Some(ResState::Committed),
                    "{dir:?} {b}"
                );
                assert_eq!(
                    rig.p.kinds(&tx, b),
                    vec![MsgKind::Prepare, MsgKind::Commit],
                    "{dir:?} {b}"
                );
            }
            rig.wait_tx_state(&tx, pb::TxState::Committed).await;
            rig.assert_clean(&tx).await;

            // Abort path: a votes no; b's prepare and abort (or their answers) delayed.
            rig.p.script("na", PrepareScript::No("no stock".into()));
            let branches = vec![rig.direct("na"), rig.proxied("b")];
            let tx = begin(&mut rig.c, branches).await;
            expect_status(
                commit(&mut rig.c, &tx, 5_000).await,
                Code::Aborted,
                &[tx.as_str(), "no stock"],
            );
            rig.wait_tx_state(&tx, pb::TxState::Aborted).await;
            assert_eq!(
                rig.p.kinds(&tx, "b"),
                vec![MsgKind::Prepare, MsgKind::Abort],
                "{dir:?}"
            );
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Aborted), "{dir:?}");
            rig.assert_clean(&tx).await;
        }
    })
    .await;
}

/// Prepares (or votes) delayed by more than the prepare timeout: the transaction aborts at
/// the prepare timeout. A late prepare still arrives and prepares `b`; the abort follows
/// it and rolls `b` back. Every abort (or its acknowledgement) now takes longer than the
/// coordinator waits for an answer, so the abort is repeated until the network is fast
/// again.
async fn delayed_above_the_timeout_aborts(dir: Direction) {
    let mut rig = Rig::start(PREPARE_FLAGS).await;
    let delay = Duration::from_millis(1_200);
    rig.proxy.set(dir, Fault::Delay(delay));
    let tx = rig.begin_ab().await;

    let started = Instant::now();
    expect_status(
        commit(&mut rig.c, &tx, 2_000).await,
        Code::Aborted,
        &[tx.as_str(), "prepare timed out", "waiting for branch(es) b"],
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= PREPARE_TIMEOUT && elapsed < delay,
        "ABORTED after {elapsed:?}: should be at the prepare timeout, before the delayed \
         message arrives"
    );
    wait_until(WAIT, "the prepare, then the abort, reach b", || {
        rig.p.state(&tx, "b") == Some(ResState::Aborted)
    })
    .await;
    let kinds = rig.p.kinds(&tx, "b");
    assert_eq!(kinds.first(), Some(&MsgKind::Prepare), "b saw {kinds:?}");
    assert!(
        kinds[1..].iter().all(|k| *k == MsgKind::Abort),
        "b saw {kinds:?}"
    );
    assert_eq!(rig.p.state(&tx, "a"), Some(ResState::Aborted));
    let v = rig.view(&tx).await;
    assert_eq!(tx_state(&v), pb::TxState::Aborting, "{dir:?}: {v:?}");
    assert_eq!(outcome(&v), pb::Outcome::Aborted, "{dir:?}: {v:?}");

    rig.proxy.restore();
    rig.wait_tx_state(&tx, pb::TxState::Aborted).await;
    assert!(!rig.p.saw(&tx, MsgKind::Commit), "a commit was sent");
    rig.assert_clean(&tx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_delayed_above_the_timeout_aborts() {
    with_deadline(
        TEST_DEADLINE,
        delayed_above_the_timeout_aborts(Direction::ClientToServer),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_delayed_above_the_timeout_aborts() {
    with_deadline(
        TEST_DEADLINE,
        delayed_above_the_timeout_aborts(Direction::ServerToClient),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Phase two
// ---------------------------------------------------------------------------------------

/// What happens to `b`'s connection once it has voted yes.
#[derive(Clone, Copy, Debug)]
enum PhaseTwoFault {
    /// Commit requests blackholed.
    RequestDropped,
    /// Commit acknowledgements blackholed.
    ReplyDropped,
    /// Every connection reset (and new ones refused).
    Reset,
}

/// Prepares both branches, then hits `b` with `fault` before the commit goes out: Commit
/// answers OK with `b` pending, the coordinator keeps retrying, and once the network heals
/// `b` ends committed exactly once, whatever duplicates it saw.
async fn commit_survives(fault: PhaseTwoFault) {
    let (mut rig, tx, pending) = Rig::with_a_held(SHORT_PHASE_TWO_WAIT_MS).await;
    wait_until(WAIT, "a received its prepare", || {
        rig.p.count(&tx, "a", MsgKind::Prepare) == 1
    })
    .await;
    match fault {
        PhaseTwoFault::RequestDropped => rig.proxy.set(Direction::ClientToServer, Fault::Drop),
        PhaseTwoFault::ReplyDropped => rig.proxy.set(Direction::ServerToClient, Fault::Drop),
        PhaseTwoFault::Reset => rig.proxy.cut(),
    }
    rig.p.release("a");

    let resp = pending
        .await
        .expect("Commit task")
        .unwrap_or_else(|s| panic!("{fault:?}: Commit must answer OK (decided), got {s:?}"));
    assert_eq!(resp.outcome, pb::Outcome::Committed as i32, "{resp:?}");
    assert_eq!(resp.pending_branches, vec!["b".to_string()], "{fault:?}");
    assert_eq!(rig.p.state(&tx, "a"), Some(ResState::Committed));

    // The coordinator keeps trying b while the fault lasts.
    let v = rig
        .wait_branch(&tx, "b", pb::BranchState::Prepared, 4)
        .await;
    assert_eq!(tx_state(&v), pb::TxState::Committing, "{v:?}");
    assert_eq!(outcome(&v), pb::Outcome::Committed, "{v:?}");
    let stats = rig.proxy.stats();
    match fault {
        PhaseTwoFault::RequestDropped => {
            assert!(stats.client_to_server.bytes_dropped > 0, "{stats:?}");
            assert_eq!(
                rig.p.count(&tx, "b", MsgKind::Commit),
                0,
                "commit was dropped"
            );
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Prepared));
        }
        PhaseTwoFault::ReplyDropped => {
            assert!(stats.server_to_client.bytes_dropped > 0, "{stats:?}");
            // The commits get through, their acknowledgements do not: b is committed
            // and absorbs the repeats.
            wait_until(WAIT, "b receives repeated commits", || {
                rig.p.count(&tx, "b", MsgKind::Commit) >= 2
            })
            .await;
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Committed));
        }
        PhaseTwoFault::Reset => {
            assert!(stats.connections_reset >= 1, "{stats:?}");
            wait_until(WAIT, "the coordinator's reconnects are refused", || {
                rig.proxy.stats().connections_refused >= 2
            })
            .await;
            assert_eq!(rig.p.count(&tx, "b", MsgKind::Commit), 0);
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Prepared));
        }
    }

    rig.proxy.restore();
    rig.wait_tx_state(&tx, pb::TxState::Committed).await;
    assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Committed));
    assert!(rig.p.count(&tx, "b", MsgKind::Commit) >= 1);
    assert_eq!(
        rig.p.count(&tx, "a", MsgKind::Commit),
        1,
        "a was not affected"
    );
    assert!(!rig.p.saw(&tx, MsgKind::Abort), "an abort was sent");
    let dups = rig.commit_duplicates(&tx, "b");
    eprintln!("{fault:?}: duplicate commits absorbed by b: {dups}");
    if matches!(fault, PhaseTwoFault::ReplyDropped) {
        assert!(
            dups >= 1,
            "lost acknowledgements must cause repeated commits"
        );
    }
    // Commit stays OK and complete.
    let again = commit(&mut rig.c, &tx, 1_000)
        .await
        .expect("repeated Commit");
    assert!(again.pending_branches.is_empty(), "{again:?}");
    rig.assert_clean(&tx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_request_dropped_is_retried_until_committed() {
    with_deadline(
        TEST_DEADLINE,
        commit_survives(PhaseTwoFault::RequestDropped),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_reply_dropped_is_retried_and_duplicates_are_idempotent() {
    with_deadline(TEST_DEADLINE, commit_survives(PhaseTwoFault::ReplyDropped)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_during_phase_two_is_retried_until_committed() {
    with_deadline(TEST_DEADLINE, commit_survives(PhaseTwoFault::Reset)).await;
}

/// `b` prepared, then the application aborts while the network to `b` drops one
/// direction: the abort is retried until acknowledged after the network heals.
async fn abort_survives(dir: Direction) {
    let (mut rig, tx, pending) = Rig::with_a_held(2_000).await;
    rig.proxy.set(dir, Fault::Drop);
    rig.c
        .abort(pb::AbortRequest {
            tx_id: tx.clone(),
            reason: "network test".into(),
        })
        .await
        .expect("Abort while preparing");
    expect_status(
        pending.await.expect("Commit task"),
        Code::Aborted,
        &[tx.as_str(), "network test"],
    );

    // Retried while the fault lasts.
    let v = rig
        .wait_branch(&tx, "b", pb::BranchState::Prepared, 4)
        .await;
    assert_eq!(tx_state(&v), pb::TxState::Aborting, "{v:?}");
    match dir {
        Direction::ClientToServer => {
            assert_eq!(
                rig.p.count(&tx, "b", MsgKind::Abort),
                0,
                "abort was dropped"
            );
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Prepared));
            // The participant need not wait for the network: asking the coordinator
            // (reachable directly) resolves its in-doubt branch.
            let report = rig.p.recover(&mut rig.c).await;
            assert_eq!(
                report.aborted,
                vec![(tx.clone(), "b".to_string())],
                "{report:?}"
            );
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Aborted));
        }
        Direction::ServerToClient => {
            wait_until(WAIT, "b receives repeated aborts", || {
                rig.p.count(&tx, "b", MsgKind::Abort) >= 2
            })
            .await;
            assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Aborted));
        }
    }

    rig.proxy.restore();
    rig.p.release("a");
    rig.wait_tx_state(&tx, pb::TxState::Aborted).await;
    // The retried abort got through (in the ClientToServer case to a branch already
    // rolled back by its own recovery: acknowledged all the same).
    assert!(rig.p.count(&tx, "b", MsgKind::Abort) >= 1);
    for b in ["a", "b"] {
        assert_eq!(rig.p.state(&tx, b), Some(ResState::Aborted), "branch {b}");
    }
    assert!(!rig.p.saw(&tx, MsgKind::Commit), "a commit was sent");
    eprintln!(
        "{dir:?} dropped: aborts received by b: {}",
        rig.p.count(&tx, "b", MsgKind::Abort)
    );
    rig.assert_clean(&tx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_request_dropped_is_retried_until_acknowledged() {
    with_deadline(TEST_DEADLINE, abort_survives(Direction::ClientToServer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_reply_dropped_is_retried_until_acknowledged() {
    with_deadline(TEST_DEADLINE, abort_survives(Direction::ServerToClient)).await;
}

// ---------------------------------------------------------------------------------------
// Partition
// ---------------------------------------------------------------------------------------

/// `b` is unreachable (every connection reset) for the whole transaction: it aborts, `a`
/// is rolled back, and once healed `b` gets its abort and nothing is left prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_of_one_branch_aborts_and_heals_clean() {
    with_deadline(TEST_DEADLINE, async {
        let mut rig = Rig::start(PHASE_TWO_FLAGS).await;
        rig.proxy.cut();
        let tx = rig.begin_ab().await;
        expect_status(
            commit(&mut rig.c, &tx, 2_000).await,
            Code::Aborted,
            &[tx.as_str(), "prepare of branch b failed"],
        );
        wait_until(WAIT, "a is rolled back", || {
            rig.p.state(&tx, "a") == Some(ResState::Aborted)
        })
        .await;
        let v = rig
            .wait_branch(&tx, "b", pb::BranchState::Preparing, 3)
            .await;
        assert_eq!(tx_state(&v), pb::TxState::Aborting, "{v:?}");
        assert!(rig.p.kinds(&tx, "b").is_empty(), "nothing reached b");
        assert!(rig.proxy.stats().connections_refused >= 1);

        rig.proxy.restore();
        rig.wait_tx_state(&tx, pb::TxState::Aborted).await;
        let kinds = rig.p.kinds(&tx, "b");
        assert!(
            !kinds.is_empty() && kinds.iter().all(|k| *k == MsgKind::Abort),
            "b saw {kinds:?}"
        );
        assert_eq!(rig.p.state(&tx, "b"), Some(ResState::Aborted));
        assert!(!rig.p.saw(&tx, MsgKind::Commit), "a commit was sent");
        rig.assert_clean(&tx).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Duplicated messages
// ---------------------------------------------------------------------------------------

/// How [`DuplicatingHop`] sends its two copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DupMode {
    /// Both at once; answer when both have answered.
    Concurrent,
    /// The second after the first has answered.
    BackToBack,
}

/// A Participant service in front of a real participant that forwards every request
/// twice and answers with the first copy's answer, noting when the two answers differ
/// (every Participant RPC must give the same answer when repeated).
struct DuplicatingHop {
    shared: Arc<HopShared>,
    server: KitParticipant,
}

/// The hop's behaviour: forwards every call twice to `target`.
struct HopShared {
    target: ParticipantClient<Channel>,
    mode: Mutex<DupMode>,
    /// Requests forwarded (two per request received).
    forwarded: AtomicUsize,
    /// Pairs whose answers differed.
    mismatches: Mutex<Vec<String>>,
}

impl DuplicatingHop {
    async fn start(target: &str) -> DuplicatingHop {
        let channel = Endpoint::from_shared(target.to_string())
            .expect("participant url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let shared = Arc::new(HopShared {
            target: ParticipantClient::new(channel),
            mode: Mutex::new(DupMode::Concurrent),
            forwarded: AtomicUsize::new(0),
            mismatches: Mutex::new(Vec::new()),
        });
        let server = KitParticipant::start(shared.clone(), Services::UnaryOnly)
            .await
            .expect("start the duplicating hop");
        DuplicatingHop { shared, server }
    }

    fn url(&self) -> String {
        self.server.endpoint.clone()
    }

    fn set_mode(&self, mode: DupMode) {
        *self.shared.mode.lock().expect("lock") = mode;
    }

    fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    fn mismatches(&self) -> Vec<String> {
        self.shared.mismatches.lock().expect("lock").clone()
    }
}

impl HopShared {
    /// Runs both copies as the mode says; returns the first one's answer.
    async fn twice<T: PartialEq + Debug>(
        &self,
        what: String,
        first: impl Future<Output = Result<Response<T>, Status>>,
        second: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Status> {
        let mode = *self.mode.lock().expect("lock");
        let (a, b) = match mode {
            DupMode::Concurrent => tokio::join!(first, second),
            DupMode::BackToBack => {
                let a = first.await;
                (a, second.await)
            }
        };
        self.forwarded.fetch_add(2, Ordering::Relaxed);
        let same = match (&a, &b) {
            (Ok(x), Ok(y)) => x.get_ref() == y.get_ref(),
            (Err(x), Err(y)) => x.code() == y.code(),
            _ => false,
        };
        if !same {
            self.mismatches.lock().expect("lock").push(format!(
                "{what} ({mode:?}): first {:?}, second {:?}",
                a.as_ref().map(|r| r.get_ref()),
                b.as_ref().map(|r| r.get_ref())
            ));
        }
        a.map(Response::into_inner)
    }
}

impl Behaviour for HopShared {
    fn answer_prepare(self: Arc<Self>, r: pb::PrepareRequest) -> Answer<pb::PrepareResponse> {
        Box::pin(async move {
            let (mut c1, mut c2) = (self.target.clone(), self.target.clone());
            let what = format!("prepare {}/{}", r.tx_id, r.branch_id);
            self.twice(what, c1.prepare(r.clone()), c2.prepare(r)).await
        })
    }

    fn answer_commit(
        self: Arc<Self>,
        r: pb::CommitBranchRequest,
    ) -> Answer<pb::CommitBranchResponse> {
        Box::pin(async move {
            let (mut c1, mut c2) = (self.target.clone(), self.target.clone());
            let what = format!("commit {}/{}", r.tx_id, r.branch_id);
            self.twice(what, c1.commit(r.clone()), c2.commit(r)).await
        })
    }

    fn answer_abort(self: Arc<Self>, r: pb::AbortBranchRequest) -> Answer<pb::AbortBranchResponse> {
        Box::pin(async move {
            let (mut c1, mut c2) = (self.target.clone(), self.target.clone());
            let what = format!("abort {}/{}", r.tx_id, r.branch_id);
            self.twice(what, c1.abort(r.clone()), c2.abort(r)).await
        })
    }
}

/// Every message to `b` delivered twice (both at once, and one after the other): the
/// outcome is the same as without duplicates, on the commit path and on the abort path,
/// and the participant absorbed every duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_messages_change_nothing() {
    with_deadline(TEST_DEADLINE, async {
        let coord = Coordinator::start(PHASE_TWO_FLAGS).await;
        let p = TestParticipant::start("p").await;
        let hop = DuplicatingHop::start(&p.endpoint()).await;
        let mut c = coord.client().await;
        let dup_branch = |id: &str| pb::Branch {
            participant_endpoint: hop.url(),
            ..p.branch(id)
        };

        for mode in [DupMode::Concurrent, DupMode::BackToBack] {
            hop.set_mode(mode);

            // Commit path.
            let before = hop.forwarded();
            let tx = begin(&mut c, vec![p.branch("a"), dup_branch("b")]).await;
            let resp = commit(&mut c, &tx, 5_000)
                .await
                .unwrap_or_else(|s| panic!("{mode:?}: Commit with duplicates: {s:?}"));
            assert!(resp.pending_branches.is_empty(), "{mode:?}: {resp:?}");
            for b in ["a", "b"] {
                assert_eq!(p.state(&tx, b), Some(ResState::Committed), "{mode:?} {b}");
            }
            assert_eq!(
                p.kinds(&tx, "b"),
                [MsgKind::Prepare; 2]
                    .into_iter()
                    .chain([MsgKind::Commit; 2])
                    .collect::<Vec<_>>(),
                "{mode:?}: every message to b arrives twice"
            );
            assert_eq!(p.kinds(&tx, "a"), vec![MsgKind::Prepare, MsgKind::Commit]);
            assert_eq!(hop.forwarded() - before, 4, "{mode:?}");
            let v = wait_tx_state(&c, WAIT, &tx, pb::TxState::Committed).await;
            assert_eq!(outcome(&v), pb::Outcome::Committed, "{mode:?}: {v:?}");

            // Abort path: a votes no; b prepared (twice) and is aborted (twice).
            p.script("na", PrepareScript::No("no stock".into()));
            let tx = begin(&mut c, vec![p.branch("na"), dup_branch("b")]).await;
            expect_status(
                commit(&mut c, &tx, 5_000).await,
                Code::Aborted,
                &[tx.as_str(), "no stock"],
            );
            wait_tx_state(&c, WAIT, &tx, pb::TxState::Aborted).await;
            assert_eq!(p.state(&tx, "na"), Some(ResState::Aborted));
            assert_eq!(p.state(&tx, "b"), Some(ResState::Aborted), "{mode:?}");
            // Both prepares go out together; b's abort follows its (duplicated) vote.
            assert_eq!(
                p.kinds(&tx, "b"),
                [MsgKind::Prepare; 2]
                    .into_iter()
                    .chain([MsgKind::Abort; 2])
                    .collect::<Vec<_>>(),
                "{mode:?}: every message to b arrives twice"
            );
            assert!(!p.saw(&tx, MsgKind::Commit), "{mode:?}: a commit was sent");
        }

        assert!(
            hop.mismatches().is_empty(),
            "repeated requests got different answers: {:?}",
            hop.mismatches()
        );
        assert!(
            p.violations().is_empty(),
            "protocol violations: {:?}",
            p.violations()
        );
        let report = p.recover(&mut c).await;
        assert!(
            report.in_doubt.is_empty() && report.committed.is_empty() && report.aborted.is_empty(),
            "branches were left prepared: {report:?}"
        );
    })
    .await;
}
