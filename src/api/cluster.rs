//! The `idemkv.v1.Cluster` service: status, membership, snapshots.
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::auth::{authenticate, Auth};
use crate::error::to_status;
use crate::error::Error;
use crate::pb::api::{self, cluster_server::Cluster};
use crate::raft::consensus::Consensus;
use crate::raft::PeerNode;

/// How long a leader transfer may take before the call says it did not
/// happen (several election timeouts).
const MOVE_LEADER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a node waits to apply a hash entry it is asked about.
const HASH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct ClusterService {
    consensus: Arc<Consensus>,
    api_addr: String,
    auth: Option<Arc<Auth>>,
}

impl ClusterService {
    pub fn new(consensus: Arc<Consensus>, api_addr: String, auth: Option<Arc<Auth>>) -> Self {
        ClusterService {
            consensus,
            api_addr,
            auth,
        }
    }

    /// With auth on: any known token may read status; changing the cluster
    /// (`what`) takes an admin token.
    fn allow(&self, md: &tonic::metadata::MetadataMap, what: Option<&str>) -> Result<(), Status> {
        if let (Some(who), Some(what)) = (authenticate(&self.auth, md).map_err(to_status)?, what) {
            who.check_admin(what).map_err(to_status)?;
        }
        Ok(())
    }

    fn members(&self) -> Vec<api::Member> {
        self.consensus
            .status()
            .members
            .into_iter()
            .map(|m| api::Member {
                id: m.id,
                api_addr: m.node.api_addr,
                raft_addr: m.node.raft_addr,
                voter: m.voter,
            })
            .collect()
    }
}

/// How long saving waits for the leader to build its snapshot.
const SNAPSHOT_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);
/// Bytes per streamed message of a saved snapshot.
const SNAPSHOT_CHUNK: usize = 1 << 20;

type SnapshotStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<api::SnapshotData, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    type SaveSnapshotStream = SnapshotStream;

    async fn save_snapshot(
        &self,
        req: Request<api::SaveSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.allow(req.metadata(), Some("save_snapshot"))?;
        let (_, mut file) = self
            .consensus
            .fresh_snapshot(SNAPSHOT_WITHIN)
            .await
            .map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let sent = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        tx.blocking_send(Ok(api::SnapshotData { data: buf }))
                    }
                    Err(e) => tx.blocking_send(Err(to_status(Error::Internal(format!(
                        "reading the snapshot: {e}"
                    ))))),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        req: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        self.allow(req.metadata(), None)?;
        let s = self.consensus.status();
        let (data_bytes, quota_bytes) = self.consensus.data_size();
        let alarms = self
            .consensus
            .no_space()
            .map(|_| crate::wire::Reason::NoSpace.as_str().to_string())
            .into_iter()
            .collect();
        Ok(Response::new(api::StatusResponse {
            id: s.id,
            role: s.role,
            leader_id: s.leader.as_ref().map(|(id, _)| *id),
            leader_api_addr: s.leader.map(|(_, n)| n.api_addr).unwrap_or_default(),
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            last_log_index: s.last_log_index,
            members: self.members(),
            snapshot_index: s.snapshot_index,
            api_addr: self.api_addr.clone(),
            clock_ms: self.consensus.now_ms(),
            wall_clock_ms: self.consensus.wall_clock_ms(),
            rejoin_until: s.rejoin_until,
            data_bytes,
            quota_bytes,
            alarms,
            cluster_id: self.consensus.cluster_id().unwrap_or_default(),
        }))
    }

    async fn add_learner(
        &self,
        req: Request<api::AddLearnerRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        self.allow(req.metadata(), Some("add_learner"))?;
        let r = req.into_inner();
        if r.api_addr.is_empty() || r.raft_addr.is_empty() {
            return Err(to_status(Error::invalid(
                "api_addr",
                "api_addr and raft_addr are both required",
            )));
        }
        let node = PeerNode {
            api_addr: r.api_addr,
            raft_addr: r.raft_addr,
        };
        self.consensus
            .add_learner(r.id, node)
            .await
            .map_err(to_status)?;
        Ok(Response::new(api::MembershipResponse {
            members: self.members(),
        }))
    }

    async fn change_membership(
        &self,
        req: Request<api::ChangeMembershipRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        self.allow(req.metadata(), Some("change_membership"))?;
        let r = req.into_inner();
        if r.voters.is_empty() {
            return Err(to_status(Error::invalid(
                "voters",
                "at least one voter is required",
            )));
        }
        self.consensus
            .change_membership(r.voters, r.retain)
            .await
            .map_err(to_status)?;
        Ok(Response::new(api::MembershipResponse {
            members: self.members(),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<api::TransferLeaderRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        self.allow(req.metadata(), Some("transfer_leader"))?;
        let to = req.into_inner().to;
        self.consensus
            .move_leader(to, MOVE_LEADER_WITHIN)
            .await
            .map_err(to_status)?;
        Ok(Response::new(api::MembershipResponse {
            members: self.members(),
        }))
    }

    async fn hash_state(
        &self,
        req: Request<api::HashStateRequest>,
    ) -> Result<Response<api::HashStateResponse>, Status> {
        let index = req.get_ref().index;
        // A new hash is a log entry: an admin's call; reading one is not.
        self.allow(req.metadata(), (index == 0).then_some("hash_state"))?;
        let h = if index == 0 {
            self.consensus.hash_now().await
        } else {
            self.consensus.hash_at(index, HASH_WAIT).await
        }
        .map_err(to_status)?;
        Ok(Response::new(api::HashStateResponse {
            id: if index == 0 { 0 } else { self.consensus.id },
            index: h.index,
            hash: h.hash,
            records: h.records,
        }))
    }

    async fn trigger_snapshot(
        &self,
        req: Request<api::TriggerSnapshotRequest>,
    ) -> Result<Response<api::TriggerSnapshotResponse>, Status> {
        self.allow(req.metadata(), Some("trigger_snapshot"))?;
        self.consensus.trigger_snapshot().await.map_err(to_status)?;
        Ok(Response::new(api::TriggerSnapshotResponse {}))
    }
}
