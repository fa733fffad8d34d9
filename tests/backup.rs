//! Backups as an operator takes them: `idemkv ctl snapshot save FILE` from a
//! running cluster, `idemkv snapshot status FILE` checks it whole; a
//! truncated or damaged copy is refused by name. `idemkv snapshot restore`
//! makes a new cluster of it on other ports that replays every result.
mod support;
use std::process::Command;
use std::time::Duration;
use support::procs;

use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;
use procs::{ProcCluster, BIN};
use serde_json::Value;

fn claim(key: &str) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: "backup".into(),
        key: key.as_bytes().to_vec(),
        owner: "w1".into(),
        lease_ms: 60_000,
        ..Default::default()
    }
}

fn status(file: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["snapshot", "status", "--json"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_snapshot_holds_every_record_and_a_damaged_copy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(dir.path(), 3, "");
    c.start_all();
    let client = Client::new(&c.api).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    let mut top_token = 0;
    for i in 0..300 {
        let key = format!("done-{i}");
        let Outcome::Acquired(a) = client.claim(claim(&key)).await.unwrap() else {
            panic!("{key} not acquired");
        };
        top_token = top_token.max(a.token);
        client
            .complete(api::CompleteRequest {
                namespace: "backup".into(),
                key: key.into_bytes(),
                token: a.token,
                result: b"receipt".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for i in 0..20 {
        let Outcome::Acquired(a) = client.claim(claim(&format!("live-{i}"))).await.unwrap() else {
            panic!("live-{i} not acquired");
        };
        top_token = top_token.max(a.token);
    }
    let applied = client.status().await.unwrap().applied_index;

    let file = dir.path().join("backup.snap");
    let out = Command::new(BIN)
        .args(["ctl", "--endpoints", &c.api.join(","), "snapshot", "save"])
        .arg(&file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.starts_with("SAVED"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("backup.snap.part").exists());

    // A save stopped part way (here the file-size limit, as a full disk
    // would) fails saying why and leaves neither the file nor a part.
    let limited = dir.path().join("limited.snap");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"trap "" XFSZ; ulimit -f 4; exec "$@""#)
        .arg("sh")
        .args([
            BIN,
            "ctl",
            "--endpoints",
            &c.api.join(","),
            "snapshot",
            "save",
        ])
        .arg(&limited)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("limited.snap.part")
            && err.contains("too large")
            && !err.contains("configuration"),
        "a save past the file-size limit: {:?} {err}",
        out.status
    );
    assert!(!limited.exists(), "a failed save left its file");
    assert!(
        !dir.path().join("limited.snap.part").exists(),
        "a failed save left its part file"
    );
    // A save that never got a snapshot (no node answers) leaves a file of
    // that name it did not make alone.
    let unreached = dir.path().join("unreached.snap");
    let theirs = dir.path().join("unreached.snap.part");
    std::fs::write(&theirs, b"not ours").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap().to_string();
    drop(closed);
    let out = Command::new(BIN)
        .args([
            "ctl",
            "--endpoints",
            &nobody,
            "--retry-for",
            "0s",
            "snapshot",
            "save",
        ])
        .arg(&unreached)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a save with no node to answer succeeded"
    );
    assert_eq!(
        std::fs::read(&theirs).unwrap(),
        b"not ours",
        "a save that made no part file removed or changed one"
    );

    let (ok, out, err) = status(&file);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checksum_valid"], true);
    assert_eq!(v["records"], 320, "{v}");
    assert_eq!(v["completed"], 300, "{v}");
    assert_eq!(v["in_progress"], 20, "{v}");
    assert!(
        v["index"].as_u64().unwrap() >= applied,
        "{v}: applied {applied} before the save"
    );
    assert!(v["term"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["last_token"].as_u64().unwrap() >= top_token,
        "{v}: tokens up to {top_token} were granted"
    );

    // Cut short, one byte changed, or not a snapshot at all: refused, naming
    // the file and where it fails.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.snap");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let (ok, _, err) = status(&cut);
    assert!(
        !ok && err.contains("truncated") && err.contains("cut.snap"),
        "{err}"
    );
    let mut flipped = bytes.clone();
    let mid = bytes.len() / 2;
    flipped[mid] ^= 0x20;
    let bad = dir.path().join("flipped.snap");
    std::fs::write(&bad, &flipped).unwrap();
    let (ok, _, err) = status(&bad);
    assert!(
        !ok && err.contains("is not a sound idemkv snapshot") && err.contains("byte "),
        "{err}"
    );
    let (ok, _, err) = status(&dir.path().join("node-1").join("sled.mark"));
    assert!(!ok && err.contains("not an idemkv snapshot"), "{err}");
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The result stored for record `i`: bytes no text encoding would keep.
fn result_of(i: u32) -> Vec<u8> {
    let mut r = b"receipt\x00\xff".to_vec();
    r.extend_from_slice(&i.to_be_bytes());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_cluster_on_other_ports_replays_every_result_and_grants_later_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::create_dir_all(&new_dir).unwrap();
    let mut old = ProcCluster::new(&old_dir, 3, "");
    old.start_all();
    let client = Client::new(&old.api).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    // A later term led by another node than the first: the restored log
    // must start after an entry of that term.
    let first = client.status().await.unwrap();
    let to = if first.leader_id == Some(2) { 3 } else { 2 };
    client.move_leader(to).await.unwrap();

    let mut granted = Vec::new();
    for i in 0..1_000u32 {
        let key = format!("done-{i}");
        let Outcome::Acquired(a) = client.claim(claim(&key)).await.unwrap() else {
            panic!("{key} not acquired");
        };
        client
            .complete(api::CompleteRequest {
                namespace: "backup".into(),
                key: key.into_bytes(),
                token: a.token,
                result: result_of(i),
                ..Default::default()
            })
            .await
            .unwrap();
        granted.push(a.token);
    }
    for i in 0..10 {
        let Outcome::Acquired(a) = client.claim(claim(&format!("live-{i}"))).await.unwrap() else {
            panic!("live-{i} not acquired");
        };
        granted.push(a.token);
    }
    let top_token = *granted.iter().max().unwrap();
    let file = dir.path().join("backup.snap");
    let (ok, said, err) = run(&[
        "ctl",
        "--endpoints",
        &old.api.join(","),
        "snapshot",
        "save",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{said}{err}");
    let (ok, out, err) = status(&file);
    assert!(ok, "{err}");
    let saved: Value = serde_json::from_str(&out).unwrap();
    let saved_term = saved["term"].as_u64().unwrap();
    assert!(saved_term > first.term, "{saved}: saved before the move");
    assert!(saved["last_token"].as_u64().unwrap() >= top_token);
    // The old cluster is gone for good: the new one must need nothing of it.
    old.kill9_all();

    // Three restored members; a fourth joins later with an empty directory.
    let mut new = ProcCluster::new(&new_dir, 4, "");
    new.init = false;
    new.initial = 3;
    let peers = new.peers_arg();
    let restore = |file: &std::path::Path, into: &std::path::Path| {
        run(&[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--dir",
            into.to_str().unwrap(),
            "--peers",
            &peers,
        ])
    };
    // A cut copy is refused by name and makes nothing.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.snap");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let (ok, _, err) = restore(&cut, &elsewhere);
    assert!(
        !ok && err.contains("truncated") && err.contains("cut.snap"),
        "{err}"
    );
    assert!(
        !elsewhere.join("node-1").exists(),
        "a refused restore made a directory"
    );

    // A restore that fails part way (node 3's directory cannot be made)
    // leaves nothing restored: a directory it made is removed, and one the
    // user made empty beforehand (a mount point) is emptied again, so the
    // same restore can simply be run again.
    let halfway = dir.path().join("halfway");
    std::fs::create_dir_all(halfway.join("node-1")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("no-such/dir"), halfway.join("node-3")).unwrap();
    let (ok, _, err) = restore(&file, &halfway);
    assert!(!ok && err.contains("node-3"), "{err}");
    assert!(
        std::fs::read_dir(halfway.join("node-1"))
            .unwrap()
            .next()
            .is_none(),
        "node 1's directory kept restored data"
    );
    assert!(
        !halfway.join("node-2").exists(),
        "node 2's directory was kept"
    );

    let (ok, said, err) = restore(&file, &new_dir);
    assert!(ok && said.starts_with("RESTORED"), "{said}{err}");
    assert!(said.contains("1010 records"), "{said}");
    // Never over an existing data directory.
    let (ok, _, err) = restore(&file, &new_dir);
    assert!(!ok && err.contains("is not empty"), "{err}");

    for i in 0..3 {
        new.start_node(i);
    }
    let founders = new.api[..3].to_vec();
    let client = Client::new(&founders).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    let s = client.status().await.unwrap();
    assert!(
        s.term > saved_term,
        "the new cluster elected in term {} <= {saved_term}",
        s.term
    );
    // A new identity, the same on every restored node.
    assert!(!s.cluster_id.is_empty() && s.cluster_id != first.cluster_id);
    for (_, st) in client.status_all().await {
        assert_eq!(st.unwrap().cluster_id, s.cluster_id);
    }
    let members: Vec<&str> = s.members.iter().map(|m| m.api_addr.as_str()).collect();
    assert_eq!(
        members,
        founders.iter().map(String::as_str).collect::<Vec<_>>()
    );

    for i in 0..1_000u32 {
        let key = format!("done-{i}");
        let mut again = claim(&key);
        again.owner = "someone-else".into();
        again.claim_id = format!("replay-{i}");
        match client.claim(again).await.unwrap() {
            Outcome::Completed(c) => {
                assert_eq!(c.result, result_of(i), "{key}: not the saved result");
                assert_eq!(c.token, granted[i as usize], "{key}: not its token");
            }
            other => panic!("{key}: {other:?} instead of its saved result"),
        }
    }
    for i in 0..10 {
        let mut other = claim(&format!("live-{i}"));
        other.owner = "w2".into();
        other.claim_id = "w2".into();
        let out = client.claim(other).await.unwrap();
        assert!(
            matches!(&out, Outcome::InProgress(p) if p.owner == "w1"),
            "live-{i}: {out:?}: the 60 s lease taken before the save is still held"
        );
    }
    let Outcome::Acquired(a) = client.claim(claim("after-restore")).await.unwrap() else {
        panic!("not acquired");
    };
    assert!(
        a.token > top_token,
        "token {} after the restore, {top_token} granted before it",
        a.token
    );
    let (ok, out, err) = run(&["ctl", "--endpoints", &founders.join(","), "check"]);
    assert!(ok, "the restored replicas differ: {out}{err}");

    // A node added later gets the restored records too (by snapshot: the
    // new log starts after them), which check compares.
    new.start_node(3);
    let (ok, out, err) = run(&[
        "ctl",
        "--endpoints",
        &founders.join(","),
        "member",
        "add",
        "4",
        &new.api[3],
        &new.peer[3],
    ]);
    assert!(ok, "{out}{err}");
    let target = client.status().await.unwrap().commit_index;
    let node4 = Client::new([&new.api[3]]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node4.status().await.map_or(0, |s| s.applied_index) < target {
        assert!(
            std::time::Instant::now() < deadline,
            "node 4 did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, out, err) = run(&["ctl", "--endpoints", &founders.join(","), "check"]);
    assert!(
        ok,
        "the added node differs from the restored ones: {out}{err}"
    );
    assert!(out.contains(&new.api[3]), "check did not ask node 4: {out}");
}
