//! `twopc serve --decision-log etcd` as a real process against a private three-member
//! etcd cluster: a transaction commits, a restarted coordinator answers it COMMITTED from
//! etcd, and a second coordinator on the same cluster name refuses to start while the
//! first owns the shard.

mod support;

use std::time::Duration;

use support::{
    begin, commit, outcome, wait_tx_state, with_deadline, Coordinator, MsgKind, ResState,
    TestParticipant,
};
use twopc_proto::v1 as pb;
use twopc_testkit::{unique_name, EtcdCluster};

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// Budget of one wait for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_etcd_commits_and_a_restarted_coordinator_answers_committed() {
    with_deadline(TEST_DEADLINE, async {
        let etcd = EtcdCluster::start(3).await.expect("start etcd");
        let endpoints = etcd.endpoints().join(",");
        let cluster = unique_name("serve");
        let flags = [
            ("--decision-log", "etcd"),
            ("--etcd-endpoints", endpoints.as_str()),
            ("--etcd-cluster", cluster.as_str()),
        ];
        let mut coord = Coordinator::start(&flags).await;
        let db = TestParticipant::start("db").await;
        let mq = TestParticipant::start("mq").await;
        let mut c = coord.client().await;
        let tx = begin(&mut c, vec![db.branch("orders"), mq.branch("events")]).await;
        let resp = commit(&mut c, &tx, 5_000).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert_eq!(db.state(&tx, "orders"), Some(ResState::Committed));
        assert_eq!(mq.state(&tx, "events"), Some(ResState::Committed));
        assert_eq!(
            db.kinds(&tx, "orders"),
            vec![MsgKind::Prepare, MsgKind::Commit]
        );

        // A second coordinator on the same cluster name: the shard is owned.
        let other = tempfile::tempdir().expect("tempdir");
        let exited =
            Coordinator::run_expecting_exit(other.path(), &flags, Duration::from_secs(10)).await;
        assert!(!exited.status.success(), "{exited:?}");
        assert!(
            exited.stderr.contains("locked") && exited.stderr.contains("owned by"),
            "names the owner: {}",
            exited.stderr
        );
        assert!(
            !exited.stdout.contains("twopc listening"),
            "it never listened: {}",
            exited.stdout
        );

        // A clean stop gives the shard up at once; the restart answers from etcd.
        let status = coord.sigterm(Duration::from_secs(15)).await;
        assert!(status.success(), "{status:?}");
        coord.restart().await;
        let view = wait_tx_state(&coord.client().await, WAIT, &tx, pb::TxState::Committed).await;
        assert_eq!(outcome(&view), pb::Outcome::Committed);
        assert_eq!(view.tx_id, tx);
        let mut c = coord.client().await;
        let again = commit(&mut c, &tx, 1_000).await.expect("repeated Commit");
        assert_eq!(again.outcome, pb::Outcome::Committed as i32);

        // And new transactions commit under the new epoch.
        let tx2 = begin(&mut c, vec![db.branch("orders2"), mq.branch("events2")]).await;
        assert_ne!(tx2, tx);
        let resp = commit(&mut c, &tx2, 5_000).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
    })
    .await;
}
