//! Everything that names openraft lives under this module: the type
//! configuration, the peer network client and the peer gRPC service. The
//! rest of idemkv sees only the aliases exported here, so an openraft API
//! change stays in one place.

pub mod clock;
mod coalesce;
pub mod consensus;
pub mod network;
pub mod propose;
pub mod service;
pub mod types;

pub use types::*;

/// The Raft group, over idemkv's storage.
pub type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
