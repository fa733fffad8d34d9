//! The public gRPC API: the `Idempotency` and `Cluster` services, input
//! validation, and the one mapping from errors to gRPC status codes.
pub mod cluster;
pub mod convert;
pub mod idempotency;
pub mod status;
pub mod validate;

pub use cluster::ClusterService;
pub use idempotency::IdempotencyService;

/// Largest request accepted on the client port: well above the result and
/// batch limits, so oversized fields reach validation and get an error that
/// names them.
pub const MAX_API_MESSAGE: usize = 16 * 1024 * 1024;
