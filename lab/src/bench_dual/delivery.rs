//! How the dual-write benchmark sees an order's event arrive: the consumers on RabbitMQ
//! and NATS that record each receipt, the outbox relay of the `outbox` mode, and the wait
//! for every event of a measured slice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{Publisher, Samples};
use crate::order_service::Order;

/// How long the benchmark waits, after a slice, for that slice's events to arrive.
pub(super) const SLICE_DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Waits until every event `s` expects has arrived, or `limit` has passed.
pub(super) async fn wait_delivered(s: &Samples, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline
        && s.received.load(Ordering::Relaxed) < s.expected.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the outbox, publishes with confirmations, deletes what was published.
pub(super) async fn outbox_relay(
    pool: deadpool_postgres::Pool,
    publisher: Publisher,
    destination: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    loop {
        let mut c = pool.get().await?;
        loop {
            let tx = c.transaction().await?;
            let rows = tx
                .query(
                    "SELECT id, message_id, payload FROM outbox ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
                    &[],
                )
                .await?;
            let mut ids = Vec::with_capacity(rows.len());
            let publishes = rows.iter().map(|r| {
                ids.push(r.get::<_, i64>(0));
                publisher.publish(&destination, r.get::<_, &str>(1), r.get::<_, Vec<u8>>(2))
            });
            futures::future::try_join_all(publishes).await?;
            tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
                .await?;
            tx.commit().await?;
            if rows.len() < 1000 {
                break;
            }
        }
        drop(c);
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

pub(super) fn record_receipt(s: &Samples, order_id: &str) {
    let at = s
        .committed_at
        .lock()
        .ok()
        .and_then(|mut m| m.remove(order_id));
    if let Some(at) = at {
        s.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut d) = s.delivery_us.lock() {
            d.push(at.elapsed().as_micros() as u64);
        }
    }
}

pub(super) async fn spawn_rabbit_consumer(
    ch: lapin::Channel,
    queue: String,
    s: Arc<Samples>,
) -> anyhow::Result<()> {
    ch.basic_qos(1000, lapin::options::BasicQosOptions::default())
        .await?;
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        let _ch = ch;
        while let Some(Ok(d)) = deliveries.next().await {
            if let Ok(o) = serde_json::from_slice::<Order>(&d.data) {
                record_receipt(&s, &o.id);
            }
        }
    });
    Ok(())
}

pub(super) async fn spawn_nats_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    name: &str,
    subject: String,
    s: Arc<Samples>,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let stream = js.get_stream(stream).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(format!("bench-{name}")),
            filter_subject: subject,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let Ok(o) = serde_json::from_slice::<Order>(&m.payload) {
                record_receipt(&s, &o.id);
            }
        }
    });
    Ok(())
}
