//! The README's operating procedures, walked through with `idemkv ctl` on
//! real processes: replace a dead node (a fourth node joins as a learner,
//! catches up by snapshot, is promoted; the dead node is removed), then a
//! rolling restart; no record is lost along the way.
mod support;
use std::process::Command;
use std::time::Duration;
use support::procs;

use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;
use procs::{ProcCluster, BIN};
use serde_json::Value;

/// `idemkv ctl --endpoints … ARGS`, run to its end.
fn run_ctl(endpoints: &[String], args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("ctl")
        .args(["--endpoints", &endpoints.join(",")])
        .args(args)
        .output()
        .expect("run idemkv ctl")
}

/// `ctl` that must fail: its stderr.
fn ctl_refused(endpoints: &[String], args: &[&str]) -> String {
    let out = run_ctl(endpoints, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ctl {args:?} succeeded: {err}");
    err
}

fn ctl(endpoints: &[String], args: &[&str]) -> Value {
    let out = run_ctl(endpoints, &[&["--json"], args].concat());
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl --json prints JSON")
}

/// (id, voter) of every member, sorted.
fn members(v: &Value) -> Vec<(u64, bool)> {
    let mut m: Vec<(u64, bool)> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["voter"].as_bool().unwrap()))
        .collect();
    m.sort();
    m
}

async fn write_records(client: &Client, from: usize, to: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for i in from..to {
        let key = format!("order-{i}");
        let req = api::ClaimRequest {
            namespace: "ops".into(),
            key: key.clone().into_bytes(),
            owner: "worker".into(),
            lease_ms: 60_000,
            ..Default::default()
        };
        let Outcome::Acquired(a) = client.claim(req).await.expect("claim") else {
            panic!("{key} not acquired");
        };
        client
            .complete(api::CompleteRequest {
                namespace: "ops".into(),
                key: key.clone().into_bytes(),
                token: a.token,
                result: format!("receipt-{i}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("complete");
        out.push((key, a.token));
    }
    out
}

async fn assert_all_there(client: &Client, records: &[(String, u64)]) {
    for (key, token) in records {
        let r = client
            .get(api::GetRequest {
                namespace: "ops".into(),
                key: key.clone().into_bytes(),
                ..Default::default()
            })
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(r.token, *token, "{key}: token changed");
        let i = key.trim_start_matches("order-");
        assert_eq!(r.result, format!("receipt-{i}").into_bytes(), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_dead_node_then_rolling_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Small snapshots and a short kept log, so the newcomer's catch-up
    // needs a snapshot.
    let config = "snapshot_every = 40\nsnapshot_keep_logs = 5\n";
    let mut c = ProcCluster::new(dir.path(), 4, config);
    c.initial = 3;
    for i in 0..3 {
        c.start_node(i);
    }
    let founders: Vec<String> = c.api[..3].to_vec();
    let client = Client::new(&founders).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    let mut records = write_records(&client, 0, 120).await;
    assert_eq!(
        members(&ctl(&founders, &["member", "list"])),
        vec![(1, true), (2, true), (3, true)]
    );

    // Node 1 dies for good.
    c.kill9(0);
    c.init = false;
    let survivors: Vec<String> = c.api[1..3].to_vec();
    let client = Client::new(&survivors).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    records.extend(write_records(&client, 120, 160).await);

    // A fresh node 4 joins as a learner and catches up by snapshot.
    c.start_node(3);
    let added = ctl(&survivors, &["member", "add", "4", &c.api[3], &c.peer[3]]);
    assert_eq!(added["outcome"], "ADDED");
    assert!(members(&added).contains(&(4, false)), "{added}");
    let node4 = Client::new([&c.api[3]]).unwrap();
    let target = client.status().await.unwrap().commit_index;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let s4 = loop {
        let s = node4.status().await.unwrap();
        if s.applied_index >= target {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 4 did not catch up: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        s4.snapshot_index > 0,
        "node 4 caught up without a snapshot: {s4:?}"
    );
    // Promote it, then remove the dead node.
    let promoted = ctl(&survivors, &["member", "promote", "4"]);
    assert!(members(&promoted).contains(&(4, true)), "{promoted}");
    let removed = ctl(&survivors, &["member", "remove", "1"]);
    assert_eq!(members(&removed), vec![(2, true), (3, true), (4, true)]);

    // The new cluster serves every record, from the newcomer too.
    let current: Vec<String> = c.api[1..4].to_vec();
    let client = Client::new(&current).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    assert_all_there(&node4, &records).await;
    records.extend(write_records(&client, 160, 180).await);

    // `ctl status` shows members, leader, term, applied index and health.
    let status = ctl(&current, &["status"]);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["healthy"], true, "{n}");
        assert!(n["applied_index"].as_u64().unwrap() > 0);
        assert!(n["term"].as_u64().unwrap() > 0);
        assert!(n["leader_id"].as_u64().is_some());
    }
    assert_eq!(members(&status), vec![(2, true), (3, true), (4, true)]);

    // Rolling restart: one node at a time, waiting until the cluster agrees
    // on a leader again; writes go on in between.
    for i in 1..4 {
        c.kill9(i);
        records.extend(write_records(&client, 200 + 10 * i, 210 + 10 * i).await);
        c.start_node(i);
        client.wait_ready(Duration::from_secs(20)).await.unwrap();
    }
    assert_all_there(&client, &records).await;
    assert_eq!(records.len(), 210);
}

/// The leader's id and term as the cluster reports them.
async fn leader_and_term(client: &Client) -> (u64, u64) {
    let s = client.status().await.expect("status");
    (s.leader_id.expect("a leader"), s.term)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_under_load_loses_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(dir.path(), 3, "");
    c.start_all();
    let client = Client::new(&c.api).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    let (old, term) = leader_and_term(&client).await;

    // A node that is not a voter is refused by name; nothing moves.
    let err = ctl_refused(&c.api, &["member", "move-leader", "9"]);
    assert!(err.contains("node 9 is not a voter"), "{err}");
    assert_eq!(leader_and_term(&client).await, (old, term));

    // Writers keep claiming and completing while leadership moves.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = w * 1_000_000 + i;
                    done.extend(write_records(&client, n, n + 1).await);
                    i += 1;
                }
                done
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let to = (1..=3).find(|id| *id != old).unwrap();
    let moved = ctl(&c.api, &["member", "move-leader", &to.to_string()]);
    assert_eq!(moved["outcome"], "LEADER", "{moved}");
    // The fault took effect: another node leads, in a later term.
    let (now, new_term) = leader_and_term(&client).await;
    assert_eq!(now, to);
    assert!(
        new_term > term,
        "term {new_term} after the move, {term} before"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut records = Vec::new();
    for w in writers {
        records.extend(w.await.expect("a writer failed a write"));
    }
    assert!(
        records.len() > 20,
        "only {} writes went through",
        records.len()
    );
    // Every acknowledged write is there, with its token and result.
    assert_all_there(&client, &records).await;
    // A node that is down is refused by name; nothing moves. (Real
    // processes: the leader counts a voter silent once it has missed it for
    // an election timeout, 800 ms at most here.)
    let down = (1..=3).find(|id| *id != to).unwrap();
    c.kill9(down as usize - 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = ctl_refused(&c.api, &["member", "move-leader", &down.to_string()]);
    assert!(
        err.contains(&format!("node {down} has not answered the leader")),
        "{err}"
    );
    assert_eq!(leader_and_term(&client).await, (to, new_term));
    // Asking for the node that already leads is a success that changes nothing.
    let again = ctl(&c.api, &["member", "move-leader", &to.to_string()]);
    assert_eq!(again["outcome"], "LEADER");
    assert_eq!(leader_and_term(&client).await, (to, new_term));
}

/// Replace `from` with `to` (same length) in the one stored record that
/// holds it, in a stopped node's sled, behind Raft's back.
fn tamper(sled_dir: &std::path::Path, from: &[u8], to: &[u8]) {
    let db = sled::open(sled_dir).expect("open the stopped node's sled");
    let active = db
        .get(b"sm:active")
        .unwrap()
        .map(|v| v.to_vec())
        .unwrap_or_else(|| b"sm".to_vec());
    let tree = db.open_tree(active).unwrap();
    let mut changed = 0;
    for item in tree.scan_prefix(b"r") {
        let (k, v) = item.unwrap();
        if let Some(at) = v.windows(from.len()).position(|w| w == from) {
            let mut new = v.to_vec();
            new[at..at + to.len()].copy_from_slice(to);
            tree.insert(k, new).unwrap();
            changed += 1;
        }
    }
    assert_eq!(
        changed,
        1,
        "one record holds {:?}",
        String::from_utf8_lossy(from)
    );
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_replica_changed_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(dir.path(), 3, "");
    c.start_all();
    let client = Client::new(&c.api).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    let records = write_records(&client, 0, 30).await;

    let agreed = ctl(&c.api, &["check"]);
    assert_eq!(agreed["healthy"], true, "{agreed}");
    let nodes = agreed["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes
            .iter()
            .all(|n| n["agrees"] == true && n["records"] == 30),
        "{agreed}"
    );

    // A follower stops cleanly; one of its records changes on disk.
    let leader = client.status().await.unwrap().leader_id.unwrap();
    let f = (0..3).find(|i| *i as u64 + 1 != leader).unwrap();
    c.signal(f, "-TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !c.exited(f) {
        assert!(
            std::time::Instant::now() < deadline,
            "node {} did not stop",
            f + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tamper(&c.data_dir(f).join("sled"), b"receipt-7", b"receipt-X");
    c.start_node(f);
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    // The changed record is what that node now serves from its own copy.
    let own = Client::new([&c.api[f]]).unwrap();
    let r = own
        .get(api::GetRequest {
            namespace: "ops".into(),
            key: b"order-7".to_vec(),
            consistency: api::Consistency::Serializable as i32,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.result, b"receipt-X", "the tampering took effect");

    let out = run_ctl(&c.api, &["--json", "check"]);
    assert_eq!(out.status.code(), Some(1), "check must fail");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let odd = format!("node {} differs from the others", f + 1);
    assert!(v["problems"][0].as_str().unwrap().starts_with(&odd), "{v}");
    for n in v["nodes"].as_array().unwrap() {
        let is_odd = n["id"].as_u64().unwrap() == f as u64 + 1;
        assert_eq!(n["agrees"], !is_odd, "{v}");
    }
    // The others still hold every record as written.
    let leader_only = Client::new([&c.api[leader as usize - 1]]).unwrap();
    assert_all_there(&leader_only, &records).await;
}

/// A node of another cluster (as a node of the cluster a backup came from
/// would be, running at an address the restored cluster reuses) is refused
/// by its cluster id: added to cluster A by mistake, node 1 of cluster B
/// takes nothing of A's leader and keeps serving B's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_by_its_cluster_id() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = ProcCluster::new(dir_a.path(), 3, "");
    let mut b = ProcCluster::new(dir_b.path(), 3, "");
    a.start_all();
    b.start_all();
    let (ca, cb) = (Client::new(&a.api).unwrap(), Client::new(&b.api).unwrap());
    ca.wait_ready(Duration::from_secs(20)).await.unwrap();
    cb.wait_ready(Duration::from_secs(20)).await.unwrap();
    write_records(&ca, 0, 20).await;
    let records_b = write_records(&cb, 100, 110).await;
    let (id_a, id_b) = (
        ca.status().await.unwrap().cluster_id,
        cb.status().await.unwrap().cluster_id,
    );
    assert!(!id_a.is_empty() && id_a != id_b, "{id_a} / {id_b}");

    // B's node 1 added to A as node 4: A's leader reaches it, and is refused.
    let added = ctl(&a.api, &["member", "add", "4", &b.api[0], &b.peer[0]]);
    assert_eq!(added["outcome"], "ADDED");
    let log = b.dir.join("node-1.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("another cluster")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "B's node 1 never refused A's leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // It still belongs to B: B's members, B's id, B's records, replicas agree.
    let node = Client::new([&b.api[0]]).unwrap().status().await.unwrap();
    assert_eq!(node.cluster_id, id_b);
    let addrs: Vec<&str> = node.members.iter().map(|m| m.api_addr.as_str()).collect();
    assert_eq!(addrs, b.api.iter().map(String::as_str).collect::<Vec<_>>());
    assert_all_there(&cb, &records_b).await;
    let out = run_ctl(&b.api, &["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every node started with `--init` (one configuration for all, as an
/// orchestrator gives it): they found one cluster with one id, and every
/// node serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_all_started_with_init_found_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(dir.path(), 3, "init = true\n");
    c.start_all();
    c.wait_ready(Duration::from_secs(20)).await;
    let ids: Vec<String> = c
        .client()
        .status_all()
        .await
        .into_iter()
        .map(|(ep, s)| s.unwrap_or_else(|e| panic!("{ep}: {e}")).cluster_id)
        .collect();
    assert!(
        !ids[0].is_empty() && ids.iter().all(|i| *i == ids[0]),
        "{ids:?}"
    );
    for ep in &c.api {
        let got = Client::new([ep.as_str()])
            .unwrap()
            .claim(api::ClaimRequest {
                namespace: "init".into(),
                key: ep.as_bytes().to_vec(),
                owner: "w".into(),
                claim_id: "c".into(),
                lease_ms: 30_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(matches!(got, Outcome::Acquired(_)), "{ep}: {got:?}");
    }
}
