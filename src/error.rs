//! The library's error type. Every failure a request can meet is one of
//! these; `api::status` maps them to gRPC status codes in one place.
use crate::record::RuleError;

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
