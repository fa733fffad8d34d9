//! TLS with real processes: certificates from `idemkv certs`, a three-node
//! cluster serving TLS on both ports (the peer port always mutual TLS).
//! With `--client-auth` a client needs the CA and a client certificate;
//! plaintext, certificate-less and wrong-CA clients are refused. Without
//! it, trusting the CA is enough. Replication and a follower forwarding a
//! write to the leader both run over mutual TLS.
mod support;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::procs;

use idemkv::client::{ClientOptions, ClientTls};
use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::pb::peer::raft_peer_client::RaftPeerClient;
use idemkv::pb::peer::Payload;
use idemkv::raft::consensus::ForwardReply;
use idemkv::Client;
use procs::{ProcCluster, BIN};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// `idemkv certs --out DIR` for three nodes on loopback.
fn certs(dir: &Path) -> PathBuf {
    let out = Command::new(BIN)
        .args(["certs", "--hosts", "localhost,127.0.0.1", "--nodes", "3"])
        .arg("--out")
        .arg(dir)
        .output()
        .expect("run idemkv certs");
    assert!(
        out.status.success(),
        "idemkv certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca-key.pem",
        "node-3.pem",
        "node-3-key.pem",
        "client.pem",
        "client-key.pem",
    ] {
        assert!(dir.join(f).exists(), "{f} not written");
    }
    dir.to_path_buf()
}

/// A TLS cluster: node N uses node-N.pem; every node trusts ca.pem.
fn tls_cluster(dir: &Path, certs: &Path, client_auth: bool) -> ProcCluster {
    let config = format!(
        "tls_ca = {:?}\nclient_auth = {client_auth}\n",
        certs.join("ca.pem")
    );
    let mut c = ProcCluster::new(dir, 3, &config);
    for i in 0..3 {
        let n = i + 1;
        c.envs[i] = vec![
            (
                "IDEMKV_TLS_CERT".into(),
                certs.join(format!("node-{n}.pem")).display().to_string(),
            ),
            (
                "IDEMKV_TLS_KEY".into(),
                certs
                    .join(format!("node-{n}-key.pem"))
                    .display()
                    .to_string(),
            ),
        ];
    }
    c.start_all();
    c
}

fn tls(certs: &Path, with_identity: bool) -> ClientTls {
    let (cert, key) = (certs.join("client.pem"), certs.join("client-key.pem"));
    let identity = with_identity.then_some((cert.as_path(), key.as_path()));
    ClientTls::from_files(
        &certs.join("ca.pem"),
        identity.map(|i| i.0),
        identity.map(|i| i.1),
    )
    .expect("client TLS files")
}

fn client(endpoints: &[String], tls: Option<ClientTls>, retry_for: Duration) -> Client {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(3),
        retry_for,
        tls,
        ..ClientOptions::default()
    };
    Client::with_options(endpoints, opts).expect("client")
}

fn claim(key: &str) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: "tls".into(),
        key: key.as_bytes().to_vec(),
        owner: "w1".into(),
        lease_ms: 30_000,
        ..Default::default()
    }
}

/// Claim and complete `key`; then a fresh claim replays the result.
async fn claim_complete(c: &Client, key: &str) {
    let token = match c.claim(claim(key)).await.expect("claim") {
        Outcome::Acquired(a) => a.token,
        other => panic!("{key}: expected ACQUIRED, got {other:?}"),
    };
    c.complete(api::CompleteRequest {
        namespace: "tls".into(),
        key: key.as_bytes().to_vec(),
        token,
        result: b"done".to_vec(),
        ..Default::default()
    })
    .await
    .expect("complete");
    match c.claim(claim(key)).await.expect("replay") {
        Outcome::Completed(done) => assert_eq!(done.result, b"done"),
        other => panic!("{key}: expected COMPLETED, got {other:?}"),
    }
}

/// Wait until the cluster is ready (as seen over TLS); the follower's
/// client address.
async fn ready(c: &ProcCluster, good: &Client) -> String {
    if let Err(e) = good.wait_ready(Duration::from_secs(15)).await {
        panic!("{e}; logs in {}", c.dir.display());
    }
    good.status_all()
        .await
        .into_iter()
        .find(|(_, s)| s.as_ref().is_ok_and(|s| s.role == "follower"))
        .map(|(addr, _)| addr)
        .expect("a follower")
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_with_client_auth() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(&dir.path().join("certs"));
    let other_ca = certs(&dir.path().join("other"));
    let c = tls_cluster(dir.path(), &ca, true);

    // The cluster elected a leader and replicates: peers reach each other
    // over mutual TLS.
    let good = client(&c.api, Some(tls(&ca, true)), Duration::from_secs(10));
    let follower = ready(&c, &good).await;
    claim_complete(&good, "all-endpoints").await;

    // A write sent to a follower only is forwarded to the leader over the
    // peer port (mutual TLS), and read back through every node.
    let via_follower = client(
        std::slice::from_ref(&follower),
        Some(tls(&ca, true)),
        Duration::from_secs(10),
    );
    claim_complete(&via_follower, "via-follower").await;
    for addr in &c.api {
        let one = client(
            std::slice::from_ref(addr),
            Some(tls(&ca, true)),
            Duration::from_secs(5),
        );
        let mut seen = false;
        for _ in 0..50 {
            let rec = one
                .get(api::GetRequest {
                    namespace: "tls".into(),
                    key: b"via-follower".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("get");
            if rec.is_some_and(|r| r.result == b"done") {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen, "{addr} never applied the forwarded write");
    }

    let quick = Duration::from_millis(300);
    // Plaintext to a TLS port.
    let plain = client(&c.api, None, quick);
    let e = plain.claim(claim("plain")).await.unwrap_err();
    eprintln!("plaintext client: {e}");
    // TLS, but no client certificate.
    let anonymous = client(&c.api, Some(tls(&ca, false)), quick);
    let e = anonymous.claim(claim("anonymous")).await.unwrap_err();
    eprintln!("client without a certificate: {e}");
    // A client trusting (and certified by) another CA is told at once,
    // not after retrying for its whole retry budget.
    let stranger = client(&c.api, Some(tls(&other_ca, true)), Duration::from_secs(60));
    let started = std::time::Instant::now();
    let e = stranger.claim(claim("stranger")).await.unwrap_err();
    eprintln!("client of another CA: {e}");
    assert!(e.message().contains("certificate"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a certificate error was retried: {:?}",
        started.elapsed()
    );
    // Nothing the refused clients sent was applied.
    for key in ["plain", "anonymous", "stranger"] {
        let rec = good
            .get(api::GetRequest {
                namespace: "tls".into(),
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .expect("get");
        assert!(rec.is_none(), "{key} was written by a refused client");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_without_client_auth_needs_only_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(&dir.path().join("certs"));
    let c = tls_cluster(dir.path(), &ca, false);

    let ca_only = client(&c.api, Some(tls(&ca, false)), Duration::from_secs(10));
    let follower = ready(&c, &ca_only).await;
    claim_complete(&ca_only, "ca-only").await;
    let via_follower = client(
        std::slice::from_ref(&follower),
        Some(tls(&ca, false)),
        Duration::from_secs(10),
    );
    claim_complete(&via_follower, "ca-only-via-follower").await;

    // Still TLS: plaintext is refused.
    let plain = client(&c.api, None, Duration::from_millis(300));
    assert!(plain.claim(claim("plain")).await.is_err());

    // Endpoints written as https:// URLs, the form etcd's tools take.
    let urls: Vec<String> = c.api.iter().map(|a| format!("https://{a}")).collect();
    let by_url = client(&urls, Some(tls(&ca, false)), Duration::from_secs(10));
    claim_complete(&by_url, "ca-only-by-url").await;
    // http:// with TLS settings contradicts itself: refused at once, by name.
    let opts = ClientOptions {
        tls: Some(tls(&ca, false)),
        ..ClientOptions::default()
    };
    let e = Client::with_options([format!("http://{}", c.api[0])], opts)
        .err()
        .expect("http:// with a CA is refused")
        .to_string();
    assert!(e.contains("plaintext but TLS settings were given"), "{e}");
}

#[test]
fn serve_without_a_ca_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(&dir.path().join("certs"));
    let out = Command::new(BIN)
        .args(["serve", "--id", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(ca.join("node-1.pem"))
        .arg("--tls-key")
        .arg(ca.join("node-1-key.pem"))
        .env_remove("IDEMKV_TLS_CA")
        .output()
        .expect("run idemkv serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-ca"), "{err}");
}

/// A channel to a node's peer port presenting `name`.pem (as a peer would).
async fn peer_port_as(
    certs: &Path,
    peer: &str,
    name: &str,
) -> RaftPeerClient<tonic::transport::Channel> {
    let pem = |f: String| std::fs::read(certs.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem("ca.pem".into())))
        .identity(Identity::from_pem(
            pem(format!("{name}.pem")),
            pem(format!("{name}-key.pem")),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{peer}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    RaftPeerClient::new(ch)
}

/// The peer port takes node certificates only. `client.pem`, signed by the
/// same CA for the client port, is refused there even from a member's
/// address, so a client cannot write past the bearer tokens or vote.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_is_refused_on_the_peer_port() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs(&dir.path().join("certs"));
    let c = tls_cluster(dir.path(), &ca, true);
    let good = client(&c.api, Some(tls(&ca, true)), Duration::from_secs(10));
    ready(&c, &good).await;
    let leader = good
        .status_all()
        .await
        .into_iter()
        .find(|(_, s)| s.as_ref().is_ok_and(|s| s.role == "leader"))
        .map(|(addr, _)| addr)
        .expect("a leader");
    let at = c.api.iter().position(|a| *a == leader).unwrap();
    let peer = &c.peer[at];

    let mut as_client = peer_port_as(&ca, peer, "client").await;
    let err = as_client
        .forward(procs::forwarded_claim("tls", "by-client", "client"))
        .await
        .expect_err("a client certificate's forward is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node certificate"), "{err:?}");
    let err = as_client
        .vote(Payload {
            data: vec![],
            ..Default::default()
        })
        .await
        .expect_err("a client certificate's vote is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let get = |key: &str| api::GetRequest {
        namespace: "tls".into(),
        key: key.as_bytes().to_vec(),
        ..Default::default()
    };
    let rec = good.get(get("by-client")).await.expect("get");
    assert!(rec.is_none(), "the client certificate's claim was written");

    // The same call with a node's certificate is served: the certificate
    // is what refused the first.
    let other = (at + 1) % 3 + 1;
    let mut as_node = peer_port_as(&ca, peer, &format!("node-{other}")).await;
    let reply = as_node
        .forward(procs::forwarded_claim("tls", "by-node", "node"))
        .await
        .expect("a node certificate is served")
        .into_inner();
    let reply: ForwardReply = idemkv::codec::decode(&reply.data).unwrap();
    assert!(matches!(reply, ForwardReply::Write(_)), "{reply:?}");
    let rec = good
        .get(get("by-node"))
        .await
        .expect("get")
        .expect("written");
    assert_eq!(rec.owner, "node");
}
