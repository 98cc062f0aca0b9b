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

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status};
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::log::{DecisionLog, SledLog, SledLogOptions};
use twopc_coordinator::server;
use twopc_coordinator::types::TxId;
use twopc_proto::mux::{self, Pipeline};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{Behaviour, Services, TestParticipant, Via};

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

    let c_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", c_listener.local_addr().expect("addr"));
    let (coordinator_stop, c_stopped) = oneshot::channel::<()>();
    let cfg = ServeConfig {
        retry_initial_ms: 10,
        retry_max_ms: 50,
        ..ServeConfig::default()
    };
    let coordinator = tokio::spawn(async move {
        if let Err(e) = server::run_with_log(cfg, log, c_listener, async {
            let _ = c_stopped.await;
        })
        .await
        {
            eprintln!("coordinator stopped with an error: {e}");
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect_lazy();
    Setup {
        participant,
        endpoint,
        channel,
        coordinator_stop: Some(coordinator_stop),
        coordinator,
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
                    commit_locally: false,
                    timeout_ms: 0,
                    branches,
                    count: 0,
                })
                .await
                .map_err(Status::from)?;
            p.commit(pb::CommitRequest {
                committed_locally: false,
                tx_id: begun.tx_id,
                phase_two_wait_ms: 0,
                no_wait: false,
                branches: Vec::new(),
                answer_before_durable: false,
                more_tx_ids: Vec::new(),
            })
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
    let s = setup(true).await;
    let p = Arc::new(pipeline(&s.channel));
    commit_many(&p, &s.endpoint, 64).await;
    // 64 transactions × 2 branches × (prepare + commit).
    assert_eq!(s.participant.streamed.load(Ordering::SeqCst), 256);
    assert_eq!(s.participant.unary.load(Ordering::SeqCst), 0);
    assert_eq!(s.participant.early_commits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_without_the_stream_get_unary_calls() {
    let s = setup(false).await;
    let p = Arc::new(pipeline(&s.channel));
    commit_many(&p, &s.endpoint, 16).await;
    assert_eq!(s.participant.streamed.load(Ordering::SeqCst), 0);
    assert_eq!(s.participant.unary.load(Ordering::SeqCst), 64);
    assert_eq!(s.participant.early_commits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_calls_answer_like_their_unary_twins() {
    let s = setup(true).await;
    let p = pipeline(&s.channel);
    let mut unary = CoordinatorClient::new(s.channel.clone());
    let cases = [
        "not-a-tx-id".to_string(),
        // Another coordinator's id, and an earlier epoch of this one's shape.
        "ffffffff-1-1".to_string(),
        String::new(),
    ];
    for tx_id in cases {
        let req = pb::CommitRequest {
            committed_locally: false,
            tx_id: tx_id.clone(),
            phase_two_wait_ms: 0,
            no_wait: false,
            branches: Vec::new(),
            answer_before_durable: false,
            more_tx_ids: Vec::new(),
        };
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
        unused: false,
    };
    let e = p
        .abort(too_long_reason)
        .await
        .map_err(Status::from)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A transaction begun over the pipeline is the same transaction for unary calls.
    let begun = p
        .begin(pb::BeginRequest {
            commit_locally: false,
            timeout_ms: 0,
            branches: branches(&s.endpoint),
            count: 0,
        })
        .await
        .map_err(Status::from)
        .expect("begin");
    unary
        .abort(pb::AbortRequest {
            tx_id: begun.tx_id.clone(),
            reason: "changed my mind".into(),
            unused: false,
        })
        .await
        .expect("abort");
    let e = p
        .commit(pb::CommitRequest {
            committed_locally: false,
            tx_id: begun.tx_id,
            phase_two_wait_ms: 0,
            no_wait: false,
            branches: Vec::new(),
            answer_before_durable: false,
            more_tx_ids: Vec::new(),
        })
        .await
        .map_err(Status::from)
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
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
    let e = p
        .begin(pb::BeginRequest::default())
        .await
        .map_err(Status::from)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_enlists_the_branches_it_carries() {
    let s = setup(true).await;
    let p = pipeline(&s.channel);
    let mut unary = CoordinatorClient::new(s.channel.clone());
    // Begun without branches, committed with both: two prepares and two commits.
    let begun = p
        .begin(pb::BeginRequest::default())
        .await
        .map_err(Status::from)
        .expect("begin");
    let commit = pb::CommitRequest {
        committed_locally: false,
        tx_id: begun.tx_id.clone(),
        phase_two_wait_ms: 0,
        no_wait: false,
        branches: branches(&s.endpoint),
        answer_before_durable: false,
        more_tx_ids: Vec::new(),
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
    let e = unary.commit(other).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("svc:late"), "{e:?}");
    // A bad branch is refused before anything is enlisted: the transaction stays empty
    // and aborts cleanly.
    let begun = p
        .begin(pb::BeginRequest::default())
        .await
        .map_err(Status::from)
        .expect("begin");
    let mut bad = branches(&s.endpoint);
    bad[1].participant_endpoint = "not a url".into();
    let e = unary
        .commit(pb::CommitRequest {
            committed_locally: false,
            tx_id: begun.tx_id.clone(),
            phase_two_wait_ms: 0,
            no_wait: false,
            branches: bad,
            answer_before_durable: false,
            more_tx_ids: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let view = unary
        .get_transaction(pb::GetTransactionRequest { tx_id: begun.tx_id })
        .await
        .expect("get")
        .into_inner();
    assert!(view.branches.is_empty(), "{view:?}");
    assert_eq!(view.state, pb::TxState::Active as i32, "{view:?}");
    assert_eq!(s.participant.streamed.load(Ordering::SeqCst), 4);
}

/// `e` refuses a call that only a local transaction (begun with `commit_locally`) takes.
fn assert_refused_as_not_local(e: &Status) {
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("not begun with commit_locally"),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commits_are_checked_and_send_the_participant_nothing() {
    let s = setup(true).await;
    let p = pipeline(&s.channel);
    let mut unary = CoordinatorClient::new(s.channel.clone());
    let two = branches(&s.endpoint);
    let one = vec![two[0].clone()];
    // commit_locally needs exactly one branch.
    for bad in [Vec::new(), two.clone()] {
        let req = pb::BeginRequest {
            timeout_ms: 0,
            branches: bad.clone(),
            commit_locally: true,
            count: 0,
        };
        let e = p.begin(req).await.map_err(Status::from).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(&format!(
                "exactly one branch in branches (got {})",
                bad.len()
            )),
            "{e:?}"
        );
    }
    let local = p
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: one,
            commit_locally: true,
            count: 0,
        })
        .await
        .map_err(Status::from)
        .expect("begin local");
    assert!(local.commit_locally && local.epoch > 0, "{local:?}");
    // No other branch can join it.
    let e = unary
        .enlist(pb::EnlistRequest {
            tx_id: local.tx_id.clone(),
            branch: Some(two[1].clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("commit_locally"), "{e:?}");
    let report = |tx_id: &str, branches: Vec<pb::Branch>| pb::CommitRequest {
        tx_id: tx_id.to_string(),
        branches,
        committed_locally: true,
        answer_before_durable: true,
        ..Default::default()
    };
    // A report carries no branches, and only a local transaction takes one.
    let e = p
        .commit(report(&local.tx_id, two.clone()))
        .await
        .map_err(Status::from)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let plain = p
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches: two,
            commit_locally: false,
            count: 0,
        })
        .await
        .map_err(Status::from)
        .expect("begin");
    let e = unary
        .commit(report(&plain.tx_id, Vec::new()))
        .await
        .unwrap_err();
    assert_refused_as_not_local(&e);
    // The report records the outcome; the participant heard nothing of the transaction.
    let r = p
        .commit(report(&local.tx_id, Vec::new()))
        .await
        .map_err(Status::from)
        .expect("report");
    assert_eq!(r.outcome, pb::Outcome::Committed as i32);
    assert_eq!(r.epoch, local.epoch);
    let got = unary
        .get_transaction(pb::GetTransactionRequest {
            tx_id: local.tx_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.outcome, pb::Outcome::Committed as i32, "{got:?}");
    // Repeated: answered from the log, the same.
    let again = unary
        .commit(report(&local.tx_id, Vec::new()))
        .await
        .expect("repeated report")
        .into_inner();
    assert_eq!(again.outcome, pb::Outcome::Committed as i32);
    assert_eq!(
        s.participant.unary.load(Ordering::SeqCst) + s.participant.streamed.load(Ordering::SeqCst),
        0,
        "a local transaction sends its participant nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_transactions_begun_ahead_are_checked_and_unused_ones_go_back() {
    let s = setup(true).await;
    let p = pipeline(&s.channel);
    let mut unary = CoordinatorClient::new(s.channel.clone());
    let two = branches(&s.endpoint);
    let one = vec![two[0].clone()];
    let begin = |branches: Vec<pb::Branch>, commit_locally: bool, count: u32| pb::BeginRequest {
        timeout_ms: 0,
        branches,
        commit_locally,
        count,
    };
    // Several at once only for local transactions, and at most 256.
    for (req, what) in [
        (begin(two.clone(), false, 2), "needs commit_locally"),
        (begin(one.clone(), true, 257), "at most 256"),
    ] {
        let e = unary.begin(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{e:?}");
        assert!(e.message().contains("count is"), "{e:?}");
    }
    let ahead = p
        .begin(begin(one.clone(), true, 5))
        .await
        .map_err(Status::from)
        .expect("begin ahead");
    assert!(ahead.commit_locally && ahead.epoch > 0, "{ahead:?}");
    assert_eq!(ahead.more_tx_ids.len(), 4, "{ahead:?}");
    assert_eq!(ahead.timeout_ms, 60_000, "the default timeout: {ahead:?}");
    let mut ids: Vec<String> = std::iter::once(ahead.tx_id.clone())
        .chain(ahead.more_tx_ids.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "distinct ids");
    for id in &ids {
        let got = unary
            .get_transaction(pb::GetTransactionRequest { tx_id: id.clone() })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got.branches.len(), 1, "{got:?}");
    }
    // Reports of local commits travel together: ids are checked before any is recorded,
    // only a report carries more, and at most 1 + 1024 go in one call.
    let report = |first: &str, more: &[String]| pb::CommitRequest {
        tx_id: first.to_string(),
        more_tx_ids: more.to_vec(),
        committed_locally: true,
        answer_before_durable: true,
        ..Default::default()
    };
    let reader = unary.clone();
    let outcome = |id: String| {
        let mut c = reader.clone();
        async move {
            c.get_transaction(pb::GetTransactionRequest { tx_id: id })
                .await
                .expect("get")
                .into_inner()
                .outcome
        }
    };
    let e = unary
        .commit(report(&ids[3], &["not-an-id".to_string()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        outcome(ids[3].clone()).await,
        pb::Outcome::Unspecified as i32,
        "nothing recorded"
    );
    let e = unary
        .commit(pb::CommitRequest {
            committed_locally: false,
            ..report(&ids[3], &ids[4..])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("more_tx_ids"), "{e:?}");
    let e = unary
        .commit(report(&ids[3], &vec![ids[4].clone(); 1025]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 1024"), "{e:?}");
    let r = p
        .commit(report(&ids[3], &ids[4..]))
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
    unary
        .abort(pb::AbortRequest {
            tx_id: ids[0].clone(),
            reason: String::new(),
            unused: true,
        })
        .await
        .expect("given back");
    let got = unary
        .get_transaction(pb::GetTransactionRequest {
            tx_id: ids[0].clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.outcome, pb::Outcome::Aborted as i32, "{got:?}");
    assert_eq!(
        s.participant.unary.load(Ordering::SeqCst) + s.participant.streamed.load(Ordering::SeqCst),
        asked + 1,
        "the participant was asked"
    );
    // An ordinary transaction's id cannot go back unused.
    let plain = p
        .begin(begin(two, false, 0))
        .await
        .map_err(Status::from)
        .expect("begin");
    let e = unary
        .abort(pb::AbortRequest {
            tx_id: plain.tx_id.clone(),
            reason: String::new(),
            unused: true,
        })
        .await
        .unwrap_err();
    assert_refused_as_not_local(&e);
    // A report naming a transaction the coordinator commits itself fails, naming it.
    let e = unary
        .commit(report(&ids[1], std::slice::from_ref(&plain.tx_id)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .starts_with(&format!("transaction {}:", plain.tx_id)),
        "{e:?}"
    );
}
