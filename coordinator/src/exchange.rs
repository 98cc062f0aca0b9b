//! The coordinator's side of the batched participant channel (`ParticipantExchange`).
//!
//! One [`mux::Session`] per participant endpoint carries every transaction's prepare,
//! commit and abort messages to that participant over one long-lived HTTP/2 stream,
//! several per frame. [`Exchanges::call`] answers [`mux::CallError::Unsupported`] for a
//! participant that does not serve the stream (an older SDK, or a hand-written
//! participant); [`GrpcTransport`](crate::transport::GrpcTransport) then uses the unary
//! calls for it, and tries the stream again a minute later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use twopc_proto::mux::{self, CallError, Session};
use twopc_proto::v1 as pb;
use twopc_proto::v1::participant_exchange_client::ParticipantExchangeClient;

type ExchangeSession = Session<pb::ExchangeRequest, pb::ExchangeResponse>;

/// Batched-channel sessions by participant endpoint.
#[derive(Clone, Default)]
pub struct Exchanges {
    sessions: Arc<Mutex<HashMap<String, Arc<ExchangeSession>>>>,
}

impl Exchanges {
    /// Sends one call to `endpoint` over its stream (opened on `channel` if needed) and
    /// waits at most `timeout` for the result.
    pub async fn call(
        &self,
        endpoint: &str,
        channel: &Channel,
        call: pb::participant_call::Call,
        timeout: Duration,
    ) -> Result<pb::participant_result::Result, CallError> {
        let session = self.session(endpoint, channel)?;
        let result = session
            .call(
                pb::ParticipantCall {
                    call_id: 0,
                    call: Some(call),
                },
                timeout,
            )
            .await?;
        result.result.ok_or_else(|| {
            CallError::Transport(format!("{endpoint}: participant sent an empty result"))
        })
    }

    fn session(
        &self,
        endpoint: &str,
        channel: &Channel,
    ) -> Result<Arc<ExchangeSession>, CallError> {
        let mut sessions = self
            .sessions
            .lock()
            .map_err(|_| CallError::Transport("exchange lock poisoned".into()))?;
        if let Some(s) = sessions.get(endpoint) {
            return Ok(s.clone());
        }
        let channel = channel.clone();
        let open: mux::Opener<pb::ExchangeRequest, pb::ExchangeResponse> =
            Arc::new(move |outbound| {
                let mut client = ParticipantExchangeClient::new(channel.clone())
                    .max_decoding_message_size(64 << 20);
                Box::pin(async move { client.exchange(outbound).await })
            });
        let s = Arc::new(Session::new(open));
        sessions.insert(endpoint.to_string(), s.clone());
        Ok(s)
    }
}
