//! Backups as an operator takes them: `idemkv ctl snapshot save FILE` from a
//! running cluster, `idemkv snapshot status FILE` checks it whole; a
//! truncated or damaged copy is refused by name.
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
