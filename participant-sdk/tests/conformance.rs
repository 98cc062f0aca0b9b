//! Every [`Resource`] adapter against the conformance suite of the contract
//! (`support/conformance.rs`; the contract is the "# Contract" of `src/resource.rs`), on
//! the real services:
//!
//! * PostgreSQL ([`PgResource`]): the binary's private cluster (testkit `PgCluster`, with
//!   `max_prepared_transactions` > 0, which the system server at 5432 does not have), a
//!   fresh database per test; once plain (`Postgres<false>`) and once with the outbox
//!   enabled (`Postgres<true>`), which adds the durable one-phase marker;
//! * RabbitMQ ([`RabbitResource`]): the system server at 127.0.0.1:5672, a unique queue
//!   and staging directory per test;
//! * NATS JetStream ([`NatsResource`]): the system server at 127.0.0.1:4222, a unique
//!   stream and staging directory per test.
//!
//! Each fixture below is all an adapter needs to run the suite; a new adapter (Kafka,
//! MariaDB XA) adds its own and one `conformance_tests!` line at the bottom. Where an
//! adapter legitimately differs from another, its [`Promises`] say so, citing its docs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use twopc_participant::{
    Broker, NatsResource, OutboxOptions, PgResource, RabbitResource, Resource, Transaction, TwoPc,
};
use twopc_testkit::unique_name;

mod support;
use support::conformance::{Branch, EmptyBranch, Fixture, Promises};
use support::{
    connect, database, delete_stream, nats_on, reopen_staging, resource, staging, stream_messages,
    Got, RabbitProbe, NATS_URL, RABBIT_URL,
};

/// Bound of reopening a staging store (waiting for the old one to be dropped) and of
/// each RabbitMQ probe operation.
const REOPEN: Duration = Duration::from_secs(10);

/// The messages of `branch` among `message_ids`: broker message ids are
/// `<tx_id>:<branch_id>:<index>`.
fn of_branch<'a>(message_ids: impl Iterator<Item = &'a str>, branch: &Branch) -> usize {
    let prefix = format!("{}:{}:", branch.tx_id, branch.branch_id);
    message_ids.filter(|id| id.starts_with(&prefix)).count()
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/// A database with a table `effects (tx_id)`: a branch's write is one row holding its
/// transaction id. With `OUTBOX`, the resource has the outbox enabled (its broker is
/// never published to: what matters here is the one-phase marker the outbox adds).
struct Postgres<const OUTBOX: bool> {
    /// The database (unique per test).
    url: String,
    /// The resource under test; `None` only while restarting.
    db: Option<Arc<PgResource>>,
    /// The outbox's broker (kept across a restart: the marker lives in the database) and
    /// its staging directory.
    outbox: Option<(Arc<RabbitResource>, TempDir)>,
}

impl<const OUTBOX: bool> Postgres<OUTBOX> {
    fn db(&self) -> &Arc<PgResource> {
        self.db.as_ref().expect("the resource is open")
    }

    /// A resource "db" over the database, with the outbox if `OUTBOX` (the sweep never
    /// runs during a test).
    async fn open(&self) -> Arc<PgResource> {
        let db = resource("db", &self.url).await;
        if let Some((broker, _)) = &self.outbox {
            let options = OutboxOptions {
                sweep_interval: Duration::from_secs(3600),
                sweep_after: Duration::from_secs(3600),
                ..OutboxOptions::default()
            };
            db.enable_outbox(broker.clone(), options)
                .await
                .expect("enable the outbox");
        }
        db
    }
}

#[tonic::async_trait]
impl<const OUTBOX: bool> Fixture for Postgres<OUTBOX> {
    const PROMISES: Promises = Promises {
        // postgres/mod.rs, "Votes": read-only when no transaction id was assigned.
        empty_branch: EmptyBranch::ReadOnly,
        // "Limits": only the outbox's marker tells a fresh resource about a one-phase
        // commit; without it an abort after a restart answers Aborted.
        one_phase_survives_restart: OUTBOX,
    };

    async fn start(sdk: &TwoPc) -> Self {
        let url = database("conf", "CREATE TABLE effects (tx_id text NOT NULL)").await;
        let outbox = if OUTBOX {
            let dir = tempfile::tempdir().expect("temp dir");
            let broker = RabbitResource::connect_lazy("outbox", RABBIT_URL, staging(dir.path()))
                .expect("the outbox's broker");
            Some((Arc::new(broker), dir))
        } else {
            None
        };
        let mut fixture = Postgres {
            url,
            db: None,
            outbox,
        };
        let db = fixture.open().await;
        fixture.db = Some(sdk.register(db).expect("register the resource"));
        fixture
    }

    fn resource(&self) -> Arc<dyn Resource> {
        self.db().clone()
    }

    async fn write(&self, tx: &Transaction) -> Branch {
        let branch = self.db().begin(tx).await.expect("open the branch");
        branch
            .execute("INSERT INTO effects (tx_id) VALUES ($1)", &[&tx.id()])
            .await
            .expect("insert the row");
        Branch::of(tx, &**self.db())
    }

    async fn open_without_work(&self, tx: &Transaction) -> Branch {
        let branch = self.db().begin(tx).await.expect("open the branch");
        branch
            .query("SELECT count(*) FROM effects", &[])
            .await
            .expect("read");
        Branch::of(tx, &**self.db())
    }

    async fn effects(&self, branch: &Branch) -> usize {
        let n: i64 = connect(&self.url)
            .await
            .query_one(
                "SELECT count(*) FROM effects WHERE tx_id = $1",
                &[&branch.tx_id],
            )
            .await
            .expect("count the rows")
            .get(0);
        usize::try_from(n).expect("a count")
    }

    async fn restart(&mut self) {
        // Dropping the old resource closes its open branches' connections (rolling their
        // work back), as a process exit would.
        self.db = None;
        self.db = Some(self.open().await);
    }

    async fn clean_up(&self) {}
}

// ---------------------------------------------------------------------------------------
// Brokers (both fixtures)
// ---------------------------------------------------------------------------------------

/// A broker resource under test; empty only while restarting.
struct Open<B>(Option<Arc<B>>);

impl<B: Broker + 'static> Open<B> {
    fn get(&self) -> &B {
        self.0.as_deref().expect("the resource is open")
    }

    fn resource(&self) -> Arc<dyn Resource> {
        self.0.clone().expect("the resource is open")
    }

    /// A branch's write: one message to `destination` holding the transaction id.
    async fn write(&self, tx: &Transaction, destination: &str) -> Branch {
        tx.publish(self.get(), destination, tx.id().as_bytes().to_vec())
            .await
            .expect("publish");
        Branch::of(tx, self.get())
    }

    /// The branch of `tx`, enlisted without a message.
    async fn open_without_work(&self, tx: &Transaction) -> Branch {
        tx.enlist(self.get()).await.expect("enlist");
        Branch::of(tx, self.get())
    }
}

// ---------------------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------------------

/// A unique durable queue; a branch's write is one message to it. Messages are drained
/// as they are looked at and kept in `seen`.
struct Rabbit {
    broker: Open<RabbitResource>,
    queue: String,
    probe: RabbitProbe,
    /// Every message drained from the queue so far.
    seen: Mutex<Vec<Got>>,
    /// The staging directory (declared last: removed after the store is closed).
    dir: TempDir,
}

#[tonic::async_trait]
impl Fixture for Rabbit {
    const PROMISES: Promises = Promises {
        // broker.rs, "Known limits": a branch enlisted without a message votes no.
        empty_branch: EmptyBranch::VotesNo,
        // broker.rs: one-phase outcomes are remembered in memory only.
        one_phase_survives_restart: false,
    };

    async fn start(sdk: &TwoPc) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = RabbitResource::connect("rabbit", RABBIT_URL, staging(dir.path()))
            .await
            .expect("connect to RabbitMQ");
        let broker = sdk.register(Arc::new(broker)).expect("register");
        let queue = unique_name("conformance");
        let probe = RabbitProbe::bounded(REOPEN).await;
        probe.declare(&queue).await;
        Rabbit {
            broker: Open(Some(broker)),
            queue,
            probe,
            seen: Mutex::new(Vec::new()),
            dir,
        }
    }

    fn resource(&self) -> Arc<dyn Resource> {
        self.broker.resource()
    }

    async fn write(&self, tx: &Transaction) -> Branch {
        self.broker.write(tx, &self.queue).await
    }

    async fn open_without_work(&self, tx: &Transaction) -> Branch {
        self.broker.open_without_work(tx).await
    }

    async fn effects(&self, branch: &Branch) -> usize {
        let new = self.probe.drain(&self.queue).await;
        let mut seen = self.seen.lock().expect("seen");
        seen.extend(new);
        of_branch(seen.iter().map(|m| m.message_id.as_str()), branch)
    }

    async fn restart(&mut self) {
        self.broker = Open(None);
        let store = reopen_staging(self.dir.path(), REOPEN).await;
        let broker = RabbitResource::connect("rabbit", RABBIT_URL, store)
            .await
            .expect("connect to RabbitMQ");
        self.broker = Open(Some(Arc::new(broker)));
    }

    async fn clean_up(&self) {
        self.probe.delete(&self.queue).await;
    }
}

// ---------------------------------------------------------------------------------------
// NATS JetStream
// ---------------------------------------------------------------------------------------

/// A unique stream (subjects `<stream>.>`); a branch's write is one message to
/// `<stream>.effects`.
struct Nats {
    broker: Open<NatsResource>,
    stream: String,
    /// The staging directory (declared last: removed after the store is closed).
    dir: TempDir,
}

#[tonic::async_trait]
impl Fixture for Nats {
    // The same broker core as RabbitMQ (broker.rs), so the same promises.
    const PROMISES: Promises = Rabbit::PROMISES;

    async fn start(sdk: &TwoPc) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let stream = unique_name("conformance");
        let broker = nats_on(&stream, &staging(dir.path())).await;
        let broker = sdk.register(Arc::new(broker)).expect("register");
        Nats {
            broker: Open(Some(broker)),
            stream,
            dir,
        }
    }

    fn resource(&self) -> Arc<dyn Resource> {
        self.broker.resource()
    }

    async fn write(&self, tx: &Transaction) -> Branch {
        let subject = format!("{}.effects", self.stream);
        self.broker.write(tx, &subject).await
    }

    async fn open_without_work(&self, tx: &Transaction) -> Branch {
        self.broker.open_without_work(tx).await
    }

    async fn effects(&self, branch: &Branch) -> usize {
        let stored = stream_messages(NATS_URL, &self.stream).await;
        of_branch(stored.iter().map(|m| m.message_id.as_str()), branch)
    }

    async fn restart(&mut self) {
        self.broker = Open(None);
        let store = reopen_staging(self.dir.path(), REOPEN).await;
        self.broker = Open(Some(Arc::new(nats_on(&self.stream, &store).await)));
    }

    async fn clean_up(&self) {
        delete_stream(NATS_URL, &self.stream).await;
    }
}

// ---------------------------------------------------------------------------------------
// The tests: every check of the suite, for every adapter
// ---------------------------------------------------------------------------------------

conformance_tests!(postgres, Postgres<false>);
conformance_tests!(postgres_outbox, Postgres<true>);
conformance_tests!(rabbitmq, Rabbit);
conformance_tests!(nats, Nats);
