//! Carrying a transaction id across services in gRPC metadata.
//!
//! The caller attaches its transaction's id to outgoing requests ([`TxInterceptor`] for a
//! tonic client, or [`inject`] on one request); the callee reads it ([`extract`], or the
//! [`TxIdLayer`] tower layer, which copies it into the request's extensions as a
//! [`PropagatedTx`]) and calls [`TwoPc::join`](crate::TwoPc::join) to enlist its own
//! branches in the caller's transaction.

use std::task::{Context, Poll};

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key carrying the transaction id.
pub const TX_ID_HEADER: &str = "twopc-tx-id";

/// Adds the transaction id to one outgoing request.
pub fn inject<T>(request: &mut Request<T>, tx_id: &str) -> Result<(), Status> {
    let value = MetadataValue::try_from(tx_id).map_err(|_| {
        Status::invalid_argument(format!("transaction id {tx_id:?} is not valid metadata"))
    })?;
    request.metadata_mut().insert(TX_ID_HEADER, value);
    Ok(())
}

/// The transaction id a request carries, if any (an empty header counts as none).
pub fn extract<T>(request: &Request<T>) -> Option<String> {
    if let Some(PropagatedTx(id)) = request.extensions().get::<PropagatedTx>() {
        return Some(id.clone()).filter(|id| !id.is_empty());
    }
    request
        .metadata()
        .get(TX_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// A tonic client interceptor that stamps every request with one transaction id.
#[derive(Clone, Debug)]
pub struct TxInterceptor {
    tx_id: String,
}

impl TxInterceptor {
    /// Stamps requests with `tx_id`.
    pub fn new(tx_id: impl Into<String>) -> Self {
        TxInterceptor {
            tx_id: tx_id.into(),
        }
    }
}

impl Interceptor for TxInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject(&mut request, &self.tx_id)?;
        Ok(request)
    }
}

/// The transaction id found on an incoming request, put in its extensions by [`TxIdLayer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PropagatedTx(pub String);

/// A tower layer for servers: copies the `twopc-tx-id` header into the request's
/// extensions as [`PropagatedTx`], so handlers and middleware find it without parsing.
#[derive(Clone, Copy, Debug, Default)]
pub struct TxIdLayer;

impl<S> tower::Layer<S> for TxIdLayer {
    type Service = TxIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TxIdService { inner }
    }
}

/// The service [`TxIdLayer`] wraps around.
#[derive(Clone, Debug)]
pub struct TxIdService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TxIdService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get(TX_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(id) = id {
            req.extensions_mut().insert(PropagatedTx(id));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_then_extract() {
        let mut req = Request::new(());
        inject(&mut req, "0000abcd-1-7").expect("valid");
        assert_eq!(extract(&req).as_deref(), Some("0000abcd-1-7"));
        assert!(inject(&mut req, "bad\nid").is_err());
        assert_eq!(extract(&Request::new(())), None);
        let mut empty = Request::new(());
        empty
            .metadata_mut()
            .insert(TX_ID_HEADER, MetadataValue::from_static(""));
        assert_eq!(extract(&empty), None);
    }

    #[test]
    fn interceptor_stamps_requests() {
        let mut i = TxInterceptor::new("0000abcd-1-9");
        let req = i.call(Request::new(())).expect("ok");
        assert_eq!(extract(&req).as_deref(), Some("0000abcd-1-9"));
    }
}
