//! The coordinator's durability promises, observed from a participant's seat:
//!
//! - no branch receives a commit before the COMMIT decision has been synced (the sled
//!   log's sync counter and durable LSN are read at the moment each commit arrives);
//! - a failed sync stops the coordinator: the caller hears UNAVAILABLE, no branch receives
//!   a commit, health turns NOT_SERVING and new transactions are refused.
//!
//! These run the real gRPC server in-process over the real sled log, so the test can hold
//! the log handle and its fault switch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::Status;
use twopc_coordinator::log::{DecisionLog, SledLog, SledLogOptions};
use twopc_coordinator::types::TxId;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{Behaviour, Services, TestParticipant};
use twopc_testkit::requests;

mod support;
use support::{connect, quick_retries, serve};

/// What the participant saw when a commit arrived.
#[derive(Debug, Clone)]
struct CommitSeen {
    tx_id: String,
    branch_id: String,
    syncs: u64,
    durable_lsn: u64,
    decision_readable: bool,
}

/// A participant that votes yes and, on every commit, reads the coordinator's log.
struct Spy {
    log: Arc<SledLog>,
    commits: Mutex<Vec<CommitSeen>>,
}

impl Behaviour for Spy {
    fn commit(&self, req: &pb::CommitBranchRequest) -> Result<pb::CommitBranchResponse, Status> {
        let tx: TxId = req
            .tx_id
            .parse()
            .map_err(|_| Status::invalid_argument("bad tx id"))?;
        let seen = CommitSeen {
            tx_id: req.tx_id.clone(),
            branch_id: req.branch_id.clone(),
            syncs: self.log.stats().syncs,
            durable_lsn: self.log.durable_lsn(),
            decision_readable: matches!(self.log.decision(&tx), Ok(Some(_))),
        };
        self.commits.lock().expect("lock").push(seen);
        Ok(pb::CommitBranchResponse {
            committed: true,
            reason: String::new(),
        })
    }
}

struct Setup {
    client: CoordinatorClient<tonic::transport::Channel>,
    endpoint: String,
    coordinator_addr: String,
    spy: Arc<Spy>,
    _participant: TestParticipant,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn setup(fail_syncs: Option<Arc<AtomicBool>>) -> (Setup, Arc<SledLog>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SledLogOptions {
        fail_syncs,
        ..SledLogOptions::default()
    };
    let log = Arc::new(SledLog::open(dir.path(), opts).expect("open log"));
    let spy = Arc::new(Spy {
        log: log.clone(),
        commits: Mutex::new(Vec::new()),
    });
    let participant = TestParticipant::start(spy.clone(), Services::UnaryOnly)
        .await
        .expect("start the participant");
    let endpoint = participant.endpoint.clone();

    let served = serve(quick_retries(), log.clone()).await;
    let coordinator_addr = served.url;
    let c_stop = served.stop;
    let client = connect(&coordinator_addr).await;
    let s = Setup {
        client,
        endpoint,
        coordinator_addr,
        spy,
        _participant: participant,
        _stop: c_stop,
        _dir: dir,
    };
    (s, log)
}

fn branches(endpoint: &str, n: usize) -> Vec<pb::Branch> {
    (0..n)
        .map(|i| pb::Branch {
            branch_id: format!("b{i}"),
            participant_endpoint: endpoint.to_string(),
            commit_order: i as u32,
            kind: pb::BranchKind::Database as i32,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_commit_reaches_a_branch_before_its_decision_is_synced() {
    let (mut s, log) = setup(None).await;
    let syncs_at_start = log.stats().syncs;
    let mut tx_ids = Vec::new();
    for _ in 0..20 {
        let begin = s
            .client
            .begin(pb::BeginRequest {
                timeout_ms: 0,
                branches: branches(&s.endpoint, 2),
            })
            .await;
        let tx_id = begin.expect("begin").into_inner().tx_id;
        let resp = s
            .client
            .commit(requests::commit(&tx_id))
            .await
            .expect("commit")
            .into_inner();
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
        tx_ids.push(tx_id);
    }
    let commits = s.spy.commits.lock().expect("lock").clone();
    assert_eq!(
        commits.len(),
        40,
        "two branches per transaction: {commits:?}"
    );
    for (i, seen) in commits.iter().enumerate() {
        assert!(
            seen.decision_readable,
            "commit {i} arrived before its decision could be read back: {seen:?}"
        );
        assert!(
            seen.syncs > syncs_at_start,
            "commit {i} arrived before any sync: {seen:?}"
        );
        assert!(
            seen.durable_lsn >= 1,
            "commit {i} arrived with nothing durable: {seen:?}"
        );
    }
    // Phase two went tier by tier: b0 (order 0) of each transaction before its b1.
    for tx_id in &tx_ids {
        let order: Vec<&str> = commits
            .iter()
            .filter(|c| &c.tx_id == tx_id)
            .map(|c| c.branch_id.as_str())
            .collect();
        assert_eq!(order, ["b0", "b1"], "tier order violated for {tx_id}");
    }
    let stats = log.stats();
    assert_eq!(stats.decisions, 20);
    assert!(
        stats.syncs - syncs_at_start <= 20,
        "at most one sync per decision: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_halts_the_coordinator_and_sends_no_commit() {
    let switch = Arc::new(AtomicBool::new(false));
    let (mut s, log) = setup(Some(switch.clone())).await;
    let tx_id = s
        .client
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: branches(&s.endpoint, 2),
        })
        .await
        .expect("begin")
        .into_inner()
        .tx_id;
    switch.store(true, Ordering::SeqCst);
    let err = s
        .client
        .commit(requests::commit(&tx_id))
        .await
        .expect_err("commit must fail when the decision cannot be synced");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("decision log failed"),
        "{}",
        err.message()
    );
    assert!(
        s.spy.commits.lock().expect("lock").is_empty(),
        "a commit was sent although the sync failed"
    );
    assert!(log.is_failed());

    // Health turns NOT_SERVING.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(s.coordinator_addr.clone())
            .expect("uri")
            .connect_lazy(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "twopc.v1.Coordinator".into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "health never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New work is refused, even after the disk "recovers": a failed sync is never retried
    // as if it had worked.
    switch.store(false, Ordering::SeqCst);
    let err = s
        .client
        .begin(pb::BeginRequest::default())
        .await
        .expect_err("begin must be refused");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("not taking new transactions"),
        "{}",
        err.message()
    );
    // Asking again about the in-doubt transaction does not guess an outcome.
    let err = s
        .client
        .commit(requests::commit(tx_id))
        .await
        .expect_err("in doubt");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(s.spy.commits.lock().expect("lock").is_empty());
}
