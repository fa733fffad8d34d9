//! SPEC §2 Tokens, end to end: every grant (each item of a batch too)
//! takes the next value of a replicated counter, so tokens are unique and
//! strictly increasing across leader changes, full restarts and a node that
//! learnt the state from a snapshot and then leads.
mod support;
use support::inproc;

use std::time::Duration;

use idemkv::pb::api::{self, claim_batch_item};
use idemkv::{Client, Node};
use inproc::{claim_req, config, TestCluster};

/// Claim `n` fresh keys in one batch; their tokens, in item order.
async fn batch_tokens(c: &Client, prefix: &str, n: usize) -> Vec<u64> {
    let items = (0..n)
        .map(|i| claim_req("tokens", &format!("{prefix}-{i}"), "w", 60_000))
        .map(|mut r| {
            r.claim_id = format!("{}-id", String::from_utf8_lossy(&r.key));
            r
        })
        .collect();
    let resp = c
        .claim_batch(api::ClaimBatchRequest {
            items,
            all_or_nothing: true,
        })
        .await
        .unwrap();
    resp.items
        .into_iter()
        .map(|i| match i.outcome {
            Some(claim_batch_item::Outcome::Acquired(a)) => a.token,
            other => panic!("not acquired: {other:?}"),
        })
        .collect()
}

/// Tokens must all be new and above every one seen so far.
fn check_above(seen: &mut Vec<u64>, got: &[u64], when: &str) {
    let max = seen.iter().copied().max().unwrap_or(0);
    for w in got.windows(2) {
        assert!(
            w[0] < w[1],
            "{when}: tokens of one batch not increasing: {got:?}"
        );
    }
    assert!(
        got[0] > max,
        "{when}: token {} is not above the {max} already granted",
        got[0]
    );
    seen.extend_from_slice(got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_per_grant_and_increase_across_leaders_restarts_and_snapshots() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let mut seen = Vec::new();
    // Batches put the counter far above the log index: a node that fell
    // back on its applied index would hand out old tokens.
    for b in 0..5 {
        let got = batch_tokens(&client, &format!("b{b}"), 100).await;
        check_above(&mut seen, &got, "first batches");
    }
    let applied = c
        .node(c.wait_leader(Duration::from_secs(5)).await)
        .consensus()
        .status()
        .applied_index;
    assert!(
        *seen.last().unwrap() > applied + 400,
        "the counter is not the log index ({} vs {applied})",
        seen.last().unwrap()
    );

    // A leader change.
    let old = c.wait_leader(Duration::from_secs(5)).await;
    c.stop(old).await;
    let new = c.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new, old, "the leader changed");
    let got = batch_tokens(&client, "after-leader-change", 10).await;
    check_above(&mut seen, &got, "after a leader change");
    c.restart(old).await;

    // Every node restarts.
    for id in 1..=3 {
        c.stop(id).await;
    }
    for id in 1..=3 {
        c.restart(id).await;
    }
    c.wait_leader(Duration::from_secs(10)).await;
    let got = batch_tokens(&client, "after-restart", 10).await;
    check_above(&mut seen, &got, "after a full restart");

    // A new node learns the state from a snapshot, then leads. Enough
    // entries first that the snapshot lets the leader purge its log (the
    // test config keeps 50 behind a snapshot).
    for i in 0..80 {
        let got = batch_tokens(&client, &format!("fill-{i}"), 1).await;
        check_above(&mut seen, &got, "single claims");
    }
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    c.node(leader).consensus().trigger_snapshot().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.node(leader).consensus().status().snapshot_index == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no snapshot built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fourth = Node::start(config(4, c.dir.path().join("n4")))
        .await
        .unwrap();
    let lead = c.node(leader).consensus().clone();
    lead.add_learner(4, fourth.member.clone()).await.unwrap();
    let target = lead.status().applied_index;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fourth.consensus().status().applied_index < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 4 never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let joined = fourth.consensus().status();
    assert!(
        joined.snapshot_index > 0,
        "the fault took effect: node 4 was sent a snapshot ({joined:?})"
    );
    // Node 4 becomes the only voter: it must then lead (an election it
    // alone decides), with no leader transfer to race the load.
    lead.change_membership(vec![4], false).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fourth.consensus().status().role != "leader" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 4 never took over: {:?}",
            fourth.consensus().status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let via_four = Client::new([fourth.member.api_addr.clone()]).unwrap();
    let got = batch_tokens(&via_four, "after-snapshot", 10).await;
    check_above(&mut seen, &got, "on a leader that installed a snapshot");
    fourth.shutdown().await;
    c.shutdown().await;
}

/// A node restarted before the cluster's first grant must mint the same
/// tokens as the others: the token counter is replicated state, so every
/// node's record of a claim holds the token its holder was given, and a
/// Complete with that token succeeds after a failover to that node.
/// (A store without a stored counter used to start it from the applied
/// index it found at open, which depends on when the node restarted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_before_the_first_grant_mints_the_same_tokens() {
    let mut c = TestCluster::start(3).await;
    let (leader, follower) = c.leader_and_follower(Duration::from_secs(10)).await;
    // It has applied the leader's first entries, and restarts before any grant.
    let want = c.node(leader).consensus().status().applied_index;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.node(follower).consensus().status().applied_index < want {
        assert!(tokio::time::Instant::now() < deadline, "follower lags");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.stop(follower).await;
    c.restart(follower).await;

    let mut req = claim_req("tokens", "after-restart", "w", 60_000);
    req.claim_id = "after-restart-id".into();
    let granted = match c.client_of(leader).claim(req).await.unwrap() {
        api::claim_response::Outcome::Acquired(a) => a.token,
        other => panic!("expected ACQUIRED, got {other:?}"),
    };
    let get = api::GetRequest {
        namespace: "tokens".into(),
        key: b"after-restart".to_vec(),
        consistency: api::Consistency::Serializable as i32,
    };
    for id in 1..=3u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let rec = loop {
            if let Some(r) = c.client_of(id).get(get.clone()).await.unwrap() {
                break r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} lacks the claim"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            rec.token,
            granted,
            "node {id} (restarted: {}) holds another token than the holder was given",
            id == follower
        );
    }
    c.shutdown().await;
}
