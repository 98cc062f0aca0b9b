//! The channel to the coordinator: [`CoordinatorChannel`] stamps the bearer token
//! ([`BearerToken`], shared with every client of the coordinator) on every call, the
//! client API's and recovery's alike; the token is never printed.

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use twopc_proto::auth::BearerToken;

/// The channel of [`TwoPc::coordinator`](crate::TwoPc::coordinator): a tonic [`Channel`]
/// that stamps the bearer token (if any) on every call.
pub type CoordinatorChannel = InterceptedService<Channel, BearerToken>;

#[cfg(test)]
mod tests {
    use crate::TwoPc;

    #[test]
    fn the_builder_never_prints_its_token() {
        let b = TwoPc::builder("http://x").token("secret-token-0123456789");
        assert!(!format!("{b:?}").contains("secret"));
    }
}
