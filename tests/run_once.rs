//! The run-once helper against a real three-node cluster: the work's effect
//! happens once, duplicates get the saved result, failures release, lost
//! leases stop the work, checkpoints reach the next attempt.
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestCluster;
use idemkv::client::{RunError, RunOptions, RunOutcome};
use idemkv::pb::api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicates_run_the_work_once_and_all_get_its_result() {
    let c = TestCluster::start(3).await;
    let effects = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    for i in 0..8 {
        let client = c.client();
        let effects = effects.clone();
        calls.push(tokio::spawn(async move {
            let mut opts = RunOptions::new(format!("worker-{i}"), Duration::from_secs(5));
            opts.wait_for_duplicate = Some(Duration::from_secs(10));
            client
                .run_once("jobs", b"report/2026-11-22", &opts, |_claimed| async move {
                    effects.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, String>("report-done")
                })
                .await
        }));
    }
    let mut ran = 0;
    for call in calls {
        match call.await.unwrap().unwrap() {
            RunOutcome::Ran { completion, .. } => {
                ran += 1;
                assert_eq!(completion.result, b"report-done");
            }
            RunOutcome::Replayed { completion, .. } => {
                assert_eq!(completion.result, b"report-done")
            }
            other => panic!("every duplicate should get the result, got {other:?}"),
        }
    }
    assert_eq!(ran, 1);
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the effect happened exactly once"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_releases_and_hands_its_checkpoint_to_the_next() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let opts = RunOptions::new("w1", Duration::from_millis(300));
    let first = client
        .run_once("import", b"batch-7", &opts, |claimed| async move {
            assert_eq!(claimed.attempt, 1);
            claimed.save_checkpoint("row-1200");
            // Long enough for a renewal (every lease/3) to carry it.
            tokio::time::sleep(Duration::from_millis(350)).await;
            Err::<Vec<u8>, _>("database timeout")
        })
        .await;
    assert!(
        matches!(&first, Err(RunError::Work(e)) if *e == "database timeout"),
        "{first:?}"
    );

    let second = client
        .run_once(
            "import",
            b"batch-7",
            &RunOptions::new("w2", Duration::from_secs(5)),
            |claimed| async move {
                assert_eq!(claimed.attempt, 2);
                assert_eq!(claimed.previous_owner.as_deref(), Some("w1"));
                assert_eq!(claimed.checkpoint.as_deref(), Some(&b"row-1200"[..]));
                Ok::<_, String>("imported")
            },
        )
        .await
        .unwrap();
    assert!(matches!(second, RunOutcome::Ran { .. }), "{second:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_stops_the_work_and_saves_nothing() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let other = c.client();
    let res = client
        .run_once(
            "orders",
            b"o-9",
            &RunOptions::new("w1", Duration::from_millis(300)),
            |claimed| async move {
                // Someone deletes the record under us: the next renewal is fenced.
                other
                    .delete(api::DeleteRequest {
                        namespace: "orders".into(),
                        key: b"o-9".to_vec(),
                        token: None,
                    })
                    .await
                    .unwrap();
                tokio::time::timeout(Duration::from_secs(5), claimed.lost())
                    .await
                    .expect("lost() fires after the lease is taken away");
                Ok::<_, String>("too late")
            },
        )
        .await;
    assert!(matches!(res, Err(RunError::LeaseLost { .. })), "{res:?}");
    let rec = c
        .client()
        .get(api::GetRequest {
            namespace: "orders".into(),
            key: b"o-9".to_vec(),
            consistency: 0,
        })
        .await
        .unwrap();
    assert!(
        rec.is_none(),
        "nothing was completed with the stale token: {rec:?}"
    );
    c.shutdown().await;
}
