//! The batched streams: `Coordinator.Pipeline` (client → coordinator) and
//! `ParticipantExchange.Exchange` (coordinator → participant).
//!
//! - a participant that serves the stream gets every message over it (no unary call), and
//!   each commit still arrives only after its decision is durable;
//! - a participant that does not serve it gets unary calls, and transactions commit alike;
//! - Pipeline calls answer exactly as their unary twins, errors included;
//! - Commit enlists the branches it carries, and a repeat of it answers the same;
//! - a graceful shutdown of the coordinator or of a participant is not held up by the
//!   long-lived streams its peers keep open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status};
use twopc_coordinator::log::{DecisionLog, SledLog, SledLogOptions};
use twopc_coordinator::types::TxId;
use twopc_proto::mux::{self, Pipeline};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{Behaviour, Services, TestParticipant, Via};
use twopc_testkit::requests;

mod support;
use support::{quick_retries, serve};

/// Bound on anything a test waits for.
const LIMIT: Duration = Duration::from_secs(20);

/// Counts what arrived how; votes yes and commits. On every commit it checks the
/// coordinator's log: the decision must already be durable.
struct Counting {
    log: Arc<SledLog>,
    unary: AtomicU64,
    streamed: AtomicU64,
    early_commits: AtomicU64,
}

impl Behaviour for Counting {
    fn arrived(&self, via: Via) {
        match via {
            Via::Unary => self.unary.fetch_add(1, Ordering::SeqCst),
            Via::Stream => self.streamed.fetch_add(1, Ordering::SeqCst),
        };
    }

    fn commit(&self, req: &pb::CommitBranchRequest) -> Result<pb::CommitBranchResponse, Status> {
        let durable = req
            .tx_id
            .parse::<TxId>()
            .ok()
            .map(|tx| matches!(self.log.decision(&tx), Ok(Some(_))) && self.log.stats().syncs > 0)
            .unwrap_or(false);
        if !durable {
            self.early_commits.fetch_add(1, Ordering::SeqCst);
        }
        Ok(pb::CommitBranchResponse {
            committed: true,
            reason: String::new(),
        })
    }
}

struct Setup {
    participant: Arc<Counting>,
    endpoint: String,
    channel: Channel,
    coordinator_stop: Option<oneshot::Sender<()>>,
    coordinator: tokio::task::JoinHandle<()>,
    participant_server: Option<TestParticipant>,
    _dir: tempfile::TempDir,
}

async fn setup(serve_stream: bool) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(SledLog::open(dir.path(), SledLogOptions::default()).expect("open log"));
    let participant = Arc::new(Counting {
        log: log.clone(),
        unary: AtomicU64::new(0),
        streamed: AtomicU64::new(0),
        early_commits: AtomicU64::new(0),
    });
    let services = if serve_stream {
        Services::UnaryAndStream
    } else {
        Services::UnaryOnly
    };
    let participant_server = TestParticipant::start(participant.clone(), services)
        .await
        .expect("start the participant");
    let endpoint = participant_server.endpoint.clone();

    let served = serve(quick_retries(), log).await;
    let channel = tonic::transport::Endpoint::from_shared(served.url)
        .expect("url")
        .connect_lazy();
    Setup {
        participant,
        endpoint,
        channel,
        coordinator_stop: Some(served.stop),
        coordinator: served.task,
        participant_server: Some(participant_server),
        _dir: dir,
    }
}

fn pipeline(channel: &Channel) -> Pipeline {
    let ch = channel.clone();
    let open: mux::Opener<pb::PipelineRequest, pb::PipelineResponse> = Arc::new(move |out| {
        let mut c = CoordinatorClient::new(ch.clone());
        Box::pin(async move { c.pipeline(out).await })
    });
    Pipeline::new(open, LIMIT)
}

/// A coordinator that serves streams, with a pipeline and a unary client over the same
/// channel.
async fn both_paths() -> (Setup, Pipeline, CoordinatorClient<Channel>) {
    let s = setup(true).await;
    let p = pipeline(&s.channel);
    let unary = CoordinatorClient::new(s.channel.clone());
    (s, p, unary)
}

fn branches(endpoint: &str) -> Vec<pb::Branch> {
    ["svc:a", "svc:b"]
        .iter()
        .map(|b| pb::Branch {
            branch_id: b.to_string(),
            participant_endpoint: endpoint.to_string(),
            commit_order: 0,
            kind: pb::BranchKind::Other as i32,
        })
        .collect()
}

/// Runs `n` two-branch transactions at once over one pipeline; all must commit.
async fn commit_many(p: &Arc<Pipeline>, endpoint: &str, n: usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let p = p.clone();
        let branches = branches(endpoint);
        tasks.push(tokio::spawn(async move {
            let begun = p
                .begin(pb::BeginRequest {
                    timeout_ms: 0,
                    branches,
                })
                .await
                .map_err(Status::from)?;
            p.commit(requests::commit(begun.tx_id))
                .await
                .map_err(Status::from)
        }));
    }
    for t in tasks {
        let resp = tokio::time::timeout(LIMIT, t)
            .await
            .expect("a transaction took too long")
            .expect("task")
            .expect("commit over the pipeline");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert!(resp.pending_branches.is_empty(), "{resp:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_that_serve_the_stream_get_every_message_over_it() {
    // 64 transactions × 2 branches × (prepare + commit).
    calls_reach_the_participant(true, 64, (256, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_without_the_stream_get_unary_calls() {
    calls_reach_the_participant(false, 16, (0, 64)).await;
}

/// Commits `n` two-branch transactions over one pipeline with a participant that serves
/// the stream if `serves_stream`; checks the calls it got as `(streamed, unary)`, none of
/// them an early commit.
async fn calls_reach_the_participant(serves_stream: bool, n: usize, calls: (u64, u64)) {
    let s = setup(serves_stream).await;
    let p = Arc::new(pipeline(&s.channel));
    commit_many(&p, &s.endpoint, n).await;
    let got = (
        s.participant.streamed.load(Ordering::SeqCst),
        s.participant.unary.load(Ordering::SeqCst),
    );
    assert_eq!(got, calls, "(streamed, unary) calls");
    assert_eq!(s.participant.early_commits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_calls_answer_like_their_unary_twins() {
    let (s, p, mut unary) = both_paths().await;
    let cases = [
        "not-a-tx-id".to_string(),
        // Another coordinator's id, and an earlier epoch of this one's shape.
        "ffffffff-1-1".to_string(),
        String::new(),
    ];
    for tx_id in cases {
        let req = requests::commit(&tx_id);
        let piped = p.commit(req.clone()).await.map_err(Status::from);
        let direct = unary.commit(req).await.map(|r| r.into_inner());
        match (piped, direct) {
            (Err(a), Err(b)) => {
                assert_eq!(a.code(), b.code(), "tx_id {tx_id:?}: {a:?} vs {b:?}");
                assert_eq!(a.message(), b.message(), "tx_id {tx_id:?}");
                assert_ne!(a.code(), Code::Ok);
            }
            (a, b) => panic!("tx_id {tx_id:?}: pipeline {a:?}, unary {b:?}"),
        }
    }
    let too_long_reason = pb::AbortRequest {
        tx_id: "x".into(),
        reason: "r".repeat(5000),
    };
    refused(p.abort(too_long_reason).await, Code::InvalidArgument, &[]);
    // A transaction begun over the pipeline is the same transaction for unary calls.
    let begun = p
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: branches(&s.endpoint),
        })
        .await
        .map_err(Status::from)
        .expect("begin");
    unary
        .abort(pb::AbortRequest {
            tx_id: begun.tx_id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .expect("abort");
    refused(
        p.commit(requests::commit(begun.tx_id)).await,
        Code::Aborted,
        &[],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdowns_are_not_held_up_by_open_streams() {
    let mut s = setup(true).await;
    let p = Arc::new(pipeline(&s.channel));
    commit_many(&p, &s.endpoint, 8).await;
    // Both streams are open now (the pipeline and the coordinator's exchange). A
    // participant shutdown ends the exchange stream at once.
    let server = s
        .participant_server
        .take()
        .expect("the participant is running");
    tokio::time::timeout(LIMIT, server.stop())
        .await
        .expect("the participant server waited for the coordinator's stream");
    let _ = s.coordinator_stop.take().map(|t| t.send(()));
    tokio::time::timeout(LIMIT, &mut s.coordinator)
        .await
        .expect("the coordinator waited for the client's pipeline")
        .expect("coordinator task");
    // The pipeline's stream has ended: the next call fails as after a broken connection.
    refused(
        p.begin(pb::BeginRequest::default()).await,
        Code::Unavailable,
        &[],
    );
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_enlists_the_branches_it_carries() {
    let (s, p, mut unary) = both_paths().await;
    // Begun without branches, committed with both: two prepares and two commits.
    let begun = p
        .begin(pb::BeginRequest::default())
        .await
        .map_err(Status::from)
        .expect("begin");
    let commit = pb::CommitRequest {
        branches: branches(&s.endpoint),
        ..requests::commit(&begun.tx_id)
    };
    let resp = p
        .commit(commit.clone())
        .await
        .map_err(Status::from)
        .expect("commit");
    assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
    assert!(resp.pending_branches.is_empty(), "{resp:?}");
    assert_eq!(s.participant.streamed.load(Ordering::SeqCst), 4);
    // Repeated, over the other path: the same outcome, nothing sent again.
    let again = unary
        .commit(commit.clone())
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(again.outcome, pb::Outcome::Committed as i32);
    assert_eq!(s.participant.streamed.load(Ordering::SeqCst), 4);
    // A branch the committed transaction did not have cannot join it afterwards.
    let mut other = commit.clone();
    other.branches[0].branch_id = "svc:late".into();
    refused(
        unary.commit(other).await,
        Code::FailedPrecondition,
        &["svc:late"],
    );
    // A bad branch is refused before anything is enlisted: the transaction stays empty
    // and aborts cleanly.
    let begun = p
        .begin(pb::BeginRequest::default())
        .await
        .map_err(Status::from)
        .expect("begin");
    let mut bad = branches(&s.endpoint);
    bad[1].participant_endpoint = "not a url".into();
    refused(
        unary
            .commit(pb::CommitRequest {
                branches: bad,
                ..requests::commit(&begun.tx_id)
            })
            .await,
        Code::InvalidArgument,
        &[],
    );
    let view = unary
        .get_transaction(requests::get(begun.tx_id))
        .await
        .expect("get")
        .into_inner();
    assert!(view.branches.is_empty(), "{view:?}");
    assert_eq!(view.state, pb::TxState::Active as i32, "{view:?}");
    assert_eq!(s.participant.streamed.load(Ordering::SeqCst), 4);
}

/// A report of the local commits of `tx_ids`, answered before the outcomes are durable.
/// The error `r` must be: `code`, with a message that contains each of `needles`.
#[track_caller]
fn refused<T: std::fmt::Debug, E>(r: Result<T, E>, code: Code, needles: &[&str]) -> Status
where
    Status: From<E>,
{
    let e = Status::from(r.expect_err("the call must be refused"));
    assert_eq!(e.code(), code, "{e:?}");
    for needle in needles {
        assert!(
            e.message().contains(needle),
            "{e:?} does not name {needle:?}"
        );
    }
    e
}

fn report(tx_ids: &[String]) -> pb::ReportLocalCommitsRequest {
    pb::ReportLocalCommitsRequest {
        tx_ids: tx_ids.to_vec(),
        answer_before_durable: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_are_checked_and_send_the_participant_nothing() {
    let (s, p, mut unary) = both_paths().await;
    let two = branches(&s.endpoint);
    // BeginLocal needs its branch.
    refused(
        p.begin_local(pb::BeginLocalRequest::default()).await,
        Code::InvalidArgument,
        &["branch is missing"],
    );
    let local = p
        .begin_local(pb::BeginLocalRequest {
            branch: Some(two[0].clone()),
            timeout_ms: 0,
            count: 0,
        })
        .await
        .map_err(Status::from)
        .expect("begin local");
    assert!(local.tx_ids.len() == 1 && local.epoch > 0, "{local:?}");
    let tx_id = local.tx_ids[0].clone();
    // No other branch can join it.
    refused(
        unary
            .enlist(pb::EnlistRequest {
                tx_id: tx_id.clone(),
                branch: Some(two[1].clone()),
            })
            .await,
        Code::FailedPrecondition,
        &[],
    );
    // A report names at least one transaction, and only a local transaction takes one.
    refused(
        p.report_local_commits(report(&[])).await,
        Code::InvalidArgument,
        &["tx_ids is empty"],
    );
    let plain = p
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: two,
        })
        .await
        .map_err(Status::from)
        .expect("begin");
    refused(
        unary
            .report_local_commits(report(std::slice::from_ref(&plain.tx_id)))
            .await,
        Code::FailedPrecondition,
        &["not begun"],
    );
    // The report records the outcome; the participant heard nothing of the transaction.
    let r = p
        .report_local_commits(report(std::slice::from_ref(&tx_id)))
        .await
        .map_err(Status::from)
        .expect("report");
    assert_eq!(r.recorded, 1, "{r:?}");
    assert_eq!(r.epoch, local.epoch);
    let got = unary
        .get_transaction(requests::get(&tx_id))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.outcome, pb::Outcome::Committed as i32, "{got:?}");
    // Repeated: answered from the log, the same.
    let again = unary
        .report_local_commits(report(std::slice::from_ref(&tx_id)))
        .await
        .expect("repeated report")
        .into_inner();
    assert_eq!(again.recorded, 1, "{again:?}");
    assert_eq!(
        s.participant.unary.load(Ordering::SeqCst) + s.participant.streamed.load(Ordering::SeqCst),
        0,
        "a local transaction sends its participant nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_transactions_begun_ahead_are_checked_and_unused_ones_go_back() {
    let (s, p, mut unary) = both_paths().await;
    let two = branches(&s.endpoint);
    let begin_local = |count: u32| pb::BeginLocalRequest {
        branch: Some(two[0].clone()),
        timeout_ms: 0,
        count,
    };
    // At most 256 at once.
    refused(
        unary.begin_local(begin_local(257)).await,
        Code::InvalidArgument,
        &["count is 257", "at most 256"],
    );
    let ahead = p
        .begin_local(begin_local(5))
        .await
        .map_err(Status::from)
        .expect("begin ahead");
    assert!(ahead.epoch > 0, "{ahead:?}");
    assert_eq!(ahead.tx_ids.len(), 5, "{ahead:?}");
    assert_eq!(ahead.timeout_ms, 60_000, "the default timeout: {ahead:?}");
    let mut ids = ahead.tx_ids.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "distinct ids");
    for id in &ids {
        let got = unary
            .get_transaction(requests::get(id))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got.branches.len(), 1, "{got:?}");
    }
    // Reports of local commits travel together: ids are checked before any is recorded,
    // and at most 1024 go in one call.
    let reader = unary.clone();
    let outcome = |id: String| {
        let mut c = reader.clone();
        async move {
            c.get_transaction(requests::get(id))
                .await
                .expect("get")
                .into_inner()
                .outcome
        }
    };
    refused(
        unary
            .report_local_commits(report(&[ids[3].clone(), "not-an-id".to_string()]))
            .await,
        Code::InvalidArgument,
        &["tx_ids[1]"],
    );
    assert_eq!(
        outcome(ids[3].clone()).await,
        pb::Outcome::Unspecified as i32,
        "nothing recorded"
    );
    let e = unary
        .report_local_commits(report(&vec![ids[4].clone(); 1025]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 1024"), "{e:?}");
    let r = p
        .report_local_commits(report(&ids[3..]))
        .await
        .map_err(Status::from)
        .expect("batched report");
    assert_eq!(r.recorded, 2, "{r:?}");
    assert_eq!(r.epoch, ahead.epoch);
    for id in &ids[3..] {
        assert_eq!(
            outcome(id.clone()).await,
            pb::Outcome::Committed as i32,
            "{id}"
        );
    }
    // An unused one goes back: settled by asking the participant, which says aborted.
    let asked =
        s.participant.unary.load(Ordering::SeqCst) + s.participant.streamed.load(Ordering::SeqCst);
    let released = p
        .release_unused(pb::ReleaseUnusedRequest {
            tx_id: ids[0].clone(),
        })
        .await
        .map_err(Status::from)
        .expect("given back");
    assert_eq!(released.outcome, pb::Outcome::Aborted as i32);
    let got = unary
        .get_transaction(requests::get(ids[0].clone()))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.outcome, pb::Outcome::Aborted as i32, "{got:?}");
    assert_eq!(
        s.participant.unary.load(Ordering::SeqCst) + s.participant.streamed.load(Ordering::SeqCst),
        asked + 1,
        "the participant was asked"
    );
    // An ordinary transaction's id cannot go back unused, and a bad id is named.
    let plain = p
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: two.clone(),
        })
        .await
        .map_err(Status::from)
        .expect("begin");
    refused(
        unary
            .release_unused(pb::ReleaseUnusedRequest {
                tx_id: plain.tx_id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        &["not begun"],
    );
    refused(
        unary
            .release_unused(pb::ReleaseUnusedRequest {
                tx_id: "not-an-id".into(),
            })
            .await,
        Code::InvalidArgument,
        &["tx_id"],
    );
    // A report naming a transaction the coordinator commits itself fails, naming it.
    let e = refused(
        unary
            .report_local_commits(report(&[ids[1].clone(), plain.tx_id.clone()]))
            .await,
        Code::FailedPrecondition,
        &[],
    );
    assert!(
        e.message()
            .starts_with(&format!("transaction {}:", plain.tx_id)),
        "{e:?}"
    );
}
