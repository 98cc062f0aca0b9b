//! The SDK's error type.

/// What can go wrong using the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator answered with an error status (the message says why).
    #[error("coordinator: {}: {}", .0.code(), .0.message())]
    Coordinator(#[from] tonic::Status),
    /// The transaction aborted; nothing of it is committed anywhere.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// Cannot reach the coordinator or start the participant server.
    #[error("transport: {0}")]
    Transport(String),
    /// A resource (database, broker, staging store) failed.
    #[error("{resource}: {message}")]
    Resource {
        /// Which resource.
        resource: String,
        /// What it said.
        message: String,
    },
    /// The SDK was used wrongly (e.g. a resource registered twice, or a joined
    /// transaction asked to commit).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// A resource error.
    pub fn resource(resource: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Resource {
            resource: resource.into(),
            message: message.to_string(),
        }
    }
}

/// So a service can answer its own callers with `?`: coordinator statuses pass through,
/// an abort is ABORTED, a resource failure UNAVAILABLE, misuse FAILED_PRECONDITION.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Coordinator(s) => s,
            Error::Aborted(m) => tonic::Status::aborted(m),
            Error::Transport(m) => tonic::Status::unavailable(m),
            e @ Error::Resource { .. } => tonic::Status::unavailable(e.to_string()),
            Error::Usage(m) => tonic::Status::failed_precondition(m),
        }
    }
}

/// Result with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
