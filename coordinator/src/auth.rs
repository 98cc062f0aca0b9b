//! Bearer-token authentication of the coordinator's gRPC APIs.
//!
//! Two tokens, both optional (see `docs/security.md`):
//!
//! * the **client token** (`--client-token`, `TWOPC_CLIENT_TOKEN`, or `--client-token-file`)
//!   guards the `twopc.v1.Coordinator` service that services and the participant SDK call;
//! * the **admin token** (`--admin-token`, `TWOPC_ADMIN_TOKEN`, or `--admin-token-file`)
//!   guards the `twopc.v1.Admin` service of `twopc tx`. It is also accepted by the
//!   Coordinator service: an operator may do whatever a client may, not the other way round.
//!
//! A call carries the token as `authorization: Bearer <token>` metadata. [`AuthInterceptor`]
//! checks it *before* the call reaches the service, so a refused call runs no handler and
//! changes nothing:
//!
//! | the API's token | the call carries | answer |
//! |---|---|---|
//! | not configured | anything | served (the API is open, as without this module) |
//! | configured | no `authorization`, or not `Bearer <token>` | `UNAUTHENTICATED` |
//! | configured | a token that is neither | `UNAUTHENTICATED` |
//! | admin | the client token | `PERMISSION_DENIED` |
//!
//! "The API's token" is the client token for the Coordinator service and the admin token
//! for the Admin service: with only the admin token set, the Coordinator service stays
//! open; with only the client token set, the Admin service is open (the server warns about
//! it at start).
//!
//! A token is a setting first: its type ([`Secret`]) and the form it must have
//! ([`check_token`]) live in [`crate::config`], which this module reads from.
//!
//! Messages say what was missing or wrong and never echo a token. Tokens are compared in
//! constant time ([`subtle`]), so the time of a refusal does not tell how much of a guess
//! was right. Health (`grpc.health.v1.Health`) and reflection are not wrapped: load
//! balancers and tools probe them without credentials, and neither reveals or changes a
//! transaction.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::debug;

use crate::config::{check_token, Secret};

/// A token file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use {} ({flag}): {message}", path.display())]
pub struct TokenFileError {
    /// The flag that named the file.
    pub flag: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// Reads a token from `path` (`flag` names the file in errors). Surrounding whitespace,
/// such as the newline editors add, is not part of the token.
pub fn read_token_file(flag: &'static str, path: &Path) -> Result<Secret, TokenFileError> {
    let err = |message: String| TokenFileError {
        flag,
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = Secret::new(text.trim());
    check_token(flag, &token).map_err(|e| err(format!("the token {}", e.allowed)))?;
    Ok(token)
}

/// The tokens in force. `None`: that API is open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Accepted by the Coordinator service.
    pub client: Option<Secret>,
    /// Accepted by the Admin service and the Coordinator service.
    pub admin: Option<Secret>,
}

/// Which service an [`AuthInterceptor`] guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `twopc.v1.Coordinator`: the client token or the admin token.
    Client,
    /// `twopc.v1.Admin`: the admin token only.
    Admin,
}

/// Equality in time that depends on the lengths only, not on where the first difference is.
fn same(a: &str, b: &Secret) -> bool {
    bool::from(a.as_bytes().ct_eq(b.expose().as_bytes()))
}

/// Checks the `authorization` metadata of every call of one service (see the module
/// docs). Cheap to clone: the tokens are shared.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    /// The tokens in force, shared by both services' interceptors.
    tokens: Arc<Tokens>,
    /// The service this one guards: decides which tokens it accepts.
    api: Api,
}

impl AuthInterceptor {
    /// An interceptor for `api` with `tokens`.
    pub fn new(tokens: Arc<Tokens>, api: Api) -> AuthInterceptor {
        AuthInterceptor { tokens, api }
    }

    /// Whether calls need a token at all.
    pub fn is_open(&self) -> bool {
        match self.api {
            Api::Client => self.tokens.client.is_none(),
            Api::Admin => self.tokens.admin.is_none(),
        }
    }

    /// The decision for a call with this `authorization` value (`None`: no such
    /// metadata, or not valid ASCII).
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Status> {
        if self.is_open() {
            return Ok(());
        }
        let (api, wanted) = match self.api {
            Api::Client => ("the Coordinator API", "the client token or the admin token"),
            Api::Admin => ("the Admin API", "the admin token"),
        };
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(format!(
                "{api} needs `authorization: Bearer <token>` metadata with {wanted}; the call \
                 carried none"
            )));
        };
        let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        else {
            return Err(Status::unauthenticated(format!(
                "{api}: the authorization metadata is not of the form `Bearer <token>`"
            )));
        };
        let token = token.trim();
        // Both comparisons always run: the time does not tell which token was close.
        let is_client = self.tokens.client.as_ref().is_some_and(|c| same(token, c));
        let is_admin = self.tokens.admin.as_ref().is_some_and(|a| same(token, a));
        match (self.api, is_client, is_admin) {
            (_, _, true) | (Api::Client, true, _) => Ok(()),
            (Api::Admin, true, false) => Err(Status::permission_denied(
                "the client token may not use the admin API; use the admin token",
            )),
            (_, false, false) => Err(Status::unauthenticated(format!(
                "{api}: the bearer token is not valid here (it needs {wanted})"
            ))),
        }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.is_open() {
            return Ok(request);
        }
        let value = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.check(value) {
            Ok(()) => Ok(request),
            Err(status) => {
                debug!(api = ?self.api, code = ?status.code(), "refused a call: {}", status.message());
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const CLIENT: &str = "client-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789ab";

    fn both(api: Api) -> AuthInterceptor {
        AuthInterceptor::new(
            Arc::new(Tokens {
                client: Some(Secret::new(CLIENT)),
                admin: Some(Secret::new(ADMIN)),
            }),
            api,
        )
    }

    fn code(r: Result<(), Status>) -> Option<Code> {
        r.err().map(|s| s.code())
    }

    #[test]
    fn auth_decisions_follow_the_table() {
        let client = both(Api::Client);
        let admin = both(Api::Admin);
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(code(client.check(Some(&bearer(CLIENT)))), None);
        assert_eq!(code(client.check(Some(&bearer(ADMIN)))), None);
        assert_eq!(code(admin.check(Some(&bearer(ADMIN)))), None);
        assert_eq!(
            code(admin.check(Some(&bearer(CLIENT)))),
            Some(Code::PermissionDenied)
        );
        for api in [&client, &admin] {
            assert_eq!(code(api.check(None)), Some(Code::Unauthenticated));
            assert_eq!(
                code(api.check(Some("Basic abc"))),
                Some(Code::Unauthenticated)
            );
            assert_eq!(
                code(api.check(Some(&bearer("client-token-012345678")))),
                Some(Code::Unauthenticated)
            );
            assert_eq!(
                code(api.check(Some(&bearer(&format!("{CLIENT}x"))))),
                Some(Code::Unauthenticated)
            );
        }
    }

    #[test]
    fn auth_messages_never_echo_a_token() {
        let admin = both(Api::Admin);
        for value in [
            format!("Bearer {CLIENT}"),
            "Bearer wrong-token-wrong-token".into(),
        ] {
            let s = admin.check(Some(&value)).expect_err("refused");
            assert!(!s.message().contains(CLIENT), "{}", s.message());
            assert!(!s.message().contains("wrong-token"), "{}", s.message());
        }
        let s = admin.check(None).expect_err("refused");
        assert!(s.message().contains("Bearer"), "{}", s.message());
    }

    #[test]
    fn auth_without_tokens_is_open_and_admin_token_alone_leaves_clients_open() {
        let none = Arc::new(Tokens::default());
        assert!(AuthInterceptor::new(none.clone(), Api::Client)
            .check(None)
            .is_ok());
        assert!(AuthInterceptor::new(none, Api::Admin).check(None).is_ok());
        let admin_only = Arc::new(Tokens {
            client: None,
            admin: Some(Secret::new(ADMIN)),
        });
        // No client token: the Coordinator API stays open; the Admin API is guarded.
        let c = AuthInterceptor::new(admin_only.clone(), Api::Client);
        assert!(c.check(None).is_ok());
        assert_eq!(
            code(AuthInterceptor::new(admin_only.clone(), Api::Admin).check(None)),
            Some(Code::Unauthenticated)
        );
        assert!(AuthInterceptor::new(admin_only, Api::Admin)
            .check(Some(&format!("Bearer {ADMIN}")))
            .is_ok());
    }
}
