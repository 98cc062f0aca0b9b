//! The SDK's error type.

/// What can go wrong using the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator answered with an error status, or could not be reached (the
    /// message says why).
    #[error("coordinator: {}", status_text(.0))]
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

/// `Code: message`, the code's description left out of the message where the transport
/// repeated it there ("The service is currently unavailable: The service is currently
/// unavailable: tcp connect error ..." becomes "Unavailable: tcp connect error ...").
fn status_text(s: &tonic::Status) -> String {
    let description = s.code().description();
    let message = s.message();
    let message = message
        .strip_prefix(description)
        .map(|rest| rest.trim_start_matches(':').trim_start())
        .unwrap_or(message);
    if message.is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {message}", s.code())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_error_names_its_code_once() {
        let e = Error::Coordinator(tonic::Status::unavailable(
            "The service is currently unavailable: tcp connect error: Connection refused",
        ));
        assert_eq!(
            e.to_string(),
            "coordinator: Unavailable: tcp connect error: Connection refused"
        );
        let e = Error::Coordinator(tonic::Status::not_found("transaction 1-2-3 is unknown"));
        assert_eq!(
            e.to_string(),
            "coordinator: NotFound: transaction 1-2-3 is unknown"
        );
        let e = Error::Coordinator(tonic::Status::cancelled(""));
        assert_eq!(e.to_string(), "coordinator: Cancelled");
    }
}
