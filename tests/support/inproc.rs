//! In-process clusters for integration tests: real nodes, real sled
//! directories, ports picked by the OS.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use idemkv::clock::{Clock, VirtualWall};
use idemkv::pb::api;
use idemkv::raft::PeerNode;
use idemkv::{Client, Node, NodeConfig};
use std::sync::Arc;

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Option<Node>>,
    /// Each node's addresses, kept so a stopped node restarts on the same ones.
    pub members: BTreeMap<u64, PeerNode>,
    /// The clock every node reads (a restarted node too).
    pub clock: Clock,
}

pub fn config(id: u64, data_dir: PathBuf) -> NodeConfig {
    let mut cfg = NodeConfig::new(id, data_dir);
    cfg.request_timeout = Duration::from_secs(3);
    cfg.sweep_interval = Duration::from_millis(100);
    // Purge eagerly so lagging nodes exercise snapshot installs.
    cfg.snapshot_keep_logs = 50;
    cfg
}

impl TestCluster {
    /// Start `n` nodes and initialise them as one cluster.
    pub async fn start(n: u64) -> TestCluster {
        Self::start_with(n, |_| {}).await
    }

    /// `n` nodes reading one virtual clock ([`Clock::virtual_wall`]): in a
    /// test under `tokio::time::pause()`, `tokio::time::advance` moves
    /// lease and retention time exactly, without sleeping, and the returned
    /// handle steps the wall clock.
    pub async fn start_virtual(n: u64) -> (TestCluster, Arc<VirtualWall>) {
        let (clock, wall) = Clock::virtual_wall();
        let c = Self::start_with(n, |cfg| cfg.clock = clock.clone()).await;
        (c, wall)
    }

    /// Like `start`, with `tweak` applied to every node's configuration.
    pub async fn start_with(n: u64, tweak: impl Fn(&mut NodeConfig)) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        let mut members = BTreeMap::new();
        let mut clock = Clock::system();
        for id in 1..=n {
            let mut cfg = config(id, dir.path().join(format!("n{id}")));
            tweak(&mut cfg);
            clock = cfg.clock.clone();
            let node = Node::start(cfg).await.expect("start node");
            members.insert(id, node.member.clone());
            nodes.push(Some(node));
        }
        let c = TestCluster {
            dir,
            nodes,
            members,
            clock,
        };
        c.node(1)
            .initialize(c.members.clone())
            .await
            .expect("initialize");
        c.wait_leader(Duration::from_secs(10)).await;
        c
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes[(id - 1) as usize]
            .as_ref()
            .expect("node is running")
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.values().map(|m| m.api_addr.clone()).collect()
    }

    pub fn client(&self) -> Client {
        Client::new(self.endpoints()).expect("client")
    }

    /// A client that talks only to node `id`.
    pub fn client_of(&self, id: u64) -> Client {
        Client::new([self.members[&id].api_addr.clone()]).expect("client")
    }

    /// Wait until a running node is leader and every running node knows it.
    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let leaders: Vec<Option<u64>> = self
                .nodes
                .iter()
                .flatten()
                .map(|n| n.consensus().status().leader.map(|(id, _)| id))
                .collect();
            if let Some(Some(l)) = leaders.first() {
                let running = self.nodes[(*l - 1) as usize].is_some();
                if running && leaders.iter().all(|x| *x == Some(*l)) {
                    return *l;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader within {within:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait for a leader (as [`Self::wait_leader`]); the leader and the
    /// lowest-numbered running node that follows it.
    pub async fn leader_and_follower(&self, within: Duration) -> (u64, u64) {
        let leader = self.wait_leader(within).await;
        let follower = self
            .members
            .keys()
            .copied()
            .find(|id| *id != leader && self.nodes[(*id - 1) as usize].is_some())
            .expect("a running follower");
        (leader, follower)
    }

    pub async fn stop(&mut self, id: u64) {
        if let Some(n) = self.nodes[(id - 1) as usize].take() {
            n.shutdown().await;
        }
    }

    /// Restart node `id` on its old addresses and data.
    pub async fn restart(&mut self, id: u64) {
        let m = self.members[&id].clone();
        let mut cfg = config(id, self.dir.path().join(format!("n{id}")));
        cfg.listen = m.api_addr.clone();
        cfg.peer_listen = m.raft_addr.clone();
        cfg.clock = self.clock.clone();
        // The OS may hold the port briefly after a close; retry the bind.
        let mut tries = 0;
        let node = loop {
            match Node::start(cfg.clone()).await {
                Ok(n) => break n,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "restart bind retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart node {id}: {e}"),
            }
        };
        self.nodes[(id - 1) as usize] = Some(node);
    }

    pub async fn shutdown(mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.stop(id).await;
        }
    }
}

pub fn claim_req(ns: &str, key: &str, owner: &str, lease_ms: u64) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        owner: owner.into(),
        lease_ms,
        ..Default::default()
    }
}

pub fn acquired(o: api::claim_response::Outcome) -> api::Acquired {
    match o {
        api::claim_response::Outcome::Acquired(a) => a,
        other => panic!("expected ACQUIRED, got {other:?}"),
    }
}

/// A TCP endpoint that accepts connections and never answers (a frozen
/// node): a request sent there is lost, its outcome unknown to the sender.
pub async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}
