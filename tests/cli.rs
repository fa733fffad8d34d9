//! The README walk-through, run as a user would: `idemkv up` in one place,
//! `idemkv ctl` commands against it, Ctrl-C (SIGTERM) to stop, `up` again
//! to find the data still there.
mod support;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::procs;

use procs::BIN;

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
    let mut child = Command::new(BIN)
        .arg("up")
        .arg("--dir")
        .arg(dir)
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
