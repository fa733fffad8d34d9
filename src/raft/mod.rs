//! Everything that names openraft lives under this module: the type
//! configuration, the peer network client and the peer gRPC service. The
//! rest of idemkv sees only the aliases exported here, so an openraft API
//! change stays in one place.

pub mod clock;
pub mod consensus;
pub mod network;
pub mod service;

use serde::{Deserialize, Serialize};

use crate::record::{Outcome, Request, RuleError};

/// What the state machine answers for one entry.
pub type Response = Result<Outcome, RuleError>;

/// How a node is reached: clients use `api_addr`, peers use `raft_addr`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub api_addr: String,
    pub raft_addr: String,
}

impl std::fmt::Display for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "api={} raft={}", self.api_addr, self.raft_addr)
    }
}

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// idemkv's Raft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = PeerNode,
);

pub type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, std::fs::File>;
pub type Config = openraft::Config;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type StreamAppendResult = openraft::raft::StreamAppendResult<TypeConfig>;
pub use openraft::{EntryPayload, ServerState};
