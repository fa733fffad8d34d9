//! The cluster's identity (like etcd's cluster id): made when a cluster is
//! initialised (from its founding members, so every node started with
//! `--init` and the same `--peers` makes the same one) or restored from a
//! backup (random), kept durably in the data directory and sent with every
//! peer call. A node refuses peer calls
//! that carry another cluster's id, so a node of the cluster a backup came
//! from, still running at an address the restored cluster reuses, can
//! neither append to nor vote in it (nor be appended to). A node that has
//! none (a new, empty one being added) takes the first id a peer sends;
//! calls without one (older versions, tools) are not checked.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, RwLock};

use super::durable::sled_err;
use super::keys;
use crate::raft::types::{NodeId, PeerNode};

pub struct ClusterId {
    tree: sled::Tree,
    id: RwLock<Option<String>>,
}

impl ClusterId {
    pub(super) fn open(db: &sled::Db) -> io::Result<Arc<ClusterId>> {
        let tree = db.open_tree(keys::RAFT_TREE).map_err(sled_err)?;
        let id = tree
            .get(keys::CLUSTER_ID)
            .map_err(sled_err)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(Arc::new(ClusterId {
            tree,
            id: RwLock::new(id),
        }))
    }

    /// A new random id.
    pub fn fresh() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// The id of a cluster founded by `members`: the same on every node
    /// initialised with them, whichever of them is first.
    pub fn of_members(members: &BTreeMap<NodeId, PeerNode>) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (id, n) in members {
            h.update(format!("{id}={}/{};", n.api_addr, n.raft_addr));
        }
        let digest = h.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Uuid::from_bytes(bytes).to_string()
    }

    /// This node's cluster id, if it has one.
    pub fn get(&self) -> Option<String> {
        self.id.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A peer's id against this node's, taking it when this node has none:
    /// `None` when they agree, else this node's id. Every peer call comes
    /// through here; when they agree it takes a read lock and allocates
    /// nothing.
    pub fn admit(&self, theirs: &str) -> io::Result<Option<String>> {
        if let Some(ours) = &*self.id.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok((ours != theirs).then(|| ours.clone()));
        }
        let ours = self.adopt(theirs)?;
        Ok((ours != theirs).then_some(ours))
    }

    /// Take `id` as this node's, durably, unless it has one; returns the
    /// id it has afterwards.
    pub fn adopt(&self, id: &str) -> io::Result<String> {
        let mut cur = self.id.write().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*cur {
            return Ok(c.clone());
        }
        self.tree
            .insert(keys::CLUSTER_ID, id.as_bytes())
            .map_err(sled_err)?;
        self.tree.flush().map_err(sled_err)?;
        *cur = Some(id.to_string());
        Ok(id.to_string())
    }
}
