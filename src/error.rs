//! The library's error type, and the one mapping from it to a gRPC
//! status, used by every port (client, peer). Every failure a request can
//! meet is one of these. The mapping has no side effects: metrics are
//! counted where a refusal happens, not here.
use tonic::{Code, Status};

use crate::record::RuleError;
use crate::wire::{Reason, REASON_HEADER};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input, rejected before anything was proposed.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// Input over a size limit.
    #[error("{field}: {message}")]
    TooLarge { field: String, message: String },
    /// A rule of the record model refused the operation; nothing changed.
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("{0}")]
    NotFound(String),
    /// No leader or no quorum right now; safe to retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Auth is on and the request carries no valid bearer token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but may not touch this namespace or operation.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A concurrency cap is reached; nothing was done, safe to retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The data-size quota is exceeded: new claims are refused until the
    /// sweep (or deletes) make room; nothing was done.
    #[error("{0}")]
    NoSpace(String),
    /// This node cannot serve (storage or Raft fault).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn too_large(field: &str, message: impl Into<String>) -> Self {
        Error::TooLarge {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(format!("storage: {e}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The status a port answers for `e`: its code, its message, and for a
/// rule refusal or an overload the reason in [`REASON_HEADER`].
pub fn to_status(e: Error) -> Status {
    let (code, reason) = match &e {
        Error::InvalidArgument { .. } => (Code::InvalidArgument, None),
        Error::TooLarge { .. } => (Code::ResourceExhausted, None),
        Error::Rule(r) => (Code::FailedPrecondition, Some(r.reason())),
        Error::NotFound(_) => (Code::NotFound, None),
        Error::Unavailable(_) => (Code::Unavailable, None),
        Error::Unauthenticated(_) => (Code::Unauthenticated, None),
        Error::PermissionDenied(_) => (Code::PermissionDenied, None),
        Error::Overloaded(_) => (Code::ResourceExhausted, Some(Reason::Overloaded)),
        Error::NoSpace(_) => (Code::ResourceExhausted, Some(Reason::NoSpace)),
        Error::Internal(_) => (Code::Internal, None),
    };
    let mut status = Status::new(code, e.to_string());
    if let Some(r) = reason {
        status.metadata_mut().insert(
            REASON_HEADER,
            tonic::metadata::MetadataValue::from_static(r.as_str()),
        );
    }
    status
}
