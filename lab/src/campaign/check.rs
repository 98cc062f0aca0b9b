//! The campaign's checker: the bounded waits after each cycle's fault (the coordinator
//! answers again, nothing is left in doubt), and at the end PostgreSQL and the broker
//! read directly and every invariant checked (see the campaign's module docs for the list).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use twopc_testkit::requests;

use super::*;

pub(super) struct CheckResult {
    pub(super) violations: Vec<String>,
    pub(super) duplicates: u64,
    /// One-phase markers left of transactions whose Commit call did not answer (allowed).
    pub(super) markers_left: usize,
    /// One-phase markers of answered commits whose deletion failed while PostgreSQL was
    /// down and was not retried before the end (tolerated in kill-postgres cycles only).
    pub(super) markers_leaked: usize,
    /// Transactions the coordinator answered FORGOTTEN at the check (their records were
    /// collected): their outcome is checked on the branches only.
    pub(super) forgotten: usize,
}

/// How long the checker lets the outbox sweep publish what is left (every cycle already
/// waited for an empty outbox, so this normally returns at once).
const DRAIN: Duration = Duration::from_secs(15);

/// How long the checker lets the relay delete the markers of answered one-phase commits
/// (it does so right after each answer; every cycle settled since).
const MARKER_WAIT: Duration = Duration::from_secs(2);

/// The checker: PostgreSQL and the broker, read directly.
pub(super) async fn check(
    ops: &[Op],
    env: &Env,
    p: &Participant,
    amqp_url: &str,
) -> anyhow::Result<CheckResult> {
    let mut violations = Vec::new();
    let mut forgotten = 0;
    let c = env.pool.get().await?;
    // The outbox first: what is left in it is published by the sweep (every 200 ms, rows
    // older than 500 ms); only then is the queue complete.
    let deadline = Instant::now() + DRAIN;
    let outbox_left: Vec<(String, String)> = loop {
        let left: Vec<(String, String)> = c
            .query(
                "SELECT message_id, to_char(staged_at, 'HH24:MI:SS.MS') FROM twopc_outbox ORDER BY id",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !outbox_left.is_empty() {
        let some: Vec<String> = outbox_left
            .iter()
            .take(10)
            .map(|(id, at)| format!("{id} (staged {at})"))
            .collect();
        violations.push(format!(
            "{} event(s) still in twopc_outbox after a {DRAIN:?} drain (never published): {}",
            outbox_left.len(),
            some.join(", ")
        ));
    }
    // Rows.
    let rows: HashMap<String, Order> = c
        .query("SELECT id, customer, item, quantity FROM orders", &[])
        .await?
        .into_iter()
        .map(|r| {
            let o = Order {
                id: r.get(0),
                customer: r.get(1),
                item: r.get(2),
                quantity: r.get(3),
            };
            (o.id.clone(), o)
        })
        .collect();
    // Events, drained straight from the queue, deduplicated by message id.
    let (events, duplicates) = drain_queue(amqp_url, &env.queue).await?;
    let mut events_by_order: HashMap<String, (String, Order)> = HashMap::new();
    for (message_id, payload) in &events {
        match serde_json::from_slice::<OrderCreated>(payload) {
            Ok(e) => {
                if let Some((other, _)) =
                    events_by_order.insert(e.order.id.clone(), (message_id.clone(), e.order))
                {
                    violations.push(format!(
                        "two different messages for one order (messages {other} and {message_id})"
                    ));
                }
            }
            Err(e) => violations.push(format!("message {message_id} is not an OrderCreated: {e}")),
        }
    }
    let mut coordinator = twopc_proto::v1::coordinator_client::CoordinatorClient::new(
        tonic::transport::Endpoint::from_shared(env.coordinator_url.clone())?.connect_lazy(),
    );
    for op in ops {
        let label = op.label();
        let id = &label;
        let id_key = &op.order.id;
        let row = rows.get(id_key);
        let event = events_by_order.get(id_key);
        match (&op.result, row, event) {
            (OpResult::Ok, Some(r), Some((_, e))) => {
                if r != &op.order || e != &op.order {
                    violations.push(format!(
                        "{id}: row {r:?} / event {e:?} differ from the order"
                    ));
                }
            }
            (OpResult::Ok, _, _) => violations.push(format!(
                "{id}: OK reply but row={} event={}",
                row.is_some(),
                event.is_some()
            )),
            (OpResult::Aborted(why), None, None) => {
                let _ = why;
            }
            (OpResult::Aborted(why), _, _) => violations.push(format!(
                "{id}: ABORTED reply ({why}) but row={} event={}",
                row.is_some(),
                event.is_some()
            )),
            (OpResult::Unknown(_), Some(_), Some(_)) | (OpResult::Unknown(_), None, None) => {}
            (OpResult::Unknown(why), _, _) => violations.push(format!(
                "{id}: unknown reply ({why}) and half-committed: row={} event={}",
                row.is_some(),
                event.is_some()
            )),
        }
        // The event is this transaction's, staged where the order said.
        if let Some((message_id, _)) = event {
            match op.expected_message_id() {
                Some(expected) if *message_id != expected => violations.push(format!(
                    "{id}: event has message id {message_id}, expected {expected}"
                )),
                Some(_) => {}
                None => violations.push(format!(
                    "{id}: event {message_id} although the transaction never began"
                )),
            }
        }
        // The coordinator's decision matches the branches.
        if let Some(tx_id) = &op.tx_id {
            if let Ok(resp) = coordinator.get_transaction(requests::get(tx_id)).await {
                let outcome = resp.into_inner().outcome;
                if outcome == pb::Outcome::Forgotten as i32 {
                    forgotten += 1;
                }
                let committed = row.is_some() && event.is_some();
                if outcome == pb::Outcome::Committed as i32 && !committed {
                    violations.push(format!(
                        "{id}: coordinator says COMMITTED but row={} event={}",
                        row.is_some(),
                        event.is_some()
                    ));
                }
                // One-phase commits included: their intent and outcome are synced, so a
                // crash never makes the coordinator forget a committed one.
                if outcome == pb::Outcome::Aborted as i32 && (row.is_some() || event.is_some()) {
                    violations.push(format!(
                        "{id}: coordinator says ABORTED but row={} event={}",
                        row.is_some(),
                        event.is_some()
                    ));
                }
            }
        }
    }
    for id in rows.keys() {
        if !events_by_order.contains_key(id) {
            violations.push(format!("{id}: row without event"));
        }
    }
    for (id, (message_id, _)) in &events_by_order {
        if !rows.contains_key(id) {
            violations.push(format!("{id}: event {message_id} without row"));
        }
    }
    // One-phase markers. Written in the one-phase commit's own transaction, so each one
    // belongs to a committed database-staged order of a one-phase cycle; deleted (by the
    // relay) once the owner's Commit answered and a coordinator Barrier of the same epoch
    // made the outcome durable. Markers of orders whose Commit did not answer may stay
    // (until marker_retention).
    let by_gid: HashMap<String, &Op> = ops
        .iter()
        .filter_map(|op| op.db_gid().map(|g| (g, op)))
        .collect();
    let deadline = Instant::now() + MARKER_WAIT;
    let markers: Vec<String> = loop {
        let markers: Vec<String> = c
            .query(MARKERS_SQL, &[])
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let answered = markers.iter().any(|g| {
            by_gid
                .get(g)
                .is_some_and(|op| !matches!(op.result, OpResult::Unknown(_)))
        });
        if !answered || Instant::now() > deadline {
            break markers;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut markers_left = 0;
    let mut markers_leaked = 0;
    for gid in &markers {
        let Some(op) = by_gid.get(gid) else {
            violations.push(format!(
                "one-phase marker {gid} of no transaction of the campaign"
            ));
            continue;
        };
        let id = op.label();
        match &op.result {
            OpResult::Unknown(_) => markers_left += 1,
            // The relay deletes the marker of an answered one-phase commit right after the
            // answer and, when PostgreSQL is down then, again at every sweep; a participant
            // restarted before that forgets the retry (the marker then goes after
            // marker_retention, 24 h). Tolerated only for orders of a cycle that killed
            // PostgreSQL; counted.
            OpResult::Ok if op.fault == FaultKind::KillPostgres => {
                markers_leaked += 1;
                eprintln!(
                    "campaign: note: {id}: one-phase marker {gid} left although the Commit answered: \
                     PostgreSQL was killed when the relay deleted it, and no retry has run since"
                );
            }
            // Answered early, and the coordinator was killed before the SDK's Barrier (the
            // restarted one answers another epoch, so the outcome may not be durable), or
            // the participant process "died" with the commit waiting for its Barrier: the
            // marker must stay (until marker_retention). Counted.
            OpResult::Ok
                if matches!(
                    op.fault,
                    FaultKind::KillCoordinator
                        | FaultKind::KillCoordinatorAtStart
                        | FaultKind::KillCoordinatorInCollection
                        | FaultKind::RestartParticipantMidLoad
                ) =>
            {
                markers_leaked += 1;
                eprintln!(
                    "campaign: note: {id}: one-phase marker {gid} kept: {:?} before a Barrier made \
                     the early-answered outcome durable",
                    op.fault
                );
            }
            r => violations.push(format!(
                "{id}: its one-phase marker {gid} is left ({MARKER_WAIT:?} after the end) although the owner's Commit \
                 answered ({})",
                r.name()
            )),
        }
        if op.staging != EventStaging::Database || !op.one_phase {
            violations.push(format!(
                "{id}: one-phase marker {gid} of a transaction that could not commit in one phase"
            ));
        }
        if !rows.contains_key(&op.order.id) {
            violations.push(format!(
                "{id}: one-phase marker {gid} but no order row (the marker commits with the row)"
            ));
        }
    }
    let prepared = p.db.prepared_count().await?;
    if prepared != 0 {
        violations.push(format!("{prepared} prepared transaction(s) left"));
    }
    if !p.staging.is_empty() {
        violations.push(format!("{} staged batch(es) left", p.staging.len()));
    }
    Ok(CheckResult {
        violations,
        duplicates,
        markers_left,
        markers_leaked,
        forgotten,
    })
}

/// The gids of the one-phase markers in `twopc_one_phase` (not the fences), in order.
const MARKERS_SQL: &str = "SELECT gid FROM twopc_one_phase WHERE NOT fenced ORDER BY gid";

/// The gids of the one-phase markers ([`MARKERS_SQL`]).
pub(super) async fn marker_gids(pool: &deadpool_postgres::Pool) -> anyhow::Result<Vec<String>> {
    let c = pool.get().await?;
    Ok(c.query(MARKERS_SQL, &[])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

/// Every message in the queue, deduplicated by message id; returns them and how many
/// duplicates were removed. Deletes the queue afterwards.
async fn drain_queue(
    amqp_url: &str,
    queue: &str,
) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, u64)> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut seen = BTreeMap::new();
    let mut duplicates = 0;
    for m in twopc_testkit::amqp::take_all(&ch, queue).await? {
        if seen.insert(m.message_id, m.payload).is_some() {
            duplicates += 1;
        }
    }
    let _ = ch
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
    Ok((seen, duplicates))
}

/// Waits until the coordinator answers on the participant's own channel (so the next
/// orders do not fail on a connection to the previous process).
pub(super) async fn coordinator_answers(p: &Participant, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut coordinator = p.sdk.coordinator();
    loop {
        match coordinator
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("after {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until nothing is in doubt anywhere: no prepared gid, nothing staged, no event
/// waiting in the outbox table, the coordinator working on nothing.
pub(super) async fn settle(p: &Participant, env: &Env, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut coordinator = twopc_proto::v1::coordinator_client::CoordinatorClient::new(
        tonic::transport::Endpoint::from_shared(env.coordinator_url.clone())?.connect_lazy(),
    );
    loop {
        p.sdk.recover_now().await;
        let prepared = p.db.prepared_count().await.unwrap_or(-1);
        let staged = p.staging.len();
        let open = p.db.open_branch_list(Duration::ZERO).len();
        let outbox = p.db.outbox_backlog().await.unwrap_or(-1);
        let live_txs = match coordinator
            .list_transactions(pb::ListTransactionsRequest::default())
            .await
        {
            Ok(r) => Some(r.into_inner().transactions),
            Err(_) => None,
        };
        let live = live_txs.as_ref().map_or(-1, |t| t.len() as i64);
        if prepared == 0 && staged == 0 && live == 0 && open == 0 && outbox == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            // Name what the coordinator is stuck on: each live transaction's branches and
            // their last errors.
            let mut stuck = Vec::new();
            for t in live_txs.unwrap_or_default().iter().take(5) {
                let detail = match coordinator.get_transaction(requests::get(&t.tx_id)).await {
                    Ok(r) => r
                        .into_inner()
                        .branches
                        .iter()
                        .map(|b| {
                            format!(
                                "{} {:?} after {} attempt(s): {}",
                                b.branch.as_ref().map_or("?", |b| b.branch_id.as_str()),
                                pb::BranchState::try_from(b.state).unwrap_or_default(),
                                b.attempts,
                                b.last_error
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(e) => e.message().to_string(),
                };
                stuck.push(format!(
                    "tx {} {:?}: {detail}",
                    t.tx_id,
                    pb::TxState::try_from(t.state).unwrap_or_default()
                ));
            }
            bail!(
                "after {within:?}: {prepared} prepared gid(s), {staged} staged batch(es), \
                 {open} open database branch(es), {live} live transaction(s), \
                 {outbox} event(s) in twopc_outbox{}{}",
                if stuck.is_empty() { "" } else { "; live: " },
                stuck.join(" | ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
