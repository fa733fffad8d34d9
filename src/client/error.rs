//! Errors the client returns.
use tonic::{Code, Status};

use crate::wire::{Reason, REASON_HEADER};

/// New variants may come in later versions (as `OutcomeUnknown` did), so
/// a `match` needs a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error (after any safe retries), or the
    /// client refused to send the request (OUT_OF_RANGE: over gRPC's
    /// message limit).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    #[error("bad client configuration: {0}")]
    Config(String),
    #[error("cluster not ready: {0}")]
    Unready(String),
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// Something on the caller's side failed, not the cluster: a file the
    /// caller writes what it received to, for example.
    #[error("{0}")]
    Local(String),
    /// A write that is not safe to retry (an unfenced Delete) was sent and
    /// no answer came: it may or may not have taken effect. Read the record
    /// to find out, or use a fenced call.
    #[error("outcome unknown: the {what} may or may not have taken effect, and retrying it is not safe ({}: {})", .status.code(), .status.message())]
    OutcomeUnknown { what: &'static str, status: Status },
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) | ClientError::OutcomeUnknown { status: s, .. } => {
                Some(s.code())
            }
            _ => None,
        }
    }

    /// The reason of a FAILED_PRECONDITION: `LEASE_LOST`,
    /// `FINGERPRINT_MISMATCH` or `ALREADY_COMPLETED`.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Status(s) => reason_of(s),
            _ => None,
        }
    }

    /// Whether the server refused with `reason`.
    pub fn is(&self, reason: Reason) -> bool {
        self.reason() == Some(reason.as_str())
    }

    /// Whether the request was refused as too large: a field over the
    /// store's limit (`RESOURCE_EXHAUSTED` with no reason; an overloaded or
    /// full store names its reason), or the whole message over gRPC's
    /// (`OUT_OF_RANGE`, from this side's encoder or the server's decoder).
    /// Retrying the same request cannot succeed.
    pub fn is_too_large(&self) -> bool {
        matches!(self, ClientError::Status(s)
            if (s.code() == Code::ResourceExhausted && reason_of(s).is_none())
                || s.code() == Code::OutOfRange)
    }

    pub fn message(&self) -> String {
        match self {
            ClientError::Status(s) => s.message().to_string(),
            other => other.to_string(),
        }
    }
}

/// The reason a status carries in [`REASON_HEADER`], if any.
pub(crate) fn reason_of(s: &Status) -> Option<&str> {
    s.metadata()
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// Whether `e` or any error under it (its `source` chain) is one `hit`
/// picks out.
pub(crate) fn caused_by(
    e: &(dyn std::error::Error + 'static),
    hit: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if hit(c) {
            return true;
        }
        cause = c.source();
    }
    false
}
