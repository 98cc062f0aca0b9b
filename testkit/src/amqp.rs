//! RabbitMQ helpers for tests and the lab's checkers: declare a queue as the SDK does,
//! and take what a queue holds, as it is, with each message's id (the SDK publishes every
//! message under its own id, which is what a consumer deduplicates by).

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;

/// Declares `queue` durable, as the SDK does (a queue that exists already is left as it
/// is); returns how many messages it holds.
pub async fn declare_durable(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// One message taken from a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The AMQP `message_id` property (empty when the message has none).
    pub message_id: String,
    /// The body.
    pub payload: Vec<u8>,
}

/// Takes every message `queue` holds right now (`basic.get` without acknowledgements,
/// so nothing taken goes back), oldest first.
pub async fn take_all(channel: &Channel, queue: &str) -> Result<Vec<Taken>, lapin::Error> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let message_id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        out.push(Taken {
            message_id,
            payload: m.delivery.data,
        });
    }
    Ok(out)
}
