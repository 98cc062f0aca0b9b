//! Broker branches against REAL brokers and a REAL (in-process) coordinator.
//!
//! * RabbitMQ: the system server at 127.0.0.1:5672 (guest/guest), one unique queue per
//!   test. Its outages are simulated with a TCP proxy in this file ([`Proxy`]) whose
//!   `cut` shuts every connection down synchronously and closes its port, and whose
//!   `restore` opens the same port again; a closed port stands for "never reachable".
//! * NATS JetStream: the system server at 127.0.0.1:4222 with one unique stream (and
//!   subject space) per test, or a private `nats-server` ([`NatsServer`]) where the test
//!   kills it and starts it again on the same port and store directory.
//! * The coordinator runs in-process (`twopc_coordinator::server::run`) on 127.0.0.1:0
//!   with quick phase-two retries.
//!
//! Deliveries are checked by draining the queue / reading the stream directly. Waits are
//! bounded polls ([`eventually`]); every test runs under an overall timeout.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use twopc_participant::resource::BranchKind;
use twopc_participant::{
    AbortOutcome, Broker, BrokerCore, BrokerOptions, Error, NatsResource, OnePhase, PublishOptions,
    RabbitResource, Resource, Retry, StagingOptions, StagingStore, Transaction, TwoPc, Vote,
};
use twopc_proto::v1 as pb;
use twopc_testkit::{free_port, unique_name, FaultProxy, NatsServer};

mod support;
use support::{
    bounded, delete_stream, eventually, get_tx, ids_and_payloads, nats_on, quick_retries,
    reopen_staging, sdk, staging, Coordinator, RabbitProbe, Rig, Wait, NATS_URL, RABBIT_URL,
};

const RABBIT_ADDR: &str = "127.0.0.1:5672";
/// Overall bound of one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound of one wait for a condition, polled every 50 ms.
const WAIT: Wait = Wait {
    limit: Duration::from_secs(30),
    every: Duration::from_millis(50),
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A [`Rig`]: an in-process coordinator with quick phase-two retries, a staging store and
/// an SDK handle with `commit_wait`.
async fn rig(commit_wait: Duration) -> Rig {
    Rig::start(Coordinator::start(quick_retries()).await, commit_wait).await
}

/// Commits `tx`, which must abort; returns the abort's message.
async fn commit_aborts(tx: Transaction) -> String {
    match tx.commit().await {
        Err(Error::Aborted(msg)) => msg,
        other => panic!("expected Aborted, got {other:?}"),
    }
}

/// A trivial resource: votes as told, commits and aborts always succeed (an abort of a
/// branch it committed answers `AlreadyCommitted`). An optional hook runs at its (first)
/// commit: as a database-tier branch it commits before any broker branch, so the hook can
/// take a broker down "after prepare, before publish".
struct TestResource {
    name: String,
    vote: Vote,
    on_commit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    commits: AtomicUsize,
    aborts: AtomicUsize,
    /// The branches it committed, as `(tx_id, branch_id)`.
    committed: Mutex<HashSet<(String, String)>>,
}

impl TestResource {
    fn new(name: &str, vote: Vote) -> Arc<TestResource> {
        Arc::new(TestResource {
            name: name.into(),
            vote,
            on_commit: Mutex::new(None),
            commits: AtomicUsize::new(0),
            aborts: AtomicUsize::new(0),
            committed: Mutex::new(HashSet::new()),
        })
    }

    fn with_hook(name: &str, hook: impl FnOnce() + Send + 'static) -> Arc<TestResource> {
        let r = TestResource::new(name, Vote::Yes);
        *r.on_commit.lock().expect("hook lock") = Some(Box::new(hook));
        r
    }
}

impl TestResource {
    fn committed_now(&self, tx: &str, branch: &str) {
        self.committed
            .lock()
            .expect("committed lock")
            .insert((tx.to_string(), branch.to_string()));
    }
}

#[tonic::async_trait]
impl Resource for TestResource {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> BranchKind {
        BranchKind::Database
    }
    async fn prepare(&self, _tx: &str, _branch: &str) -> Vote {
        self.vote.clone()
    }
    async fn commit(&self, tx: &str, branch: &str) -> Result<(), Retry> {
        let hook = self.on_commit.lock().expect("hook lock").take();
        if let Some(hook) = hook {
            hook();
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.committed_now(tx, branch);
        Ok(())
    }
    async fn commit_one_phase(&self, tx: &str, branch: &str) -> Result<OnePhase, Retry> {
        self.committed_now(tx, branch);
        Ok(OnePhase::Committed)
    }
    async fn abort(&self, tx: &str, branch: &str) -> Result<AbortOutcome, Retry> {
        if self
            .committed
            .lock()
            .expect("committed lock")
            .contains(&(tx.to_string(), branch.to_string()))
        {
            return Ok(AbortOutcome::AlreadyCommitted);
        }
        self.aborts.fetch_add(1, Ordering::SeqCst);
        Ok(AbortOutcome::Aborted)
    }
    async fn in_doubt(&self) -> Result<Vec<(String, String)>, Retry> {
        Ok(Vec::new())
    }
}

impl Rig {
    /// A [`TestResource`] "db" voting `vote`, registered with the rig's SDK.
    fn register_db(&self, vote: Vote) -> Arc<TestResource> {
        self.sdk
            .register(TestResource::new("db", vote))
            .expect("register db")
    }

    /// A RabbitMQ resource named `name` at `url` that connects only when first used,
    /// registered with the rig's SDK.
    fn register_lazy_rabbit(&self, name: &str, url: String) -> Arc<RabbitResource> {
        let rabbit = RabbitResource::connect_lazy(name, url, self.store.clone()).expect("lazy");
        self.sdk.register(Arc::new(rabbit)).expect("register")
    }

    /// Waits until the staged batch of the late broker branch of `tx_id` is published and
    /// removed, and the coordinator sees the transaction's branches done.
    async fn late_commit_finishes(&self, tx_id: &str) {
        eventually(
            WAIT,
            "the staged batch is published and removed",
            || async { self.store.is_empty() },
        )
        .await;
        eventually(WAIT, "the coordinator sees the branch done", || async {
            get_tx(&self.sdk, tx_id).await.state == pb::TxState::Committed as i32
        })
        .await;
    }

    /// Begins a transaction, enlists `db`, publishes "never" to `destination` of
    /// `broker` and commits, which must abort: returns the abort's message.
    async fn publish_after<B: Broker>(
        &self,
        db: &TestResource,
        broker: &B,
        destination: &str,
    ) -> String {
        let tx = self.sdk.begin().await.expect("begin");
        tx.enlist(db).await.expect("enlist");
        tx.publish(broker, destination, b"never".to_vec())
            .await
            .expect("publish");
        commit_aborts(tx).await
    }
}

// --- NATS consumer side -----------------------------------------------------------------

/// Every message in `stream`, as `(subject, Nats-Msg-Id, payload)`.
async fn stream_messages(url: &str, stream: &str) -> Vec<(String, String, Vec<u8>)> {
    support::stream_messages(url, stream)
        .await
        .into_iter()
        .map(|m| (m.subject, m.message_id, m.payload))
        .collect()
}

/// A private nats-server (JetStream, its own port and store), killable.
async fn nats_server() -> Arc<NatsServer> {
    Arc::new(
        NatsServer::start()
            .await
            .expect("start a private nats-server"),
    )
}

/// A NATS resource named "nats" on the private `server`, stream `EVENTS` (subjects
/// `events.>`), staging in `store`.
async fn events_on(server: &NatsServer, store: &Arc<StagingStore>) -> NatsResource {
    NatsResource::connect(
        "nats",
        server.url(),
        "EVENTS",
        vec!["events.>".into()],
        store.clone(),
    )
    .await
    .expect("connect to NATS")
}

/// "rabbit" through `proxy` and "nats" on `server` ([`events_on`]), both staging in
/// `store` and registered with `sdk`.
async fn both_brokers(
    sdk: &TwoPc,
    proxy: &FaultProxy,
    server: &NatsServer,
    store: &Arc<StagingStore>,
) -> (Arc<RabbitResource>, Arc<NatsResource>) {
    let rabbit = RabbitResource::connect("rabbit", via(proxy), store.clone())
        .await
        .expect("connect");
    let rabbit = sdk.register(Arc::new(rabbit)).expect("register");
    let nats = sdk.register(Arc::new(events_on(server, store).await));
    (rabbit, nats.expect("register"))
}

/// SIGKILL (if it still runs) and start again on the same port and store.
fn restart(server: &NatsServer) {
    if server.is_running() {
        server.kill9().expect("kill nats-server");
    }
    server.start_again().expect("start nats-server again");
}

/// A proxy in front of the machine's RabbitMQ that can be cut.
async fn rabbit_proxy() -> Arc<FaultProxy> {
    let upstream = RABBIT_ADDR.parse().expect("RabbitMQ address");
    Arc::new(FaultProxy::start(upstream).await.expect("start a proxy"))
}

/// The AMQP URL through `proxy`.
fn via(proxy: &FaultProxy) -> String {
    format!("amqp://guest:guest@{}/%2f", proxy.listen_addr())
}

/// A URL of a port nothing listens on.
fn closed_rabbit_url() -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port())
}

fn ids(tx_id: &str, branch: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tx_id}:{branch}:{i}")).collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transaction_delivers_each_message_once_with_its_id() {
    bounded(TEST_TIMEOUT, async {
        let r = rig(Duration::from_secs(5)).await;
        let queue = unique_name("orders");
        let probe = RabbitProbe::new().await;

        let rabbit = r.register_rabbit("rabbit", RABBIT_URL).await;
        let db = r.register_db(Vote::Yes);

        let tx = r.sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        tx.enlist(&*db).await.expect("enlist db");
        let mut sent = Vec::new();
        for i in 0..3 {
            let payload = format!("{{\"order\":{i}}}").into_bytes();
            let id = tx
                .publish(&*rabbit, &queue, payload.clone())
                .await
                .expect("publish");
            sent.push((id, payload));
        }
        let opts = PublishOptions {
            headers: vec![("kind".into(), "OrderCreated".into())],
            content_type: Some("application/json".into()),
        };
        let id = tx
            .publish_with(&*rabbit, &queue, b"{\"order\":3}".to_vec(), opts)
            .await
            .expect("publish_with");
        sent.push((id, b"{\"order\":3}".to_vec()));
        assert_eq!(
            sent.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            ids(&tx_id, "svc:rabbit", 4)
        );

        let committed = tx.commit().await.expect("commit");
        assert!(committed.pending_branches.is_empty(), "{committed:?}");
        assert_eq!(db.commits.load(Ordering::SeqCst), 1);

        let got = probe.drain(&queue).await;
        assert_eq!(got.len(), 4, "{got:?}");
        for (g, (id, payload)) in got.iter().zip(&sent) {
            assert_eq!(&g.message_id, id);
            assert_eq!(&g.payload, payload);
            assert!(g.persistent, "delivery mode 2 expected");
        }
        assert_eq!(got[3].content_type.as_deref(), Some("application/json"));
        assert_eq!(
            got[3].headers,
            vec![("kind".to_string(), "OrderCreated".to_string())]
        );
        assert!(
            r.store.is_empty(),
            "staged copies must be removed: {:?}",
            r.store.list()
        );
        assert_eq!(rabbit.core().open_branches(), 0);
        assert_eq!(
            get_tx(&r.sdk, &tx_id).await.outcome,
            pb::Outcome::Committed as i32
        );

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_and_nats_branches_commit_together() {
    bounded(TEST_TIMEOUT, async {
        let r = rig(Duration::from_secs(5)).await;
        let queue = unique_name("orders");
        let stream = unique_name("events");
        let subject = format!("{stream}.order.created");
        let probe = RabbitProbe::new().await;

        let rabbit = r.register_rabbit("rabbit", RABBIT_URL).await;
        let nats = r.register_nats(&stream).await;

        let tx = r.sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let r0 = tx
            .publish(&*rabbit, &queue, b"to rabbit".to_vec())
            .await
            .expect("publish");
        let n0 = tx
            .publish(&*nats, &subject, b"to nats 0".to_vec())
            .await
            .expect("publish");
        let n1 = tx
            .publish(&*nats, &subject, b"to nats 1".to_vec())
            .await
            .expect("publish");
        assert_eq!(vec![n0.clone(), n1.clone()], ids(&tx_id, "svc:nats", 2));
        // A subject outside the stream is refused at once.
        let err = tx
            .publish(&*nats, "elsewhere.x", b"x".to_vec())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not captured"), "{err}");

        let committed = tx.commit().await.expect("commit");
        assert!(committed.pending_branches.is_empty(), "{committed:?}");

        let got = probe.drain(&queue).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message_id, r0);
        assert_eq!(got[0].payload, b"to rabbit");
        let msgs = stream_messages(NATS_URL, &stream).await;
        assert_eq!(
            msgs,
            vec![
                (subject.clone(), n0, b"to nats 0".to_vec()),
                (subject.clone(), n1, b"to nats 1".to_vec())
            ]
        );
        assert!(r.store.is_empty());

        probe.delete(&queue).await;
        delete_stream(NATS_URL, &stream).await;
        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_delivers_and_stages_nothing() {
    bounded(TEST_TIMEOUT, async {
        let r = rig(Duration::from_secs(5)).await;
        let queue = unique_name("orders");
        let stream = unique_name("events");
        let probe = RabbitProbe::new().await;
        probe.declare(&queue).await;

        let rabbit = r.register_rabbit("rabbit", RABBIT_URL).await;
        let nats = r.register_nats(&stream).await;

        let tx = r.sdk.begin().await.expect("begin");
        tx.publish(&*rabbit, &queue, b"never".to_vec())
            .await
            .expect("publish");
        tx.publish(&*nats, &format!("{stream}.x"), b"never".to_vec())
            .await
            .expect("publish");
        assert_eq!(rabbit.core().open_branches(), 1);
        tx.abort("changed my mind").await.expect("abort");

        // The coordinator's courtesy aborts drop the buffers.
        eventually(WAIT, "both buffers dropped", || async {
            rabbit.core().open_branches() == 0 && nats.core().open_branches() == 0
        })
        .await;
        assert!(r.store.is_empty());
        assert!(probe.drain(&queue).await.is_empty());
        assert!(stream_messages(NATS_URL, &stream).await.is_empty());

        probe.delete(&queue).await;
        delete_stream(NATS_URL, &stream).await;
        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_vote_aborts_and_drops_the_staged_batch() {
    bounded(TEST_TIMEOUT, async {
        let r = rig(Duration::from_secs(5)).await;
        let queue = unique_name("orders");
        let probe = RabbitProbe::new().await;
        probe.declare(&queue).await;

        let rabbit = r.register_rabbit("rabbit", RABBIT_URL).await;
        let db = r.register_db(Vote::No("constraint violated".into()));

        let msg = r.publish_after(&db, &*rabbit, &queue).await;
        assert!(msg.contains("constraint violated"), "{msg}");
        // The rabbit branch may have staged (voted yes) before the no arrived: the abort
        // that follows removes it.
        eventually(WAIT, "staged batch removed and buffer dropped", || async {
            r.store.is_empty() && rabbit.core().open_branches() == 0
        })
        .await;
        assert!(probe.drain(&queue).await.is_empty());

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_unreachable_at_prepare_aborts_naming_the_broker() {
    bounded(TEST_TIMEOUT, async {
        let r = rig(Duration::from_secs(5)).await;
        let queue = unique_name("orders");

        let url = closed_rabbit_url();
        assert!(
            RabbitResource::connect("eager", url.clone(), r.store.clone())
                .await
                .is_err()
        );
        let rabbit = r.register_lazy_rabbit("rabbit", url);
        let db = r.register_db(Vote::Yes);

        let msg = r.publish_after(&db, &*rabbit, &queue).await;
        assert!(
            msg.contains("svc:rabbit"),
            "the message names the branch: {msg}"
        );
        assert!(msg.contains("broker unreachable"), "{msg}");
        assert!(!msg.contains("guest:guest"), "credentials leak: {msg}");
        assert!(r.store.is_empty());
        eventually(WAIT, "db branch aborted", || async {
            db.aborts.load(Ordering::SeqCst) == 1
        })
        .await;
        eventually(WAIT, "buffer dropped", || async {
            rabbit.core().open_branches() == 0
        })
        .await;

        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_at_prepare_aborts_naming_the_broker() {
    bounded(TEST_TIMEOUT, async {
        let server = nats_server().await;
        let r = rig(Duration::from_secs(5)).await;

        let nats = r.sdk.register(Arc::new(events_on(&server, &r.store).await));
        let nats = nats.expect("register");
        let db = r.register_db(Vote::Yes);

        server.kill9().expect("kill nats-server");
        eventually(WAIT, "the client notices", || async {
            nats.client().connection_state() != async_nats::connection::State::Connected
        })
        .await;

        let msg = r.publish_after(&db, &*nats, "events.order").await;
        assert!(
            msg.contains("svc:nats"),
            "the message names the branch: {msg}"
        );
        assert!(msg.contains("broker unreachable"), "{msg}");
        assert!(r.store.is_empty());
        eventually(WAIT, "buffer dropped", || async {
            nats.core().open_branches() == 0
        })
        .await;

        // Back up: the next transaction goes through, and nothing of the first shows up.
        restart(&server);
        eventually(WAIT, "the client reconnects", || async {
            nats.client().connection_state() == async_nats::connection::State::Connected
        })
        .await;
        let tx = r.sdk.begin().await.expect("begin");
        tx.enlist(&*db).await.expect("enlist");
        let id = tx
            .publish(&*nats, "events.order", b"later".to_vec())
            .await
            .expect("publish");
        tx.commit().await.expect("commit");
        assert_eq!(
            stream_messages(&server.url(), "EVENTS").await,
            vec![("events.order".into(), id, b"later".to_vec())]
        );

        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_at_commit_makes_the_commit_late_not_lost() {
    bounded(TEST_TIMEOUT, async {
        let server = nats_server().await;
        let r = rig(Duration::from_millis(1500)).await;
        let (sdk, store) = (&r.sdk, &r.store);

        let nats = sdk.register(Arc::new(events_on(&server, store).await));
        let nats = nats.expect("register");
        // The database tier commits first: its hook kills NATS after every prepare.
        let killer = server.clone();
        let db = sdk
            .register(TestResource::with_hook("db", move || {
                let _ = killer.kill9();
            }))
            .expect("register");

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        tx.enlist(&*db).await.expect("enlist");
        let a = tx
            .publish(&*nats, "events.order", b"a".to_vec())
            .await
            .expect("publish");
        let b = tx
            .publish(&*nats, "events.mail", b"b".to_vec())
            .await
            .expect("publish");
        let committed = tx.commit().await.expect("the decision is commit");
        assert_eq!(committed.pending_branches, vec!["svc:nats".to_string()]);
        assert_eq!(
            store.list().expect("list"),
            vec![(tx_id.clone(), "svc:nats".to_string())]
        );

        restart(&server);
        r.late_commit_finishes(&tx_id).await;
        assert_eq!(
            stream_messages(&server.url(), "EVENTS").await,
            vec![
                ("events.order".into(), a, b"a".to_vec()),
                ("events.mail".into(), b, b"b".to_vec())
            ]
        );
        assert_eq!(nats.core().open_branches(), 0);

        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_down_at_commit_makes_the_commit_late_not_lost() {
    bounded(TEST_TIMEOUT, async {
        let proxy = rabbit_proxy().await;
        let r = rig(Duration::from_millis(1500)).await;
        let (sdk, store) = (&r.sdk, &r.store);
        let queue = unique_name("orders");
        let probe = RabbitProbe::new().await;

        let rabbit = r.register_rabbit("rabbit", &via(&proxy)).await;
        let cutter = proxy.clone();
        let db = sdk
            .register(TestResource::with_hook("db", move || cutter.cut()))
            .expect("register");

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        tx.enlist(&*db).await.expect("enlist");
        let a = tx
            .publish(&*rabbit, &queue, b"a".to_vec())
            .await
            .expect("publish");
        let b = tx
            .publish(&*rabbit, &queue, b"b".to_vec())
            .await
            .expect("publish");
        let committed = tx.commit().await.expect("the decision is commit");
        assert_eq!(committed.pending_branches, vec!["svc:rabbit".to_string()]);
        assert_eq!(store.len(), 1);
        assert!(
            probe.drain(&queue).await.is_empty(),
            "nothing may pass while the broker is cut off"
        );

        proxy.restore();
        r.late_commit_finishes(&tx_id).await;
        assert_eq!(
            ids_and_payloads(probe.drain(&queue).await),
            vec![(a, b"a".to_vec()), (b, b"b".to_vec())],
            "exactly once each"
        );

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_messages_survive_a_participant_restart_and_recovery_publishes_them() {
    bounded(TEST_TIMEOUT, async {
        let server = nats_server().await;
        let proxy = rabbit_proxy().await;
        let coord = Coordinator::start(quick_retries()).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let queue = unique_name("orders");
        let probe = RabbitProbe::new().await;

        // First life: both brokers go down after prepare; the decision is COMMIT.
        let (tx_id, rabbit_id, nats_id) = {
            let store = staging(dir.path());
            let sdk = sdk(&coord, Duration::from_millis(1000)).await;
            let (rabbit, nats) = both_brokers(&sdk, &proxy, &server, &store).await;
            let (s, p) = (server.clone(), proxy.clone());
            let db = sdk
                .register(TestResource::with_hook("db", move || {
                    let _ = s.kill9();
                    p.cut();
                }))
                .expect("register");

            let tx = sdk.begin().await.expect("begin");
            let tx_id = tx.id().to_string();
            tx.enlist(&*db).await.expect("enlist");
            let rabbit_id = tx
                .publish(&*rabbit, &queue, b"row 1 created".to_vec())
                .await
                .expect("publish");
            let nats_id = tx
                .publish(&*nats, "events.row", b"row 1 created".to_vec())
                .await
                .expect("publish");
            let committed = tx.commit().await.expect("the decision is commit");
            assert_eq!(committed.pending_branches.len(), 2, "{committed:?}");
            let mut staged = store.list().expect("list");
            staged.sort();
            assert_eq!(
                staged,
                vec![
                    (tx_id.clone(), "svc:nats".into()),
                    (tx_id.clone(), "svc:rabbit".into())
                ]
            );
            sdk.shutdown().await;
            (tx_id, rabbit_id, nats_id)
        };

        // The brokers come back, the participant starts again on the same data directory
        // (on another port: the coordinator cannot reach it, only recovery can finish).
        restart(&server);
        proxy.restore();
        let store = reopen_staging(dir.path(), WAIT.limit).await;
        assert_eq!(store.len(), 2, "staged batches survive the restart");
        let sdk = sdk(&coord, Duration::from_millis(1000)).await;
        let (rabbit, nats) = both_brokers(&sdk, &proxy, &server, &store).await;
        let mut in_doubt = rabbit.in_doubt().await.expect("in doubt");
        in_doubt.extend(nats.in_doubt().await.expect("in doubt"));
        assert_eq!(
            in_doubt,
            vec![
                (tx_id.clone(), "svc:rabbit".into()),
                (tx_id.clone(), "svc:nats".into())
            ]
        );

        assert_eq!(
            get_tx(&sdk, &tx_id).await.outcome,
            pb::Outcome::Committed as i32
        );
        assert_eq!(sdk.recover_now().await, 2);
        assert!(store.is_empty());
        assert_eq!(sdk.recover_now().await, 0, "nothing left in doubt");

        assert_eq!(
            ids_and_payloads(probe.drain(&queue).await),
            vec![(rabbit_id, b"row 1 created".to_vec())]
        );
        assert_eq!(
            stream_messages(&server.url(), "EVENTS").await,
            vec![("events.row".into(), nats_id, b"row 1 created".to_vec())]
        );

        probe.delete(&queue).await;
        sdk.shutdown().await;
        coord.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_broker_branch_commits_in_one_phase_or_is_refused() {
    bounded(TEST_TIMEOUT, async {
        let r = rig(Duration::from_secs(5)).await;
        let (sdk, store) = (&r.sdk, &r.store);
        let queue = unique_name("orders");
        let probe = RabbitProbe::new().await;
        probe.declare(&queue).await;

        let rabbit = r.register_rabbit("rabbit", RABBIT_URL).await;
        let down = r.register_lazy_rabbit("down", closed_rabbit_url());

        let tx = sdk.begin().await.expect("begin");
        let syncs = store.syncs();
        let id = tx
            .publish(&*rabbit, &queue, b"one phase".to_vec())
            .await
            .expect("publish");
        tx.commit().await.expect("commit");
        assert_eq!(store.syncs(), syncs, "a one-phase commit stages nothing");
        assert_eq!(
            ids_and_payloads(probe.drain(&queue).await),
            vec![(id, b"one phase".to_vec())]
        );
        assert_eq!(rabbit.core().open_branches(), 0);

        let tx = sdk.begin().await.expect("begin");
        tx.publish(&*down, &queue, b"never".to_vec())
            .await
            .expect("publish");
        let msg = commit_aborts(tx).await;
        assert!(msg.contains("broker unreachable"), "{msg}");
        assert!(probe.drain(&queue).await.is_empty());
        assert!(store.is_empty());

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_after_commit_started_is_refused_and_reprepare_is_idempotent() {
    bounded(TEST_TIMEOUT, async {
        let (_dir, store, stream, nats) = lone_nats("events").await;
        let core = nats.core();
        let subject = format!("{stream}.x");
        core.buffer(
            "tx-1",
            "svc:nats",
            &subject,
            b"m".to_vec(),
            PublishOptions::default(),
        )
        .expect("buffer");
        assert_eq!(nats.prepare("tx-1", "svc:nats").await, Vote::Yes);
        assert_eq!(
            nats.prepare("tx-1", "svc:nats").await,
            Vote::Yes,
            "a repeated prepare gives the same vote"
        );
        let err = core
            .buffer(
                "tx-1",
                "svc:nats",
                &subject,
                b"late".to_vec(),
                PublishOptions::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("already being committed"), "{err}");
        // Unknown here (e.g. lost in a restart before prepare): a safe no.
        assert!(matches!(
            nats.prepare("tx-2", "svc:nats").await,
            Vote::No(_)
        ));
        // An abort drops a buffer.
        core.buffer(
            "tx-3",
            "svc:nats",
            &subject,
            b"m".to_vec(),
            PublishOptions::default(),
        )
        .expect("buffer");
        assert_eq!(
            nats.abort("tx-3", "svc:nats").await,
            Ok(AbortOutcome::Aborted)
        );
        assert_eq!(core.buffered("tx-3", "svc:nats"), 0);
        nats.commit("tx-1", "svc:nats").await.expect("commit");
        nats.commit("tx-1", "svc:nats")
            .await
            .expect("a repeated commit is a success");
        assert!(store.is_empty());
        let msgs = stream_messages(NATS_URL, &stream).await;
        assert_eq!(
            msgs,
            vec![(
                subject.clone(),
                "tx-1:svc:nats:0".to_string(),
                b"m".to_vec()
            )]
        );
        delete_stream(NATS_URL, &stream).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_staging_sync_votes_no() {
    bounded(TEST_TIMEOUT, async {
        let fail = Arc::new(AtomicBool::new(false));
        let open = |dir: &Path| {
            let options = StagingOptions {
                fail_syncs: Some(fail.clone()),
            };
            let store = StagingStore::open_with(dir, options);
            Arc::new(store.expect("open the staging store"))
        };
        let coord = Coordinator::start(quick_retries()).await;
        let r = Rig::start_with(coord, Duration::from_secs(5), open).await;
        let queue = unique_name("orders");
        let probe = RabbitProbe::new().await;
        probe.declare(&queue).await;
        let rabbit = r.register_rabbit("rabbit", RABBIT_URL).await;
        let db = r.register_db(Vote::Yes);

        fail.store(true, Ordering::SeqCst);
        let msg = r.publish_after(&db, &*rabbit, &queue).await;
        assert!(
            msg.contains("svc:rabbit") && msg.contains("cannot stage"),
            "{msg}"
        );
        assert!(r.store.is_failed(), "a failed sync poisons the store");
        eventually(WAIT, "buffer dropped", || async {
            rabbit.core().open_branches() == 0
        })
        .await;
        assert!(probe.drain(&queue).await.is_empty());

        probe.delete(&queue).await;
        r.stop().await;
    })
    .await;
}

/// An abort answers what became of a broker branch: a branch committed in one phase
/// (its messages published) is `AlreadyCommitted` and keeps its messages, also when asked
/// again; a buffered branch, a prepared one and an unknown one are `Aborted`. (A
/// restarted coordinator settles a one-phase commit with an abort and trusts the answer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_says_whether_the_broker_branch_had_committed_in_one_phase() {
    bounded(TEST_TIMEOUT, async {
        let (_dir, store, stream, nats) = lone_nats("abortres").await;
        let core = nats.core();
        let subject = format!("{stream}.x");
        let buffer = |tx: &str| buffer_in(core, &subject, tx);

        buffer("tx-1");
        assert_eq!(
            nats.commit_one_phase("tx-1", "svc:nats").await,
            Ok(OnePhase::Committed)
        );
        for _ in 0..2 {
            assert_eq!(
                nats.abort("tx-1", "svc:nats").await,
                Ok(AbortOutcome::AlreadyCommitted),
                "a branch committed in one phase is reported committed"
            );
        }
        assert_eq!(
            nats.commit_one_phase("tx-1", "svc:nats").await,
            Ok(OnePhase::Committed),
            "the abort undid nothing"
        );

        buffer("tx-2");
        assert_eq!(
            nats.abort("tx-2", "svc:nats").await,
            Ok(AbortOutcome::Aborted)
        );
        buffer("tx-3");
        assert_eq!(nats.prepare("tx-3", "svc:nats").await, Vote::Yes);
        assert_eq!(
            nats.abort("tx-3", "svc:nats").await,
            Ok(AbortOutcome::Aborted)
        );
        assert!(store.is_empty(), "the abort dropped the staged batch");
        assert_eq!(
            nats.abort("tx-unknown", "svc:nats").await,
            Ok(AbortOutcome::Aborted)
        );

        let msgs = stream_messages(NATS_URL, &stream).await;
        assert_eq!(
            msgs,
            vec![(
                subject.clone(),
                "tx-1:svc:nats:0".to_string(),
                b"tx-1".to_vec()
            )],
            "only the one-phase commit published"
        );
        delete_stream(NATS_URL, &stream).await;
    })
    .await;
}

/// A NATS resource [`nats_on`] a stream of its own (named after `prefix`), with no SDK:
/// the staging directory, its store, the stream's name and the resource.
async fn lone_nats(prefix: &str) -> (tempfile::TempDir, Arc<StagingStore>, String, NatsResource) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = staging(dir.path());
    let stream = unique_name(prefix);
    let nats = nats_on(&stream, &store).await;
    (dir, store, stream, nats)
}

/// Buffers one message (its payload the transaction id) in branch `svc:nats` of `tx`.
fn buffer_in(core: &BrokerCore, subject: &str, tx: &str) {
    core.buffer(
        tx,
        "svc:nats",
        subject,
        tx.as_bytes().to_vec(),
        PublishOptions::default(),
    )
    .expect("buffer");
}

/// A branch committed in two phases is remembered too (a late prepare votes yes, a late
/// abort answers AlreadyCommitted), but apart from the one-phase outcomes: ordinary
/// commits never push out the outcome a restarted coordinator may still ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_commits_are_remembered_without_pushing_out_one_phase_outcomes() {
    bounded(TEST_TIMEOUT, async {
        let (_dir, store, stream, nats) = lone_nats("remember").await;
        let nats = nats.with_options(BrokerOptions {
            remembered_outcomes: 1,
            ..BrokerOptions::default()
        });
        let core = nats.core();
        let subject = format!("{stream}.x");
        let buffer = |tx: &str| buffer_in(core, &subject, tx);

        buffer("one");
        assert_eq!(
            nats.commit_one_phase("one", "svc:nats").await,
            Ok(OnePhase::Committed)
        );
        for tx in ["two-a", "two-b"] {
            buffer(tx);
            assert_eq!(nats.prepare(tx, "svc:nats").await, Vote::Yes);
            assert_eq!(nats.commit(tx, "svc:nats").await, Ok(()));
        }
        assert_eq!(
            nats.abort("one", "svc:nats").await,
            Ok(AbortOutcome::AlreadyCommitted),
            "two later two-phase commits pushed out the one-phase outcome"
        );
        assert_eq!(nats.prepare("two-b", "svc:nats").await, Vote::Yes);
        assert_eq!(
            nats.abort("two-b", "svc:nats").await,
            Ok(AbortOutcome::AlreadyCommitted)
        );
        // A message published into a committed branch is dropped by a late prepare.
        buffer("two-b");
        assert_eq!(nats.prepare("two-b", "svc:nats").await, Vote::Yes);
        assert!(store.is_empty(), "nothing staged after the late prepare");
        assert_eq!(
            stream_messages(NATS_URL, &stream).await.len(),
            3,
            "one message per commit, none from the late prepare"
        );
        delete_stream(NATS_URL, &stream).await;
    })
    .await;
}
