//! The one mapping from [`Error`] to `tonic::Status`. Rule errors carry their
//! reason (`LEASE_LOST`, `FINGERPRINT_MISMATCH`, `ALREADY_COMPLETED`) at the
//! start of the message and in the `idemkv-reason` metadata entry.

use tonic::{Code, Status};

use crate::error::Error;
use crate::record::RuleError;

pub const REASON_HEADER: &str = "idemkv-reason";

/// The reason of a `RESOURCE_EXHAUSTED` that a concurrency cap gave: the
/// request was not started, so retrying it later is safe.
pub const OVERLOADED: &str = "OVERLOADED";

pub fn reason(e: &RuleError) -> &'static str {
    match e {
        RuleError::LeaseLost { .. } => "LEASE_LOST",
        RuleError::FingerprintMismatch => "FINGERPRINT_MISMATCH",
        RuleError::AlreadyCompleted { .. } => "ALREADY_COMPLETED",
        RuleError::NotAttempted => "NOT_ATTEMPTED",
    }
}

pub fn to_status(e: Error) -> Status {
    let (code, reason) = match &e {
        Error::InvalidArgument { .. } => (Code::InvalidArgument, None),
        Error::TooLarge { .. } => (Code::ResourceExhausted, None),
        Error::Rule(r) => (Code::FailedPrecondition, Some(reason(r))),
        Error::NotFound(_) => (Code::NotFound, None),
        Error::Unavailable(_) => (Code::Unavailable, None),
        Error::Unauthenticated(_) => (Code::Unauthenticated, None),
        Error::PermissionDenied(_) => (Code::PermissionDenied, None),
        Error::Overloaded(_) => (Code::ResourceExhausted, Some(OVERLOADED)),
        Error::Internal(_) => (Code::Internal, None),
    };
    if let Error::Unauthenticated(_) | Error::PermissionDenied(_) = &e {
        crate::metrics::auth_refused(code == Code::PermissionDenied);
    }
    let mut status = Status::new(code, e.to_string());
    if let Some(r) = reason {
        crate::metrics::refusal(r);
        if let Ok(v) = r.parse() {
            status.metadata_mut().insert(REASON_HEADER, v);
        }
    }
    status
}
