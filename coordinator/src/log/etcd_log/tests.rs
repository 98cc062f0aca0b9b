//! Tests of a whole [`EtcdLog`] against real etcd clusters started by the testkit: the
//! conformance suite, reopening, the owner lock, fencing, a lost lease, and a
//! three-member cluster that loses a member.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use twopc_testkit::{unique_name, EtcdCluster};

use super::*;
use crate::log::conformance::{self, branches, commit, tx_of, Subject, SuiteOptions};

fn options(cluster: &EtcdCluster, name: &str) -> EtcdLogOptions {
    EtcdLogOptions::new(cluster.endpoints(), name)
}

fn open(cluster: &EtcdCluster, name: &str) -> EtcdLog {
    EtcdLog::open(options(cluster, name)).expect("open the etcd log")
}

/// A raw client, for what another coordinator (or an operator) would do.
async fn raw(cluster: &EtcdCluster) -> Client {
    Client::connect(cluster.endpoints(), None)
        .await
        .expect("connect to etcd")
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn tx_suffixes_parse_back() {
    let tx = TxId {
        node: 0xdead_beef,
        epoch: 77,
        seq: 1 << 40,
    };
    let keys = Keys::new("c", 0);
    let key = keys.tx(&tx);
    let suffix = key
        .strip_prefix(keys.tx_prefix().as_slice())
        .expect("prefix");
    assert_eq!(tx_of_suffix(suffix), Some(tx));
    assert_eq!(tx_of_suffix(b"zz"), None);
}

#[test]
fn bad_options_fail_the_open_with_a_clear_message() {
    let err = EtcdLog::open(EtcdLogOptions::new(vec![], "c")).expect_err("no endpoints");
    assert!(err.to_string().contains("no etcd endpoints"), "{err}");
    let err = EtcdLog::open(EtcdLogOptions::new(
        vec!["http://127.0.0.1:1".into()],
        "a/b",
    ))
    .expect_err("bad cluster");
    assert!(err.to_string().contains("cluster name"), "{err}");
}

#[tokio::test]
async fn etcd_log_passes_the_conformance_suite() {
    let cluster = EtcdCluster::start(1).await.expect("start etcd");
    let endpoints = cluster.endpoints();
    conformance::run_all(
        || {
            let flag = Arc::new(AtomicBool::new(false));
            // A cluster name of its own: no check sees another's keys.
            let mut opts = EtcdLogOptions::new(endpoints.clone(), unique_name("conformance"));
            opts.fail_writes = Some(flag.clone());
            let log = EtcdLog::open(opts).expect("open the etcd log");
            Subject::new(log, move |_: &EtcdLog| flag.store(true, Ordering::SeqCst))
        },
        SuiteOptions::default(),
    )
    .await;
}

#[tokio::test]
async fn reopen_keeps_decisions_and_the_node_and_raises_the_epoch() {
    let cluster = EtcdCluster::start(1).await.expect("start etcd");
    let name = unique_name("reopen");
    let log = open(&cluster, &name);
    let (node, e1) = (log.node_id(), log.epoch());
    let finished = commit(tx_of(&log, 1), branches(2, "a"), 11);
    let open_one = commit(tx_of(&log, 2), branches(3, "b"), 12);
    log.force_commit(e1, finished.clone()).await.expect("force");
    let lsn = log.force_commit(e1, open_one.clone()).await.expect("force");
    log.record_lazy(e1, LazyRecord::Done { tx: finished.tx })
        .expect("done");
    let undecided = tx_of(&log, 3);
    log.record_lazy(
        e1,
        LazyRecord::Preparing {
            tx: undecided,
            branches: branches(1, "c"),
        },
    )
    .expect("preparing");
    drop(log);

    // The owner key went with the lease: the next open need not wait for it.
    let started = Instant::now();
    let log = open(&cluster, &name);
    assert!(started.elapsed() < Duration::from_secs(3), "no lease wait");
    assert_eq!(log.node_id(), node, "the node id is fixed per cluster");
    assert!(log.epoch() > e1, "every open has a larger epoch");
    assert_eq!(log.durable_lsn(), lsn, "the LSN counter survives");
    assert_eq!(
        log.decision(&finished.tx).expect("read"),
        Some(StoredDecision {
            record: finished.clone(),
            done: true
        })
    );
    assert_eq!(
        log.recover().expect("recover"),
        Recovered {
            commits: vec![open_one.clone()],
            undecided: vec![(undecided, branches(1, "c"))],
            one_phase: vec![],
        }
    );
    let e2 = log.epoch();
    assert_eq!(
        log.force_commit(e2, open_one.clone())
            .await
            .expect("idempotent"),
        lsn,
        "a repeat across opens answers the stored LSN"
    );
    assert!(matches!(
        log.force_commit(e2, commit(open_one.tx, vec![], 0)).await,
        Err(LogError::Conflict { .. })
    ));
    let next = log
        .force_commit(e2, commit(tx_of(&log, 1), branches(1, "n"), 0))
        .await
        .expect("force");
    assert!(
        next > lsn,
        "LSNs keep growing across opens: {next} after {lsn}"
    );
    // Another cluster name is another log.
    let other = open(&cluster, &unique_name("other"));
    assert_ne!(other.epoch(), log.epoch());
    assert_eq!(other.decision(&open_one.tx).expect("read"), None);
}

#[tokio::test]
async fn a_second_opener_is_locked_out_at_once_and_told_who_owns_the_shard() {
    let cluster = EtcdCluster::start(1).await.expect("start etcd");
    let name = unique_name("locked");
    let mut opts = options(&cluster, &name);
    opts.advertise = "http://10.1.2.3:50051".into();
    let log = EtcdLog::open(opts).expect("open");
    let started = Instant::now();
    let err = EtcdLog::open(options(&cluster, &name)).expect_err("must be locked");
    assert!(started.elapsed() < Duration::from_secs(2), "fails at once");
    match &err {
        LogError::Locked { dir, detail } => {
            assert!(
                dir.contains(&format!("/twopc/v1/{name}/shard/0/owner")),
                "{dir}"
            );
            assert!(
                detail.contains(&format!("node={:08x}", log.node_id()))
                    && detail.contains("http://10.1.2.3:50051")
                    && detail.contains(&format!("epoch {}", log.epoch())),
                "names the owner: {detail}"
            );
        }
        other => panic!("want Locked, got {other:?}"),
    }
    // The failed opener took nothing: the owner still writes.
    let e = log.epoch();
    log.force_commit(e, commit(tx_of(&log, 1), branches(1, "l"), 1))
        .await
        .expect("the owner still writes");
    drop(log);
    let again = open(&cluster, &name);
    assert!(again.epoch() > e);
}

#[tokio::test]
async fn a_write_after_someone_else_took_the_owner_key_is_fenced_and_poisons() {
    let cluster = EtcdCluster::start(1).await.expect("start etcd");
    let name = unique_name("fenced");
    let log = open(&cluster, &name);
    let e = log.epoch();
    let kept = commit(tx_of(&log, 1), branches(2, "k"), 1);
    log.force_commit(e, kept.clone()).await.expect("force");

    // Someone deletes the owner key and takes the shard with a key of their own.
    let mut client = raw(&cluster).await;
    let owner = format!("/twopc/v1/{name}/shard/0/owner");
    client.delete(owner.clone(), None).await.expect("delete");
    let put = client
        .put(owner.clone(), "node=ffffffff endpoint=intruder", None)
        .await
        .expect("put");
    let theirs = u64::try_from(put.header().expect("header").revision()).expect("revision");

    let lost = commit(tx_of(&log, 2), branches(1, "lost"), 2);
    let err = log.force_commit(e, lost.clone()).await.expect_err("fenced");
    assert!(
        matches!(err, LogError::Fenced { caller, current } if caller == e && current == theirs),
        "want Fenced {{ caller: {e}, current: {theirs} }}, got {err:?}"
    );
    assert!(log.is_failed(), "a fenced write poisons the log");
    assert!(matches!(
        log.force_commit(e, lost.clone()).await,
        Err(LogError::Failed(_))
    ));
    assert!(matches!(log.sync(e).await, Err(LogError::Failed(_))));
    assert!(matches!(
        log.record_lazy(e, LazyRecord::Done { tx: kept.tx }),
        Err(LogError::Failed(_))
    ));
    // Nothing was written: the refused decision is not in etcd.
    let key = Keys::new(&name, 0).tx(&lost.tx);
    let got = client.get(key, None).await.expect("get");
    assert!(got.kvs().is_empty(), "a fenced write writes nothing");
    // A lazy record is fenced the same way when the writer writes it.
    drop(log);
    client.delete(owner, None).await.expect("delete");
    let log = open(&cluster, &name);
    let e = log.epoch();
    client
        .delete(format!("/twopc/v1/{name}/shard/0/owner"), None)
        .await
        .expect("delete");
    log.record_lazy(
        e,
        LazyRecord::Preparing {
            tx: tx_of(&log, 5),
            branches: branches(1, "p"),
        },
    )
    .expect("queued");
    assert!(
        matches!(log.sync(e).await, Err(LogError::Fenced { current: 0, .. })),
        "a sync after the owner key vanished is fenced"
    );
    assert!(log.is_failed());
}

#[tokio::test]
async fn losing_the_lease_stops_the_log_from_writing() {
    let cluster = EtcdCluster::start(1).await.expect("start etcd");
    let name = unique_name("lease");
    let mut opts = options(&cluster, &name);
    opts.lease_ttl_s = 2;
    let log = EtcdLog::open(opts).expect("open");
    let e = log.epoch();
    // Keep-alives hold it well past its time to live.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!log.is_failed(), "the keeper keeps the lease alive");
    log.sync(e).await.expect("still the owner");

    let mut client = raw(&cluster).await;
    let owner = client
        .get(format!("/twopc/v1/{name}/shard/0/owner"), None)
        .await
        .expect("get");
    let lease = owner.kvs().first().expect("owner key").lease();
    client.lease_revoke(lease).await.expect("revoke");
    until(
        "the log to notice its lease is gone",
        Duration::from_secs(5),
        || log.is_failed(),
    )
    .await;
    assert!(matches!(
        log.force_commit(e, commit(tx_of(&log, 1), branches(1, "x"), 1))
            .await,
        Err(LogError::Failed(m)) if m.contains("lease")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_on_a_three_member_cluster_with_one_member_killed() {
    let cluster = EtcdCluster::start(3).await.expect("start etcd");
    let log = open(&cluster, &unique_name("three"));
    let e = log.epoch();
    let first = commit(tx_of(&log, 1), branches(2, "t"), 1);
    log.force_commit(e, first.clone()).await.expect("force");
    // The first endpoint the client knows goes away.
    cluster.kill9(0).expect("kill a member");
    let started = Instant::now();
    let records: Vec<CommitRecord> = (2..=41u64)
        .map(|seq| commit(tx_of(&log, seq), branches(2, "t"), seq))
        .collect();
    let lsns = conformance::join_all(
        records
            .iter()
            .map(|r| log.force_commit(e, r.clone()))
            .collect(),
    )
    .await;
    for r in &lsns {
        r.as_ref()
            .expect("writes continue with two of three members");
    }
    for r in &records {
        log.record_lazy(e, LazyRecord::Done { tx: r.tx })
            .expect("done");
    }
    log.sync(e).await.expect("sync");
    assert_eq!(
        log.recover().expect("recover").commits,
        vec![first.clone()],
        "reads work too, and see every record"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // The member comes back; the log never noticed more than retries.
    tokio::task::block_in_place(|| cluster.start_again(0)).expect("restart");
    log.force_commit(e, commit(tx_of(&log, 99), branches(1, "z"), 1))
        .await
        .expect("force");
    assert!(!log.is_failed());
}

/// Decisions per second with 64 concurrent writers on a one-member cluster (run by hand:
/// `cargo test -p twopc-coordinator etcd_log_throughput -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn etcd_log_throughput() {
    let members: usize = std::env::var("ETCD_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cluster = EtcdCluster::start(members).await.expect("start etcd");
    let log = Arc::new(open(&cluster, &unique_name("throughput")));
    let e = log.epoch();
    let total = 20_000u64;
    let clients = 64u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = c + 1;
            while seq <= total {
                let tx = TxId {
                    node: log.node_id(),
                    epoch: e,
                    seq,
                };
                log.force_commit(e, commit(tx, branches(2, "b"), seq))
                    .await
                    .expect("force");
                seq += clients;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let secs = started.elapsed().as_secs_f64();
    let stats = log.stats();
    println!(
        "{members} member(s): {total} decisions in {secs:.2} s = {:.0}/s; {} etcd transactions, max batch {}",
        total as f64 / secs,
        stats.batches,
        stats.max_batch
    );
}
