//! [`NatsResource`]: NATS JetStream (through `async-nats`) as a transaction branch.
//!
//! The transaction logic is the shared [`BrokerCore`] (see
//! [`crate::broker`]); this module only talks to NATS.
//!
//! # Destinations and the stream
//!
//! A destination is a **subject** without wildcards. The resource owns one JetStream
//! stream (file storage) that must capture every subject it publishes to:
//! [`NatsResource::connect`] creates it with the given subjects if it does not exist (an
//! existing stream is used as it is), [`Transaction::publish`](crate::Transaction::publish)
//! refuses a subject that none of the configured subject patterns match, and prepare
//! votes no if the server's stream does not capture a destination (or is gone and
//! cannot be created again).
//!
//! # Confirmation and deduplication
//!
//! Every message carries the `Nats-Msg-Id` header set to its deterministic message id,
//! and counts as published when the stream's `PubAck` arrives. A `PubAck` flagged
//! `duplicate` (the stream already holds that id) counts as published too: that is the
//! deduplication at work when a commit is retried after a lost ack, or recovery
//! publishes a batch again. JetStream only remembers ids for the stream's **duplicate
//! window** (`duplicate_window`, 2 minutes by default, which is what streams created here
//! get): a repeat later than that is stored twice, so consumers should still
//! deduplicate by message id (the header) when a broker outage can last longer.
//!
//! # Durability caveat: NATS syncs lazily
//!
//! JetStream acks a message once it is written to its file store, **not** once it is
//! fsynced: by default the server syncs its files every 2 minutes (`sync_interval`). A
//! message acked here survives a crash of the nats-server process, but an OS crash or a
//! power loss of a single server in that window can lose it, after the staged copy was
//! deleted. Where that matters, run a replicated stream (R3, acked after a quorum
//! stored it) or, on NATS 2.10+, set `jetstream { sync_interval: always }` in the server
//! configuration.
//!
//! # Connection handling
//!
//! The client reconnects in the background (delays doubling from a few ms up to 1 s).
//! While it is disconnected, prepare votes no at once and commits fail fast without
//! sending anything (so nothing is queued inside the client to be sent after the
//! reconnect); the coordinator retries them.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use tokio::time::Instant;
use tracing::info;

use crate::broker::{broker_resource, Broker, BrokerCore, BrokerOptions, PublishOutcome};
use crate::error::{Error, Result};
use crate::rabbitmq::redact_url;
use crate::staging::{StagedMessage, StagingStore};

/// Bound on the initial connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on JetStream API requests (stream info / create).
const API_TIMEOUT: Duration = Duration::from_secs(3);
/// Duplicate window of streams created here.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A NATS JetStream broker resource. See the module docs.
pub struct NatsResource {
    name: String,
    shown_url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    stream_config: stream::Config,
    core: BrokerCore,
}

impl std::fmt::Debug for NatsResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsResource")
            .field("name", &self.name)
            .field("url", &self.shown_url)
            .field("stream", &self.stream_config.name)
            .finish()
    }
}

/// Whether `subject` (no wildcards) matches the subject pattern `pattern` (`*` matches
/// one token, a final `>` one or more).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn check_subject(subject: &str) -> std::result::Result<(), String> {
    if subject.is_empty() {
        return Err("a subject must not be empty".into());
    }
    if subject
        .split('.')
        .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err("a subject to publish to needs non-empty tokens and no wildcards".into());
    }
    if subject.bytes().any(|c| c.is_ascii_whitespace()) {
        return Err("a subject must not contain whitespace".into());
    }
    Ok(())
}

impl NatsResource {
    /// Connects to NATS at `url` (e.g. `nats://127.0.0.1:4222`), makes sure the
    /// file-storage stream `stream_name` exists (creating it for `subjects` if not), and
    /// returns the resource `name`, staging in `staging`. Fails if the server cannot be
    /// reached or the stream cannot be created.
    pub async fn connect(
        name: impl Into<String>,
        url: impl Into<String>,
        stream_name: impl Into<String>,
        subjects: Vec<String>,
        staging: Arc<StagingStore>,
    ) -> Result<NatsResource> {
        let name = name.into();
        let url = url.into();
        let stream_name = stream_name.into();
        let shown_url = redact_url(&url);
        if subjects.is_empty() {
            return Err(Error::Usage(format!(
                "NATS resource {name:?}: give at least one subject for stream {stream_name:?}"
            )));
        }
        let options = async_nats::ConnectOptions::new()
            .name(format!("twopc participant {name}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .reconnect_delay_callback(|attempts| {
                let exp = u32::try_from(attempts.saturating_sub(1))
                    .unwrap_or(u32::MAX)
                    .min(20);
                Duration::from_millis(2u64.saturating_pow(exp)).min(Duration::from_secs(1))
            });
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT + Duration::from_secs(1),
            options.connect(url.as_str()),
        )
        .await
        .map_err(|_| {
            Error::resource(
                &name,
                format!("cannot connect to NATS at {shown_url}: timed out"),
            )
        })?
        .map_err(|e| {
            Error::resource(&name, format!("cannot connect to NATS at {shown_url}: {e}"))
        })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        let stream_config = stream::Config {
            name: stream_name,
            subjects,
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let resource = NatsResource {
            core: BrokerCore::new(name.clone(), staging, BrokerOptions::default()),
            name,
            shown_url,
            client,
            js,
            stream_config,
        };
        let info = resource
            .stream_info()
            .await
            .map_err(|e| Error::resource(&resource.name, e))?;
        if info.storage != stream::StorageType::File {
            tracing::warn!(resource = %resource.name, stream = %info.name, "the stream uses memory storage: staged messages will not survive a NATS restart once published");
        }
        info!(resource = %resource.name, url = %resource.shown_url, stream = %info.name, subjects = ?info.subjects, "connected to NATS JetStream");
        Ok(resource)
    }

    /// Replaces the timeouts (see [`BrokerOptions`]).
    pub fn with_options(mut self, options: BrokerOptions) -> Self {
        self.core.set_options(options);
        self
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_config.name
    }

    /// The underlying client (for consumers, health checks).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The server's configuration of the stream, creating the stream if it is missing.
    async fn stream_info(&self) -> std::result::Result<stream::Config, String> {
        let stream = self
            .js
            .get_or_create_stream(self.stream_config.clone())
            .await
            .map_err(|e| {
                format!(
                    "NATS at {}: stream {:?}: {e}",
                    self.shown_url, self.stream_config.name
                )
            })?;
        Ok(stream.cached_info().config.clone())
    }

    fn connected(&self) -> std::result::Result<(), String> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            other => Err(format!(
                "not connected to NATS at {} ({other})",
                self.shown_url
            )),
        }
    }
}

#[tonic::async_trait]
impl Broker for NatsResource {
    fn core(&self) -> &BrokerCore {
        &self.core
    }

    fn check_destination(&self, destination: &str) -> std::result::Result<(), String> {
        check_subject(destination)?;
        if self
            .stream_config
            .subjects
            .iter()
            .any(|p| subject_matches(p, destination))
        {
            Ok(())
        } else {
            Err(format!(
                "subject is not captured by stream {:?} (subjects {:?})",
                self.stream_config.name, self.stream_config.subjects
            ))
        }
    }

    async fn ensure_ready(&self, destinations: &[String]) -> std::result::Result<(), String> {
        self.connected()?;
        let config = self.stream_info().await?;
        for d in destinations {
            if !config.subjects.iter().any(|p| subject_matches(p, d)) {
                return Err(format!(
                    "subject {d:?} is not captured by stream {:?} at {} (subjects {:?})",
                    config.name, self.shown_url, config.subjects
                ));
            }
        }
        Ok(())
    }

    async fn publish_confirmed(
        &self,
        messages: &[StagedMessage],
        timeout: Duration,
    ) -> Vec<PublishOutcome> {
        let deadline = Instant::now() + timeout;
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; messages.len()];
        let mut pending = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            // While disconnected the client would queue the message and send it after the
            // reconnect, with nobody waiting for its ack: do not hand it over at all.
            if let Err(e) = self.connected() {
                outcomes[i] = Some(PublishOutcome::NotSent(e));
                continue;
            }
            let mut publish = PublishMessage::build()
                .payload(Bytes::from(m.payload.clone()))
                .message_id(&m.message_id);
            for (k, v) in &m.headers {
                publish = publish.header(k.as_str(), v.as_str());
            }
            if let Some(ct) = &m.content_type {
                publish = publish.header("Content-Type", ct.as_str());
            }
            let sent = tokio::time::timeout_at(
                deadline,
                self.js.send_publish(m.destination.clone(), publish),
            )
            .await;
            match PublishOutcome::handed_over(&self.shown_url, sent) {
                Ok(ack) => pending.push((i, ack)),
                Err(outcome) => outcomes[i] = Some(outcome),
            }
        }
        for (i, ack) in pending {
            outcomes[i] = Some(
                match tokio::time::timeout_at(deadline, ack.into_future()).await {
                    Ok(Ok(_ack)) => PublishOutcome::Confirmed,
                    Ok(Err(e)) => PublishOutcome::Unconfirmed(format!(
                        "no PubAck from {}: {e}",
                        self.shown_url
                    )),
                    Err(_) => PublishOutcome::Unconfirmed(format!(
                        "no PubAck from {} within {timeout:?}",
                        self.shown_url
                    )),
                },
            );
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

broker_resource!(NatsResource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_patterns() {
        assert!(subject_matches("orders.*", "orders.created"));
        assert!(!subject_matches("orders.*", "orders.created.eu"));
        assert!(subject_matches("orders.>", "orders.created.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.x"));
        assert!(subject_matches("*.created", "orders.created"));
    }

    #[test]
    fn publish_subjects_are_checked() {
        assert!(check_subject("a.b").is_ok());
        assert!(check_subject("a.*").is_err());
        assert!(check_subject("a..b").is_err());
        assert!(check_subject("").is_err());
        assert!(check_subject("a b").is_err());
    }
}
