//! Prometheus `/metrics` on `--metrics-listen`: a scrape shows claims by
//! outcome, takeovers, fenced rejections, fingerprint mismatches, the Raft
//! term and indexes, and the log's fsync latency, as a user's actions
//! changed them.
mod support;
use std::io::{Read, Write};
use std::time::Duration;
use support::procs;

use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;
use procs::{free_ports, ProcCluster};

fn scrape(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample named exactly `series` (name plus labels).
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

/// Wait (Await) until the holder's lease on `key` runs out.
async fn lease_runs_out(client: &Client, key: &str) {
    client
        .r#await(api::AwaitRequest {
            namespace: "m".into(),
            key: key.as_bytes().to_vec(),
            timeout_ms: 5_000,
        })
        .await
        .unwrap();
}

fn claim(key: &str, owner: &str, lease_ms: u64, fingerprint: &str) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: "m".into(),
        key: key.as_bytes().to_vec(),
        owner: owner.into(),
        lease_ms,
        fingerprint: Some(fingerprint.as_bytes().to_vec()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_clients_saw() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(dir.path(), 3, "");
    let ports = free_ports(3);
    let metrics: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for (i, m) in metrics.iter().enumerate() {
        c.envs[i] = vec![("IDEMKV_METRICS_LISTEN".into(), m.clone())];
    }
    // Logs: JSON on nodes 1 and 2; node 2 filters out everything below warn.
    for (i, filter) in [(0, "info,openraft=warn"), (1, "warn")] {
        c.envs[i].push(("IDEMKV_LOG_FORMAT".into(), "json".into()));
        c.envs[i].push(("RUST_LOG".into(), filter.into()));
    }
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    // Every call through node 1, so node 1 answers (and counts) them all.
    let client = Client::new([&c.api[0]]).unwrap();

    let Outcome::Acquired(a) = client.claim(claim("k", "w1", 100, "f")).await.unwrap() else {
        panic!("not acquired");
    };
    // The holder dies; wait (Await) until its 100 ms lease runs out.
    lease_runs_out(&client, "k").await;
    let Outcome::Acquired(b) = client.claim(claim("k", "w2", 60_000, "f")).await.unwrap() else {
        panic!("no takeover");
    };
    assert_eq!(b.previous_owner.as_deref(), Some("w1"));
    let busy = client.claim(claim("k", "w3", 60_000, "f")).await.unwrap();
    assert!(matches!(busy, Outcome::InProgress(_)), "{busy:?}");
    let mismatch = client.claim(claim("k", "w3", 60_000, "other")).await;
    assert_eq!(mismatch.unwrap_err().reason(), Some("FINGERPRINT_MISMATCH"));
    let stale = client
        .complete(api::CompleteRequest {
            namespace: "m".into(),
            key: b"k".to_vec(),
            token: a.token,
            result: b"late".to_vec(),
            ..Default::default()
        })
        .await;
    assert_eq!(stale.unwrap_err().reason(), Some("LEASE_LOST"));
    client
        .complete(api::CompleteRequest {
            namespace: "m".into(),
            key: b"k".to_vec(),
            token: b.token,
            result: b"ok".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let replay = client.claim(claim("k", "w4", 60_000, "f")).await.unwrap();
    assert!(matches!(replay, Outcome::Completed(_)), "{replay:?}");

    let (status, body) = scrape(&metrics[0], "/metrics");
    assert!(status.contains("200"), "{status}");
    for (series, want) in [
        ("idemkv_claims_total{outcome=\"acquired\"}", 2.0),
        ("idemkv_claims_total{outcome=\"in_progress\"}", 1.0),
        ("idemkv_claims_total{outcome=\"completed\"}", 1.0),
        ("idemkv_claims_total{outcome=\"failed\"}", 0.0),
        ("idemkv_takeovers_total", 1.0),
        ("idemkv_fenced_rejections_total", 1.0),
        ("idemkv_fingerprint_mismatches_total", 1.0),
        ("idemkv_auth_refusals_total{code=\"unauthenticated\"}", 0.0),
        ("idemkv_overloaded_total", 0.0),
        ("idemkv_peer_refused_total", 0.0),
    ] {
        assert_eq!(value(&body, series), want, "{series}");
    }
    // Every node: Raft gauges and fsync latency of its own log. A follower
    // learns the last commit with the leader's next message, so each node is
    // read once it has caught up with the leader's commit index (the three
    // writes above, after the cluster's own first entries).
    let leader_commit = metrics
        .iter()
        .map(|m| scrape(m, "/metrics").1)
        .find(|body| value(body, "idemkv_raft_is_leader") == 1.0)
        .map(|body| value(&body, "idemkv_raft_commit_index"))
        .expect("a node says it leads");
    assert!(
        leader_commit >= 4.0,
        "leader's commit index {leader_commit}"
    );
    let mut leaders = 0.0;
    let mut followers_synced_on_append = 0.0;
    for m in &metrics {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let body = loop {
            let (_, body) = scrape(m, "/metrics");
            let commit = value(&body, "idemkv_raft_commit_index");
            if commit >= leader_commit {
                break body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{m} stays at commit index {commit}, the leader's is {leader_commit}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The calls above came one at a time, with pauses: a follower made
        // some of them durable on its appending task.
        if value(&body, "idemkv_raft_is_leader") == 0.0 {
            followers_synced_on_append += value(&body, "idemkv_log_fsync_on_append_total");
        }
        assert!(value(&body, "idemkv_raft_term") >= 1.0);
        assert!(value(&body, "idemkv_raft_applied_index") >= 1.0);
        assert!(value(&body, "idemkv_raft_apply_lag") >= 0.0);
        // The records written above, well under the default quota.
        assert!(value(&body, "idemkv_data_bytes") > 0.0);
        assert!(value(&body, "idemkv_quota_bytes") > value(&body, "idemkv_data_bytes"));
        assert_eq!(value(&body, "idemkv_alarm_nospace"), 0.0);
        assert!(value(&body, "idemkv_log_fsync_seconds_count") >= 1.0);
        assert!(value(&body, "idemkv_log_fsync_seconds_bucket{le=\"+Inf\"}") >= 1.0);
        leaders += value(&body, "idemkv_raft_is_leader");
    }
    assert_eq!(leaders, 1.0, "exactly one node says it leads");
    assert!(followers_synced_on_append >= 1.0);
    let (status, _) = scrape(&metrics[0], "/other");
    assert!(status.contains("404"), "{status}");

    // `--log-format json` (here IDEMKV_LOG_FORMAT): one JSON object per
    // line, with level, message and fields; RUST_LOG filters.
    let events = |i: usize| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(c.log_file(i)).unwrap();
        text.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    };
    let started: Vec<_> = events(0)
        .into_iter()
        .filter(|e| e["fields"]["message"] == "node started")
        .collect();
    assert_eq!(started.len(), 1, "node 1 logs its start as JSON");
    assert_eq!(started[0]["level"], "INFO");
    assert_eq!(started[0]["fields"]["api"], c.api[0].as_str());
    assert!(
        events(1)
            .iter()
            .all(|e| e["level"] == "WARN" || e["level"] == "ERROR"),
        "RUST_LOG=warn keeps info out"
    );
    let plain = std::fs::read_to_string(c.log_file(2)).unwrap();
    assert!(
        plain.contains("node started") && !plain.contains("\"fields\""),
        "node 3 logs text"
    );
}

/// `idemkv_takeovers_total` counts only grants taken from an expired
/// holder: not a grant after a Release, not the holder's own retry. A
/// stranger refused at the peer port counts in `idemkv_peer_refused_total`
/// and not as a client auth refusal. (Both were miscounted while the
/// counting was a side effect of the error mapping and of `previous_owner`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeovers_and_peer_refusals_are_counted_as_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(dir.path(), 1, "");
    let port = free_ports(1)[0];
    let metrics = format!("127.0.0.1:{port}");
    c.envs[0] = vec![("IDEMKV_METRICS_LISTEN".into(), metrics.clone())];
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    let client = Client::new([&c.api[0]]).unwrap();
    let with_id = |owner: &str, id: &str, lease_ms: u64| api::ClaimRequest {
        claim_id: id.into(),
        ..claim("t", owner, lease_ms, "f")
    };

    // w1's 100 ms lease runs out; w2 takes over: one takeover.
    let Outcome::Acquired(_) = client.claim(with_id("w1", "t-1", 100)).await.unwrap() else {
        panic!("not acquired");
    };
    lease_runs_out(&client, "t").await;
    let Outcome::Acquired(b) = client.claim(with_id("w2", "t-2", 60_000)).await.unwrap() else {
        panic!("no takeover");
    };
    assert_eq!(b.previous_owner.as_deref(), Some("w1"));
    // w2 retries its claim (a lost reply): the same grant, no new takeover.
    let Outcome::Acquired(again) = client.claim(with_id("w2", "t-2", 60_000)).await.unwrap() else {
        panic!("the holder's retry is answered with its grant");
    };
    assert_eq!(again.token, b.token);
    // w2 gives the key back and w3 claims it: a grant, not a takeover.
    client
        .release(api::ReleaseRequest {
            namespace: "m".into(),
            key: b"t".to_vec(),
            token: b.token,
            error: "gave up".into(),
            permanent: false,
        })
        .await
        .unwrap();
    let Outcome::Acquired(d) = client.claim(with_id("w3", "t-3", 60_000)).await.unwrap() else {
        panic!("not acquired after the release");
    };
    assert_eq!(d.previous_owner.as_deref(), Some("w2"));

    // A stranger (another source address) writes through the peer port.
    let mut stranger = procs::peer_from("127.0.0.2", &c.peer[0]).await;
    let err = stranger
        .vote(idemkv::pb::peer::Payload {
            data: vec![],
            ..Default::default()
        })
        .await
        .expect_err("a non-member's call is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let (_, body) = scrape(&metrics, "/metrics");
    for (series, want) in [
        ("idemkv_claims_total{outcome=\"acquired\"}", 4.0),
        ("idemkv_takeovers_total", 1.0),
        ("idemkv_peer_refused_total", 1.0),
        (
            "idemkv_auth_refusals_total{code=\"permission_denied\"}",
            0.0,
        ),
        ("idemkv_auth_refusals_total{code=\"unauthenticated\"}", 0.0),
    ] {
        assert_eq!(value(&body, series), want, "{series}");
    }
}

/// Three nodes, each serving `/metrics` (the addresses returned), ready.
async fn three_nodes_with_metrics(dir: &std::path::Path) -> (ProcCluster, Vec<String>) {
    let mut c = ProcCluster::new(dir, 3, "");
    let metrics: Vec<String> = free_ports(3)
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    for (i, m) in metrics.iter().enumerate() {
        c.envs[i] = vec![("IDEMKV_METRICS_LISTEN".into(), m.clone())];
    }
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    (c, metrics)
}

/// The index of the node whose metrics say it leads, once exactly one
/// does and the other two say they do not (an election may still be
/// settling just after `wait_ready`); panics after 10 s.
async fn agreed_leader(metrics: &[String]) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let says: Vec<f64> = metrics
            .iter()
            .map(|m| value(&scrape(m, "/metrics").1, "idemkv_raft_is_leader"))
            .collect();
        let leaders: Vec<usize> = (0..says.len()).filter(|i| says[*i] == 1.0).collect();
        if let [leader] = leaders[..] {
            return leader;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no agreed leader within 10 s: idemkv_raft_is_leader {says:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claim `key` and complete it with `result`.
async fn completed(client: &Client, key: &str, result: &[u8]) {
    let Outcome::Acquired(a) = client.claim(claim(key, "w1", 60_000, "f")).await.unwrap() else {
        panic!("not acquired");
    };
    client
        .complete(api::CompleteRequest {
            namespace: "m".into(),
            key: key.as_bytes().to_vec(),
            token: a.token,
            result: result.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A linearizable Get of `key` in namespace `m`.
async fn linearizable_get(
    client: &Client,
    key: &str,
) -> Result<Option<api::Record>, idemkv::client::ClientError> {
    client
        .get(api::GetRequest {
            namespace: "m".into(),
            key: key.as_bytes().to_vec(),
            consistency: api::Consistency::Linearizable as i32,
        })
        .await
}

/// Every linearizable read on the leader waits for a heartbeat round, and
/// openraft sends each heartbeat as an append stream of one request. The
/// leader keeps one stream per follower open for them, so a follower's
/// `idemkv_peer_append_streams_total` stays flat while reads go on; it used
/// to open a stream (an HTTP/2 stream and a task on both nodes) per
/// heartbeat, and rise by about one per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_do_not_open_a_peer_stream_each() {
    let dir = tempfile::tempdir().unwrap();
    let (c, metrics) = three_nodes_with_metrics(dir.path()).await;
    let client = Client::new(c.api.iter()).unwrap();
    completed(&client, "r", b"done").await;
    let streams = |m: &String| value(&scrape(m, "/metrics").1, "idemkv_peer_append_streams_total");
    let leader = agreed_leader(&metrics).await;
    let followers: Vec<&String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| &metrics[i])
        .collect();
    let before: Vec<f64> = followers.iter().map(|m| streams(m)).collect();
    // Each streams appends already: the leader replicated the claim.
    assert!(before.iter().all(|n| *n >= 1.0), "{before:?}");

    let reads = 300;
    for _ in 0..reads {
        let rec = linearizable_get(&client, "r").await.unwrap();
        assert_eq!(rec.expect("the completed record").result, b"done");
    }
    let opened: Vec<f64> = followers
        .iter()
        .zip(&before)
        .map(|(m, b)| streams(m) - b)
        .collect();
    // A stream may be opened again after a hiccup; not one per read.
    assert!(
        opened.iter().all(|n| *n < 20.0),
        "{reads} linearizable reads opened {opened:?} append streams on the followers"
    );
}

/// The value of `series` at `addr`, or `None` while nothing listens there.
fn try_value(addr: &str, series: &str) -> Option<f64> {
    std::net::TcpStream::connect(addr).ok()?;
    Some(value(&scrape(addr, "/metrics").1, series))
}

/// The leader's heartbeats to a follower go over a stream it keeps open
/// (above). When that follower is killed and started again, the stream
/// it kept is dead; the leader must open a new one, or once the other
/// follower is gone too it could no longer confirm a read. Here the
/// restarted follower is then the leader's only quorum partner, and
/// linearizable reads at the leader go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_through_a_follower_restarted_under_the_leaders_kept_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, metrics) = three_nodes_with_metrics(dir.path()).await;
    let leader = agreed_leader(&metrics).await;
    let (a, b) = match leader {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let client = Client::new([&c.api[leader]]).unwrap();
    completed(&client, "s", b"kept").await;
    let read = || linearizable_get(&client, "s");
    // Reads open the leader's heartbeat streams to both followers.
    for _ in 0..50 {
        assert_eq!(read().await.unwrap().expect("the record").result, b"kept");
    }

    let pid = c.pid(a).unwrap();
    c.kill9(a);
    assert!(!procs::running(pid), "follower {} still runs", a + 1);
    c.start_node(a);
    let commit = value(
        &scrape(&metrics[leader], "/metrics").1,
        "idemkv_raft_commit_index",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while try_value(&metrics[a], "idemkv_raft_applied_index").is_none_or(|i| i < commit) {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted follower did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pid = c.pid(b).unwrap();
    c.kill9(b);
    assert!(!procs::running(pid), "follower {} still runs", b + 1);
    let reads = tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..50 {
            let rec = read()
                .await
                .expect("a linearizable read with one follower left");
            assert_eq!(rec.expect("the record").result, b"kept");
        }
    })
    .await;
    assert!(
        reads.is_ok(),
        "linearizable reads stalled with the restarted follower as the only partner"
    );
    assert_eq!(
        value(
            &scrape(&metrics[leader], "/metrics").1,
            "idemkv_raft_is_leader"
        ),
        1.0,
        "the leader kept its office"
    );
}
