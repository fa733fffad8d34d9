//! The README walk-through, run as a user would: `idemkv up` in one place,
//! `idemkv ctl` commands against it, Ctrl-C (SIGTERM) to stop, `up` again
//! to find the data still there.
mod support;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::procs;

use procs::{running, BIN};

/// A base port with `n` consecutive free ports at `base` and at `base + 100`.
fn free_base(n: u16) -> u16 {
    loop {
        let base = procs::free_ports(1)[0];
        if base > 60000 {
            continue;
        }
        let ok = (0..n).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if ok {
            return base;
        }
    }
}

struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn up(dir: &std::path::Path, base: u16) -> Up {
    up_nodes(dir, base, 3)
}

fn up_nodes(dir: &std::path::Path, base: u16, nodes: u16) -> Up {
    let mut child = Command::new(BIN)
        .arg("up")
        .arg("--dir")
        .arg(dir)
        .args(["--nodes", &nodes.to_string()])
        .args(["--api-port", &base.to_string()])
        .args(["--peer-port", &(base + 100).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn idemkv up");
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Up { child, lines }
}

impl Up {
    /// Wait for a stdout line containing `needle`; return every line so far.
    fn wait_for(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    let hit = l.contains(needle);
                    seen.push(l);
                    if hit {
                        return seen;
                    }
                }
                Err(e) => panic!("no {needle:?} from idemkv up ({e}); got {seen:?}"),
            }
        }
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.wait_for("cluster stopped");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "idemkv up exited with {status}");
    }
}

impl Drop for Up {
    /// On a failed assertion, still stop the cluster (up stops its children).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = self.child.wait();
        }
    }
}

fn ctl(endpoints: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("ctl")
        .args(["--endpoints", endpoints])
        .args(args)
        .output()
        .expect("run idemkv ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn readme_walkthrough_with_up_and_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base(3);
    let eps: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let endpoints = eps.join(",");

    let cluster = up(dir.path(), base);
    let banner = cluster.wait_for("endpoints:");
    for ep in &eps {
        assert!(
            banner.iter().any(|l| l.contains(ep)),
            "up did not print endpoint {ep}: {banner:?}"
        );
    }

    let (ok, out, err) = ctl(
        &endpoints,
        &["claim", "orders", "o-1", "--owner", "w1", "--lease", "30s"],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("ACQUIRED token="), "{out}");
    let token: u64 = out["ACQUIRED token=".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let (ok, out, _) = ctl(
        &endpoints,
        &["claim", "orders", "o-1", "--owner", "w2", "--lease", "30s"],
    );
    assert!(ok);
    assert!(out.starts_with("IN_PROGRESS owner=w1"), "{out}");

    let (ok, out, err) = ctl(
        &endpoints,
        &[
            "complete",
            "orders",
            "o-1",
            "--token",
            &token.to_string(),
            "--result",
            "shipped",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("COMPLETED"), "{out}");

    let (ok, out, _) = ctl(&endpoints, &["claim", "orders", "o-1", "--owner", "w3"]);
    assert!(ok);
    assert!(out.starts_with("COMPLETED result=shipped"), "{out}");

    let (ok, out, _) = ctl(
        &endpoints,
        &["--json", "claim", "orders", "o-1", "--owner", "w3"],
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["outcome"], "COMPLETED");
    assert_eq!(v["result"], "shipped");
    assert_eq!(v["token"], token);

    // A stale token is refused with the documented code and reason.
    let (ok, _, err) = ctl(
        &endpoints,
        &[
            "--json", "complete", "orders", "o-1", "--token", "999999", "--result", "x",
        ],
    );
    assert!(!ok);
    let e: serde_json::Value = serde_json::from_str(&err).expect("--json error is JSON");
    assert_eq!(e["error"], "FAILED_PRECONDITION");
    assert_eq!(e["reason"], "LEASE_LOST");

    let (ok, out, _) = ctl(&endpoints, &["status"]);
    assert!(ok);
    assert_eq!(out.matches("leader=").count(), 3, "{out}");
    let leaders = out
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("leader"))
        .count();
    assert_eq!(leaders, 1, "exactly one node reports itself leader: {out}");

    // Endpoints written as URLs (as etcd's tools take them), by flag and by
    // IDEMKV_ENDPOINTS; anything else is refused naming the forms.
    let urls: Vec<String> = eps.iter().map(|e| format!("http://{e}/")).collect();
    let (ok, out, err) = ctl(&urls.join(","), &["get", "orders", "o-1"]);
    assert!(ok && out.starts_with("COMPLETED"), "{out}{err}");
    let by_env = Command::new(BIN)
        .args(["ctl", "get", "orders", "o-1"])
        .env("IDEMKV_ENDPOINTS", urls.join(","))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&by_env.stdout);
    assert!(
        by_env.status.success() && out.starts_with("COMPLETED"),
        "{out}"
    );
    let (ok, _, err) = ctl("ftp://127.0.0.1:1", &["status"]);
    assert!(!ok, "a bad endpoint must fail");
    assert!(
        err.contains("\"ftp://127.0.0.1:1\"")
            && err.contains("http://host:port or https://host:port"),
        "{err}"
    );

    cluster.stop();

    // Running up again serves the same data.
    let cluster = up(dir.path(), base);
    cluster.wait_for("endpoints:");
    let (ok, out, err) = ctl(&endpoints, &["get", "orders", "o-1"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("COMPLETED orders/o-1 result=shipped"),
        "{out}"
    );
    cluster.stop();
}

/// `ctl claim orders KEY --owner w1` through `endpoints` answers ACQUIRED.
fn claim_acquired(endpoints: &str, key: &str) {
    let (ok, out, err) = ctl(endpoints, &["claim", "orders", key, "--owner", "w1"]);
    assert!(ok && out.starts_with("ACQUIRED"), "{key}: {out}{err}");
}

/// A fresh `up` of `nodes` nodes on free ports, its banner read.
struct Started {
    dir: tempfile::TempDir,
    eps: Vec<String>,
    endpoints: String,
    cluster: Up,
    banner: Vec<String>,
}

fn start(nodes: u16) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base(nodes);
    let eps: Vec<String> = (0..nodes)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect();
    let cluster = up_nodes(dir.path(), base, nodes);
    let banner = cluster.wait_for("endpoints:");
    Started {
        dir,
        endpoints: eps.join(","),
        eps,
        cluster,
        banner,
    }
}

/// Ctrl-C (SIGTERM) `up`; none of the node processes it ran may remain.
fn stop_leaving_no_node<'a>(cluster: Up, pids: impl Iterator<Item = &'a u32>) {
    cluster.stop();
    for pid in pids {
        assert!(!running(*pid), "node process {pid} outlived up");
    }
}

/// Each node's PID from `up`'s banner (`  node N  HOST:PORT  pid P  log: …`).
fn banner_pids(banner: &[String]) -> std::collections::BTreeMap<u64, u32> {
    banner
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["node", id, _, "pid", pid, "log:", ..] => {
                    Some((id.parse().ok()?, pid.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// The node that `ctl status` shows as leader, and its term.
fn leader_id(endpoints: &str) -> (u64, u64) {
    for _ in 0..100 {
        // A node that is down makes the status degraded (exit 1), not
        // unreadable.
        let (_, out, _) = ctl(endpoints, &["status"]);
        if let Some(l) = out
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some("leader"))
        {
            let w: Vec<&str> = l.split_whitespace().collect();
            let term = w[4].strip_prefix("term=").unwrap().parse().unwrap();
            return (w[2].parse().unwrap(), term);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no leader shown by ctl status");
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a node process `up` started for this test.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    for _ in 0..100 {
        if !running(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("node process {pid} still runs after SIGKILL");
}

/// The PID in `up`'s "node N restarted (pid P)" line.
fn restarted_pid(lines: &[String], id: u64) -> u32 {
    let prefix = format!("node {id} restarted (pid ");
    let l = lines.iter().rev().find(|l| l.starts_with(&prefix)).unwrap();
    l[prefix.len()..].trim_end_matches(')').parse().unwrap()
}

/// Retry `ctl get` against one endpoint until it answers (the node may be
/// starting); the answer.
fn get_from(endpoint: &str, key: &str) -> String {
    let mut last = String::new();
    for _ in 0..150 {
        let (ok, out, err) = ctl(endpoint, &["get", "orders", key]);
        if ok {
            return out;
        }
        last = err;
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{endpoint} never answered a get: {last}");
}

#[test]
fn up_restarts_a_killed_leader_and_the_cluster_keeps_serving() {
    let Started {
        dir: _dir,
        eps,
        endpoints,
        cluster,
        banner,
    } = start(3);
    let pids = banner_pids(&banner);
    assert_eq!(pids.len(), 3, "up prints each node's PID: {banner:?}");
    assert!(pids.values().all(|p| running(*p)), "{pids:?}");

    claim_acquired(&endpoints, "before");

    // kill -9 the leader, as a new user watching failover would.
    let (leader, term) = leader_id(&endpoints);
    kill9(pids[&leader]);
    let after_kill = std::time::Instant::now();
    // The others keep serving: a claim succeeds within about one election
    // timeout (400-800 ms) plus the client's retry.
    let (ok, out, err) = ctl(&endpoints, &["claim", "orders", "during", "--owner", "w1"]);
    let took = after_kill.elapsed();
    assert!(ok && out.starts_with("ACQUIRED"), "{out}{err}");
    assert!(
        took < Duration::from_secs(5),
        "the claim after the kill took {took:?}"
    );
    // A new election (the restarted node may win it again).
    let (_, new_term) = leader_id(&endpoints);
    assert!(
        new_term > term,
        "no election after the leader died (term {term})"
    );

    // up reported the exit and started the node again, on its data.
    let lines = cluster.wait_for(&format!("node {leader} restarted (pid "));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("node {leader} exited (signal: 9"))),
        "{lines:?}"
    );
    let new_pid = restarted_pid(&lines, leader);
    assert_ne!(new_pid, pids[&leader]);
    assert!(running(new_pid));
    // The restarted node serves both records through its own endpoint: the
    // one from before (its data) and the one written while it was down
    // (caught up from the others).
    let own = &eps[leader as usize - 1];
    assert!(get_from(own, "before").starts_with("IN_PROGRESS"));
    assert!(get_from(own, "during").starts_with("IN_PROGRESS"));

    stop_leaving_no_node(cluster, pids.values().chain([&new_pid]));
}

#[test]
fn up_gives_up_on_a_node_that_keeps_crashing_and_five_nodes_keep_serving() {
    let Started {
        dir,
        eps,
        endpoints,
        cluster,
        banner,
    } = start(5);
    let pids = banner_pids(&banner);
    assert_eq!(pids.len(), 5, "{banner:?}");
    let (leader, _) = leader_id(&endpoints);
    let followers: Vec<u64> = (1..=5).filter(|id| *id != leader).collect();
    let (broken, killed) = (followers[0], followers[1]);

    // A node whose data directory became a file cannot start again.
    let data = dir.path().join(format!("node-{broken}"));
    std::fs::rename(&data, dir.path().join("moved-away")).unwrap();
    std::fs::write(&data, b"not a directory").unwrap();
    kill9(pids[&broken]);
    let lines = cluster.wait_for(&format!("node {broken} is left down"));
    let give_up = lines
        .iter()
        .position(|l| l.contains("not restarting it"))
        .unwrap();
    assert!(
        lines[give_up].starts_with(&format!("node {broken} exited")),
        "{lines:?}"
    );
    // The tail of its log says why, so the user need not go looking.
    let tail: Vec<&String> = lines.iter().filter(|l| l.starts_with("  | ")).collect();
    assert!(!tail.is_empty(), "no log tail shown: {lines:?}");
    let log = std::fs::read_to_string(dir.path().join(format!("node-{broken}.log"))).unwrap();
    let last = log.lines().last().unwrap();
    assert_eq!(tail.last().unwrap().trim_start_matches("  | "), last);
    let restarts = lines
        .iter()
        .filter(|l| l.starts_with(&format!("node {broken} restarted")))
        .count();
    // Five quick exits in a row: the kill (if within 10 s of starting) and
    // four or five failed restarts, then no more.
    assert!(
        (4..=5).contains(&restarts),
        "{restarts} restarts: {lines:?}"
    );

    // A second node down: 3 of 5 still make a majority, and up restarts it.
    kill9(pids[&killed]);
    let (ok, out, err) = ctl(
        &endpoints,
        &["claim", "orders", "two-down", "--owner", "w1"],
    );
    assert!(ok && out.starts_with("ACQUIRED"), "{out}{err}");
    let lines = cluster.wait_for(&format!("node {killed} restarted (pid "));
    let new_pid = restarted_pid(&lines, killed);
    assert!(get_from(&eps[killed as usize - 1], "two-down").starts_with("IN_PROGRESS"));
    // The broken node stays down: nothing answers on its port.
    let (ok, out, _) = ctl(&eps[broken as usize - 1], &["status"]);
    assert!(
        !ok && out.contains("UNREACHABLE"),
        "the given-up node should not serve: {out}"
    );

    stop_leaving_no_node(cluster, pids.values().chain([&new_pid]));
}

/// The last lines of a log file.
fn tail_of(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// `up` starts node 1 with `--init` only for a new cluster. Node 1 wiped
/// and re-added the README's way (`member remove`, empty its directory,
/// `member add`) then waits to be added and catches up, instead of
/// founding a cluster of its own: here a restored cluster, whose id is not
/// the one node 1 would make up, so the leader's calls would be refused.
#[test]
fn node_1_wiped_and_added_again_under_up_catches_up() {
    let Started {
        dir,
        endpoints,
        cluster,
        banner,
        ..
    } = start(3);
    claim_acquired(&endpoints, "kept");
    let file = dir.path().join("backup.snap");
    let (ok, out, err) = ctl(&endpoints, &["snapshot", "save", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    stop_leaving_no_node(cluster, banner_pids(&banner).values());

    let restored = dir.path().join("restored");
    let base = free_base(3);
    let out = Command::new(BIN)
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--dir")
        .arg(&restored)
        .args(["--api-port", &base.to_string()])
        .args(["--peer-port", &(base + 100).to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cluster = up_nodes(&restored, base, 3);
    let banner = cluster.wait_for("endpoints:");
    let pids = banner_pids(&banner);
    let eps: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let endpoints = eps.join(",");
    if leader_id(&endpoints).0 == 1 {
        let (ok, out, err) = ctl(&endpoints, &["member", "move-leader", "2"]);
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = ctl(&endpoints, &["member", "remove", "1"]);
    assert!(ok, "{out}{err}");
    std::fs::remove_dir_all(restored.join("node-1")).unwrap();
    kill9(pids[&1]);
    let lines = cluster.wait_for("node 1 restarted (pid ");
    let node_1 = restarted_pid(&lines, 1);
    // up stopped and started again before node 1 is added: node 1 (its
    // directory no longer empty, still in no cluster) waits again; the
    // start does not wait for it to find a leader.
    stop_leaving_no_node(cluster, pids.values().chain([&node_1]));
    let cluster = up_nodes(&restored, base, 3);
    let banner = cluster.wait_for("endpoints:");
    let pids = banner_pids(&banner);
    let peer_1 = format!("127.0.0.1:{}", base + 100);
    let (ok, out, err) = ctl(
        &eps[1..].join(","),
        &["member", "add", "1", &eps[0], &peer_1],
    );
    assert!(ok, "member add: {out}{err}");
    // It catches up: within 30 s it serves the record from before.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = ctl(&eps[0], &["--retry-for", "0", "get", "orders", "kept"]);
        if ok && out.starts_with("IN_PROGRESS") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 1 never caught up: {out}{err}; its log: {}",
            tail_of(&restored.join("node-1.log"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out, err) = ctl(&endpoints, &["check"]);
    assert!(ok, "{out}{err}");
    stop_leaving_no_node(cluster, pids.values());
}

/// A node whose data cannot be opened when `up` starts is left down, as a
/// node that keeps crashing later is: the other two still make a majority,
/// so `up` prints its banner and serves instead of stopping them.
#[test]
fn up_starts_without_a_node_whose_data_is_damaged() {
    let Started {
        dir,
        eps,
        endpoints,
        cluster,
        banner,
    } = start(3);
    claim_acquired(&endpoints, "before");
    stop_leaving_no_node(cluster, banner_pids(&banner).values());

    // Node 3's store cannot be opened any more.
    let sled = dir.path().join("node-3").join("sled");
    std::fs::remove_dir_all(&sled).unwrap();
    std::fs::write(&sled, b"not a directory").unwrap();
    let base: u16 = eps[0].rsplit(':').next().unwrap().parse().unwrap();
    let cluster = up_nodes(dir.path(), base, 3);
    // Up with nodes 1 and 2 while node 3 is still being restarted, then
    // node 3 left down; the cluster serves throughout.
    let banner = cluster.wait_for("endpoints:");
    let pids = banner_pids(&banner);
    claim_acquired(&endpoints, "during");
    let left_down = "node 3 is left down; the others keep serving";
    if !banner.iter().any(|l| l == left_down) {
        cluster.wait_for(left_down);
    }
    claim_acquired(&endpoints, "after");
    assert!(get_from(&eps[0], "before").starts_with("IN_PROGRESS"));
    stop_leaving_no_node(cluster, pids.values());
}

/// `up` killed outright (SIGKILL, no chance to stop its nodes) leaves no
/// node running with the ports and data: each gets SIGTERM from the
/// kernel and stops.
#[test]
fn a_killed_up_takes_its_nodes_with_it() {
    let Started {
        dir: _dir,
        mut cluster,
        banner,
        ..
    } = start(3);
    let mut pids = banner_pids(&banner);
    assert_eq!(pids.len(), 3, "{banner:?}");
    // One node restarted by up (a restart starts from another thread).
    kill9(pids[&2]);
    let lines = cluster.wait_for("node 2 restarted (pid ");
    pids.insert(2, restarted_pid(&lines, 2));
    kill9(cluster.child.id());
    let _ = cluster.child.wait();
    for pid in pids.values() {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while running(*pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "node process {pid} outlived a killed up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A first `up` stopped before node 1 founded the cluster leaves every
/// node's directory holding files but no cluster; the next `up` founds it
/// (node 1's directory is not empty, so it was not wiped to rejoin).
#[test]
fn up_founds_the_cluster_after_a_first_start_that_was_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base(3);
    let peers = (1..=3)
        .map(|i| format!("{i}=127.0.0.1:{}/127.0.0.1:{}", base + i - 1, base + 99 + i))
        .collect::<Vec<_>>()
        .join(",");
    // Each node started and stopped without --init: files, no cluster.
    for i in 1..=3u16 {
        let data = dir.path().join(format!("node-{i}"));
        let mut node = Command::new(BIN)
            .args(["serve", "--id", &i.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", base + i - 1)])
            .args(["--peer-listen", &format!("127.0.0.1:{}", base + 99 + i)])
            .args(["--peers", &peers])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::read_dir(&data).map_or(true, |mut d| d.next().is_none()) {
            assert!(
                std::time::Instant::now() < deadline,
                "node {i} wrote nothing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = node.kill();
        let _ = node.wait();
    }
    let cluster = up_nodes(dir.path(), base, 3);
    let banner = cluster.wait_for("endpoints:");
    let endpoints = (0..3)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect::<Vec<_>>()
        .join(",");
    claim_acquired(&endpoints, "o-1");
    stop_leaving_no_node(cluster, banner_pids(&banner).values());
}

/// Ports that would be used twice (`--peer-port` one above `--api-port`,
/// node 1's peer port being node 2's client port) are refused at once by
/// `up` and by `snapshot restore`, naming the address, and nothing starts.
#[test]
fn up_and_restore_refuse_a_port_used_twice() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base(3);
    let ports = [
        "--api-port".to_string(),
        base.to_string(),
        "--peer-port".to_string(),
        (base + 1).to_string(),
    ];
    let mut up = Command::new(BIN)
        .arg("up")
        .arg("--dir")
        .arg(dir.path().join("up"))
        .args(&ports)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            panic!("up started with a port used twice");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(up.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    let twice = format!(
        "127.0.0.1:{} would be both node 1's peer port and node 2's client port",
        base + 1
    );
    assert!(err.contains(&twice), "{err}");
    assert!(!dir.path().join("up").join("node-1").exists());

    let out = Command::new(BIN)
        .args(["snapshot", "restore", "backup.snap", "--dir"])
        .arg(dir.path().join("restored"))
        .args(&ports)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&twice), "{err}");
    assert!(!dir.path().join("restored").exists());
}

/// `ctl --retry-for`: 0 makes one attempt and fails at once where nothing
/// listens (a script polling a restarting node sees it the moment it
/// answers, not at the client's next backoff step); a window keeps trying
/// for that long.
#[test]
fn ctl_retry_for_sets_how_long_a_call_keeps_trying() {
    let port = procs::free_ports(1)[0];
    let endpoint = format!("127.0.0.1:{port}");
    let timed = |window: &str| {
        let t0 = std::time::Instant::now();
        let (ok, _, err) = ctl(
            &endpoint,
            &["--retry-for", window, "get", "ns", "k", "--serializable"],
        );
        (ok, err, t0.elapsed())
    };
    let (ok, err, once) = timed("0");
    assert!(!ok, "a get from a port nobody listens on succeeded");
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(
        once < Duration::from_secs(5),
        "--retry-for 0 still retried for {once:?} (the default window is 15 s): {err}"
    );
    // Backing off 25 ms, doubling to 800: the last try that fits in 3 s
    // starts about 2.4 s in.
    let (ok, err, window) = timed("3s");
    assert!(!ok, "{err}");
    assert!(
        window >= Duration::from_secs(2),
        "--retry-for 3s gave up after {window:?}: {err}"
    );
}

/// A reader that stops early (`idemkv ctl status | head -1`) does not
/// make a command panic: its output is dropped, a failure keeps its exit
/// code (`ctl status` of an unreachable cluster: 1), and a success that
/// could not deliver its output exits 141, as a command a closed pipe
/// stopped would (`bench` against the in-process floor). The same holds
/// when the errors' reader went away too (`idemkv ctl … 2>&1 | head -1`):
/// the error line is dropped and the exit code is the error's, not a
/// panic's 101.
#[test]
fn output_to_a_reader_that_went_away_is_not_a_panic() {
    let unread = |args: &[&str], stderr_too: bool| {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run idemkv");
        // The readers go away before the command has written anything.
        drop(child.stdout.take());
        if stderr_too {
            drop(child.stderr.take());
        }
        let out = child.wait_with_output().expect("wait for idemkv");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        (out.status.code(), err)
    };
    let endpoint = format!("127.0.0.1:{}", procs::free_ports(1)[0]);
    let status = [
        "ctl",
        "--endpoints",
        &endpoint,
        "--retry-for",
        "0",
        "status",
    ];
    let (code, err) = unread(&status, false);
    assert_eq!(code, Some(1), "ctl status, unreachable: {err}");
    let (code, _) = unread(&status, true);
    assert_eq!(
        code,
        Some(1),
        "ctl status, unreachable, its errors unread too (101 is a panic)"
    );
    let get = [
        "ctl",
        "--endpoints",
        &endpoint,
        "--retry-for",
        "0",
        "get",
        "orders",
        "o-1",
    ];
    let (code, err) = unread(&get, false);
    assert!(
        matches!(code, Some(c) if c != 0 && c != 101),
        "ctl get, unreachable: {code:?}: {err}"
    );
    let (code_unread, _) = unread(&get, true);
    assert_eq!(
        code_unread, code,
        "ctl get, unreachable, its errors unread too: the error's exit code, not a panic's (101)"
    );
    let (code, err) = unread(
        &[
            "bench",
            "--target",
            "floor",
            "--ops",
            "50",
            "--clients",
            "2",
        ],
        false,
    );
    assert_eq!(code, Some(141), "bench, its report unread: {err}");
}

/// A metrics address that cannot be bound (here an empty one, as
/// `IDEMKV_METRICS_LISTEN=` gives) is a bad setting: `serve` exits
/// non-zero with a message that names `metrics_listen` and the address,
/// not an "internal error" (it was "internal error: bind metrics :
/// invalid socket address", and `idemkv up` restarted the node in a loop).
#[test]
fn serve_refuses_a_metrics_address_it_cannot_bind_as_a_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--id", "1"])
        .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("node-1"))
        .env("IDEMKV_METRICS_LISTEN", "")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run idemkv serve");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(30)) else {
        procs::signal_pid(pid, "-KILL");
        panic!("idemkv serve kept running with an empty metrics address");
    };
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("metrics_listen") && err.contains("\"\""),
        "the message names the setting and the address: {err}"
    );
    assert!(!err.contains("internal error"), "{err}");
}
