//! Three-node clusters in-process: replication, failover, restart, leases.
mod support;
use std::time::Duration;
use support::inproc;

use idemkv::pb::api::{self, claim_response::Outcome};
use inproc::{acquired, claim_req, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_one_node_is_seen_from_every_node() {
    let c = TestCluster::start(3).await;
    // Ask a follower, which forwards to the leader.
    let (_, follower) = c.leader_and_follower(Duration::from_secs(5)).await;
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

fn get_req(ns: &str, key: &str) -> api::GetRequest {
    api::GetRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        consistency: api::Consistency::Linearizable as i32,
    }
}

fn complete_req(ns: &str, key: &str, token: u64, result: &str) -> api::CompleteRequest {
    api::CompleteRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        token,
        result: result.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_keeps_records_and_tokens_increasing() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let mut max_token = 0;
    for i in 0..20 {
        let a = acquired(
            client
                .claim(claim_req("orders", &format!("k{i}"), "w1", 30_000))
                .await
                .unwrap(),
        );
        max_token = max_token.max(a.token);
        if i % 2 == 0 {
            client
                .complete(complete_req("orders", &format!("k{i}"), a.token, "done"))
                .await
                .unwrap();
        }
    }
    let old = c.wait_leader(Duration::from_secs(5)).await;
    c.stop(old).await;
    let new = c.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new, old, "a survivor took over");
    let client = c.client();
    for i in 0..20 {
        let rec = client
            .get(get_req("orders", &format!("k{i}")))
            .await
            .unwrap()
            .expect("record kept");
        let want = if i % 2 == 0 {
            api::RecordState::Completed
        } else {
            api::RecordState::InProgress
        };
        assert_eq!(rec.state, want as i32, "k{i}");
    }
    let a = acquired(
        client
            .claim(claim_req("orders", "after", "w2", 30_000))
            .await
            .unwrap(),
    );
    assert!(
        a.token > max_token,
        "token {} after failover must exceed {max_token}",
        a.token
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_node_keeps_every_completed_record() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let mut max_token = 0;
    for i in 0..30 {
        let key = format!("job-{i}");
        let a = acquired(
            client
                .claim(claim_req("jobs", &key, "w1", 30_000))
                .await
                .unwrap(),
        );
        client
            .complete(complete_req("jobs", &key, a.token, &format!("result-{i}")))
            .await
            .unwrap();
        max_token = max_token.max(a.token);
    }
    for id in 1..=3 {
        c.stop(id).await;
    }
    for id in 1..=3 {
        c.restart(id).await;
    }
    c.wait_leader(Duration::from_secs(10)).await;
    let client = c.client();
    for i in 0..30 {
        match client
            .claim(claim_req("jobs", &format!("job-{i}"), "w9", 30_000))
            .await
            .unwrap()
        {
            Outcome::Completed(done) => assert_eq!(done.result, format!("result-{i}").as_bytes()),
            other => panic!("job-{i} should replay its result after restart, got {other:?}"),
        }
    }
    let a = acquired(
        client
            .claim(claim_req("jobs", "new", "w1", 30_000))
            .await
            .unwrap(),
    );
    assert!(
        a.token > max_token,
        "tokens keep increasing across restarts"
    );
    c.shutdown().await;
}

/// Lease time is the cluster's clock, moved here by `tokio::time::advance`
/// (every node reads one virtual clock): a 30 s lease holds at 29 s after
/// its renewal and is taken over at 31 s, with no real waiting.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_expired_lease_is_taken_over_and_the_old_token_is_fenced() {
    let (c, _wall) = TestCluster::start_virtual(3).await;
    let client = c.client();
    let w1 = acquired(
        client
            .claim(claim_req("orders", "o-7", "w1", 30_000))
            .await
            .unwrap(),
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    client
        .renew(api::RenewRequest {
            namespace: "orders".into(),
            key: b"o-7".to_vec(),
            token: w1.token,
            lease_ms: 30_000,
            checkpoint: Some(b"step-3".to_vec()),
        })
        .await
        .unwrap();
    let renewed = tokio::time::Instant::now();
    // 49 s after the claim, 29 s after the renewal: the renewal counts.
    tokio::time::advance(Duration::from_secs(29)).await;
    match client
        .claim(claim_req("orders", "o-7", "w2", 30_000))
        .await
        .unwrap()
    {
        Outcome::InProgress(p) => assert_eq!(p.owner, "w1"),
        other => panic!("w1's lease is live, got {other:?}"),
    }
    assert!(
        renewed.elapsed() < Duration::from_secs(30),
        "the claim was decided inside the lease ({:?} after the renewal)",
        renewed.elapsed()
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let w2 = acquired(
        client
            .claim(claim_req("orders", "o-7", "w2", 30_000))
            .await
            .unwrap(),
    );
    assert!(w2.token > w1.token);
    assert_eq!(w2.previous_owner.as_deref(), Some("w1"));
    assert_eq!(w2.checkpoint.as_deref(), Some(&b"step-3"[..]));
    assert_eq!(w2.attempt, 2);
    let err = client
        .complete(complete_req("orders", "o-7", w1.token, "late"))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some("LEASE_LOST"), "{err}");
    assert!(
        err.message().contains("w2"),
        "the error names the holder: {err}"
    );
    let rec = client.get(get_req("orders", "o-7")).await.unwrap().unwrap();
    assert_eq!(rec.owner, "w2");
    assert_eq!(
        rec.state,
        api::RecordState::InProgress as i32,
        "w1's late result was not saved"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_answers_unavailable_and_grants_nothing() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    for id in (1..=3).filter(|i| *i != survivor) {
        c.stop(id).await;
    }
    let opts = idemkv::client::ClientOptions {
        retry_for: Duration::from_secs(1),
        request_timeout: Duration::from_secs(4),
        ..Default::default()
    };
    let lonely =
        idemkv::Client::with_options([c.members[&survivor].api_addr.clone()], opts).unwrap();
    let err = lonely
        .claim(claim_req("orders", "o-m", "w1", 30_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    for id in (1..=3).filter(|i| *i != survivor) {
        c.restart(id).await;
    }
    c.wait_leader(Duration::from_secs(10)).await;
    // Nothing was granted to w1 in the minority: w2 can claim the key.
    let a = acquired(
        c.client()
            .claim(claim_req("orders", "o-m", "w2", 30_000))
            .await
            .unwrap(),
    );
    assert!(a.token > 0);
    c.shutdown().await;
}

/// Retention time is the cluster's clock, moved by `tokio::time::advance`:
/// a record kept for an hour is there at 59 minutes and swept after.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retention_sweeps_completed_records_and_the_key_can_be_claimed_afresh() {
    let (c, _wall) = TestCluster::start_virtual(3).await;
    let client = c.client();
    let a = acquired(
        client
            .claim(api::ClaimRequest {
                retention_ms: 3_600_000,
                ..claim_req("jobs", "short", "w1", 30_000)
            })
            .await
            .unwrap(),
    );
    client
        .complete(complete_req("jobs", "short", a.token, "r"))
        .await
        .unwrap();
    let kept = acquired(
        client
            .claim(claim_req("jobs", "long", "w1", 30_000))
            .await
            .unwrap(),
    );
    client
        .complete(complete_req("jobs", "long", kept.token, "r"))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(59 * 60)).await;
    assert!(
        client
            .get(get_req("jobs", "short"))
            .await
            .unwrap()
            .is_some(),
        "kept while its retention runs"
    );
    tokio::time::advance(Duration::from_secs(2 * 60)).await;
    // The leader sweeps through the log once the retention has passed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client
        .get(get_req("jobs", "short"))
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "record not swept after its retention"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every replica removed it, and the 24 h record is untouched.
    for id in 1..=3 {
        let serial = api::GetRequest {
            consistency: api::Consistency::Serializable as i32,
            ..get_req("jobs", "short")
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.client_of(id).get(serial.clone()).await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} kept a swept record"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(client.get(get_req("jobs", "long")).await.unwrap().is_some());
    let again = acquired(
        client
            .claim(claim_req("jobs", "short", "w2", 30_000))
            .await
            .unwrap(),
    );
    assert!(again.token > a.token);
    assert_eq!(again.attempt, 1, "a swept key starts afresh");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_returns_when_the_holder_completes_or_times_out() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let a = acquired(
        client
            .claim(claim_req("orders", "o-a", "w1", 30_000))
            .await
            .unwrap(),
    );
    let waiter = {
        let client = c.client_of(3);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let r = client
                .r#await(api::AwaitRequest {
                    namespace: "orders".into(),
                    key: b"o-a".to_vec(),
                    timeout_ms: 20_000,
                })
                .await
                .unwrap();
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .complete(complete_req("orders", "o-a", a.token, "shipped"))
        .await
        .unwrap();
    let (r, took) = waiter.await.unwrap();
    assert!(!r.timed_out);
    let rec = r.record.unwrap();
    assert_eq!(rec.state, api::RecordState::Completed as i32);
    assert_eq!(rec.result, b"shipped");
    assert!(
        took < Duration::from_secs(5),
        "await returned promptly, not at its timeout: {took:?}"
    );

    acquired(
        client
            .claim(claim_req("orders", "o-b", "w1", 30_000))
            .await
            .unwrap(),
    );
    let r = client
        .r#await(api::AwaitRequest {
            namespace: "orders".into(),
            key: b"o-b".to_vec(),
            timeout_ms: 300,
        })
        .await
        .unwrap();
    assert!(r.timed_out);
    assert_eq!(r.record.unwrap().state, api::RecordState::InProgress as i32);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_after_the_leader_snapshotted() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let lagging = (1..=3).find(|i| *i != leader).unwrap();
    c.stop(lagging).await;
    let client = c.client();
    let n = 1200;
    let mut claims = Vec::new();
    for i in 0..n {
        let client = client.clone();
        claims.push(tokio::spawn(async move {
            client
                .claim(claim_req("bulk", &format!("k{i}"), "w1", 60_000))
                .await
                .unwrap()
        }));
    }
    for cl in claims {
        acquired(cl.await.unwrap());
    }
    // A snapshot on the leader while the node is away. (openraft does not
    // purge entries a follower's replication still needs, so this node may
    // catch up from the log; snapshot install itself is tested in
    // storage_suite.rs.)
    client
        .cluster()
        .trigger_snapshot(api::TriggerSnapshotRequest {})
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.node(leader).consensus().status().snapshot_index == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no snapshot built");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let target = c.node(leader).consensus().status().applied_index;
    c.restart(lagging).await;
    let node = c.client_of(lagging);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while c.node(lagging).consensus().status().applied_index < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {lagging} did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in (0..n).step_by(7) {
        let serial = api::GetRequest {
            consistency: api::Consistency::Serializable as i32,
            ..get_req("bulk", &format!("k{i}"))
        };
        assert!(
            node.get(serial).await.unwrap().is_some(),
            "k{i} missing on node {lagging}"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_grpc_tools_find_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let c = TestCluster::start(3).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.members[&2].api_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let resp = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "idemkv.v1.Idempotency".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status, ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let names: Vec<String> = match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("{other:?}"),
    };
    assert!(
        names.contains(&"idemkv.v1.Idempotency".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"idemkv.v1.Cluster".to_string()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("RaftPeer")),
        "peer RPCs are not shown to clients: {names:?}"
    );
    c.shutdown().await;
}

/// A claim that changes nothing — a replay of a completed result, or a key
/// held under a live lease — is answered after a read-index barrier without
/// a log entry; the answers are the same as through the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_change_nothing_add_no_log_entries() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let client = c.client_of(leader);
    let done = acquired(
        client
            .claim(claim_req("jobs", "done", "w1", 30_000))
            .await
            .unwrap(),
    );
    client
        .complete(complete_req("jobs", "done", done.token, "42 rows"))
        .await
        .unwrap();
    let held = acquired(
        client
            .claim(claim_req("jobs", "held", "w1", 30_000))
            .await
            .unwrap(),
    );
    let last_log = || c.node(leader).consensus().status().last_log_index;
    let before = last_log();
    for i in 0..20 {
        let owner = format!("dup-{i}");
        match client
            .claim(claim_req("jobs", "done", &owner, 30_000))
            .await
            .unwrap()
        {
            Outcome::Completed(r) => {
                assert_eq!(r.result, b"42 rows");
                assert_eq!(r.token, done.token);
            }
            other => panic!("expected COMPLETED, got {other:?}"),
        }
        match client
            .claim(claim_req("jobs", "held", &owner, 30_000))
            .await
            .unwrap()
        {
            Outcome::InProgress(p) => {
                assert_eq!(p.owner, "w1");
                assert!(p.lease_remaining_ms > 0 && p.lease_remaining_ms <= 30_000);
            }
            other => panic!("expected IN_PROGRESS, got {other:?}"),
        }
    }
    assert_eq!(
        last_log(),
        before,
        "duplicate claims were written to the log"
    );
    // A claim that does change something still goes through the log.
    let fresh = acquired(
        client
            .claim(claim_req("jobs", "fresh", "w2", 30_000))
            .await
            .unwrap(),
    );
    assert!(fresh.token > held.token);
    assert!(last_log() > before);
    c.shutdown().await;
}

/// A follower's clients' writes reach the leader many per call once they
/// come faster than the leader answers, and each still gets its own
/// outcome: 300 claims sent at once to one follower, 20 of them racing for
/// one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_concurrent_writes_in_shared_calls() {
    let c = TestCluster::start(3).await;
    let (_, follower) = c.leader_and_follower(Duration::from_secs(5)).await;
    let before = c.node(follower).consensus().forward_calls();
    let client = c.client_of(follower);
    let calls: Vec<_> = (0..300usize)
        .map(|i| {
            let client = client.clone();
            let key = if i < 280 {
                format!("k{i}")
            } else {
                "raced".to_string()
            };
            tokio::spawn(async move {
                let out = client
                    .claim(claim_req("fwd", &key, &format!("w{i}"), 60_000))
                    .await
                    .unwrap();
                (key, out)
            })
        })
        .collect();
    let mut tokens = std::collections::BTreeSet::new();
    let mut raced_winners = 0;
    for call in calls {
        match call.await.unwrap() {
            (key, Outcome::Acquired(a)) => {
                assert!(tokens.insert(a.token), "token {} twice", a.token);
                raced_winners += usize::from(key == "raced");
            }
            (key, Outcome::InProgress(_)) if key == "raced" => {}
            (key, other) => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(raced_winners, 1, "exactly one racer holds the key");
    assert_eq!(tokens.len(), 281);
    let calls = c.node(follower).consensus().forward_calls() - before;
    assert!(
        calls > 0 && calls < 150,
        "300 writes to a follower took {calls} forward calls"
    );
    c.shutdown().await;
}

/// A follower's linearizable reads reach the leader many per read-index
/// call once they come faster than the leader answers, and each still sees
/// every write acknowledged before it began: 40 writers each claim and
/// complete a fresh key through the leader and, once the complete is
/// acknowledged, read the key back through a follower; ten keys each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_shares_read_index_calls_and_its_reads_see_every_acknowledged_write() {
    let c = TestCluster::start(3).await;
    let (leader, follower) = c.leader_and_follower(Duration::from_secs(5)).await;
    let before = c.node(follower).consensus().read_forward_calls();
    let (writer, reader) = (c.client_of(leader), c.client_of(follower));
    let tasks: Vec<_> = (0..40usize)
        .map(|w| {
            let (writer, reader) = (writer.clone(), reader.clone());
            tokio::spawn(async move {
                for round in 0..10 {
                    let key = format!("w{w}-{round}");
                    let claim = claim_req("lin", &key, &format!("w{w}"), 60_000);
                    let a = acquired(writer.claim(claim).await.unwrap());
                    let result = format!("r{w}-{round}");
                    writer
                        .complete(complete_req("lin", &key, a.token, &result))
                        .await
                        .unwrap();
                    let rec = reader
                        .get(get_req("lin", &key))
                        .await
                        .unwrap()
                        .unwrap_or_else(|| panic!("{key}: acknowledged, but not found"));
                    assert_eq!(
                        (rec.state, rec.result),
                        (api::RecordState::Completed as i32, result.into_bytes()),
                        "{key}: a linearizable read at the follower missed the acknowledged complete"
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let calls = c.node(follower).consensus().read_forward_calls() - before;
    assert!(
        calls > 0 && calls < 300,
        "400 linearizable reads at a follower took {calls} read-index calls to the leader"
    );
    c.shutdown().await;
}

/// A linearizable read at the leader waits until the leader itself has
/// applied the index its leadership confirmed: the leader applies on a
/// task of its own, behind the commit a read index covers. Under 32
/// writers, each of 1000 read indexes taken at the leader is applied there
/// when `read_index` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_index_at_the_leader_is_applied_there_before_the_read() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let consensus = c.node(leader).consensus().clone();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..32usize)
        .map(|w| {
            let (client, stop) = (c.client_of(leader), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{w}-{n}");
                    client
                        .claim(claim_req("ri", &key, "w", 60_000))
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut behind = Vec::new();
    for _ in 0..1000 {
        let index = consensus.read_index().await.unwrap();
        let applied = consensus.applied_index();
        if applied < index {
            behind.push((index, applied));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    assert!(writes > 100, "only {writes} writes ran beside the reads");
    assert!(
        behind.is_empty(),
        "{} of 1000 read indexes were not applied at the leader when the read went ahead (index, applied): {:?}",
        behind.len(),
        &behind[..behind.len().min(5)]
    );
    c.shutdown().await;
}

/// Watching for Raft's fatal stop (what `idemkv serve` does, to exit
/// crash-only) costs nothing under load: the watch wakes when the role, the
/// vote, the leader or the members change, not at every turn of Raft's
/// loop (it did: a wake-up per turn, thousands a second at 64 clients).
/// It still resolves when Raft stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_for_a_fatal_stop_does_not_wake_at_every_call() {
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let consensus = c.node(leader).consensus().clone();
    let polls = std::sync::Arc::new(AtomicU64::new(0));
    let watch = {
        let polls = polls.clone();
        let mut fatal = Box::pin(async move { consensus.fatal().await });
        tokio::spawn(std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            fatal.as_mut().poll(cx)
        }))
    };
    let client = c.client_of(leader);
    for i in 0..200 {
        let key = format!("k{i}");
        let a = acquired(
            client
                .claim(claim_req("watch", &key, "w", 60_000))
                .await
                .unwrap(),
        );
        client
            .complete(complete_req("watch", &key, a.token, "done"))
            .await
            .unwrap();
        client
            .get(get_req("watch", &key))
            .await
            .unwrap()
            .expect("a completed record");
    }
    let woken = polls.load(Ordering::Relaxed);
    assert!(
        woken < 20,
        "600 calls woke the fatal-stop watch {woken} times"
    );
    c.shutdown().await;
    let said = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the fatal-stop watch did not resolve when Raft stopped")
        .unwrap();
    assert!(said.contains("stop"), "the watch said: {said}");
}

/// Concurrent writes share log entries on the leader (coalescing), and each
/// keeps its own outcome and its own token: 300 claims of distinct keys and
/// 40 racing claims of one key, sent at once through every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_keep_their_own_outcomes() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let before = c.node(leader).consensus().status().last_log_index;
    let mut calls = Vec::new();
    for i in 0..340usize {
        let client = c.client_of(1 + (i % 3) as u64);
        let key = if i < 300 {
            format!("k{i}")
        } else {
            "raced".to_string()
        };
        calls.push(tokio::spawn(async move {
            let out = client
                .claim(claim_req("coalesce", &key, &format!("w{i}"), 60_000))
                .await
                .unwrap();
            (key, out)
        }));
    }
    let mut tokens = std::collections::BTreeMap::new();
    let mut raced_winners = 0;
    for call in calls {
        let (key, out) = call.await.unwrap();
        match out {
            Outcome::Acquired(a) => {
                assert!(
                    tokens.insert(a.token, key.clone()).is_none(),
                    "token {} twice",
                    a.token
                );
                raced_winners += usize::from(key == "raced");
            }
            Outcome::InProgress(_) if key == "raced" => {}
            other => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!(raced_winners, 1, "exactly one racer holds the key");
    assert_eq!(tokens.len(), 301);
    let entries = c.node(leader).consensus().status().last_log_index - before;
    // 301 grants each need a write: fewer entries means they shared.
    assert!(
        entries < 301,
        "the writes shared entries: {entries} entries for 301 grants"
    );
    // Each holder's token is the one its record holds: its Complete succeeds.
    let client = c.client();
    for (token, key) in &tokens {
        client
            .complete(complete_req("coalesce", key, *token, "ok"))
            .await
            .unwrap_or_else(|e| panic!("complete {key} with {token}: {e}"));
    }
    c.shutdown().await;
}

/// Writes that queued on a follower while its forward calls hung (its
/// leader paused) are proposed by that follower itself once it takes
/// office, as queued linearizable reads already were. Before, each got
/// UNAVAILABLE "elected leader … but not serving as leader now" from the
/// node that was serving as leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_queued_on_a_follower_that_takes_office_are_proposed_there() {
    use api::cluster_client::ClusterClient;
    use api::idempotency_client::IdempotencyClient;
    use support::procs;

    let dir = tempfile::tempdir().unwrap();
    // A forward call waits for the leader up to 4 + 1 s: long enough for
    // an election (0.4-0.8 s) to end while the calls hang.
    let mut c = procs::ProcCluster::new(dir.path(), 3, "request_timeout_ms = 4000\n");
    c.start_all();
    c.wait_ready(Duration::from_secs(30)).await;
    let old = c.leader_index().await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let claim = |key: String| api::ClaimRequest {
        claim_id: format!("{key}-c"),
        ..claim_req("took-office", &key, "w", 60_000)
    };
    for &f in &followers {
        // Each follower's connection to the leader is open before the pause.
        let mut raw = IdempotencyClient::connect(format!("http://{}", c.api[f]))
            .await
            .unwrap();
        let warm = raw.claim(claim(format!("warm-{f}"))).await.unwrap();
        acquired(warm.into_inner().outcome.unwrap());
    }

    c.pause(old);
    // Five claims on each follower at once: two forward calls go to the
    // paused leader and hang until their deadline; three writes queue
    // behind them.
    let mut calls = tokio::task::JoinSet::new();
    for &f in &followers {
        for k in 0..5 {
            let addr = format!("http://{}", c.api[f]);
            let req = claim(format!("{f}-{k}"));
            calls.spawn(async move {
                let mut raw = IdempotencyClient::connect(addr).await.unwrap();
                (f, raw.claim(req).await)
            });
        }
    }
    // One of the followers takes office while they wait.
    let started = std::time::Instant::now();
    let new = 'found: loop {
        for &f in &followers {
            let mut cl = ClusterClient::connect(format!("http://{}", c.api[f]))
                .await
                .unwrap();
            let s = cl.status(api::StatusRequest {}).await.unwrap().into_inner();
            if s.role == "leader" {
                break 'found f;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no follower took office while the forward calls hung"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut granted = [0usize; 3];
    let mut refused = Vec::new();
    while let Some(done) = calls.join_next().await {
        match done.unwrap() {
            (f, Ok(r)) => {
                acquired(r.into_inner().outcome.unwrap());
                granted[f] += 1;
            }
            (f, Err(s)) => refused.push((f, s.message().to_string())),
        }
    }
    c.signal(old, "-CONT");
    assert!(
        granted[new] >= 3,
        "node {} took office; of its own queued writes {} were granted, refused: {refused:?}",
        new + 1,
        granted[new]
    );
}

/// A node that stopped answering without closing its connections (frozen:
/// SIGSTOP, a hung host, packets dropped) listed first. With the default
/// ten-second attempt deadline, a client used to wait it out on every
/// call that started there; the connection's keepalive pings now find the
/// node dead in about five seconds (2 s without news, then 3 s for the
/// ping's answer), and the call goes on to the next node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_costs_a_call_seconds_not_its_whole_deadline() {
    let c = TestCluster::start(3).await;
    // Accepts connections and never says a word.
    let (frozen, _hole) = inproc::black_hole().await;
    let mut endpoints = vec![frozen.clone()];
    endpoints.extend(c.endpoints());
    let opts = idemkv::client::ClientOptions::default();
    assert_eq!(opts.request_timeout, Duration::from_secs(10));

    // The fault took effect: the frozen node alone answers nothing, and a
    // call there fails only when the connection is found dead, well
    // before its deadline.
    let lone = idemkv::Client::with_options(
        [frozen],
        idemkv::client::ClientOptions {
            retry_for: Duration::from_millis(1),
            ..opts.clone()
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = lone
        .claim(claim_req("frozen", "alone", "w", 30_000))
        .await
        .unwrap_err();
    let alone = started.elapsed();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    assert!(alone < Duration::from_secs(8), "{alone:?}: {err:?}");

    let client = idemkv::Client::with_options(endpoints, opts).unwrap();
    let started = std::time::Instant::now();
    let a = acquired(
        client
            .claim(claim_req("frozen", "k", "w", 30_000))
            .await
            .expect("the claim goes on to a live node"),
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    // Once: the same claim again is the same grant (its reply came from
    // the live node that made it).
    assert!(a.token > 0);
    c.shutdown().await;
}
