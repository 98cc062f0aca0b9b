//! The driver over a fake coordinator, in paused time: it performs the core's commands
//! (bounding the Barrier), answers callers through oneshots, tells resources what to
//! forget, and ends once its handle is gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use twopc_proto::v1 as pb;

use super::*;
use crate::client::local::driver::{start, Began, LocalCoordinator, LocalHandle};
use crate::error::Error;
use crate::resource::{AbortOutcome, BranchKind, OnePhase, Registry, Resource, Retry, Vote};

/// A coordinator that answers at once (its Barrier may hang), and remembers the calls.
#[derive(Default)]
struct Fake {
    epoch: AtomicU64,
    barrier_hangs: AtomicBool,
    off: AtomicBool,
    next_id: AtomicU64,
    begins: Mutex<Vec<u32>>,
    reports: Mutex<Vec<Vec<String>>>,
    released: Mutex<Vec<String>>,
    aborted: Mutex<Vec<String>>,
}

impl LocalCoordinator for Fake {
    async fn begin_local(&self, _branch: pb::Branch, count: u32) -> BeginLocalAnswer<Error> {
        if self.off.load(Ordering::SeqCst) {
            return BeginLocalAnswer::Off;
        }
        crate::lock(&self.begins).push(count);
        let mut ids =
            (0..count).map(|_| format!("tx{}", self.next_id.fetch_add(1, Ordering::SeqCst)));
        BeginLocalAnswer::Begun {
            first: ids.next().unwrap_or_default(),
            rest: ids.collect(),
            epoch: self.epoch.load(Ordering::SeqCst),
            timeout_ms: 0,
        }
    }

    async fn barrier(&self) -> BarrierAnswer {
        if self.barrier_hangs.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(self.epoch.load(Ordering::SeqCst))
    }

    async fn report(&self, tx_ids: Vec<String>) -> ReportAnswer {
        crate::lock(&self.reports).push(tx_ids);
        ReportAnswer::Recorded(self.epoch.load(Ordering::SeqCst))
    }

    async fn release(&self, tx_id: String) -> std::result::Result<(), String> {
        crate::lock(&self.released).push(tx_id);
        Ok(())
    }

    async fn abort(&self, tx_id: String, _reason: String) -> std::result::Result<(), String> {
        crate::lock(&self.aborted).push(tx_id);
        Ok(())
    }
}

/// A resource that only remembers which branches it was told to forget.
#[derive(Default)]
struct Forgets(Mutex<Vec<String>>);

#[tonic::async_trait]
impl Resource for Forgets {
    fn name(&self) -> &str {
        "db"
    }
    fn kind(&self) -> BranchKind {
        BranchKind::Database
    }
    async fn prepare(&self, _tx_id: &str, _branch_id: &str) -> Vote {
        Vote::Yes
    }
    async fn commit(&self, _tx_id: &str, _branch_id: &str) -> Result<(), Retry> {
        Ok(())
    }
    async fn commit_one_phase(&self, _tx_id: &str, _branch_id: &str) -> Result<OnePhase, Retry> {
        Ok(OnePhase::Committed)
    }
    async fn abort(&self, _tx_id: &str, _branch_id: &str) -> Result<AbortOutcome, Retry> {
        Ok(AbortOutcome::Aborted)
    }
    fn outcome_known(&self, tx_id: &str, _branch_id: &str) {
        crate::lock(&self.0).push(tx_id.to_string());
    }
    async fn in_doubt(&self) -> Result<Vec<(String, String)>, Retry> {
        Ok(Vec::new())
    }
}

fn rig(begin_ahead: u32) -> (Arc<Fake>, Arc<Forgets>, LocalHandle) {
    let fake = Arc::new(Fake::default());
    fake.epoch.store(7, Ordering::SeqCst);
    let db = Arc::new(Forgets::default());
    let mut resources: HashMap<String, Arc<dyn Resource>> = HashMap::new();
    resources.insert("db".into(), db.clone());
    let registry: Registry = Arc::new(RwLock::new(resources));
    let handle = start(fake.clone(), registry, begin_ahead);
    (fake, db, handle)
}

fn branch() -> pb::Branch {
    pb::Branch {
        branch_id: "svc:db".into(),
        ..Default::default()
    }
}

async fn local(handle: &LocalHandle) -> (String, tokio::sync::oneshot::Receiver<Intent>) {
    match handle.begin_local("db", branch()).await {
        Ok(Began::Local { tx_id, durable }) => (tx_id, durable),
        Ok(Began::Off) => panic!("off"),
        Err(e) => panic!("{e}"),
    }
}

/// Lets the driver run until `done` holds (paused time advances only when every task
/// waits, so this is a handful of turns, not a sleep).
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never: {what}");
}

#[tokio::test(start_paused = true)]
async fn a_local_transaction_hears_that_its_intent_is_durable() {
    let (fake, _, handle) = rig(128);
    let (tx_id, durable) = local(&handle).await;
    assert_eq!(tx_id, "tx0");
    assert_eq!(durable.await.ok(), Some(Intent::Durable));
    assert_eq!(*crate::lock(&fake.begins), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_barrier_without_an_answer_fails_after_5_s() {
    let (fake, _, handle) = rig(128);
    fake.barrier_hangs.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let (_, durable) = local(&handle).await;
    assert_eq!(
        durable.await.ok(),
        Some(Intent::Unknown(format!(
            "no answer within {BARRIER_TIMEOUT:?}"
        )))
    );
    assert_eq!(started.elapsed(), BARRIER_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_coordinator_without_local_begins_is_reported_off() {
    let (fake, _, handle) = rig(128);
    fake.off.store(true, Ordering::SeqCst);
    assert!(matches!(
        handle.begin_local("db", branch()).await,
        Ok(Began::Off)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_local_commit_is_reported_then_forgotten_and_a_refusal_aborts() {
    let (fake, db, handle) = rig(128);
    handle.committed("t1".into(), "svc:db".into());
    until("reported and forgotten", || {
        crate::lock(&db.0).as_slice() == ["t1".to_string()]
    })
    .await;
    assert_eq!(*crate::lock(&fake.reports), vec![vec!["t1".to_string()]]);
    // A transaction committed through the coordinator, answered by another epoch: not
    // forgotten.
    handle.forget(Unforgotten {
        tx_id: "t2".into(),
        branch_ids: vec!["svc:db".into()],
        epoch: 6,
    });
    handle.refused("t3".into(), "duplicate key".into());
    until("aborted", || !crate::lock(&fake.aborted).is_empty()).await;
    assert_eq!(*crate::lock(&db.0), vec!["t1".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_pooled_ids_back_and_the_driver_ends_with_its_handle() {
    let (fake, _, handle) = rig(128);
    // 2,000 a second for a while: ids are begun ahead.
    for _ in 0..300 {
        let _ = local(&handle).await;
        tokio::time::advance(Duration::from_micros(500)).await;
    }
    until("ids pooled", || handle.pooled() > 0).await;
    let pooled = handle.pooled();
    handle.shutdown().await;
    assert_eq!(handle.pooled(), 0);
    assert_eq!(crate::lock(&fake.released).len(), pooled);
    assert!(crate::lock(&fake.begins).iter().any(|&n| n > 1));
    drop(handle);
    until("the driver let go of the coordinator", || {
        Arc::strong_count(&fake) == 1
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_id_whose_caller_went_away_goes_back() {
    let (fake, _, handle) = rig(128);
    fake.barrier_hangs.store(true, Ordering::SeqCst);
    // The caller gives up before the answer is delivered: dropped with its future.
    {
        let begin = handle.begin_local("db", branch());
        tokio::pin!(begin);
        let _ = futures::poll!(&mut begin);
    }
    until("released", || {
        crate::lock(&fake.released).as_slice() == ["tx0".to_string()]
    })
    .await;
}
