//! `idemkv bench` as a user runs it: every workload against a real
//! three-node cluster must finish its operations with every check held, and
//! the same workloads must run against etcd and Redis where those servers
//! are installed (`.ci/run` installs them; elsewhere those tests say they
//! skip).
mod support;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{inproc, procs};

use clap::Parser;
use idemkv::bench::{bench, BenchArgs, Report};
use inproc::TestCluster;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(target: &str, endpoints: &str, workload: &str, extra: &[&str]) -> BenchArgs {
    let mut opts: Vec<(&str, &str)> = vec![
        ("--target", target),
        ("--endpoints", endpoints),
        ("--workload", workload),
        ("--clients", "8"),
        ("--ops", "200"),
        ("--warmup", "0"),
        ("--keys", "20"),
    ];
    for pair in extra.chunks(2) {
        match opts.iter_mut().find(|(k, _)| *k == pair[0]) {
            Some(o) => o.1 = pair[1],
            None => opts.push((pair[0], pair[1])),
        }
    }
    let argv = std::iter::once("bench").chain(opts.into_iter().flat_map(|(k, v)| [k, v]));
    Wrap::parse_from(argv).args
}

fn assert_clean(r: &Report, ops: u64) {
    assert!(
        r.check.passed,
        "{} {}: {}",
        r.target, r.workload, r.check.detail
    );
    assert_eq!(
        r.errors, 0,
        "{} {}: {:?}",
        r.target, r.workload, r.first_error
    );
    assert_eq!(r.ops, ops, "{} {}", r.target, r.workload);
    assert!(r.ops_per_sec > 0.0);
    let l = &r.latency_us;
    assert!(l.p50 > 0 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
}

/// A `batch` run of 200 calls of 10 keys: 2,000 keys acquired, counted as
/// items beside the calls.
fn assert_batch(r: &Report) {
    assert!(
        r.check
            .detail
            .starts_with("2000 fresh keys ACQUIRED in batches"),
        "{} batch: {}",
        r.target,
        r.check.detail
    );
    assert_eq!(r.items_per_op, 10);
    assert!((r.items_per_sec - 10.0 * r.ops_per_sec).abs() < 1e-6 * r.items_per_sec);
}

async fn every_workload(target: &str, endpoints: &str) {
    for workload in ["claim", "storm", "lifecycle", "mixed", "get", "batch"] {
        let r = bench(&args(target, endpoints, workload, &["--batch", "10"]))
            .await
            .unwrap_or_else(|e| panic!("{target} {workload}: {e:#}"));
        assert_clean(&r, 200);
        match workload {
            "storm" => assert!(
                r.check.detail.contains("exactly one ACQUIRED"),
                "{}",
                r.check.detail
            ),
            "lifecycle" => assert!(r.check.detail.contains("replayed"), "{}", r.check.detail),
            "batch" => assert_batch(&r),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workload_holds_its_checks_against_idemkv() {
    let c = TestCluster::start(3).await;
    c.wait_leader(Duration::from_secs(10)).await;
    every_workload("idemkv", &c.endpoints().join(",")).await;
    c.shutdown().await;
}

/// `--no-leader-discovery` loads the endpoint it is given, as grpcurl or a
/// generated stub would: aimed at a follower, every write is forwarded
/// (the follower's forward calls count them), and the checks hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_endpoint_is_loaded_as_given_without_leader_discovery() {
    let c = TestCluster::start(3).await;
    let (_, follower) = c.leader_and_follower(Duration::from_secs(10)).await;
    let at = c.members[&follower].api_addr.clone();
    let before = c.node(follower).consensus().forward_calls();
    let mut a = args("idemkv", &at, "claim", &[]);
    a.no_leader_discovery = true;
    let r = bench(&a).await.expect("bench");
    assert_clean(&r, 200);
    let calls = c.node(follower).consensus().forward_calls() - before;
    assert!(
        calls > 0,
        "the follower forwarded nothing: the load went elsewhere"
    );
    // With discovery (the default) the load tool goes to the leader.
    let before = c.node(follower).consensus().forward_calls();
    assert_clean(
        &bench(&args("idemkv", &at, "claim", &[])).await.unwrap(),
        200,
    );
    assert_eq!(c.node(follower).consensus().forward_calls(), before);
    c.shutdown().await;
}

/// The replicated floor starts its followers as `idemkv floor-follower`;
/// a test process is not `idemkv`, so it is given this build's binary.
fn floor_args(target: &str, workload: &str, extra: &[&str]) -> BenchArgs {
    let mut a = args(target, "unused", workload, extra);
    a.endpoints = None;
    a.floor_follower = Some(env!("CARGO_BIN_EXE_idemkv").into());
    a
}

/// The gRPC floor (`--target floor`) and the replicated floor
/// (`--target replicated-floor`) serve every workload through the same
/// client with its checks holding, and take no endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workload_holds_its_checks_against_the_grpc_floors() {
    for target in ["floor", "replicated-floor"] {
        for workload in ["claim", "storm", "lifecycle", "mixed", "get", "batch"] {
            let r = bench(&floor_args(target, workload, &["--batch", "10"]))
                .await
                .unwrap_or_else(|e| panic!("{target} {workload}: {e:#}"));
            assert_clean(&r, 200);
            assert_eq!(r.target, target);
            if workload == "batch" {
                assert_batch(&r);
            }
            assert_eq!(r.replication.is_some(), target == "replicated-floor");
        }
        let refused = bench(&args(target, "127.0.0.1:1", "claim", &[])).await;
        assert!(
            refused.is_err_and(|e| e.to_string().contains("give none")),
            "endpoints given to the {target} are refused"
        );
    }
}

/// The replicated floor groups concurrent writes into batches: 2,000
/// fresh claims from 64 clients are 2,000 replicated writes in fewer
/// batches, and both followers synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replicated_floor_batches_writes_and_its_followers_sync_them() {
    let a = floor_args(
        "replicated-floor",
        "claim",
        &["--clients", "64", "--ops", "2000"],
    );
    let r = bench(&a).await.unwrap();
    assert_clean(&r, 2000);
    let rep = r
        .replication
        .expect("the replicated floor reports its copies");
    assert_eq!(rep.writes, 2000, "each fresh claim is one replicated write");
    assert!(
        rep.batches >= 1 && rep.batches < rep.writes,
        "concurrent writes share batches: {rep:?}"
    );
    assert!(
        rep.follower_syncs.iter().any(|&n| n >= 1)
            && rep.follower_syncs.iter().all(|&n| n <= rep.batches),
        "a follower fdatasynced, at most once per batch: {rep:?}"
    );
}

/// A write to the replicated floor is answered only once a follower holds
/// it: with both followers killed, a fresh claim fails (UNAVAILABLE, not
/// a hang, not ACQUIRED), while the claim made before is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replicated_floor_refuses_writes_without_a_follower() {
    use idemkv::pb::api::{self, claim_response::Outcome, idempotency_client::IdempotencyClient};
    let mut floor =
        idemkv::bench::floor::start(Some(std::path::Path::new(env!("CARGO_BIN_EXE_idemkv"))))
            .unwrap();
    let mut c = IdempotencyClient::connect(format!("http://{}", floor.addr))
        .await
        .unwrap();
    let claim = |key: &str| api::ClaimRequest {
        namespace: "n".into(),
        key: key.as_bytes().to_vec(),
        owner: "w".into(),
        claim_id: format!("c-{key}"),
        lease_ms: 30_000,
        ..Default::default()
    };
    let first = c.claim(claim("k-1")).await.unwrap().into_inner().outcome;
    assert!(matches!(first, Some(Outcome::Acquired(_))), "{first:?}");

    assert_eq!(
        floor.stop_followers(),
        2,
        "both followers were running and are killed"
    );
    let second = tokio::time::timeout(Duration::from_secs(10), c.claim(claim("k-2")))
        .await
        .expect("a write without followers fails, it does not hang");
    assert_eq!(
        second.map(|r| r.into_inner().outcome).unwrap_err().code(),
        tonic::Code::Unavailable
    );
    let again = c.claim(claim("k-1")).await.unwrap().into_inner().outcome;
    assert!(matches!(again, Some(Outcome::InProgress(_))), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_grants_each_raced_key_once_and_replays_see_the_result() {
    let c = TestCluster::start(3).await;
    c.wait_leader(Duration::from_secs(10)).await;
    let eps = c.endpoints().join(",");
    // 32 clients racing on 5 keys per generation: most claims lose.
    let r = bench(&args(
        "idemkv",
        &eps,
        "storm",
        &["--clients", "32", "--keys", "5", "--ops", "640"],
    ))
    .await
    .unwrap();
    assert_clean(&r, 640);
    // "exactly one ACQUIRED for each of N raced keys": every client walks
    // the same key sequence, so 640 claims by 32 clients reach 20 keys at
    // least (4 generations of 5).
    let raced: u64 = r
        .check
        .detail
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(raced >= 20, "{}", r.check.detail);
    // Large results replay byte for byte.
    let r = bench(&args(
        "idemkv",
        &eps,
        "lifecycle",
        &["--value-size", "200000", "--ops", "20"],
    ))
    .await
    .unwrap();
    assert_clean(&r, 20);
    c.shutdown().await;
}

#[test]
fn bad_options_are_refused_by_name_before_any_load() {
    for (flag, value, named) in [
        ("--clients", "0", "clients"),
        ("--dup-rate", "1.5", "dup-rate"),
        ("--value-size", "2000000", "value-size"),
        ("--ops", "0", "ops"),
    ] {
        let out = Command::new(procs::BIN)
            .args(["bench", "--endpoints", "127.0.0.1:1", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{flag}: {err}");
    }
}

#[test]
fn json_report_and_exit_status_from_the_binary() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(async {
        let c = TestCluster::start(3).await;
        c.wait_leader(Duration::from_secs(10)).await;
        c
    });
    let out = Command::new(procs::BIN)
        .args(["bench", "--workload", "lifecycle", "--clients", "4"])
        .args(["--ops", "50", "--warmup", "0", "--json"])
        .args(["--endpoints", &c.endpoints().join(",")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["target"], "idemkv");
    assert_eq!(v["workload"], "lifecycle");
    assert_eq!(v["ops"], 50);
    assert_eq!(v["check"]["passed"], true);
    assert!(v["latency_us"]["p99"].as_u64().unwrap() > 0);
    rt.block_on(c.shutdown());
}

/// A server the test started, killed on drop, and its data directory.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..200 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workload_runs_against_redis() {
    if !installed("redis-server") {
        eprintln!("SKIP: redis-server is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = procs::free_ports(1)[0];
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Server { child, _dir: dir };
    wait_until("redis", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    every_workload("redis", &format!("127.0.0.1:{port}")).await;
    // Written as a Redis URL, the same server is loaded the same way.
    let url = format!("redis://127.0.0.1:{port}");
    let r = bench(&args("redis", &url, "claim", &["--ops", "50"]))
        .await
        .unwrap();
    assert_clean(&r, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workload_runs_against_etcd() {
    if !installed("etcd") {
        eprintln!("SKIP: etcd is not installed (.ci/run installs etcd-server)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ports = procs::free_ports(2);
    let client = format!("http://127.0.0.1:{}", ports[0]);
    let peer = format!("http://127.0.0.1:{}", ports[1]);
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("bench={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Server { child, _dir: dir };
    let endpoint = format!("127.0.0.1:{}", ports[0]);
    // Ready once a claim goes through (etcd elects itself first).
    let mut ready = false;
    for _ in 0..100 {
        let probe = args(
            "etcd",
            &endpoint,
            "claim",
            &["--clients", "1", "--ops", "1"],
        );
        if bench(&probe).await.is_ok_and(|r| r.check.passed) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "etcd did not come up");
    every_workload("etcd", &endpoint).await;
    // Written as etcd's own tools write it (http://host:port), the same
    // member is loaded the same way (this was a DNS error once).
    let r = bench(&args("etcd", &client, "claim", &["--ops", "50"]))
        .await
        .unwrap();
    assert_clean(&r, 50);
}
