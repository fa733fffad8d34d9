//! Three-node clusters in-process: replication, failover, restart, leases.
mod common;

use std::time::Duration;

use common::{acquired, claim_req, TestCluster};
use idemkv::pb::api::{self, claim_response::Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_one_node_is_seen_from_every_node() {
    let c = TestCluster::start(3).await;
    // Ask a follower, which forwards to the leader.
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let a = acquired(
        c.client_of(follower)
            .claim(claim_req("orders", "o-1", "w1", 30_000))
            .await
            .unwrap(),
    );
    assert!(a.token > 0);
    for id in 1..=3 {
        let rec = c
            .client_of(id)
            .get(api::GetRequest {
                namespace: "orders".into(),
                key: b"o-1".to_vec(),
                consistency: api::Consistency::Linearizable as i32,
            })
            .await
            .unwrap()
            .expect("record visible");
        assert_eq!(rec.state, api::RecordState::InProgress as i32, "node {id}");
        assert_eq!(rec.owner, "w1");
        assert_eq!(rec.token, a.token);
    }
    // A second owner sees IN_PROGRESS from any node.
    match c
        .client_of(3)
        .claim(claim_req("orders", "o-1", "w2", 30_000))
        .await
        .unwrap()
    {
        Outcome::InProgress(p) => assert_eq!(p.owner, "w1"),
        other => panic!("expected IN_PROGRESS, got {other:?}"),
    }
    c.shutdown().await;
}
