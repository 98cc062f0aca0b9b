//! The bearer token every client of the coordinator sends (the participant SDK, recovery,
//! the operator's `twopc tx` commands): a tonic interceptor that adds
//! `authorization: Bearer <token>` and never prints the token.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// A token that cannot travel as a header: what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidToken(pub &'static str);

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidToken {}

/// Adds `authorization: Bearer <token>` to every call it intercepts (nothing without a
/// token). The coordinator checks it before the call reaches any handler.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// An interceptor sending `token` (`None`: sends nothing). Fails when the token is
    /// empty or is not visible ASCII (it travels as a header).
    pub fn new(token: Option<&str>) -> Result<BearerToken, InvalidToken> {
        let Some(token) = token else {
            return Ok(BearerToken(None));
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken(
                "the bearer token must be visible ASCII characters, without spaces",
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken("the bearer token is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_sent_but_never_printed() {
        let mut t = BearerToken::new(Some("secret-token-0123456789")).expect("valid");
        assert!(!format!("{t:?}").contains("secret"));
        let req = t.call(tonic::Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer secret-token-0123456789")
        );
        let mut none = BearerToken::new(None).expect("no token");
        let req = none.call(tonic::Request::new(())).expect("intercepted");
        assert!(req.metadata().get("authorization").is_none());
        assert!(BearerToken::new(Some("has space")).is_err());
        assert!(BearerToken::new(Some("")).is_err());
    }
}
