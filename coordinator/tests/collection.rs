//! Collection of finished decision records, seen over the wire: after the retention a
//! finished transaction answers FORGOTTEN (never a presumed abort), a Commit or Abort of
//! it is refused saying why, an id never issued stays NOT_FOUND, and nothing is forgotten
//! while a lower id is still open or before its own retention has passed since it
//! finished. The real gRPC server runs in-process over a real sled log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::log::{DecisionLog, SledLog, SledLogOptions};
use twopc_coordinator::types::TxId;
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{AlwaysYes, Services, TestParticipant};
use twopc_testkit::requests;

mod support;
use support::{connect, quick_retries, serve, Served};

/// The retention of these tests.
const RETENTION: Duration = Duration::from_millis(400);

type Client = CoordinatorClient<tonic::transport::Channel>;

fn config() -> ServeConfig {
    ServeConfig {
        decision_retention_ms: RETENTION.as_millis() as u64,
        tx_timeout_ms: 600_000,
        ..quick_retries()
    }
}

async fn begin(client: &mut Client, endpoint: &str) -> String {
    let branches = (0..2)
        .map(|i| pb::Branch {
            branch_id: format!("b{i}"),
            participant_endpoint: endpoint.to_string(),
            commit_order: 0,
            kind: pb::BranchKind::Database as i32,
        })
        .collect();
    client
        .begin(pb::BeginRequest {
            timeout_ms: 0,
            branches,
        })
        .await
        .expect("begin")
        .into_inner()
        .tx_id
}

async fn commit(client: &mut Client, tx_id: &str) {
    let resp = client
        .commit(requests::commit(tx_id))
        .await
        .expect("commit")
        .into_inner();
    assert_eq!(resp.outcome, pb::Outcome::Committed as i32, "{tx_id}");
    assert!(resp.pending_branches.is_empty(), "{tx_id}: {resp:?}");
}

async fn abort(client: &mut Client, tx_id: &str) -> Result<(), tonic::Status> {
    client
        .abort(pb::AbortRequest {
            tx_id: tx_id.to_string(),
            reason: "test".into(),
        })
        .await
        .map(|_| ())
}

/// (state, outcome) of `tx_id` as GetTransaction answers.
async fn status(client: &mut Client, tx_id: &str) -> (pb::TxState, pb::Outcome) {
    let resp = client
        .get_transaction(requests::get(tx_id))
        .await
        .unwrap_or_else(|s| panic!("get {tx_id}: {s:?}"))
        .into_inner();
    (
        pb::TxState::try_from(resp.state).expect("a known state"),
        pb::Outcome::try_from(resp.outcome).expect("a known outcome"),
    )
}

const FORGOTTEN: (pb::TxState, pb::Outcome) = (pb::TxState::Forgotten, pb::Outcome::Forgotten);
const COMMITTED: (pb::TxState, pb::Outcome) = (pb::TxState::Committed, pb::Outcome::Committed);
const ABORTED: (pb::TxState, pb::Outcome) = (pb::TxState::Aborted, pb::Outcome::Aborted);

/// Waits (at most 20 retentions) until `tx_id` answers FORGOTTEN.
async fn forgotten_in_time(client: &mut Client, tx_id: &str) {
    let deadline = Instant::now() + RETENTION * 20;
    loop {
        let now = status(client, tx_id).await;
        if now == FORGOTTEN {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{tx_id} still answers {now:?} after 20 retentions"
        );
        tokio::time::sleep(RETENTION / 8).await;
    }
}

struct World {
    client: Client,
    endpoint: String,
    log: Arc<SledLog>,
    served: Served,
    _participant: TestParticipant,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(SledLog::open(dir.path(), SledLogOptions::default()).expect("open log"));
    let participant = TestParticipant::start(Arc::new(AlwaysYes), Services::UnaryOnly)
        .await
        .expect("participant");
    let served = serve(config(), log.clone()).await;
    World {
        client: connect(&served.url).await,
        endpoint: participant.endpoint.clone(),
        log,
        served,
        _participant: participant,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_transaction_is_forgotten_after_the_retention_never_presumed_aborted() {
    let mut w = world().await;
    let committed = begin(&mut w.client, &w.endpoint).await;
    commit(&mut w.client, &committed).await;
    let aborted = begin(&mut w.client, &w.endpoint).await;
    abort(&mut w.client, &aborted).await.expect("abort");
    assert_eq!(status(&mut w.client, &committed).await, COMMITTED);
    assert_eq!(
        status(&mut w.client, &aborted).await.1,
        pb::Outcome::Aborted
    );

    forgotten_in_time(&mut w.client, &committed).await;
    // The aborted one has no record to collect and is above the mark: still ABORTED.
    assert_eq!(status(&mut w.client, &aborted).await, ABORTED);
    assert_eq!(w.log.kept().expect("kept").records, 0, "the record is gone");

    // Requests about the forgotten one are refused, saying why.
    for (what, result) in [
        (
            "Commit",
            w.client
                .commit(requests::commit(&committed))
                .await
                .map(|_| ()),
        ),
        ("Abort", abort(&mut w.client, &committed).await),
    ] {
        let status = result.expect_err("refused");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains("no longer kept"),
            "{what}: {}",
            status.message()
        );
    }
    // Giving back an id as unused is no request about its outcome: accepted.
    w.client
        .release_unused(pb::ReleaseUnusedRequest {
            tx_id: committed.clone(),
        })
        .await
        .expect("a forgotten id given back");
    // An id this coordinator never issued is still unknown, not forgotten.
    let mut never: TxId = committed.parse().expect("an id");
    never.seq = 1_000_000;
    let unknown = w
        .client
        .get_transaction(pb::GetTransactionRequest {
            tx_id: never.to_string(),
        })
        .await
        .expect_err("never issued");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // The low-water mark outlives a restart.
    let _ = w.served.stop.send(());
    let _ = w.served.task.await;
    drop(w.log);
    let log = Arc::new(SledLog::open(w.dir.path(), SledLogOptions::default()).expect("reopen"));
    let served = serve(config(), log).await;
    let mut client = connect(&served.url).await;
    assert_eq!(status(&mut client, &committed).await, FORGOTTEN);
    assert_eq!(status(&mut client, &aborted).await, ABORTED);
}

/// A record is not collected while a lower id is still open, and an aborted transaction
/// answers ABORTED for a whole retention after it finished, even once a higher id's
/// record older than that could go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_forgotten_while_a_lower_id_is_open_or_finished_less_than_a_retention_ago() {
    let mut w = world().await;
    let open = begin(&mut w.client, &w.endpoint).await;
    let committed = begin(&mut w.client, &w.endpoint).await;
    commit(&mut w.client, &committed).await;
    // Several retentions pass with `open` still active: the later record stays.
    tokio::time::sleep(RETENTION * 4).await;
    assert_eq!(status(&mut w.client, &committed).await, COMMITTED);

    abort(&mut w.client, &open).await.expect("abort");
    assert_eq!(
        status(&mut w.client, &open).await.1,
        pb::Outcome::Aborted,
        "just aborted (its branches may still be acknowledging): its outcome is answered"
    );
    assert_eq!(
        status(&mut w.client, &committed).await,
        COMMITTED,
        "a lower id finished just now: not collectable yet"
    );
    // Once a retention has passed since the abort, both go.
    forgotten_in_time(&mut w.client, &committed).await;
    assert_eq!(status(&mut w.client, &open).await, FORGOTTEN);
}
