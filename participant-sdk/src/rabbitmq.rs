//! [`RabbitResource`]: RabbitMQ (AMQP 0-9-1, through `lapin`) as a transaction branch.
//!
//! The transaction logic is the shared [`BrokerCore`] (see
//! [`crate::broker`]); this module only talks to RabbitMQ.
//!
//! # Destinations
//!
//! A destination is a **queue name**. Messages are published to the default exchange
//! (`""`) with the queue name as routing key, so they land in exactly that queue. The
//! queue is declared durable (no arguments) before the first publish to it on a
//! connection; if it already exists with other arguments (a quorum queue, a TTL...), the
//! declaration is refused by the server and the existing queue is used as it is, after a
//! passive check that it exists. Fan-out through exchanges is the queue owner's business
//! (bind the queue; or publish to a queue that a shovel forwards).
//!
//! # Durability of a confirmed message
//!
//! Every message is published with `delivery_mode = 2` (persistent), `mandatory = true`
//! and the branch's deterministic `message_id` property, on a channel in publisher
//! confirm mode (`confirm.select`). A message counts as published only when the broker
//! acks it: for a durable queue that means it was written to disk (classic queues) or
//! to a quorum of nodes (quorum queues). A nack, a message returned as unroutable (the
//! queue vanished) or a missing confirm is a failure, and the commit is retried.
//!
//! RabbitMQ does not deduplicate: a message whose confirm was lost is published again by
//! the retry, with the same `message_id`; consumers deduplicate by it.
//!
//! # Connection handling
//!
//! One connection and [`PUBLISH_CHANNELS`] confirm-mode channels per resource, created on
//! demand: whenever the connection or a channel is found dead (broker restart, network
//! failure), the next operation opens new ones. Publishes take the channels in turn, and
//! concurrent commits share them (lapin tracks each publish's confirm separately): one
//! channel is one process inside RabbitMQ, and a single one becomes the bottleneck (and
//! is throttled by RabbitMQ's flow control) at a few thousand persistent messages per
//! second. Nothing reconnects in the background.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::broker::{broker_resource, Broker, BrokerCore, BrokerOptions, PublishOutcome};
use crate::error::{Error, Result};
use crate::staging::{StagedMessage, StagingStore};

/// Bound on opening a connection and a channel.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A RabbitMQ broker resource. See the module docs.
pub struct RabbitResource {
    name: String,
    /// The URL to connect to (with credentials).
    connect_url: String,
    /// `connect_url` without credentials, for messages.
    url: String,
    core: BrokerCore,
    session: tokio::sync::Mutex<Option<Session>>,
}

impl std::fmt::Debug for RabbitResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitResource")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

/// Confirm-mode channels per connection (see the module docs).
pub const PUBLISH_CHANNELS: usize = 4;

/// One live connection with its confirm-mode channels.
struct Session {
    connection: Arc<Connection>,
    /// [`PUBLISH_CHANNELS`] channels; queue declarations use the first.
    channels: Vec<Channel>,
    /// The channel the next publish takes.
    next: usize,
    /// Queues declared on this connection.
    declared: Arc<Mutex<HashSet<String>>>,
}

impl Session {
    fn alive(&self) -> bool {
        self.connection.status().connected() && self.channels.iter().all(|c| c.status().connected())
    }
}

/// `url` with any `user:password@` replaced by `***@`.
pub(crate) fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

fn check_queue_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("a queue name must not be empty".into());
    }
    if name.len() > 255 {
        return Err("a queue name is at most 255 bytes".into());
    }
    if name.starts_with("amq.") {
        return Err("queue names starting with \"amq.\" are reserved by RabbitMQ".into());
    }
    Ok(())
}

impl RabbitResource {
    /// Connects to RabbitMQ at `amqp_url` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`)
    /// and returns the resource `name`, staging in `staging`. Fails if the broker cannot
    /// be reached now; use [`RabbitResource::connect_lazy`] to start without it.
    pub async fn connect(
        name: impl Into<String>,
        amqp_url: impl Into<String>,
        staging: Arc<StagingStore>,
    ) -> Result<RabbitResource> {
        let resource = RabbitResource::connect_lazy(name, amqp_url, staging)?;
        resource
            .session()
            .await
            .map_err(|e| Error::resource(&resource.name, e))?;
        Ok(resource)
    }

    /// Like [`RabbitResource::connect`], but connects on first use: the service can start
    /// (and recover its staged branches later) while the broker is down. Only the URL's
    /// syntax is checked here.
    pub fn connect_lazy(
        name: impl Into<String>,
        amqp_url: impl Into<String>,
        staging: Arc<StagingStore>,
    ) -> Result<RabbitResource> {
        let name = name.into();
        let connect_url = amqp_url.into();
        let url = redact_url(&connect_url);
        connect_url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| Error::Usage(format!("RabbitMQ URL {url:?} is malformed: {e}")))?;
        Ok(RabbitResource {
            core: BrokerCore::new(name.clone(), staging, BrokerOptions::default()),
            name,
            connect_url,
            url,
            session: tokio::sync::Mutex::new(None),
        })
    }

    /// Replaces the timeouts (see [`BrokerOptions`]).
    pub fn with_options(mut self, options: BrokerOptions) -> Self {
        self.core.set_options(options);
        self
    }

    /// The broker URL, without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes the connection, if open (the next use opens a new one).
    pub async fn close(&self) {
        if let Some(s) = self.session.lock().await.take() {
            let _ = s
                .connection
                .close(200, "closed by the application".into())
                .await;
        }
    }

    async fn open_session(&self) -> std::result::Result<Session, String> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("twopc participant {}", self.name).into());
        let connection = Connection::connect(&self.connect_url, props)
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ at {}: {e}", self.url))?;
        let channels = self.new_channels(&connection).await?;
        info!(resource = %self.name, url = %self.url, "connected to RabbitMQ");
        Ok(Session {
            connection: Arc::new(connection),
            channels,
            next: 0,
            declared: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// [`PUBLISH_CHANNELS`] new confirm-mode channels on `connection`.
    async fn new_channels(
        &self,
        connection: &Connection,
    ) -> std::result::Result<Vec<Channel>, String> {
        let mut channels = Vec::with_capacity(PUBLISH_CHANNELS);
        for _ in 0..PUBLISH_CHANNELS {
            channels.push(self.new_channel(connection).await?);
        }
        Ok(channels)
    }

    async fn new_channel(&self, connection: &Connection) -> std::result::Result<Channel, String> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("cannot open a channel to RabbitMQ at {}: {e}", self.url))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("cannot enable publisher confirms at {}: {e}", self.url))?;
        Ok(channel)
    }

    /// The live session, (re)connecting if needed, with every queue in `queues` declared.
    /// Returns the channel to publish on and the session's declared-queue set.
    async fn session_with(
        &self,
        queues: &[String],
    ) -> std::result::Result<(Channel, Arc<Mutex<HashSet<String>>>), String> {
        let mut slot = self.session.lock().await;
        let reuse = slot.as_ref().is_some_and(Session::alive);
        if !reuse {
            // A live connection whose channel died (e.g. closed by a refused declaration)
            // gets new channels; anything else a new connection.
            let reopened = match slot.take() {
                Some(s) if s.connection.status().connected() => {
                    match tokio::time::timeout(CONNECT_TIMEOUT, self.new_channels(&s.connection))
                        .await
                    {
                        Ok(Ok(channels)) => Some(Session { channels, ..s }),
                        _ => None,
                    }
                }
                _ => None,
            };
            let session = match reopened {
                Some(s) => s,
                None => tokio::time::timeout(CONNECT_TIMEOUT, self.open_session())
                    .await
                    .map_err(|_| format!("cannot connect to RabbitMQ at {}: no answer within {CONNECT_TIMEOUT:?}", self.url))??,
            };
            *slot = Some(session);
        }
        let Some(session) = slot.as_mut() else {
            return Err("internal error: no RabbitMQ session".into());
        };
        for queue in queues {
            if session
                .declared
                .lock()
                .map(|d| d.contains(queue))
                .unwrap_or(false)
            {
                continue;
            }
            self.declare(session, queue).await?;
            if let Ok(mut d) = session.declared.lock() {
                d.insert(queue.clone());
            }
        }
        let channel = session.channels[session.next % session.channels.len()].clone();
        session.next = session.next.wrapping_add(1);
        Ok((channel, session.declared.clone()))
    }

    async fn declare(&self, session: &mut Session, queue: &str) -> std::result::Result<(), String> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let first = session.channels[0]
            .queue_declare(queue.into(), durable, FieldTable::default())
            .await;
        let err = match first {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // The server closes the channel on a refused declaration (e.g. the queue exists
        // with other arguments): check on a new channel that the queue exists, and use
        // that channel from now on.
        let channel = match self.new_channel(&session.connection).await {
            Ok(c) => c,
            Err(_) => {
                return Err(format!(
                    "cannot declare queue {queue:?} at {}: {err}",
                    self.url
                ))
            }
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let second = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await;
        match second {
            Ok(_) => {
                warn!(resource = %self.name, queue, error = %err, "queue exists with other arguments; using it as it is");
                session.channels[0] = channel;
                Ok(())
            }
            Err(_) => {
                // The passive check closed that channel too; the next use opens another.
                Err(format!(
                    "cannot declare queue {queue:?} at {}: {err}",
                    self.url
                ))
            }
        }
    }

    async fn session(&self) -> std::result::Result<(), String> {
        self.session_with(&[]).await.map(|_| ())
    }
}

fn properties(m: &StagedMessage) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(m.message_id.clone()))
        .with_delivery_mode(2);
    if let Some(ct) = &m.content_type {
        props = props.with_content_type(ShortString::from(ct.clone()));
    }
    if !m.headers.is_empty() {
        let mut table = FieldTable::default();
        for (k, v) in &m.headers {
            table.insert(
                ShortString::from(k.clone()),
                AMQPValue::LongString(LongString::from(v.clone())),
            );
        }
        props = props.with_headers(table);
    }
    props
}

#[tonic::async_trait]
impl Broker for RabbitResource {
    fn core(&self) -> &BrokerCore {
        &self.core
    }

    fn check_destination(&self, destination: &str) -> std::result::Result<(), String> {
        check_queue_name(destination)
    }

    async fn ensure_ready(&self, destinations: &[String]) -> std::result::Result<(), String> {
        self.session_with(destinations).await.map(|_| ())
    }

    async fn publish_confirmed(
        &self,
        messages: &[StagedMessage],
        timeout: Duration,
    ) -> Vec<PublishOutcome> {
        let deadline = Instant::now() + timeout;
        let mut queues: Vec<String> = messages.iter().map(|m| m.destination.clone()).collect();
        queues.sort();
        queues.dedup();
        let (channel, declared) =
            match tokio::time::timeout_at(deadline, self.session_with(&queues)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return vec![PublishOutcome::NotSent(e); messages.len()],
                Err(_) => {
                    let e = format!("RabbitMQ at {}: no connection within {timeout:?}", self.url);
                    return vec![PublishOutcome::NotSent(e); messages.len()];
                }
            };
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; messages.len()];
        // Every publish is queued at once, in order (lapin queues a publish's frames when
        // its future is first polled, and join_all polls them in order), so the I/O loop
        // writes the batch together instead of one message per wake-up.
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut sends = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !channel.status().connected() {
                outcomes[i] = Some(PublishOutcome::NotSent(format!(
                    "RabbitMQ at {}: the channel closed",
                    self.url
                )));
                continue;
            }
            let send = channel.basic_publish(
                "".into(),
                m.destination.as_str().into(),
                opts,
                &m.payload,
                properties(m),
            );
            sends.push((i, tokio::time::timeout_at(deadline, send)));
        }
        let order: Vec<usize> = sends.iter().map(|(i, _)| *i).collect();
        let sent = futures::future::join_all(sends.into_iter().map(|(_, f)| f)).await;
        let mut pending = Vec::with_capacity(messages.len());
        for (i, sent) in order.into_iter().zip(sent) {
            match PublishOutcome::handed_over(&self.url, sent) {
                Ok(confirm) => pending.push((i, confirm)),
                Err(outcome) => outcomes[i] = Some(outcome),
            }
        }
        for (i, confirm) in pending {
            let queue = &messages[i].destination;
            outcomes[i] = Some(match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => PublishOutcome::Confirmed,
                Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                    // Unroutable: the queue is gone. Declare it again next time.
                    if let Ok(mut d) = declared.lock() {
                        d.remove(queue);
                    }
                    PublishOutcome::NotSent(format!(
                        "queue {queue:?} does not exist at {} (returned: {} {})",
                        self.url, returned.reply_code, returned.reply_text
                    ))
                }
                Ok(Ok(Confirmation::Nack(_))) => PublishOutcome::Unconfirmed(format!(
                    "RabbitMQ at {} nacked the message for {queue:?}",
                    self.url
                )),
                Ok(Ok(Confirmation::NotRequested)) => PublishOutcome::Unconfirmed(
                    "internal error: the channel is not in confirm mode".into(),
                ),
                Ok(Err(e)) => {
                    PublishOutcome::Unconfirmed(format!("no confirm from {}: {e}", self.url))
                }
                Err(_) => PublishOutcome::Unconfirmed(format!(
                    "no confirm from {} within {timeout:?}",
                    self.url
                )),
            });
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    PublishOutcome::Unconfirmed("internal error: no outcome".into())
                })
            })
            .collect()
    }
}

broker_resource!(RabbitResource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("nats://u:p@h:4222"), "nats://***@h:4222");
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(check_queue_name("orders").is_ok());
        for bad in ["", "amq.x", &"q".repeat(256)] {
            assert!(check_queue_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
