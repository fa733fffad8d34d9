//! The Raft type configuration and the aliases the rest of idemkv uses.
//! The storage layer (`store`) builds on these alone; it never reaches the
//! consensus, network or peer service above it.

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
