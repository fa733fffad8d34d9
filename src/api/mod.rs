//! The public gRPC API: the `Idempotency` and `Cluster` services, input
//! and input validation (the mapping from errors to gRPC status codes is
//! [`crate::error::to_status`], shared with the peer port).
pub mod cluster;
pub mod convert;
pub mod idempotency;
pub mod validate;

pub use cluster::ClusterService;
pub use idempotency::IdempotencyService;
