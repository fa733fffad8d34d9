//! Bearer tokens, the peer port's member check, and the size and
//! concurrency caps of both ports, as a caller meets them. Every refusal is
//! checked for its code, a message naming what refused it, and for having
//! changed nothing. (TLS is tests/tls.rs.)
mod support;
use support::{inproc, procs};

use std::path::Path;
use std::time::Duration;

use idemkv::client::{ClientError, ClientOptions};
use idemkv::pb::api;
use idemkv::pb::peer::Payload;
use idemkv::raft::consensus::{ForwardReply, Forwarded};
use idemkv::record::{Claim, ClaimOutcome, Command, Op, Outcome, RecordKey};
use idemkv::Client;
use inproc::{acquired, claim_req, TestCluster};
use tonic::Code;

const BILLING: &str = "billing-secret-0001";
const ALL: &str = "reader-secret-00002";
const OPS: &str = "operator-secret-003";

fn token_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[token]]
name = "billing"
token = "{BILLING}"
namespaces = ["billing", "billing-*"]

[[token]]
name = "reader"
token_sha256 = "{}"
namespaces = ["*"]

[[token]]
name = "ops"
token = "{OPS}"
admin = true
"#,
            idemkv::auth::token_sha256(ALL)
        ),
    )
    .unwrap();
    path
}

fn client(c: &TestCluster, token: Option<&str>) -> Client {
    Client::with_options(
        c.endpoints(),
        ClientOptions {
            token: token.map(str::to_string),
            retry_for: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap()
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> (Code, String) {
    match r {
        Err(e) => (e.code().expect("a gRPC status"), e.message()),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

/// Assert that no record exists at (ns, key): a refused call wrote nothing.
async fn absent(reader: &Client, ns: &str, key: &str) {
    let rec = reader.get(get_req(ns, key)).await.unwrap();
    assert!(rec.is_none(), "{ns}/{key} was written: {rec:?}");
}

fn get_req(ns: &str, key: &str) -> api::GetRequest {
    api::GetRequest {
        namespace: ns.into(),
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_reach_only_their_namespaces() {
    let files = tempfile::tempdir().unwrap();
    let tokens = token_file(files.path());
    let c = TestCluster::start_with(3, |cfg| cfg.auth_tokens = Some(tokens.clone())).await;
    let none = client(&c, None);
    let wrong = client(&c, Some("not-a-known-token-at-all"));
    let billing = client(&c, Some(BILLING));
    let reader = client(&c, Some(ALL));
    let ops = client(&c, Some(OPS));

    // No token, or an unknown one: UNAUTHENTICATED, for writes, reads and
    // status alike; nothing is written.
    for cl in [&none, &wrong] {
        let (code_, msg) = code(cl.claim(claim_req("billing", "k1", "w", 5000)).await);
        assert_eq!(code_, Code::Unauthenticated, "{msg}");
        assert!(msg.contains("token"), "{msg}");
        let (code_, _) = code(cl.get(get_req("billing", "k1")).await);
        assert_eq!(code_, Code::Unauthenticated);
        let (code_, _) = code(cl.status().await);
        assert_eq!(code_, Code::Unauthenticated);
    }
    absent(&reader, "billing", "k1").await;

    // Health checks need no token (probes and load balancers).
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.endpoints()[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    // A token works in its namespaces, through any node (followers
    // forward), and is refused elsewhere with PERMISSION_DENIED.
    for id in 1..=3 {
        let only = Client::with_options(
            [c.members[&id].api_addr.clone()],
            ClientOptions {
                token: Some(BILLING.into()),
                ..Default::default()
            },
        )
        .unwrap();
        let key = format!("via-{id}");
        let a = acquired(
            only.claim(claim_req("billing-eu", &key, "w", 5000))
                .await
                .unwrap(),
        );
        only.complete(api::CompleteRequest {
            namespace: "billing-eu".into(),
            key: key.as_bytes().to_vec(),
            token: a.token,
            result: b"done".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (code_, msg) = code(billing.claim(claim_req("payments", "k1", "w", 5000)).await);
    assert_eq!(code_, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("namespace") && msg.contains("billing") && msg.contains("payments"),
        "{msg}"
    );
    let (code_, _) = code(billing.get(get_req("payments", "k1")).await);
    assert_eq!(code_, Code::PermissionDenied);
    // `billing-*` is a prefix; `billingx` is another namespace.
    let (code_, _) = code(billing.claim(claim_req("billingx", "k1", "w", 5000)).await);
    assert_eq!(code_, Code::PermissionDenied);
    absent(&reader, "payments", "k1").await;
    absent(&reader, "billingx", "k1").await;

    // A batch is refused whole if any item names a foreign namespace.
    let batch = api::ClaimBatchRequest {
        items: vec![
            claim_req("billing", "b1", "w", 5000),
            claim_req("payments", "b2", "w", 5000),
        ],
        all_or_nothing: false,
    };
    let (code_, _) = code(billing.claim_batch(batch).await);
    assert_eq!(code_, Code::PermissionDenied);
    absent(&reader, "billing", "b1").await;
    absent(&reader, "payments", "b2").await;

    // Status: any known token. Changing the cluster: admin tokens only.
    assert!(billing.status().await.is_ok());
    let (code_, msg) = code(
        billing
            .cluster()
            .trigger_snapshot(api::TriggerSnapshotRequest {})
            .await
            .map_err(ClientError::Status),
    );
    assert_eq!(code_, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("admin"), "{msg}");
    let (code_, _) = code(billing.change_voters(vec![1, 2]).await);
    assert_eq!(code_, Code::PermissionDenied);
    assert_eq!(reader.members().await.unwrap().len(), 3, "nothing removed");
    ops.cluster()
        .trigger_snapshot(api::TriggerSnapshotRequest {})
        .await
        .expect("an admin token may take a snapshot");
    // An admin token is not a data token unless it lists namespaces.
    let (code_, _) = code(ops.get(get_req("billing", "via-1")).await);
    assert_eq!(code_, Code::PermissionDenied);

    // Rotating: the file changes, a reload applies it; the old secret stops
    // working at once.
    std::fs::write(
        &tokens,
        "[[token]]\nname = \"billing\"\ntoken = \"billing-secret-0002\"\nnamespaces = [\"billing\"]\n",
    )
    .unwrap();
    for id in 1..=3 {
        assert_eq!(c.node(id).auth().unwrap().reload(), Ok(1));
    }
    let (code_, _) = code(billing.get(get_req("billing", "via-1")).await);
    assert_eq!(code_, Code::Unauthenticated);
    let rotated = client(&c, Some("billing-secret-0002"));
    let rec = rotated.get(get_req("billing-eu", "via-1")).await;
    assert_eq!(code(rec).0, Code::PermissionDenied, "billing-* was dropped");
    assert!(rotated
        .get(get_req("billing", "nothing"))
        .await
        .unwrap()
        .is_none());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_token_file_stops_the_node_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    std::fs::write(
        &path,
        "[[token]]\nname = \"a\"\ntoken = \"short\"\nnamespaces = [\"x\"]\n",
    )
    .unwrap();
    let mut cfg = inproc::config(1, dir.path().join("n1"));
    cfg.auth_tokens = Some(path);
    let err = idemkv::Node::start(cfg).await.err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("auth_tokens") && msg.contains("shorter than 16"),
        "{msg}"
    );
}

/// What a caller that connected and then fell silent saw before its
/// connection ended: whether the node pinged it, and after how long the
/// connection closed (`None`: still open after [`SILENCE_GIVE_UP`]).
struct Silent {
    pinged: bool,
    closed_after: Option<Duration>,
}

/// How long [`fall_silent_on`] waits for the node to close the connection.
const SILENCE_GIVE_UP: Duration = Duration::from_secs(20);

impl Silent {
    /// The node pinged the silent caller (the fault: the ping went
    /// unanswered), then closed its connection within `within`.
    fn assert_pinged_and_closed_within(&self, within: Duration) {
        assert!(
            self.pinged,
            "the node never pinged the silent caller (closed after {:?})",
            self.closed_after
        );
        let after = self.closed_after.unwrap_or_else(|| {
            panic!("the silent caller's connection was still open after {SILENCE_GIVE_UP:?}")
        });
        assert!(after < within, "closed only after {after:?}");
    }
}

/// Connect to `addr` as an HTTP/2 client, send the connection preface and
/// an empty SETTINGS frame, then answer nothing (no SETTINGS or PING
/// acknowledgement), reading what the node sends until it closes the
/// connection or [`SILENCE_GIVE_UP`] passes.
async fn fall_silent_on(addr: &str) -> Silent {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let start = std::time::Instant::now();
    let mut pinged = false;
    let read_all = async {
        let mut header = [0u8; 9];
        loop {
            if s.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            // A PING that is not itself an acknowledgement: the node asks.
            if header[3] == 0x6 && header[4] & 0x1 == 0 {
                pinged = true;
            }
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return;
            }
        }
    };
    let closed = tokio::time::timeout(SILENCE_GIVE_UP, read_all)
        .await
        .is_ok();
    Silent {
        pinged,
        closed_after: closed.then(|| start.elapsed()),
    }
}

/// A peer that opened a connection to the peer port and then went silent
/// (a leader that hung, a host gone without closing its connections) is
/// pinged and, with no answer, disconnected, instead of holding the
/// connection and its streams on this node for good. Live peers answer
/// pings, so the cluster's own connections stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_falls_silent_is_pinged_and_disconnected() {
    // Election timeouts of 300-600 ms: the keepalive (five of them, 3 s)
    // follows them.
    let c = TestCluster::start_with(3, |cfg| {
        cfg.election_timeout = (Duration::from_millis(300), Duration::from_millis(600))
    })
    .await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    fall_silent_on(&c.members[&follower].raft_addr)
        .await
        .assert_pinged_and_closed_within(Duration::from_secs(12));

    // The cluster's own peer connections answer the same pings: writes
    // go on.
    claims_go_on(&c, "peers").await;
    c.shutdown().await;
}

/// The client port does the same after `caps.client_keepalive_ms`
/// (two hours by default, as etcd's server keepalive): a client gone
/// without closing its connection is pinged and disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_falls_silent_is_pinged_and_disconnected() {
    let c = TestCluster::start_with(1, |cfg| cfg.caps.client_keepalive_ms = 500).await;
    fall_silent_on(&c.members[&1].api_addr)
        .await
        .assert_pinged_and_closed_within(Duration::from_secs(5));
    // A client that answers pings is served as before.
    claims_go_on(&c, "clients").await;
    c.shutdown().await;
}

/// After a silent caller was dropped, a claim in `namespace` is ACQUIRED.
async fn claims_go_on(c: &TestCluster, namespace: &str) {
    let out = c
        .client()
        .claim(claim_req(namespace, "after-silence", "w", 30_000))
        .await
        .expect("claim after the silent caller was dropped");
    acquired(out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_calls_are_accepted_only_from_member_addresses() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let peer_addr = c.members[&leader].raft_addr.clone();

    // A process on another address writes through the peer port, the way a
    // follower forwards: refused, nothing written.
    let mut stranger = procs::peer_from("127.0.0.2", &peer_addr).await;
    let err = stranger
        .forward(procs::forwarded_claim("peers", "k", "stranger"))
        .await
        .expect_err("a non-member's forward is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("127.0.0.2") && err.message().contains("member"),
        "{}",
        err.message()
    );
    let rec = c.client().get(get_req("peers", "k")).await.unwrap();
    assert!(
        rec.is_none(),
        "the stranger's claim was not written: {rec:?}"
    );
    // Votes are refused too (a stranger cannot disrupt elections).
    let err = stranger
        .vote(Payload {
            data: vec![],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);

    // The same call from a member's address is served: the check is what
    // refused the stranger.
    let mut member = procs::peer_from("127.0.0.1", &peer_addr).await;
    let reply = member
        .forward(procs::forwarded_claim("peers", "k", "member"))
        .await
        .unwrap()
        .into_inner();
    let reply: ForwardReply = idemkv::codec::decode(&reply.data).unwrap();
    assert!(matches!(reply, ForwardReply::Write(_)), "{reply:?}");
    let rec = c
        .client()
        .get(get_req("peers", "k"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.owner, "member");
    c.shutdown().await;

    // `peer_members_only = false` (peers behind address translation)
    // serves the same stranger.
    let open = TestCluster::start_with(3, |cfg| cfg.peer_members_only = false).await;
    let leader = open.wait_leader(Duration::from_secs(10)).await;
    let mut stranger = procs::peer_from("127.0.0.2", &open.members[&leader].raft_addr).await;
    let reply = stranger
        .forward(procs::forwarded_claim("peers", "k", "stranger"))
        .await
        .expect("served with the check off")
        .into_inner();
    let reply: ForwardReply = idemkv::codec::decode(&reply.data).unwrap();
    assert!(matches!(reply, ForwardReply::Write(_)), "{reply:?}");
    open.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_messages_are_refused_on_both_ports() {
    let c = TestCluster::start_with(3, |cfg| {
        cfg.caps.max_message_bytes = 256 * 1024;
        cfg.limits.result_max = 128 * 1024;
        cfg.caps.peer_max_message_bytes = 4 * 1024 * 1024;
    })
    .await;
    let cl = c.client();
    let a = acquired(cl.claim(claim_req("ns", "big", "w", 30_000)).await.unwrap());
    let complete = |len: usize| api::CompleteRequest {
        namespace: "ns".into(),
        key: b"big".to_vec(),
        token: a.token,
        result: vec![7; len],
        ..Default::default()
    };
    // Over the field limit but under the message cap: validation names the
    // field.
    let (code_, msg) = code(cl.complete(complete(200 * 1024)).await);
    assert_eq!(code_, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("result"), "{msg}");
    // Over the message cap: refused before decoding.
    let (code_, msg) = code(cl.complete(complete(300 * 1024)).await);
    assert_eq!(code_, Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("message") && msg.contains("262144"), "{msg}");
    let rec = cl.get(get_req("ns", "big")).await.unwrap().unwrap();
    assert_eq!(rec.state, api::RecordState::InProgress as i32, "unchanged");
    cl.complete(complete(1000)).await.unwrap();

    // The peer port: a message over its cap is refused before decoding
    // (a small undecodable one gets as far as decoding).
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let mut member = procs::peer_from("127.0.0.1", &c.members[&leader].raft_addr).await;
    let err = member
        .forward(Payload {
            data: vec![0xff; 5 * 1024 * 1024],
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let err = member
        .forward(Payload {
            data: vec![0xff; 16],
            ..Default::default()
        })
        .await
        .expect_err("undecodable");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_at_its_in_flight_cap_refuses_more_and_recovers() {
    let c = TestCluster::start_with(3, |cfg| cfg.caps.max_in_flight = 2).await;
    let cl = c.client();
    let a = acquired(
        cl.claim(claim_req("ns", "slow", "w", 60_000))
            .await
            .unwrap(),
    );
    let node1 = c.members[&1].api_addr.clone();
    let no_retry = ClientOptions {
        retry_for: Duration::ZERO,
        ..Default::default()
    };
    let one = Client::with_options([node1.clone()], no_retry).unwrap();

    // Two calls whose request bodies never arrive hold node 1's two slots
    // (Awaits would not: they have caps of their own).
    let mut waiters = vec![stall_a_call(&node1).await, stall_a_call(&node1).await];
    // Once both run, a third call is refused at once, naming the cap.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match one.get(get_req("ns", "slow")).await {
            Err(e) if e.code() == Some(Code::ResourceExhausted) => break e,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => {
                for w in &mut waiters {
                    if w.is_finished() {
                        // It arrived while a probe held the other slot:
                        // refused at the cap, the only way it may end.
                        let code = (&mut *w)
                            .await
                            .unwrap()
                            .expect_err("a stalled call answered");
                        assert_eq!(code.code(), Code::ResourceExhausted, "{code}");
                        *w = stall_a_call(&node1).await;
                    }
                }
                assert!(tokio::time::Instant::now() < deadline, "never refused");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(refused.reason(), Some("OVERLOADED"));
    assert!(refused.message().contains("max_in_flight"), "{refused}");
    // An unfenced delete refused there never ran, and is told so: the
    // refusal itself, not "outcome unknown" (the record is still there,
    // read below).
    let del = one
        .delete(api::DeleteRequest {
            namespace: "ns".into(),
            key: "slow".into(),
            token: None,
        })
        .await
        .unwrap_err();
    assert_eq!(del.reason(), Some("OVERLOADED"), "{del:?}");
    assert!(matches!(del, ClientError::Status(_)), "{del:?}");
    // Other nodes are not affected, and health checks still pass on node 1.
    assert!(c.client_of(2).get(get_req("ns", "slow")).await.is_ok());
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{node1}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is not capped");

    // The library retries an OVERLOADED refusal: this call waits for a slot.
    let patient = Client::new([node1.clone()]).unwrap();
    let later = tokio::spawn(async move { patient.get(get_req("ns", "slow")).await });
    for w in waiters {
        w.abort();
    }
    let rec = later.await.unwrap().unwrap().unwrap();
    assert_eq!(rec.state, api::RecordState::InProgress as i32);
    assert_eq!(rec.token, a.token);
    c.shutdown().await;
}

/// A unary call whose request message never comes: it holds an in-flight
/// slot on the node at `addr` until the returned task is aborted.
async fn stall_a_call(addr: &str) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.unwrap();
        let never = futures::stream::pending::<api::GetRequest>();
        grpc.client_streaming(
            tonic::Request::new(never),
            tonic::codegen::http::uri::PathAndQuery::from_static("/idemkv.v1.Idempotency/Get"),
            tonic_prost::ProstCodec::<api::GetRequest, api::GetResponse>::default(),
        )
        .await
        .map(drop)
    })
}

/// `idemkv ctl` against a process cluster: (exit code, stdout JSON or text,
/// stderr).
fn ctl(endpoints: &[String], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(procs::BIN)
        .arg("ctl")
        .args(["--endpoints", &endpoints.join(","), "--json"])
        .args(args)
        .env_remove("IDEMKV_AUTH_TOKEN")
        .output()
        .expect("run idemkv ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_and_ctl_with_tokens_reload_on_sighup_and_status_reports_health() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let mut c = procs::ProcCluster::new(
        dir.path(),
        3,
        &format!("auth_tokens = {:?}\n", tokens.display().to_string()),
    );
    c.start_all();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = c.api.clone();
    // Wait for a leader with a token that may read status.
    rt.block_on(async {
        let admin = Client::with_options(
            &api,
            ClientOptions {
                token: Some(OPS.into()),
                ..Default::default()
            },
        )
        .unwrap();
        admin.wait_ready(Duration::from_secs(30)).await.unwrap();
    });

    let (rc, _, err) = ctl(&api, &["claim", "billing", "k1", "--owner", "w"]);
    assert_eq!(rc, 1);
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let (rc, out, err) = ctl(
        &api,
        &[
            "--auth-token",
            BILLING,
            "claim",
            "billing",
            "k1",
            "--owner",
            "w",
        ],
    );
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("ACQUIRED"), "{out}");
    let (rc, _, err) = ctl(
        &api,
        &[
            "--auth-token",
            BILLING,
            "claim",
            "payments",
            "k1",
            "--owner",
            "w",
        ],
    );
    assert_eq!(rc, 1);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");

    // Rotate the billing secret and send SIGHUP: the old one stops working.
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"billing\"\ntoken = \"billing-secret-0002\"\nnamespaces = [\"billing\"]\n\
             [[token]]\nname = \"ops\"\ntoken = \"{OPS}\"\nadmin = true\n"
        ),
    )
    .unwrap();
    for i in 0..3 {
        c.signal(i, "-HUP");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (rc, _, err) = ctl(&api, &["--auth-token", BILLING, "get", "billing", "k1"]);
        if rc == 1 && err.contains("UNAUTHENTICATED") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old token still works"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (rc, out, err) = ctl(
        &api,
        &[
            "--auth-token",
            "billing-secret-0002",
            "get",
            "billing",
            "k1",
        ],
    );
    assert_eq!(rc, 0, "{out}{err}");

    // `ctl status`: every member, leader, term, applied index, health; exit
    // 0 when healthy, 1 (and the node named) when one is down.
    let (rc, out, err) = ctl(&api[..1], &["--auth-token", OPS, "status"]);
    assert_eq!(rc, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["healthy"], true, "{v}");
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "members found from one endpoint: {v}");
    for n in nodes {
        assert!(n["applied_index"].as_u64().unwrap() > 0, "{n}");
        assert!(n["leader_id"].as_u64().is_some(), "{n}");
    }
    c.kill9(2);
    let (rc, out, _) = ctl(&api[..1], &["--auth-token", OPS, "status"]);
    assert_eq!(rc, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["healthy"], false, "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains(&api[2]), "{problems}");
}

/// A forwarded write is checked against the leader's own limits: the peer
/// port never takes what the client port would refuse (SPEC §5), and the
/// refusal comes back as bad input, not as a retryable outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_commands_are_validated_again_on_the_leader() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let mut member = procs::peer_from("127.0.0.1", &c.members[&leader].raft_addr).await;
    let key = |k: &str| RecordKey {
        namespace: "peers".into(),
        key: k.as_bytes().to_vec(),
    };
    let claim = |lease_ms: u64, claim_id: &str| Claim {
        owner: "w".into(),
        claim_id: claim_id.into(),
        lease_ms,
        fingerprint: None,
        max_attempts: 0,
        retention_ms: 60_000,
    };
    let bad: Vec<(&str, Command)> = vec![
        (
            "lease_ms",
            Command::Op {
                key: key("huge-lease"),
                op: Op::Claim(claim(1 << 60, "c1")),
            },
        ),
        (
            "claim_id",
            Command::Op {
                key: key("no-claim-id"),
                op: Op::Claim(claim(1_000, "")),
            },
        ),
        (
            "namespace",
            Command::Op {
                key: RecordKey {
                    namespace: "bad ns\0".into(),
                    key: b"k".to_vec(),
                },
                op: Op::Claim(claim(1_000, "c1")),
            },
        ),
        (
            "result",
            Command::Op {
                key: key("big-result"),
                op: Op::Complete {
                    token: 1,
                    result: vec![0; 2 * 1024 * 1024],
                    code: None,
                    retention_ms: None,
                },
            },
        ),
        (
            "items[1].key",
            Command::ClaimBatch {
                items: vec![
                    (key("dup"), claim(1_000, "c1")),
                    (key("dup"), claim(1_000, "c2")),
                ],
                all_or_nothing: false,
            },
        ),
    ];
    for (field, cmd) in bad.clone() {
        let reply = forward(&mut member, Forwarded::Write(cmd)).await;
        assert_refused_on(field, &reply);
    }
    // Sent together in one call (as a busy follower forwards), each is
    // refused on its own field, and a good write beside them goes through.
    let good = Command::Op {
        key: key("good"),
        op: Op::Claim(claim(60_000, "c1")),
    };
    let (fields, mut cmds): (Vec<_>, Vec<_>) = bad.into_iter().unzip();
    cmds.push(good.clone());
    let ForwardReply::Writes(replies) = forward(&mut member, Forwarded::Writes(cmds)).await else {
        panic!("a group of writes was not answered write by write");
    };
    assert_eq!(replies.len(), fields.len() + 1);
    for (field, reply) in fields.iter().zip(&replies) {
        assert_refused_on(field, reply);
    }
    assert!(
        matches!(replies.last(), Some(ForwardReply::Write(Ok(_)))),
        "the good write: {:?}",
        replies.last()
    );
    // More writes in one call than a leader takes: refused whole.
    let flood: Vec<Command> = (0..=idemkv::raft::propose::MAX_COMMANDS)
        .map(|i| Command::Op {
            key: key(&format!("flood-{i}")),
            op: Op::Claim(claim(60_000, "c1")),
        })
        .collect();
    let reply = forward(&mut member, Forwarded::Writes(flood)).await;
    assert!(
        matches!(&reply, ForwardReply::Invalid { field, message } if field == "writes" && message.contains("513")),
        "{reply:?}"
    );
    assert!(c
        .client()
        .get(get_req("peers", "good"))
        .await
        .unwrap()
        .is_some());
    for k in ["huge-lease", "no-claim-id", "big-result", "dup", "flood-0"] {
        let rec = c.client().get(get_req("peers", k)).await.unwrap();
        assert!(rec.is_none(), "{k}: a refused forward wrote {rec:?}");
    }
    // A client of a follower still gets INVALID_ARGUMENT for bad input.
    let follower = c.members.keys().find(|id| **id != leader).unwrap();
    let mut req = claim_req("peers", "empty-id", "w", 1_000);
    req.claim_id = String::new();
    let err = raw_claim(&c.members[follower].api_addr, req).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("claim_id"), "{}", err.message());
    c.shutdown().await;
}

/// The writes of one forward call are proposed together: on an idle
/// leader they take one log entry between them, and each keeps its own
/// outcome and token. Proposed one by one (before), the first went alone,
/// the second too, and the rest in a third entry after them, so the
/// follower's answer waited for two rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_writes_of_one_forward_call_share_one_entry() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let mut member = procs::peer_from("127.0.0.1", &c.members[&leader].raft_addr).await;
    let claim = |k: &str, owner: &str| procs::claim_command("shared", k, owner);
    let last_log = || c.node(leader).consensus().status().last_log_index;
    // One write alone first, so the leader's start-up entries are behind.
    let ForwardReply::Write(Ok(_)) =
        forward(&mut member, Forwarded::Write(claim("first", "w"))).await
    else {
        panic!("a lone forwarded claim was not granted");
    };
    let before = last_log();
    let mut cmds: Vec<Command> = (0..20).map(|i| claim(&format!("k{i}"), "w")).collect();
    cmds.push(claim("k0", "late"));
    let ForwardReply::Writes(replies) = forward(&mut member, Forwarded::Writes(cmds)).await else {
        panic!("a group of writes was not answered write by write");
    };
    assert_eq!(replies.len(), 21);
    let mut tokens = std::collections::BTreeSet::new();
    for (i, reply) in replies[..20].iter().enumerate() {
        match reply {
            ForwardReply::Write(Ok(Outcome::Claim(ClaimOutcome::Acquired { token, .. }))) => {
                assert!(tokens.insert(*token), "k{i}: token {token} twice")
            }
            other => panic!("k{i}: {other:?}"),
        }
    }
    assert!(
        matches!(
            &replies[20],
            ForwardReply::Write(Ok(Outcome::Claim(ClaimOutcome::InProgress { owner, .. }))) if owner == "w"
        ),
        "the second claim of k0 in the same call: {:?}",
        replies[20]
    );
    assert_eq!(
        last_log() - before,
        1,
        "21 writes of one forward call took {} log entries",
        last_log() - before
    );
    c.shutdown().await;
}

/// A peer message whose length prefix claims more than any message holds
/// is refused as bad input and the node goes on. Before the decode limit,
/// these eleven bytes ("a forwarded write of one claim whose namespace is
/// 2^62 bytes long") made bincode ask the allocator for 4 EiB, and the
/// node process aborted: any process that could reach the peer port from a
/// member's address (every local one, under `idemkv up`) could stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_message_claiming_a_huge_length_is_refused_and_the_node_lives() {
    // Forwarded::Write, Command::Op, then 0xFD: a u64 length, 2^62.
    let data = vec![0, 0, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0x40];
    refused_as_bad_input_and_the_node_lives(data, "after-huge-length").await;
}

/// Send `data` to a one-node cluster's peer port as a forward: it must be
/// refused as bad input, write nothing, and leave the node serving (a
/// claim of `key` after it).
async fn refused_as_bad_input_and_the_node_lives(data: Vec<u8>, key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = procs::ProcCluster::new(dir.path(), 1, "");
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    let client = c.client();
    let before = client.status().await.unwrap().last_log_index;
    let mut member = procs::peer_from("127.0.0.1", &c.peer[0]).await;
    let refused = member
        .forward(Payload {
            data,
            ..Default::default()
        })
        .await
        .expect_err("an undecodable forward was accepted");
    assert_eq!(
        refused.code(),
        Code::InvalidArgument,
        "not refused as bad input (did the node die?): {refused:?}"
    );
    assert!(!c.exited(0), "the node exited");
    // Nothing was written, and the node still serves.
    let after = client.status().await.unwrap().last_log_index;
    assert_eq!(after, before, "the refused message reached the log");
    let out = client
        .claim(claim_req("peers", key, "w", 30_000))
        .await
        .expect("claim after the refused message");
    acquired(out);
}

/// A peer message nesting coalesced commands (`Many`) 300,000 deep, 600 KB,
/// is refused as bad input as it is decoded, and the node goes on. Before,
/// decoding recursed once per level and overflowed the thread's stack,
/// which aborts the node process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_message_nested_deep_is_refused_and_the_node_lives() {
    // Forwarded::Write, then Command::Many holding one command, again and
    // again, then Command::Hash.
    let mut data = vec![0u8];
    for _ in 0..300_000 {
        data.extend_from_slice(&[3, 1]);
    }
    data.push(4);
    refused_as_bad_input_and_the_node_lives(data, "after-nesting").await;
}

/// Send `req` to a leader's peer port as a follower would.
async fn forward(
    member: &mut idemkv::pb::peer::raft_peer_client::RaftPeerClient<tonic::transport::Channel>,
    req: Forwarded,
) -> ForwardReply {
    let data = idemkv::codec::encode(&req).unwrap();
    let reply = member
        .forward(Payload {
            data,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    idemkv::codec::decode(&reply.data).unwrap()
}

/// `reply` refuses a forwarded write on `field`, as bad input or too large.
fn assert_refused_on(field: &str, reply: &ForwardReply) {
    match reply {
        ForwardReply::Invalid { field: f, .. } | ForwardReply::TooLarge { field: f, .. } => {
            assert_eq!(f, field, "{reply:?}")
        }
        other => panic!("{field}: the leader accepted or mis-refused it: {other:?}"),
    }
}

/// The client library fills an empty claim_id; a generated client calling
/// the RPC directly does not, and must be refused.
async fn raw_claim(addr: &str, req: api::ClaimRequest) -> tonic::Status {
    let addr = format!("http://{addr}");
    let mut raw = api::idempotency_client::IdempotencyClient::connect(addr)
        .await
        .unwrap();
    raw.claim(req).await.expect_err("refused")
}

/// An append from a member whose entries skip an index (a faulty or
/// compromised member; a leader never sends one) is refused as bad input
/// and changes nothing: the node keeps its term and log and goes on
/// serving. Before, openraft handed the entries to the log, whose refusal
/// of the gap is a storage error that stops the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_with_a_gap_in_its_entries_is_refused_and_the_node_lives() {
    use idemkv::raft::types::{AppendEntriesRequest, Vote};
    use idemkv::raft::{Entry, EntryPayload, TypeConfig};
    use openraft::testing::log_id;

    let dir = tempfile::tempdir().unwrap();
    let mut c = procs::ProcCluster::new(dir.path(), 1, "");
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    let client = c.client();
    let before = client.status().await.unwrap();
    // From a new leader (node 2, the next term) on top of the node's last
    // entry, which its leader (node 1) wrote in the current term.
    let (term, last) = (before.term, before.last_log_index);
    let blank = |index| Entry {
        log_id: log_id::<TypeConfig>(term + 1, 2, index),
        payload: EntryPayload::Blank,
    };
    let rpc = AppendEntriesRequest {
        vote: Vote::new_committed(term + 1, 2),
        prev_log_id: Some(log_id::<TypeConfig>(term, 1, last)),
        entries: vec![blank(last + 1), blank(last + 3)],
        leader_commit: None,
    };
    let mut member = procs::peer_from("127.0.0.1", &c.peer[0]).await;
    let refused = member
        .append_entries(Payload {
            data: idemkv::codec::encode(&rpc).unwrap(),
            ..Default::default()
        })
        .await
        .expect_err("an append with a gap was accepted");
    assert_eq!(
        refused.code(),
        Code::InvalidArgument,
        "not refused as bad input (did the node die?): {refused:?}"
    );
    assert!(
        refused.message().contains("consecutive"),
        "{}",
        refused.message()
    );
    assert!(!c.exited(0), "the node exited");
    let after = client.status().await.unwrap();
    assert_eq!(
        (after.term, after.last_log_index),
        (before.term, before.last_log_index),
        "the refused append changed the node's term or log"
    );
    acquired(
        client
            .claim(claim_req("peers", "after-gap", "w", 30_000))
            .await
            .expect("claim after the refused append"),
    );
}

/// An append whose leader clock is beyond any real clock (a faulty member)
/// is refused as bad input and changes nothing: taken, it would have put
/// the node's clock reading, and every lease decision after it, past any
/// real leader's for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_with_an_absurd_leader_clock_is_refused_and_changes_nothing() {
    use idemkv::raft::types::{AppendEntriesRequest, Vote};
    use idemkv::raft::TypeConfig;
    use openraft::testing::log_id;

    let dir = tempfile::tempdir().unwrap();
    let mut c = procs::ProcCluster::new(dir.path(), 1, "");
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    let client = c.client();
    acquired(
        client
            .claim(claim_req("peers", "before-clock", "w", 30_000))
            .await
            .expect("claim"),
    );
    let before = client.status().await.unwrap();
    // A heartbeat from a new leader (node 2, the next term).
    let (term, last) = (before.term, before.last_log_index);
    let rpc = AppendEntriesRequest {
        vote: Vote::new_committed(term + 1, 2),
        prev_log_id: Some(log_id::<TypeConfig>(term, 1, last)),
        entries: vec![],
        leader_commit: None,
    };
    let mut member = procs::peer_from("127.0.0.1", &c.peer[0]).await;
    let refused = member
        .append_entries(Payload {
            data: idemkv::codec::encode(&rpc).unwrap(),
            leader_clock_ms: u64::MAX,
        })
        .await
        .expect_err("an append with an absurd leader clock was accepted");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("leader clock"),
        "{}",
        refused.message()
    );
    // The same over the append stream, which carries heartbeats and
    // replication: the stream ends with an error that says why, and so
    // does one that carries bytes that are no append at all.
    let absurd = Payload {
        data: idemkv::codec::encode(&rpc).unwrap(),
        leader_clock_ms: u64::MAX,
    };
    let garbage = Payload {
        data: vec![0xff; 7],
        leader_clock_ms: 0,
    };
    for (sent, why) in [(absurd, "leader clock"), (garbage, "undecodable")] {
        let mut answers = member
            .append_stream(futures::stream::iter(vec![sent]))
            .await
            .expect("the append stream opens")
            .into_inner();
        match answers.message().await {
            Err(refused) => {
                assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
                assert!(refused.message().contains(why), "{}", refused.message());
            }
            Ok(answer) => panic!("the stream answered a malformed append ({why}): {answer:?}"),
        }
    }
    let after = client.status().await.unwrap();
    assert_eq!(
        after.term, before.term,
        "the refused append changed the term"
    );
    assert!(
        after.clock_ms < after.wall_clock_ms + 60_000,
        "the node's clock reads {} ms, its wall clock {}",
        after.clock_ms,
        after.wall_clock_ms
    );
    acquired(
        client
            .claim(claim_req("peers", "after-clock", "w", 30_000))
            .await
            .expect("claim after the refused append"),
    );
}
