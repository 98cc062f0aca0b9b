//! The PostgreSQL adapter against a real private PostgreSQL cluster (testkit
//! [`PgCluster`], one per test binary, a fresh database per test) and a real in-process
//! coordinator (one per test, on `127.0.0.1:0` with a temp data directory).
//!
//! Every test is bounded ([`bounded`]); waiting for asynchronous effects polls with a
//! deadline ([`eventually`]) instead of sleeping.

use std::sync::Arc;
use std::time::Duration;

use twopc_coordinator::config::ServeConfig;
use twopc_participant::{dedup, AbortOutcome, Error, OnePhase, PgResource, Resource, TwoPc, Vote};
use twopc_proto::v1 as pb;
use twopc_testkit::PgCluster;

mod support;
use support::{
    bounded, connect, count, crashing_a_beside_b, database, database_on, eventually, execute_in,
    get_tx, prepared_gids, quick_retries, resource, sdk_of, Coordinator, Wait, ORDERS,
};

/// Bound on every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound of one wait for an asynchronous effect, polled every 20 ms.
const WAIT: Wait = Wait {
    limit: Duration::from_secs(10),
    every: Duration::from_millis(20),
};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// An in-process coordinator (quick phase-two retries); stopped on drop.
async fn coordinator() -> Coordinator {
    Coordinator::start(ServeConfig {
        retry_max_ms: 200,
        rpc_timeout_ms: 5_000,
        commit_wait_ms: 10_000,
        ..quick_retries()
    })
    .await
}

/// A fresh database (named after `prefix`, with the `orders` table) registered as
/// resource "db" of `sdk`: its URL and the resource.
async fn one_database(sdk: &TwoPc, prefix: &str) -> (String, Arc<PgResource>) {
    let url = database(prefix, ORDERS).await;
    let db = sdk.register(resource("db", &url).await).expect("register");
    (url, db)
}

/// A participant SDK handle of service "orders" (recovery only when asked).
async fn sdk(coord: &Coordinator) -> TwoPc {
    sdk_of(coord, "orders", None).await
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Two databases (`pga` set up with `setup_a`, `pgb` with `setup_b`) registered as
/// resources `db-a` and `db-b` of `sdk`: their URLs and resources.
async fn two_databases(
    sdk: &TwoPc,
    setup_a: &str,
    setup_b: &str,
) -> (String, String, Arc<PgResource>, Arc<PgResource>) {
    let (url_a, url_b) = (
        database("pga", setup_a).await,
        database("pgb", setup_b).await,
    );
    let a = sdk
        .register(resource("db-a", &url_a).await)
        .expect("register db-a");
    let b = sdk
        .register(resource("db-b", &url_b).await)
        .expect("register db-b");
    (url_a, url_b, a, b)
}

/// `err` is the abort of a two-database transaction whose message names every needle,
/// and the other database's prepared branch (at `url_b`) is rolled back.
async fn aborted_and_rolled_back(err: Error, needles: &[&str], url_b: &str) {
    let msg = err.to_string();
    assert!(matches!(err, Error::Aborted(_)), "{msg}");
    for needle in needles {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    eventually(WAIT, "b's prepared branch is rolled back", || async {
        prepared_gids(url_b).await == 0
    })
    .await;
}

#[tokio::test]
async fn a_two_branch_transaction_commits_both_and_leaves_no_prepared_gid() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url_a, url_b, a, b) = two_databases(&sdk, ORDERS, ORDERS).await;

        let tx = sdk.begin().await.expect("begin");
        let branch_a = tx.postgres(&a).await.expect("branch a");
        assert_eq!(
            branch_a
                .execute("INSERT INTO orders VALUES (1, 'book')", &[])
                .await
                .expect("insert a"),
            1
        );
        let branch_b = b.begin(&tx).await.expect("branch b");
        branch_b
            .execute("INSERT INTO orders VALUES ($1, $2)", &[&1i32, &"book"])
            .await
            .expect("insert b");
        // A second begin is the same branch (it sees the uncommitted row).
        let again = a.begin(&tx).await.expect("same branch");
        assert_eq!(again.gid(), branch_a.gid());
        assert_eq!(again.branch_id(), "orders:db-a");
        assert!(
            branch_a.gid().starts_with("twopc:") && branch_a.gid().ends_with(":orders:db-a"),
            "{}",
            branch_a.gid()
        );
        let n: i64 = again
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 1);
        // Ending the block behind the SDK's back is refused.
        let err = branch_a
            .execute("COMMIT", &[])
            .await
            .expect_err("COMMIT is refused");
        assert!(matches!(err, Error::Usage(_)), "{err}");

        let committed = tx.commit().await.expect("commit");
        assert!(committed.pending_branches.is_empty(), "{committed:?}");
        for url in [&url_a, &url_b] {
            assert_eq!(
                count(url, "SELECT count(*) FROM orders WHERE item = 'book'").await,
                1
            );
            assert_eq!(prepared_gids(url).await, 0);
        }
        assert_eq!(a.prepared_count().await.expect("prepared count"), 0);
        assert_eq!(a.oldest_prepared_age().await.expect("oldest age"), None);
        let err = branch_a
            .execute("INSERT INTO orders VALUES (2, 'pen')", &[])
            .await
            .expect_err("branch is finished");
        assert!(
            matches!(err, Error::Usage(ref m) if m.contains("committed")),
            "{err}"
        );
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_failed_insert_reaches_the_app_and_its_abort_commits_nothing() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let setup_a = format!("{ORDERS}; INSERT INTO orders VALUES (1, 'existing')");
        let (url_a, url_b, a, b) = two_databases(&sdk, &setup_a, ORDERS).await;

        let tx = sdk.begin().await.expect("begin");
        let branch_b = tx.postgres(&b).await.expect("branch b");
        branch_b.execute("INSERT INTO orders VALUES (1, 'new')", &[]).await.expect("insert b");
        let branch_a = tx.postgres(&a).await.expect("branch a");
        let err = branch_a.execute("INSERT INTO orders VALUES (1, 'new')", &[]).await.expect_err("duplicate key");
        let msg = err.to_string();
        assert!(msg.contains("db-a") && msg.contains("duplicate key") && msg.contains("23505"), "{msg}");
        tx.abort("insert failed").await.expect("abort");

        // The coordinator's abort reaches both open branches: their statements are refused.
        for branch in [&branch_a, &branch_b] {
            eventually(WAIT, "the branch is rolled back", || async {
                matches!(branch.execute("SELECT 1", &[]).await, Err(Error::Usage(ref m)) if m.contains("aborted"))
            })
            .await;
        }
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 0);
        assert_eq!(prepared_gids(&url_a).await + prepared_gids(&url_b).await, 0);
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn committing_after_a_failed_statement_aborts_with_its_message() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let setup_a = format!("{ORDERS}; INSERT INTO orders VALUES (1, 'existing')");
        let (url_a, url_b, a, b) = two_databases(&sdk, &setup_a, ORDERS).await;

        let tx = sdk.begin().await.expect("begin");
        tx.postgres(&b)
            .await
            .expect("branch b")
            .execute("INSERT INTO orders VALUES (1, 'new')", &[])
            .await
            .expect("b");
        let branch_a = tx.postgres(&a).await.expect("branch a");
        assert!(branch_a
            .execute("INSERT INTO orders VALUES (1, 'new')", &[])
            .await
            .is_err());
        // The application ignores the error and commits anyway: the branch votes no.
        let err = tx.commit().await.expect_err("aborted");
        aborted_and_rolled_back(err, &["duplicate key", "23505"], &url_b).await;
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 0);
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 1);
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_deferred_constraint_violation_refuses_prepare_and_aborts_everything() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let setup_a = "CREATE TABLE codes (code text, CONSTRAINT codes_unique UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)";
        let (url_a, url_b, a, b) = two_databases(&sdk, setup_a, ORDERS).await;

        let tx = sdk.begin().await.expect("begin");
        let branch_a = tx.postgres(&a).await.expect("branch a");
        // Both inserts succeed: the check is deferred to the end of the transaction.
        branch_a.execute("INSERT INTO codes VALUES ('x')", &[]).await.expect("first");
        branch_a.execute("INSERT INTO codes VALUES ('x')", &[]).await.expect("second (deferred check)");
        tx.postgres(&b).await.expect("branch b").execute("INSERT INTO orders VALUES (1, 'x')", &[]).await.expect("b");

        let err = tx.commit().await.expect_err("PREPARE refused");
        aborted_and_rolled_back(err, &["orders:db-a", "codes_unique", "23505"], &url_b).await;
        assert_eq!(count(&url_a, "SELECT count(*) FROM codes").await, 0);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 0);
        assert_eq!(prepared_gids(&url_a).await, 0);
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_temp_table_cannot_be_prepared_and_the_vote_says_so() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url_a, url_b, a, b) = two_databases(&sdk, ORDERS, ORDERS).await;

        let tx = sdk.begin().await.expect("begin");
        let branch_a = tx.postgres(&a).await.expect("branch a");
        branch_a
            .execute("CREATE TEMP TABLE scratch (v int) ON COMMIT DROP", &[])
            .await
            .expect("temp table");
        branch_a
            .execute("INSERT INTO orders VALUES (1, 'x')", &[])
            .await
            .expect("insert a");
        execute_in(&tx, &b, "INSERT INTO orders VALUES (1, 'x')").await;

        let err = tx.commit().await.expect_err("PREPARE refused");
        aborted_and_rolled_back(err, &["temporary objects", "0A000"], &url_b).await;
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 0);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 0);
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_single_branch_commits_in_one_phase() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url, a) = one_database(&sdk, "pg1").await;

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let branch = tx.postgres(&a).await.expect("branch");
        // A temp table cannot be prepared: committing it proves no PREPARE ran.
        branch
            .execute("CREATE TEMP TABLE scratch (v int) ON COMMIT DROP", &[])
            .await
            .expect("temp table");
        branch
            .execute("INSERT INTO orders VALUES (1, 'solo')", &[])
            .await
            .expect("insert");
        let branch_id = branch.branch_id().to_string();
        tx.commit().await.expect("one-phase commit");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(prepared_gids(&url).await, 0);
        // A repeated one-phase commit gets the same answer; phase-one calls too.
        assert_eq!(
            a.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Committed)
        );
        assert_eq!(
            a.prepare(&tx_id, &branch_id).await,
            Vote::No(format!(
                "branch {branch_id} of transaction {tx_id} is already committed"
            ))
        );

        // A one-phase commit the database refuses (deferred constraint) aborts.
        let c = connect(&url).await;
        c.batch_execute("CREATE TABLE codes (code text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
            .await
            .expect("ddl");
        let tx = sdk.begin().await.expect("begin");
        let branch = tx.postgres(&a).await.expect("branch");
        branch
            .execute("INSERT INTO codes VALUES ('x'), ('x')", &[])
            .await
            .expect("deferred");
        let err = tx.commit().await.expect_err("refused");
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Aborted(_)) && msg.contains("23505"),
            "{msg}"
        );
        assert_eq!(count(&url, "SELECT count(*) FROM codes").await, 0);
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn begin_with_enlists_the_branch_in_the_begin_call() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url, a) = one_database(&sdk, "pgbw").await;

        let tx = sdk.begin_with(&[&*a]).await.expect("begin_with");
        let tx_id = tx.id().to_string();
        // Enlisted before any branch is opened here: the coordinator already has it.
        let listed = get_tx(&sdk, &tx_id).await;
        let ids: Vec<String> = listed
            .branches
            .iter()
            .filter_map(|b| b.branch.as_ref().map(|b| b.branch_id.clone()))
            .collect();
        assert_eq!(ids, vec![tx.branch_id(&*a)]);
        let branch = tx.postgres(&a).await.expect("branch");
        branch
            .execute("INSERT INTO orders VALUES (1, 'begun with')", &[])
            .await
            .expect("insert");
        tx.commit().await.expect("one-phase commit");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);

        // A resource that is not registered is refused before anything is begun.
        let stranger = resource("stranger", &url).await;
        let Err(err) = sdk.begin_with(&[&*stranger]).await else {
            panic!("an unregistered resource was enlisted");
        };
        assert!(
            matches!(&err, Error::Usage(m) if m.contains("\"stranger\" is not registered")),
            "{err}"
        );
        sdk.shutdown().await;
    })
    .await;
}

/// Backends of the database at `url` inside an open transaction block, waiting for the
/// client.
const IN_BLOCK_SQL: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND state = 'idle in transaction'";

#[tokio::test]
async fn a_branch_opens_its_block_with_its_first_statement() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url_a, url_b, a, b) = two_databases(&sdk, ORDERS, ORDERS).await;

        // Opening the branch sends nothing: no block is open yet.
        let tx = sdk.begin().await.expect("begin");
        let branch = tx.postgres(&a).await.expect("branch");
        assert_eq!(count(&url_a, IN_BLOCK_SQL).await, 0);
        // The first statement runs inside the block (SET TRANSACTION outside one would
        // only warn, and the isolation level would stay READ COMMITTED).
        branch
            .execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[])
            .await
            .expect("set transaction");
        assert_eq!(count(&url_a, IN_BLOCK_SQL).await, 1);
        let level: String = branch
            .query_one("SHOW transaction_isolation", &[])
            .await
            .expect("show")
            .get(0);
        assert_eq!(level, "serializable");
        branch
            .execute("INSERT INTO orders VALUES (1, 'rolled back')", &[])
            .await
            .expect("insert");
        tx.abort("test").await.expect("abort");
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 0);
        assert_eq!(count(&url_a, IN_BLOCK_SQL).await, 0);

        // Branches that ran no statement: one alone commits in one phase, one beside a
        // writing branch is prepared read-only; nothing is left open or prepared.
        let tx = sdk.begin().await.expect("begin");
        tx.postgres(&a).await.expect("branch");
        tx.commit()
            .await
            .expect("one-phase commit of an empty branch");
        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        tx.postgres(&a).await.expect("empty branch");
        tx.postgres(&b)
            .await
            .expect("b")
            .execute("INSERT INTO orders VALUES (2, 'kept')", &[])
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
        assert_eq!(a.prepare(&tx_id, "orders:db-a").await, Vote::ReadOnly);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(prepared_gids(&url_a).await + prepared_gids(&url_b).await, 0);
        assert_eq!(
            count(&url_a, IN_BLOCK_SQL).await + count(&url_b, IN_BLOCK_SQL).await,
            0
        );
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_read_only_branch_takes_no_part_in_phase_two() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url_a, url_b, a, b) = two_databases(&sdk, ORDERS, ORDERS).await;

        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        let branch_a = tx.postgres(&a).await.expect("a");
        let n: i64 = branch_a
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .expect("q")
            .get(0);
        assert_eq!(n, 0);
        tx.postgres(&b)
            .await
            .expect("b")
            .execute("INSERT INTO orders VALUES (1, 'x')", &[])
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
        // The branch voted read-only (a repeated prepare gets the remembered vote) and
        // was finished at prepare: its handle refuses statements, nothing stays prepared.
        assert_eq!(a.prepare(&tx_id, "orders:db-a").await, Vote::ReadOnly);
        let err = branch_a
            .execute("SELECT 1", &[])
            .await
            .expect_err("finished");
        assert!(
            matches!(err, Error::Usage(ref m) if m.contains("read-only")),
            "{err}"
        );
        assert_eq!(prepared_gids(&url_a).await + prepared_gids(&url_b).await, 0);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 1);
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn max_prepared_transactions_zero_is_refused_with_the_setting_named() {
    bounded(TEST_TIMEOUT, async {
        let url = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5";
        match twopc_testkit::prepared_transactions_enabled(url).await {
            Err(e) => {
                println!("note: skipping: the system PostgreSQL at 127.0.0.1:5432 is not reachable ({e})");
                return;
            }
            Ok(true) => {
                println!("note: skipping: the system PostgreSQL at 127.0.0.1:5432 has max_prepared_transactions > 0");
                return;
            }
            Ok(false) => {}
        }
        let err = match PgResource::from_url("sysdb", url, 1).await {
            Ok(_) => panic!("a server without prepared transactions must be refused"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(matches!(err, Error::Resource { .. }), "{msg}");
        assert!(msg.contains("max_prepared_transactions is 0"), "{msg}");
        assert!(msg.contains("ALTER SYSTEM SET max_prepared_transactions = 64") && msg.contains("restart"), "{msg}");
    })
    .await;
}

#[tokio::test]
async fn a_repeated_commit_prepared_is_treated_as_done() {
    bounded(TEST_TIMEOUT, async {
        let url = database("pgr", ORDERS).await;
        // A branch prepared by "an earlier process": only the gid is left.
        let tx_id = "0000beef-1-1";
        let branch_id = "orders:db";
        let gid = format!("twopc:{tx_id}:{branch_id}");
        connect(&url)
            .await
            .batch_execute(&format!("BEGIN; INSERT INTO orders VALUES (1, 'x'); PREPARE TRANSACTION '{gid}'"))
            .await
            .expect("prepare by hand");

        let pg = resource("db", &url).await;
        assert_eq!(pg.in_doubt().await.expect("in doubt"), vec![(tx_id.to_string(), branch_id.to_string())]);
        // Other resources' gids are not listed.
        assert!(resource("other", &url).await.in_doubt().await.expect("in doubt").is_empty());
        let listed = pg.prepared().await.expect("prepared");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].gid, gid);
        // A prepare retried after a restart gives the same yes.
        assert_eq!(pg.prepare(tx_id, branch_id).await, Vote::Yes);

        pg.commit(tx_id, branch_id).await.expect("COMMIT PREPARED");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);
        // 42704: no such prepared transaction -> already committed.
        pg.commit(tx_id, branch_id).await.expect("repeated COMMIT PREPARED is done");
        resource("db", &url).await.commit(tx_id, branch_id).await.expect("and from a fresh resource");
        // Aborting an unknown branch is a success too, and so is a prepare of it a no.
        pg.abort("0000beef-1-2", branch_id).await.expect("abort unknown");
        assert!(matches!(pg.prepare("0000beef-1-3", branch_id).await, Vote::No(m) if m.contains("unknown branch")));
        assert_eq!(prepared_gids(&url).await, 0);
    })
    .await;
}

#[tokio::test]
async fn recovery_commits_a_prepared_branch_its_participant_forgot() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let (url_a, url_b) = (database("pga", ORDERS).await, database("pgb", ORDERS).await);
        let sdk1 = sdk_of(&coord, "orders", Some(Duration::from_millis(300))).await;
        let a = resource("db-a", &url_a).await;
        let b = crashing_a_beside_b(&sdk1, &a, &url_b).await;

        let tx = sdk1.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        for db in [&a, &b] {
            execute_in(&tx, db, "INSERT INTO orders VALUES (1, 'x')").await;
        }
        let committed = tx.commit().await.expect("decided to commit");
        assert_eq!(committed.pending_branches, vec!["orders:db-a".to_string()]);
        assert_eq!(count(&url_b, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(
            count(&url_a, "SELECT count(*) FROM orders").await,
            0,
            "a is prepared, not committed"
        );
        assert_eq!(a.prepared_count().await.expect("count"), 1);

        // The participant process "dies": its SDK and resource are gone.
        sdk1.shutdown().await;
        drop((sdk1, a));

        // A new process on the same database finds the gid and asks the coordinator.
        let sdk2 = sdk(&coord).await;
        let a2 = sdk2
            .register(resource("db-a", &url_a).await)
            .expect("register a again");
        assert_eq!(
            a2.in_doubt().await.expect("in doubt"),
            vec![(tx_id, "orders:db-a".to_string())]
        );
        assert_eq!(sdk2.recover_now().await, 1);
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(prepared_gids(&url_a).await, 0);
        assert_eq!(sdk2.recover_now().await, 0);
        sdk2.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn recovery_rolls_back_a_prepared_branch_of_an_aborted_transaction() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let setup_b = "CREATE TABLE codes (code text UNIQUE DEFERRABLE INITIALLY DEFERRED)";
        let (url_a, url_b) = (
            database("pga", ORDERS).await,
            database("pgb", setup_b).await,
        );
        let sdk1 = sdk(&coord).await;
        let a = resource("db-a", &url_a).await;
        let b = crashing_a_beside_b(&sdk1, &a, &url_b).await;

        let tx = sdk1.begin().await.expect("begin");
        execute_in(&tx, &a, "INSERT INTO orders VALUES (1, 'x')").await;
        execute_in(&tx, &b, "INSERT INTO codes VALUES ('x'), ('x')").await;
        // b votes no at prepare; a prepares (votes run in parallel) and then never
        // hears the abort.
        assert!(matches!(tx.commit().await, Err(Error::Aborted(_))));
        eventually(WAIT, "a's branch is prepared", || async {
            prepared_gids(&url_a).await == 1
        })
        .await;
        sdk1.shutdown().await;
        drop((sdk1, a));

        let sdk2 = sdk(&coord).await;
        sdk2.register(resource("db-a", &url_a).await)
            .expect("register a again");
        sdk2.recover_now().await;
        assert_eq!(prepared_gids(&url_a).await, 0);
        assert_eq!(count(&url_a, "SELECT count(*) FROM orders").await, 0);
        sdk2.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_commit_waits_out_a_postgres_crash_and_finishes_after_restart() {
    bounded(TEST_TIMEOUT, async {
        // Its own cluster: this test kills it.
        let pg = PgCluster::start().await.expect("private cluster");
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let url = database_on(&pg, "pgk", ORDERS).await;
        let a = sdk.register(resource("db", &url).await).expect("register");

        let tx = sdk.begin().await.expect("begin");
        let branch = tx.postgres(&a).await.expect("branch");
        branch
            .execute("INSERT INTO orders VALUES (1, 'x')", &[])
            .await
            .expect("insert");
        let (tx_id, branch_id) = (branch.tx_id().to_string(), branch.branch_id().to_string());
        // Phase one, driven directly (the coordinator would do the same).
        assert_eq!(a.prepare(&tx_id, &branch_id).await, Vote::Yes);
        assert_eq!(
            a.prepare(&tx_id, &branch_id).await,
            Vote::Yes,
            "a repeated prepare gives the same vote"
        );

        pg.kill9().expect("kill -9 PostgreSQL");
        let err = a
            .commit(&tx_id, &branch_id)
            .await
            .expect_err("PostgreSQL is down");
        assert!(!err.0.is_empty());
        assert!(
            a.in_doubt().await.is_err(),
            "listing in-doubt branches needs the database"
        );

        pg.start_again().expect("restart PostgreSQL");
        // Crash recovery kept the prepared transaction.
        assert_eq!(
            a.in_doubt().await.expect("in doubt"),
            vec![(tx_id.clone(), branch_id.clone())]
        );
        a.commit(&tx_id, &branch_id)
            .await
            .expect("COMMIT PREPARED after the restart");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);
        assert_eq!(prepared_gids(&url).await, 0);
        sdk.shutdown().await;
        drop(pg);
    })
    .await;
}

#[tokio::test]
async fn dedup_reports_the_first_time_only() {
    bounded(TEST_TIMEOUT, async {
        let url = database("pgd", "").await;
        let mut client = connect(&url).await;
        dedup::ensure_table(&client).await.expect("create table");
        dedup::ensure_table(&client).await.expect("idempotent");

        let tx = client.transaction().await.expect("begin");
        assert!(dedup::first_time(&tx, "billing", "0000beef-1-7-0")
            .await
            .expect("insert"));
        tx.commit().await.expect("commit");
        let tx = client.transaction().await.expect("begin");
        assert!(!dedup::first_time(&tx, "billing", "0000beef-1-7-0")
            .await
            .expect("seen"));
        assert!(dedup::first_time(&tx, "shipping", "0000beef-1-7-0")
            .await
            .expect("other consumer"));
        tx.commit().await.expect("commit");
        // A rolled-back transaction forgets the record with its effects.
        let tx = client.transaction().await.expect("begin");
        assert!(dedup::first_time(&tx, "billing", "0000beef-1-8-0")
            .await
            .expect("insert"));
        tx.rollback().await.expect("rollback");
        let tx = client.transaction().await.expect("begin");
        assert!(dedup::first_time(&tx, "billing", "0000beef-1-8-0")
            .await
            .expect("again the first time"));
        tx.commit().await.expect("commit");
        assert_eq!(
            dedup::forget_older_than(&client, Duration::from_secs(3600))
                .await
                .expect("forget"),
            0
        );
        assert_eq!(
            dedup::forget_older_than(&client, Duration::ZERO)
                .await
                .expect("forget"),
            3
        );

        // Inside a twopc branch.
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let pg = sdk.register(resource("db", &url).await).expect("register");
        for expected in [true, false] {
            let tx = sdk.begin().await.expect("begin");
            let branch = tx.postgres(&pg).await.expect("branch");
            assert_eq!(
                dedup::first_time_in_branch(&branch, "billing", "m-9")
                    .await
                    .expect("dedup"),
                expected
            );
            tx.commit().await.expect("commit");
        }
        sdk.shutdown().await;
    })
    .await;
}

/// An abort answers what became of the branch (a restarted coordinator settles a
/// one-phase commit with an abort and trusts the answer). Without the outbox: a branch
/// committed in one phase is `AlreadyCommitted` and nothing is undone; an open branch and
/// a prepared one are `Aborted` and rolled back; an unknown branch is `Aborted`. After a
/// restart (a new resource on the same database) the one-phase commit is no longer known
/// and is reported `Aborted` although its row is committed: the documented limit of
/// one-phase commit without the outbox's marker.
#[tokio::test]
async fn an_abort_says_whether_the_branch_had_committed_without_the_outbox() {
    bounded(TEST_TIMEOUT, async {
        let coord = coordinator().await;
        let sdk = sdk(&coord).await;
        let (url, a) = one_database(&sdk, "pgab").await;
        let orders = || count(&url, "SELECT count(*) FROM orders");

        // Committed in one phase (as the participant server would on the coordinator's
        // call), then aborted: reported committed, every time, and nothing undone.
        let tx = sdk.begin().await.expect("begin");
        let branch = tx.postgres(&a).await.expect("branch");
        branch
            .execute("INSERT INTO orders VALUES (1, 'one')", &[])
            .await
            .expect("insert");
        let (tx_id, branch_id) = (tx.id().to_string(), branch.branch_id().to_string());
        assert_eq!(
            a.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Committed)
        );
        for _ in 0..2 {
            assert_eq!(
                a.abort(&tx_id, &branch_id).await,
                Ok(AbortOutcome::AlreadyCommitted)
            );
        }
        assert_eq!(
            a.commit_one_phase(&tx_id, &branch_id).await,
            Ok(OnePhase::Committed)
        );
        assert_eq!(orders().await, 1);

        // "Restarted" without the outbox: nothing tells that the commit happened.
        let restarted = resource("db", &url).await;
        assert_eq!(
            restarted.abort(&tx_id, &branch_id).await,
            Ok(AbortOutcome::Aborted),
            "without the outbox a forgotten one-phase commit is reported aborted"
        );
        assert_eq!(orders().await, 1, "the abort undid nothing");

        // An open branch: rolled back, and its statements are refused from now on.
        let tx2 = sdk.begin().await.expect("begin");
        let open = tx2.postgres(&a).await.expect("branch");
        open.execute("INSERT INTO orders VALUES (2, 'two')", &[])
            .await
            .expect("insert");
        assert_eq!(
            a.abort(tx2.id(), open.branch_id()).await,
            Ok(AbortOutcome::Aborted)
        );
        assert!(matches!(
            open.execute("SELECT 1", &[]).await,
            Err(Error::Usage(ref m)) if m.contains("aborted")
        ));

        // A prepared branch: ROLLBACK PREPARED.
        let tx3 = sdk.begin().await.expect("begin");
        let prepared = tx3.postgres(&a).await.expect("branch");
        prepared
            .execute("INSERT INTO orders VALUES (3, 'three')", &[])
            .await
            .expect("insert");
        assert_eq!(a.prepare(tx3.id(), prepared.branch_id()).await, Vote::Yes);
        assert_eq!(prepared_gids(&url).await, 1);
        assert_eq!(
            a.abort(tx3.id(), prepared.branch_id()).await,
            Ok(AbortOutcome::Aborted)
        );
        assert_eq!(prepared_gids(&url).await, 0);

        // Unknown here.
        assert_eq!(
            a.abort("0000beef-9-9", &branch_id).await,
            Ok(AbortOutcome::Aborted)
        );
        assert_eq!(
            orders().await,
            1,
            "only the one-phase commit's row is there"
        );

        for t in [tx, tx2, tx3] {
            t.abort("the test finished the branches itself").await.ok();
        }
        sdk.shutdown().await;
        coord.stop().await;
    })
    .await;
}

/// A prepared branch of a transaction the coordinator no longer keeps (its record was
/// collected after the retention) is never guessed at: recovery leaves it prepared,
/// counts it, and an operator settles it.
#[tokio::test]
async fn recovery_leaves_a_prepared_branch_of_a_forgotten_transaction_to_an_operator() {
    bounded(TEST_TIMEOUT, async {
        let coord = Coordinator::start(ServeConfig {
            decision_retention_ms: 200,
            ..quick_retries()
        })
        .await;
        let url = database("pgf", ORDERS).await;
        let sdk = sdk_of(&coord, "orders", None).await;
        let pg = sdk.register(resource("db", &url).await).expect("register");
        let tx = sdk.begin().await.expect("begin");
        let tx_id = tx.id().to_string();
        execute_in(&tx, &pg, "INSERT INTO orders VALUES (1, 'x')").await;
        tx.commit().await.expect("commit");
        eventually(
            WAIT,
            "the coordinator forgets the finished transaction",
            || async { get_tx(&sdk, &tx_id).await.outcome == pb::Outcome::Forgotten as i32 },
        )
        .await;

        // A branch of it left prepared by hand, as a process that never heard the
        // outcome would leave it.
        let gid = format!("twopc:{tx_id}:orders:db");
        connect(&url)
            .await
            .batch_execute(&format!(
                "BEGIN; INSERT INTO orders VALUES (2, 'y'); PREPARE TRANSACTION '{gid}'"
            ))
            .await
            .expect("prepare by hand");
        let seen = twopc_participant::forgotten_answers();
        assert_eq!(sdk.recover_now().await, 0, "nothing is finished by a guess");
        assert_eq!(prepared_gids(&url).await, 1, "the branch stays prepared");
        assert!(
            twopc_participant::forgotten_answers() > seen,
            "the forgotten answer is counted"
        );
        // The operator's hand, as the recovery log asks.
        connect(&url)
            .await
            .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
            .await
            .expect("rollback by hand");
        assert_eq!(count(&url, "SELECT count(*) FROM orders").await, 1);
        sdk.shutdown().await;
        coord.stop().await;
    })
    .await;
}
