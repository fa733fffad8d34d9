//! The Docker Compose cluster: `cluster/docker/build.sh` builds the image
//! `FROM scratch` (the test's own binary, its shared libraries, the loader),
//! `cluster/compose.yaml` starts three nodes on a private network under a
//! unique project name with client ports chosen free at runtime, and the
//! Rust client claims, completes and reads through the published ports.
//! Then the leader's container is stopped: the two left must elect a new
//! leader, take a new claim and still answer for the earlier ones.
//!
//! Skips (prints "skipping: ..." and passes) when docker or docker-compose
//! is missing or the Docker daemon is not reachable. The project is always
//! torn down with `down -v`, also when an assertion fails.
mod support;
use support::procs;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use idemkv::client::ClientOptions;
use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_idemkv");
const IMAGE: &str = "idemkv:dev";
const NS: &str = "docker";

fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `docker-compose`, or else the `docker compose` plugin.
fn compose_program() -> Option<Vec<String>> {
    if quiet("docker-compose", &["version"]) {
        Some(vec!["docker-compose".into()])
    } else if quiet("docker", &["compose", "version"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else {
        None
    }
}

/// Three distinct free loopback ports (released before compose binds them).
fn free_ports() -> [u16; 3] {
    let p = procs::free_ports(3);
    [p[0], p[1], p[2]]
}

fn show(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A compose project; dropping it runs `down -v` (printing the logs first
/// when the test is failing).
struct Project {
    compose: Vec<String>,
    name: String,
    ports: [u16; 3],
}

impl Project {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .arg("-f")
            .arg(format!("{ROOT}/cluster/compose.yaml"))
            .arg("-p")
            .arg(&self.name)
            .args(args)
            .env("IDEMKV_IMAGE", IMAGE)
            .env("IDEMKV_BIND", "127.0.0.1")
            .stdin(Stdio::null());
        for (i, p) in self.ports.iter().enumerate() {
            c.env(format!("IDEMKV_PORT_{}", i + 1), p.to_string());
        }
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("run compose");
        assert!(out.status.success(), "compose {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn endpoints(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The container's health as Docker's healthcheck reports it.
    fn health(&self, service: &str) -> String {
        let id = self.run(&["ps", "-q", service]);
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Health.Status}}", id.trim()])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self.cmd(&["ps"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
            if let Ok(out) = self.cmd(&["logs", "--no-color", "--tail", "40"]).output() {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        match self
            .cmd(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("compose down -v failed: {}", show(&out)),
            Err(e) => eprintln!("compose down -v failed: {e}"),
        }
    }
}

fn claim(key: &str, owner: &str) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: NS.into(),
        key: key.as_bytes().to_vec(),
        owner: owner.into(),
        lease_ms: 120_000,
        ..Default::default()
    }
}

async fn get(client: &Client, key: &str) -> api::Record {
    client
        .get(api::GetRequest {
            namespace: NS.into(),
            key: key.as_bytes().to_vec(),
            consistency: api::Consistency::Linearizable as i32,
        })
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .unwrap_or_else(|| panic!("get {key}: absent"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_serves_and_survives_losing_its_leader() {
    if !quiet("docker", &["--version"]) {
        println!("skipping: docker is not installed");
        return;
    }
    let Some(compose) = compose_program() else {
        println!("skipping: neither docker-compose nor `docker compose` is installed");
        return;
    };
    if !quiet("docker", &["info"]) {
        println!("skipping: the Docker daemon is not reachable (docker info failed)");
        return;
    }
    let started = Instant::now();

    let out = Command::new("bash")
        .arg(format!("{ROOT}/cluster/docker/build.sh"))
        .arg(BIN)
        .env("IDEMKV_IMAGE", IMAGE)
        .stdin(Stdio::null())
        .output()
        .expect("run build.sh");
    assert!(out.status.success(), "build.sh: {}", show(&out));
    eprint!("{}", String::from_utf8_lossy(&out.stdout));

    let project = Project {
        compose,
        name: format!("idemkv-test-{}", std::process::id()),
        ports: free_ports(),
    };
    project.run(&["up", "-d"]);
    eprintln!(
        "project {} up on {:?} after {:?}",
        project.name,
        project.endpoints(),
        started.elapsed()
    );

    let opts = ClientOptions {
        request_timeout: Duration::from_secs(3),
        retry_for: Duration::from_secs(30),
        ..Default::default()
    };
    let client = Client::with_options(project.endpoints(), opts).unwrap();
    client
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("the three containers agree on a leader");
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 3, "{status:?}");
    for m in &status.members {
        assert_eq!(
            m.raft_addr,
            format!("idemkv-{}:7101", m.id),
            "peers advertise their service names"
        );
    }
    let leader = status.leader_id.expect("a leader");

    // Writes through the published ports (a follower forwards to the leader).
    let Outcome::Acquired(done) = client.claim(claim("done", "worker-a")).await.unwrap() else {
        panic!("a fresh key is ACQUIRED");
    };
    client
        .complete(api::CompleteRequest {
            namespace: NS.into(),
            key: b"done".to_vec(),
            token: done.token,
            result: b"receipt-1".to_vec(),
            code: Some(201),
            ..Default::default()
        })
        .await
        .unwrap();
    let Outcome::Acquired(pending) = client.claim(claim("pending", "worker-b")).await.unwrap()
    else {
        panic!("a fresh key is ACQUIRED");
    };

    // The image's healthcheck (`idemkv ctl get` inside the container) passes.
    let deadline = Instant::now() + Duration::from_secs(45);
    for i in 1..=3 {
        let service = format!("idemkv-{i}");
        loop {
            let h = project.health(&service);
            if h == "healthy" {
                break;
            }
            assert!(Instant::now() < deadline, "{service} is {h:?}, not healthy");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    eprintln!("all healthy after {:?}", started.elapsed());

    // Lose the leader.
    let stopped = format!("idemkv-{leader}");
    project.run(&["stop", "-t", "5", &stopped]);
    eprintln!(
        "stopped {stopped} (the leader) after {:?}",
        started.elapsed()
    );

    let Outcome::Acquired(after) = client.claim(claim("after-stop", "worker-c")).await.unwrap()
    else {
        panic!("a fresh key is ACQUIRED with one node down");
    };
    assert!(after.token > pending.token, "fencing tokens keep rising");

    let rec = get(&client, "done").await;
    assert_eq!(rec.state, api::RecordState::Completed as i32, "{rec:?}");
    assert_eq!(rec.result, b"receipt-1");
    assert_eq!(rec.code, Some(201));
    assert_eq!(rec.token, done.token);
    let rec = get(&client, "pending").await;
    assert_eq!(rec.state, api::RecordState::InProgress as i32, "{rec:?}");
    assert_eq!(rec.owner, "worker-b");
    assert_eq!(rec.token, pending.token);

    match client.claim(claim("done", "worker-d")).await.unwrap() {
        Outcome::Completed(c) => {
            assert_eq!(c.result, b"receipt-1");
            assert_eq!(c.token, done.token);
        }
        other => panic!("a completed key replays its result, got {other:?}"),
    }
    match client.claim(claim("pending", "worker-d")).await.unwrap() {
        Outcome::InProgress(p) => assert_eq!(p.owner, "worker-b"),
        other => panic!("a live claim is IN_PROGRESS to others, got {other:?}"),
    }

    let status = client.status().await.unwrap();
    let new_leader = status.leader_id.expect("a new leader");
    assert_ne!(new_leader, leader, "the stopped leader cannot still lead");
    eprintln!(
        "leader {leader} -> {new_leader}; done after {:?}",
        started.elapsed()
    );
}
