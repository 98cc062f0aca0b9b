//! The order-service PROCESS killed in the middle of a transaction finishes it after it
//! restarts: real `twopc serve` and `twopc-lab order-service` processes, a private PostgreSQL
//! cluster (prepared transactions on) and the machine's RabbitMQ (127.0.0.1:5672).
//!
//! The order service is killed by the participant SDK's fail points (`return(abort)`:
//! SIGABRT on the spot, nothing cleaned up), so this file needs the `failpoints` feature
//! (`cargo test --features failpoints,lab --test order_service_crash`); without it, it is
//! empty.
//!
//! Every scenario has its own coordinator, database, queue, participant port and data
//! directory, bounded waits, and prints the stderr of every process it started when it
//! fails.
#![cfg(feature = "failpoints")]

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::orders::{tx_of_gid, OrderWorld, Postgres, Run, Settings, DB_BRANCH, EVENTS_BRANCH};
use support::{outcome, tx_state, with_deadline};
use twopc_proto::v1 as pb;
use twopc_testkit::PgCluster;

/// Overall budget of one scenario.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// Budget of one wait for a process or for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(30);

/// One PostgreSQL cluster for the whole binary (each scenario has its own database).
static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

async fn cluster() -> &'static PgCluster {
    tokio::task::spawn_blocking(|| {
        CLUSTER.get_or_init(|| {
            PgCluster::start_blocking().unwrap_or_else(|e| panic!("private PostgreSQL: {e}"))
        })
    })
    .await
    .expect("starting the PostgreSQL cluster panicked")
}

/// A scenario's world (see [`OrderWorld`]) in the shared cluster, its coordinator
/// two-phase even for one branch.
async fn world() -> OrderWorld {
    world_with(&[("--one-phase", "false")]).await
}

/// [`world`] with `coordinator_flags` (the coordinator's own default, one-phase on,
/// unless they say otherwise).
async fn world_with(coordinator_flags: &[(&str, &str)]) -> OrderWorld {
    OrderWorld::start(Settings {
        name: "crash",
        postgres: Postgres::Shared(cluster().await),
        coordinator_flags,
        service_timeout_ms: 20_000,
        recovery_interval_ms: 500,
        wait: WAIT,
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Checks of a run
// ---------------------------------------------------------------------------------------

/// Checks a successful `--recover` run: it exited 0 and, after its ready line (checked
/// by `run`), printed exactly `lines`: the branches found in doubt at start, sorted, then
/// `recovered N`.
#[track_caller]
fn assert_recovered(run: &Run, lines: &[String]) {
    run.assert_success("--recover");
    assert_eq!(run.stdout[1..], lines[..], "stderr:\n{}", run.stderr);
}

/// Checks a successful `--recover` run: it found exactly both branches of `tx_id` in
/// doubt.
#[track_caller]
fn assert_recovered_both(run: &Run, tx_id: &str) {
    assert_recovered(
        run,
        &[
            format!("in doubt {tx_id} {EVENTS_BRANCH}"),
            format!("in doubt {tx_id} {DB_BRANCH}"),
            "recovered 2".to_string(),
        ],
    );
}

/// Like [`Run::assert_aborted_by_failpoint`], for fail points past the point where the
/// branch committed: the commit's answer may have reached the process before it died,
/// so `placed ORDER_ID committed` may have been printed (and no other outcome).
#[track_caller]
fn assert_aborted_by_failpoint_after_commit(run: &Run, failpoint: &str, order_id: &str) {
    run.assert_died_at(failpoint);
    let committed = format!("placed {order_id} committed");
    assert!(
        run.stdout
            .iter()
            .filter(|l| l.starts_with("placed "))
            .all(|l| *l == committed),
        "the only outcome this process can have printed is {committed:?}: {:?}",
        run.stdout
    );
}

/// Checks a successful `--recover` run of a service that stages its events in the
/// database: it found exactly the database branch of `tx_id` in doubt.
#[track_caller]
fn assert_recovered_db_branch(run: &Run, tx_id: &str) {
    assert_recovered(
        run,
        &[
            format!("in doubt {tx_id} {DB_BRANCH}"),
            "recovered 1".to_string(),
        ],
    );
}

/// Checks a successful `--recover` run that found nothing in doubt.
#[track_caller]
fn assert_recovered_nothing(run: &Run) {
    assert_recovered(run, &["recovered 0".to_string()]);
}

/// The flags of every run of the `--stage-events database` scenarios, then `extra`.
fn database_staging<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    database_staging_swept_after("300", extra)
}

/// [`database_staging`] with the sweep taking rows `sweep_after_ms` old. The runs killed
/// at a fail point take no row younger than a minute: only the relay publishes the
/// order's event (on a loaded machine, connecting to the broker can outlast a short sweep
/// age, and the sweep would publish it as well — at least once, but not the single
/// publish these scenarios count).
fn database_staging_swept_after<'a>(sweep_after_ms: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--stage-events",
        "database",
        "--outbox-sweep-interval-ms",
        "200",
        "--outbox-sweep-after-ms",
        sweep_after_ms,
    ];
    args.extend_from_slice(extra);
    args
}

/// Checks one delivered OrderCreated of order `o1` staged in the database branch of
/// `tx_id`: the message id of its first outbox message, and the payload.
#[track_caller]
fn assert_order_created_from_outbox(event: &(String, Vec<u8>), tx_id: &str) {
    assert_order_created(event, &format!("{tx_id}:{DB_BRANCH}:0"));
}

/// Checks one delivered OrderCreated of order `o1`: its message id and payload.
#[track_caller]
fn assert_order_created(event: &(String, Vec<u8>), message_id: &str) {
    assert_eq!(event.0, message_id, "message id");
    let payload: serde_json::Value = serde_json::from_slice(&event.1).expect("JSON payload");
    assert_eq!(
        payload,
        serde_json::json!({
            "type": "OrderCreated", "id": "o1", "customer": "alice", "item": "sku-1", "quantity": 1
        })
    );
}

// ---------------------------------------------------------------------------------------
// Runs of the `--stage-events database` service
// ---------------------------------------------------------------------------------------

/// Runs `--place o1` of the `--stage-events database` service killed at `failpoint`, past
/// the commit of the order's only branch (see [`database_staging_swept_after`]); checks
/// the process died there, nothing is prepared, the row is committed and one
/// outbox row waits; returns the transaction id and the row's message id.
async fn killed_after_commit(w: &mut OrderWorld, failpoint: &str) -> (String, String) {
    let run = Staging::Database
        .place(w, &format!("{failpoint}=return(abort)"))
        .await;
    assert_aborted_by_failpoint_after_commit(&run, failpoint, "o1");
    assert_eq!(
        w.prepared_gids().await,
        Vec::<String>::new(),
        "the branch committed: nothing is prepared"
    );
    assert_eq!(
        w.order_row("o1").await,
        Some(("alice".into(), "sku-1".into(), 1)),
        "the row committed before the kill"
    );
    let outbox = w.outbox().await;
    assert_eq!(outbox.len(), 1, "one outbox row is left: {outbox:?}");
    (tx_of_gid(&outbox[0].0), outbox[0].1.clone())
}

/// Runs `--recover` of the `--stage-events database` service.
async fn recover_database_staged(w: &mut OrderWorld) -> Run {
    w.run(&database_staging(&["--recover"]), "").await
}

/// The outbox is empty and the queue held exactly one OrderCreated of `tx_id`.
async fn assert_published_once(w: &OrderWorld, tx_id: &str) {
    assert_eq!(
        w.outbox_rows().await,
        0,
        "published and deleted before the exit"
    );
    let events = w.drain().await;
    assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
    assert_order_created_from_outbox(&events[0], tx_id);
}

/// Where the order service stages its OrderCreated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Staging {
    /// In the broker branch's staging store (two branches).
    Broker,
    /// In the database branch's outbox (`--stage-events database`, one branch).
    Database,
}

impl Staging {
    /// Runs `--place o1` with `failpoints`.
    async fn place(self, w: &mut OrderWorld, failpoints: &str) -> Run {
        match self {
            Staging::Broker => w.run(&["--place", "o1"], failpoints).await,
            Staging::Database => {
                w.run(
                    &database_staging_swept_after("60000", &["--place", "o1"]),
                    failpoints,
                )
                .await
            }
        }
    }

    /// Runs `--recover` and checks it found every branch of `tx_id` in doubt.
    async fn recover_in_doubt(self, w: &mut OrderWorld, tx_id: &str) {
        match self {
            Staging::Broker => {
                let run = w.run(&["--recover"], "").await;
                assert_recovered_both(&run, tx_id);
            }
            Staging::Database => {
                let run = recover_database_staged(w).await;
                assert_recovered_db_branch(&run, tx_id);
            }
        }
    }

    /// With database staging: the outbox holds no committed row.
    async fn assert_no_outbox_row(self, w: &OrderWorld, why: &str) {
        if self == Staging::Database {
            assert_eq!(w.outbox_rows().await, 0, "{why}");
        }
    }
}

/// Killed after preparing, before its vote reached the coordinator (the fail point's
/// `action` says at which prepare): the coordinator aborts (a vote is missing); the
/// restarted service rolls the prepared gid back, and the event staged with the order
/// goes with it: no row, no event, nothing staged or prepared.
async fn killed_after_prepare_before_its_vote(staging: Staging, action: &str) {
    let mut w = world().await;
    let failpoint = "participant::after_prepare_before_reply";

    let run = staging
        .place(&mut w, &format!("{failpoint}={action}"))
        .await;
    run.assert_aborted_by_failpoint(failpoint);
    let tx_id = w.prepared_tx().await;

    // The vote never arrived: the coordinator aborts and keeps sending aborts to the
    // dead participant.
    let r = w.wait_for_state(&tx_id, pb::TxState::Aborting).await;
    assert_eq!(outcome(&r), pb::Outcome::Aborted, "{r:?}");
    assert_eq!(
        w.prepared_gids().await.len(),
        1,
        "nothing rolled the gid back yet"
    );
    assert_eq!(
        w.order_row("o1").await,
        None,
        "a prepared row is not visible"
    );
    staging
        .assert_no_outbox_row(&w, "a prepared outbox row is not visible")
        .await;
    assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

    // Restarted on the same port and data directory, without the fail point.
    staging.recover_in_doubt(&mut w, &tx_id).await;

    staging.assert_no_outbox_row(&w, "no outbox row").await;
    w.assert_nothing_left("o1", &[]).await;
    let r = w.wait_for_state(&tx_id, pb::TxState::Aborted).await;
    assert_eq!(outcome(&r), pb::Outcome::Aborted, "{r:?}");
    w.cleanup().await;
}

/// Killed on the commit after the decision (every branch voted yes, COMMIT is durable,
/// nothing is committed yet): the restarted service commits the row and its event goes
/// out exactly once.
async fn killed_before_commit(staging: Staging) {
    let mut w = world().await;
    let failpoint = "participant::before_commit";

    let run = staging
        .place(&mut w, &format!("{failpoint}=return(abort)"))
        .await;
    run.assert_aborted_by_failpoint(failpoint);
    let tx_id = w.prepared_tx().await;
    let r = w.tx(&tx_id).await;
    assert_eq!(
        outcome(&r),
        pb::Outcome::Committed,
        "decided before the kill: {r:?}"
    );
    assert_eq!(
        pb::TxState::try_from(r.state),
        Ok(pb::TxState::Committing),
        "phase two cannot have finished: {r:?}"
    );
    assert_eq!(
        w.order_row("o1").await,
        None,
        "not committed before the kill"
    );
    staging
        .assert_no_outbox_row(&w, "the outbox row is still prepared")
        .await;
    assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

    staging.recover_in_doubt(&mut w, &tx_id).await;

    assert_eq!(
        w.order_row("o1").await,
        Some(("alice".into(), "sku-1".into(), 1)),
        "the row is committed"
    );
    assert_eq!(
        w.prepared_gids().await,
        Vec::<String>::new(),
        "no prepared gid left"
    );
    match staging {
        Staging::Broker => {
            let events = w.drain().await;
            assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
            assert_order_created(&events[0], &format!("{tx_id}:{EVENTS_BRANCH}:0"));
            assert_eq!(w.staged().await, vec![], "nothing staged");
        }
        Staging::Database => assert_published_once(&w, &tx_id).await,
    }
    let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
    assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
    w.cleanup().await;
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Killed after preparing, before its vote reached the coordinator: the coordinator
/// aborts (a vote is missing); the restarted service rolls the prepared gid back and
/// drops the staged event.
///
/// The prepares of the two branches run in parallel; `1*off->return(abort)` lets the
/// first yes vote out and kills the process at the second, so that BOTH branches are
/// durably prepared (a PostgreSQL gid and a staged batch) when it dies and exactly one
/// vote never reaches the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_prepare_before_its_vote_the_restarted_service_rolls_back() {
    with_deadline(
        TEST_DEADLINE,
        killed_after_prepare_before_its_vote(Staging::Broker, "1*off->return(abort)"),
    )
    .await;
}

/// Killed on the commit after the decision (both branches voted yes, COMMIT is durable,
/// nothing is committed yet): the coordinator keeps retrying; the restarted service
/// commits the row and publishes exactly one OrderCreated with the branch's message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_commit_the_restarted_service_commits_row_and_event() {
    with_deadline(TEST_DEADLINE, killed_before_commit(Staging::Broker)).await;
}

/// Killed after PostgreSQL committed, before the acknowledgement: after the restart the
/// retried commit finds the gid gone ("already committed") and the event goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_commit_before_ack_the_restarted_service_publishes_once() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = world().await;
        let failpoint = "participant::after_commit_before_ack";

        let run = w
            .run(&["--place", "o1"], &format!("{failpoint}=return(abort)"))
            .await;
        run.assert_aborted_by_failpoint(failpoint);
        // The database tier committed before the kill; the broker tier never started.
        assert_eq!(w.prepared_gids().await, Vec::<String>::new());
        assert_eq!(
            w.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1))
        );
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");

        let run = w.run(&["--recover"], "").await;
        run.assert_success("--recover");
        // Only the staged event is in doubt.
        let tx_id = run.recovered_one("in doubt ", EVENTS_BRANCH);

        let events = w.drain().await;
        assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
        assert_eq!(events[0].0, format!("{tx_id}:{EVENTS_BRANCH}:0"));
        assert_eq!(w.staged().await, vec![], "nothing staged");
        let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Scenarios: OrderCreated staged in the database branch (`--stage-events database`)
// ---------------------------------------------------------------------------------------

/// Killed after preparing its only branch, before the vote reached the coordinator: the
/// coordinator aborts; the restarted service rolls the gid back, and the outbox row
/// staged in it goes with the order row: no row, no event, nothing left in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_after_prepare_before_its_vote_rolls_back_row_and_event() {
    with_deadline(
        TEST_DEADLINE,
        killed_after_prepare_before_its_vote(Staging::Database, "return(abort)"),
    )
    .await;
}

/// Killed on the commit after the decision (COMMIT durable, the gid with the order row
/// and its outbox row still prepared): the restarted service commits the gid, and the
/// recovery's sweep of that gid publishes the event at once, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_before_commit_recovery_commits_and_publishes_once() {
    with_deadline(TEST_DEADLINE, killed_before_commit(Staging::Database)).await;
}

/// Killed after the branch committed, before the relay sent its event: the order row and
/// the outbox row are committed, the queue is empty; a plain `--recover` run (nothing in
/// doubt) has its sweep publish the event, once, and delete the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_before_the_relay_publishes_the_sweep_publishes_once() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = world().await;
        let failpoint = "participant::outbox::before_publish";

        let (tx_id, message_id) = killed_after_commit(&mut w, failpoint).await;
        assert_eq!(message_id, format!("{tx_id}:{DB_BRANCH}:0"));
        assert_eq!(w.queue_len().await, 0, "nothing published before the kill");
        let r = w.tx(&tx_id).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");

        let run = recover_database_staged(&mut w).await;
        assert_recovered_nothing(&run);

        assert_published_once(&w, &tx_id).await;
        assert_eq!(w.prepared_gids().await, Vec::<String>::new());
        w.cleanup().await;
    })
    .await;
}

/// Killed after the broker confirmed the event, before its outbox row was deleted: the
/// event is delivered once and the row stays; the restarted service's sweep publishes
/// it again, with the same message id and payload (at least once: consumers dedupe by
/// id), and deletes the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_killed_after_publish_before_delete_the_sweep_republishes_same_id() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = world().await;
        let failpoint = "participant::outbox::after_publish_before_delete";

        let (tx_id, _) = killed_after_commit(&mut w, failpoint).await;
        assert_eq!(
            w.queue_len().await,
            1,
            "the broker confirmed the event before the kill"
        );

        let run = recover_database_staged(&mut w).await;
        assert_recovered_nothing(&run);

        assert_eq!(w.outbox_rows().await, 0, "deleted after the second publish");
        let events = w.drain().await;
        assert_eq!(
            events.len(),
            2,
            "published once before the kill, once by the sweep: {events:?}"
        );
        assert_order_created_from_outbox(&events[0], &tx_id);
        assert_eq!(
            events[1], events[0],
            "the same message id and payload again"
        );
        let r = w.tx(&tx_id).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// With one-phase commits on, the single database branch commits in one phase (nothing
/// is ever prepared); killed before the relay sent the event, the restarted service's
/// sweep publishes it exactly once and deletes the row, and the coordinator ends the
/// transaction Committed: if the one-phase answer was lost with the process, the
/// coordinator's repeated one-phase commit finds the commit's marker after the restart
/// (before the marker existed, the unknown branch was answered "refused" and the
/// transaction recorded Aborted although its row and event were committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_one_phase_killed_before_the_relay_publishes_ends_committed_and_publishes_once(
) {
    with_deadline(
        TEST_DEADLINE,
        one_phase_killed_after_commit("participant::outbox::before_publish"),
    )
    .await;
}

/// Like the test above, killed right after the database commit and before the service
/// reported it to the coordinator (which holds the transaction in its participant's
/// hands): `--recover` reports the commit its one-phase marker remembers, so the
/// coordinator ends it Committed (the relay's kill above may come before or after that
/// report; this one always comes before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_one_phase_killed_before_reporting_the_commit_recover_reports_it() {
    with_deadline(
        TEST_DEADLINE,
        one_phase_killed_after_commit("participant::after_local_commit_before_report"),
    )
    .await;
}

/// The scenario of the two tests above: the service dies at `failpoint`, after its
/// one-phase commit and before its event is published.
async fn one_phase_killed_after_commit(failpoint: &str) {
    let mut w = world_with(&[]).await;

    let (tx_id, _) = killed_after_commit(&mut w, failpoint).await;
    let reported_by_the_dead_service = failpoint != "participant::after_local_commit_before_report";
    assert_eq!(w.queue_len().await, 0, "nothing published before the kill");
    // One phase: the commit is still in the dead participant's hands (Preparing), or its
    // answer made it out (Committed); a two-phase commit would be Committing here.
    let r = w.tx(&tx_id).await;
    assert!(
        matches!(
            pb::TxState::try_from(r.state),
            Ok(pb::TxState::Preparing | pb::TxState::Committed)
        ),
        "a one-phase commit: {r:?}"
    );

    let run = recover_database_staged(&mut w).await;
    // The commit is recovered (reported from its marker, and counted) unless the dead
    // service had reported it already (the relay's kill may come after the report).
    let recovered = [
        format!("committed in one phase, not reported {tx_id} {DB_BRANCH}"),
        "recovered 1".to_string(),
    ];
    run.assert_success("--recover");
    if reported_by_the_dead_service && run.stdout[1..] == ["recovered 0".to_string()] {
        // Reported before the kill: nothing left to recover.
    } else {
        assert_eq!(run.stdout[1..], recovered, "stderr:\n{}", run.stderr);
    }

    assert_published_once(&w, &tx_id).await;
    assert_eq!(w.prepared_gids().await, Vec::<String>::new());
    // The row and its event are committed: so must the transaction be.
    let r = w
        .wait_for(&tx_id, "is finished", |r| {
            matches!(tx_state(r), pb::TxState::Committed | pb::TxState::Aborted)
        })
        .await;
    assert_eq!(
        (pb::TxState::try_from(r.state), outcome(&r)),
        (Ok(pb::TxState::Committed), pb::Outcome::Committed),
        "the coordinator's record contradicts the committed row and event: {r:?}"
    );
    w.cleanup().await;
}

/// No crash: the order commits, its event is published once by the relay, and the
/// process leaves nothing behind (no outbox row, no prepared gid, nothing staged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_order_commits_and_publishes_once_without_a_crash() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = world().await;

        let run = w.run(&database_staging(&["--place", "o1"]), "").await;
        run.assert_success("--place");
        assert_eq!(
            run.stdout[1..],
            ["placed o1 committed".to_string()],
            "stderr:\n{}",
            run.stderr
        );

        assert_eq!(
            w.order_row("o1").await,
            Some(("alice".into(), "sku-1".into(), 1)),
            "the row is committed"
        );
        assert_eq!(
            w.outbox_rows().await,
            0,
            "published and deleted before the exit"
        );
        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "nothing prepared"
        );
        assert_eq!(
            w.staged().await,
            vec![],
            "nothing staged in the broker's store"
        );
        let events = w.drain().await;
        assert_eq!(events.len(), 1, "exactly one OrderCreated: {events:?}");
        let tx_id = events[0]
            .0
            .strip_suffix(&format!(":{DB_BRANCH}:0"))
            .unwrap_or_else(|| panic!("unexpected message id {:?}", events[0].0))
            .to_string();
        assert_order_created_from_outbox(&events[0], &tx_id);
        let r = w.wait_for_state(&tx_id, pb::TxState::Committed).await;
        assert_eq!(outcome(&r), pb::Outcome::Committed, "{r:?}");
        w.cleanup().await;
    })
    .await;
}

/// A bad outbox flag is refused before anything is touched: non-zero exit, an error that
/// names the flag, no ready line, no data directory, no outbox table, no row, no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_staged_zero_sweep_age_is_refused_before_touching_anything() {
    with_deadline(TEST_DEADLINE, async {
        let mut w = world().await;

        let args = database_staging(&["--place", "o1", "--outbox-sweep-after-ms", "0"]);
        let run = w.run_unchecked(&args, "").await;
        assert!(
            !run.status.success() && run.status.code().is_some(),
            "a bad flag must make the process exit non-zero, got {:?}; stdout {:?}; stderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains("--outbox-sweep-after-ms"),
            "the error names the flag:\n{}",
            run.stderr
        );
        assert_eq!(
            run.stdout,
            Vec::<String>::new(),
            "not even ready: {:?}",
            run.stdout
        );

        assert!(!w.data_dir().exists(), "no data directory created");
        assert!(!w.outbox_table_exists().await, "no outbox table created");
        assert_eq!(w.order_row("o1").await, None, "no row");
        assert_eq!(
            w.prepared_gids().await,
            Vec::<String>::new(),
            "nothing prepared"
        );
        assert_eq!(w.drain().await, vec![], "no event");
        w.cleanup().await;
    })
    .await;
}
