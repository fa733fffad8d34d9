//! What a client and a node agree on beyond the protobuf messages: the
//! metadata entry that carries a refusal's reason, the reasons themselves,
//! the message size caps and the endpoints a client tries by default.
//!
//! Both sides import this module and nothing of each other: the client
//! never reaches into the server's modules, the server never into the
//! client's.

use std::fmt;

/// The metadata entry naming why a call was refused (SPEC §3): one of
/// [`Reason`]'s texts.
pub const REASON_HEADER: &str = "idemkv-reason";
/// Peer calls carry the sender's cluster id here (`store/identity.rs`).
pub const CLUSTER_HEADER: &str = "idemkv-cluster";

/// Largest request or reply on the client port by default: well above the
/// result and batch limits, so oversized fields reach validation and get
/// an error that names them.
pub const MAX_API_MESSAGE: usize = 16 * 1024 * 1024;

/// Largest message on the peer port by default (a batch of log entries, a
/// snapshot chunk).
pub const MAX_PEER_MESSAGE: usize = 256 * 1024 * 1024;

/// The client ports of the three-node cluster `idemkv up` starts.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

/// Why a call was refused, beyond its status code. Sent in
/// [`REASON_HEADER`] and at the start of the status message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// `FAILED_PRECONDITION`: the token does not hold the claim (fenced).
    LeaseLost,
    /// `FAILED_PRECONDITION`: the key holds another request's fingerprint.
    FingerprintMismatch,
    /// `FAILED_PRECONDITION`: the record is completed; nothing to do.
    AlreadyCompleted,
    /// A batch item not tried because the all-or-nothing batch refused.
    NotAttempted,
    /// `RESOURCE_EXHAUSTED`: a concurrency cap was reached and the call was
    /// not started, so it is safe to retry later.
    Overloaded,
    /// `RESOURCE_EXHAUSTED`: the data-size quota is exceeded; claims are
    /// refused until the sweep makes room (completes, renews, releases,
    /// reads and deletes still work).
    NoSpace,
}

impl Reason {
    /// The text on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::LeaseLost => "LEASE_LOST",
            Reason::FingerprintMismatch => "FINGERPRINT_MISMATCH",
            Reason::AlreadyCompleted => "ALREADY_COMPLETED",
            Reason::NotAttempted => "NOT_ATTEMPTED",
            Reason::Overloaded => "OVERLOADED",
            Reason::NoSpace => "NOSPACE",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
