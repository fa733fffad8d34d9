//! Await and health-watch caps, per-key Await wake-ups, reflection v1alpha,
//! and the messages of a node that has lost its quorum.
mod support;
use std::time::Duration;
use support::inproc;

use idemkv::client::ClientOptions;
use idemkv::pb::api;
use idemkv::Client;
use inproc::{acquired, claim_req, TestCluster};
use tonic::Code;

fn no_retry(addr: &str) -> Client {
    let opts = ClientOptions {
        retry_for: Duration::ZERO,
        ..Default::default()
    };
    Client::with_options([addr.to_string()], opts).unwrap()
}

fn get_req(ns: &str, key: &str) -> api::GetRequest {
    api::GetRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        consistency: api::Consistency::Linearizable as i32,
    }
}

/// What a user sees on a claim and a linearizable Get at the one node left
/// of three: UNAVAILABLE, saying what is going on, without openraft's
/// internal structures.
async fn lone_node_messages(survivor_is_leader: bool) -> Vec<String> {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let survivor = if survivor_is_leader {
        leader
    } else {
        (1..=3).find(|id| *id != leader).unwrap()
    };
    for id in 1..=3 {
        if id != survivor {
            c.stop(id).await;
        }
    }
    let cl = no_retry(&c.members[&survivor].api_addr);
    let claim = cl
        .claim(claim_req("ns", "k", "w", 30_000))
        .await
        .expect_err("a lone node cannot commit a claim");
    let get = cl
        .get(get_req("ns", "k"))
        .await
        .expect_err("a lone node cannot serve a linearizable read");
    for e in [&claim, &get] {
        assert_eq!(e.code(), Some(Code::Unavailable), "{e}");
    }
    let mut messages = vec![claim.message(), get.message()];
    if !survivor_is_leader {
        // Once it stops following the lost leader, it knows no leader.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while c.node(survivor).consensus().status().leader.is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still follows a leader"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let later = cl
            .claim(claim_req("ns", "k", "w", 30_000))
            .await
            .expect_err("a lone node cannot commit a claim");
        assert_eq!(later.code(), Some(Code::Unavailable), "{later}");
        messages.push(later.message());
    }
    for m in &messages {
        assert!(m.contains(&format!("this node (id {survivor})")), "{m}");
        assert!(m.contains("check that the other nodes are up"), "{m}");
    }
    c.shutdown().await;
    messages
}

fn assert_readable(what: &str, msg: &str) {
    for internal in ["{", "voter_ids", "Membership", "LogId", "QuorumNotEnough"] {
        assert!(
            !msg.contains(internal),
            "{what}: message dumps internals ({internal:?}): {msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_its_quorum_says_so() {
    for m in lone_node_messages(true).await {
        eprintln!("leader alone: {m}");
        assert_readable("leader alone", &m);
        assert!(m.contains("is leader of term"), "{m}");
        assert!(
            m.contains("no answer from [") || m.contains("majority"),
            "{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_left_alone_says_so() {
    for m in lone_node_messages(false).await {
        eprintln!("follower alone: {m}");
        assert_readable("follower alone", &m);
    }
}

fn await_req(ns: &str, key: &str, timeout_ms: u64) -> api::AwaitRequest {
    api::AwaitRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        timeout_ms,
    }
}

fn complete_req(ns: &str, key: &str, token: u64) -> api::CompleteRequest {
    api::CompleteRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        token,
        result: b"done".to_vec(),
        ..Default::default()
    }
}

/// Probe with Awaits on an absent key (answered NOT_FOUND at once while a
/// slot is free) until one is refused; that refusal.
async fn refused_await(cl: &Client, ns: &str) -> idemkv::client::ClientError {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match cl.r#await(await_req(ns, "absent", 1_000)).await {
            Err(e) if e.code() == Some(Code::ResourceExhausted) => return e,
            Err(e) if e.code() == Some(Code::NotFound) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awaits_have_caps_of_their_own_and_leave_other_calls_alone() {
    let c = TestCluster::start_with(1, |cfg| {
        cfg.caps.max_in_flight = 2;
        cfg.caps.max_awaits = 3;
        cfg.caps.max_awaits_per_namespace = 2;
    })
    .await;
    let addr = c.members[&1].api_addr.clone();
    let cl = no_retry(&addr);
    let a = acquired(cl.claim(claim_req("a", "k", "w", 60_000)).await.unwrap());
    let a2 = acquired(cl.claim(claim_req("a", "k2", "w", 60_000)).await.unwrap());
    let b = acquired(cl.claim(claim_req("b", "k", "w", 60_000)).await.unwrap());
    let wait_on = |ns: &'static str, key: &'static str| {
        let cl = cl.clone();
        tokio::spawn(async move { cl.r#await(await_req(ns, key, 60_000)).await })
    };
    let wait = |ns: &'static str| wait_on(ns, "k");
    let sm = c.node(1).consensus().clone();
    // Each Await is waiting (registered on its key) before the next call,
    // so none of them races another for a slot.
    let settle = |want: usize| {
        let sm = sm.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while sm.watched_keys() < want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the Awaits never waited"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // Two Awaits fill namespace "a"; a third there is refused, naming the
    // setting, its value and the namespace; other namespaces still wait.
    let first = wait_on("a", "k");
    settle(1).await;
    let second = wait_on("a", "k2");
    settle(2).await;
    let in_a = vec![first, second];
    let e = refused_await(&cl, "a").await;
    assert_eq!(e.reason(), Some("OVERLOADED"), "{e}");
    let m = e.message();
    assert!(
        m.contains("max_awaits_per_namespace: 2") && m.contains("\"a\""),
        "{m}"
    );
    let in_b = wait("b");
    settle(3).await;
    // Now three wait on the node: the node's own cap refuses a fourth.
    let e = refused_await(&cl, "c").await;
    assert!(e.message().contains("max_awaits: 3"), "{e}");

    // Three calls wait, yet the two in-flight slots are free: Get and Claim
    // (two at once) are served.
    let (g, k) = tokio::join!(
        cl.get(get_req("a", "k")),
        cl.claim(claim_req("d", "k", "w", 60_000))
    );
    assert!(g.unwrap().is_some());
    acquired(k.unwrap());
    for w in in_a.iter().chain([&in_b]) {
        assert!(!w.is_finished(), "an Await ended early");
    }

    cl.complete(complete_req("a", "k", a.token)).await.unwrap();
    cl.complete(complete_req("a", "k2", a2.token))
        .await
        .unwrap();
    cl.complete(complete_req("b", "k", b.token)).await.unwrap();
    for w in in_a.into_iter().chain([in_b]) {
        let r = w.await.unwrap().unwrap();
        assert!(!r.timed_out);
        assert_eq!(r.record.unwrap().state, api::RecordState::Completed as i32);
    }
    // The slots are back.
    let e = cl
        .r#await(await_req("a", "absent", 1_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound), "{e}");
    c.shutdown().await;
}

/// Observed through the node's count of Await wake-ups
/// (`StateMachineStore::watch_wakeups`): writes to other keys wake no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_await_wakes_when_its_key_changes_and_not_for_other_keys() {
    let c = TestCluster::start(1).await;
    let cl = no_retry(&c.members[&1].api_addr);
    let sm = c.node(1).consensus().clone();
    let held = acquired(cl.claim(claim_req("ns", "k", "w", 60_000)).await.unwrap());
    let waiter = {
        let cl = cl.clone();
        tokio::spawn(async move { cl.r#await(await_req("ns", "k", 60_000)).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sm.watched_keys() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Await never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = sm.watch_wakeups();
    for i in 0..20 {
        acquired(
            cl.claim(claim_req("ns", &format!("other-{i}"), "w", 60_000))
                .await
                .unwrap(),
        );
    }
    assert_eq!(sm.watch_wakeups(), before, "woken by writes to other keys");
    assert!(!waiter.is_finished());

    let sent = tokio::time::Instant::now();
    cl.complete(complete_req("ns", "k", held.token))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the Await did not return promptly after its key completed")
        .unwrap()
        .unwrap();
    eprintln!(
        "Await returned {:?} after the Complete was sent",
        sent.elapsed()
    );
    assert!(!r.timed_out);
    let rec = r.record.unwrap();
    assert_eq!(rec.state, api::RecordState::Completed as i32);
    assert_eq!(rec.result, b"done");
    assert_eq!(sm.watch_wakeups(), before + 1);
    assert_eq!(
        sm.watched_keys(),
        0,
        "a finished Await left its key registered"
    );
    c.shutdown().await;
}

/// Under paused time (one virtual clock for the node): an Await on a key
/// whose 30 s lease runs out returns at the lease's end, not its timeout.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_await_returns_the_record_once_its_lease_passes() {
    let (c, _wall) = TestCluster::start_virtual(1).await;
    let cl = no_retry(&c.members[&1].api_addr);
    let claimed = tokio::time::Instant::now();
    acquired(cl.claim(claim_req("ns", "k", "w", 30_000)).await.unwrap());
    let r = cl.r#await(await_req("ns", "k", 120_000)).await.unwrap();
    let waited = claimed.elapsed();
    assert!(!r.timed_out, "the lease passed, so the wait is over");
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "woke at the lease's end: {waited:?} after the claim"
    );
    let rec = r.record.unwrap();
    assert_eq!(rec.state, api::RecordState::InProgress as i32);
    assert_eq!(rec.owner, "w");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_streams_are_capped_and_checks_are_not() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let c = TestCluster::start_with(1, |cfg| cfg.caps.max_health_watches = 2).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.members[&1].api_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(ch);
    let watch = || {
        let mut h = health.clone();
        async move { h.watch(HealthCheckRequest::default()).await }
    };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = watch().await.expect("under the cap").into_inner();
        assert_eq!(s.message().await.unwrap().unwrap().status, 1, "SERVING");
        open.push(s);
    }
    let refused = watch().await.expect_err("over the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_health_watches: 2"),
        "{refused:?}"
    );
    for _ in 0..5 {
        health
            .clone()
            .check(HealthCheckRequest::default())
            .await
            .expect("plain checks are not counted");
    }
    // A closed stream gives its slot back.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match watch().await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_v1alpha_clients_too() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let c = TestCluster::start(1).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.members[&1].api_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let names: Vec<String> = match stream.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("{other:?}"),
    };
    for want in ["idemkv.v1.Idempotency", "idemkv.v1.Cluster"] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("RaftPeer")), "{names:?}");
    c.shutdown().await;
}
