//! The five classic scenarios of `examples/`, each against a real
//! three-node cluster, asserting that the effect happened exactly once.
mod support;
use support::inproc;
#[path = "../examples/batch_copy.rs"]
mod batch_copy;
#[path = "../examples/consumer.rs"]
mod consumer;
#[path = "../examples/daily_job.rs"]
mod daily_job;
#[path = "../examples/http_endpoint.rs"]
mod http_endpoint;
#[path = "../examples/resume_checkpoint.rs"]
mod resume_checkpoint;

use std::sync::atomic::Ordering;
use std::time::Duration;

use inproc::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_job_runs_once_per_day_however_often_it_fires() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    assert_eq!(daily_job::fire(&client, "2026-11-22", 5).await.unwrap(), 1);
    assert_eq!(
        daily_job::fire(&client, "2026-11-22", 5).await.unwrap(),
        0,
        "same day: replayed"
    );
    assert_eq!(
        daily_job::fire(&client, "2026-11-23", 3).await.unwrap(),
        1,
        "next day: runs again"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_copy_has_zero_duplicates_with_racing_workers() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let dest = batch_copy::copy_catalog(&client, "t1", 3000).await.unwrap();
    let dest = dest.lock().unwrap().clone();
    assert_eq!(dest.len(), 3000, "every product copied");
    assert!(dest.values().all(|n| *n == 1), "no product copied twice");
    assert!(
        batch_copy::claim_bundle(&client, "t1", "a", &["b/1", "b/2", "b/3"])
            .await
            .unwrap()
    );
    assert!(
        !batch_copy::claim_bundle(&client, "t1", "b", &["b/3", "b/4"])
            .await
            .unwrap()
    );
    // b/4 stayed free: the all-or-nothing batch changed nothing.
    assert!(batch_copy::claim_bundle(&client, "t1", "c", &["b/4"])
        .await
        .unwrap());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_follows_the_idempotency_key_draft() {
    let c = TestCluster::start(3).await;
    let shop = http_endpoint::Shop::new(c.client());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http_endpoint::serve(shop.clone(), listener));
    let body = "{\"sku\":\"tea\",\"qty\":2}";
    let first =
        tokio::spawn(async move { http_endpoint::post(addr, Some("k-1"), body).await.unwrap() });
    // Once the first is being processed (it takes 300 ms), a retry conflicts.
    let probe = c.client();
    loop {
        let get = idemkv::pb::api::GetRequest {
            namespace: "http".into(),
            key: b"k-1".to_vec(),
            consistency: 0,
        };
        if probe.get(get).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let conflict = http_endpoint::post(addr, Some("k-1"), body).await.unwrap();
    assert_eq!(
        conflict.0, 409,
        "a retry while the first is processing gets 409: {conflict:?}"
    );
    let (status, original) = first.await.unwrap();
    assert_eq!(status, 201);
    let replay = http_endpoint::post(addr, Some("k-1"), body).await.unwrap();
    assert_eq!(
        replay,
        (201, original),
        "a retry replays the first response"
    );
    assert_eq!(
        http_endpoint::post(addr, Some("k-1"), "{\"qty\":9}")
            .await
            .unwrap()
            .0,
        422
    );
    assert_eq!(http_endpoint::post(addr, None, body).await.unwrap().0, 400);
    assert_eq!(shop.orders.load(Ordering::SeqCst), 1, "one order created");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_task_resumes_from_its_checkpoint_on_another_worker() {
    let c = TestCluster::start(3).await;
    let log = resume_checkpoint::story(&c.client(), "reindex")
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    let steps: Vec<u32> = log.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        steps,
        (1..=10).collect::<Vec<_>>(),
        "every step once, in order: {log:?}"
    );
    assert!(log[..4].iter().all(|(w, _)| w == "worker-a"));
    assert!(
        log[4..].iter().all(|(w, _)| w == "worker-b"),
        "worker-b resumed at step 5: {log:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_messages_charge_once() {
    let c = TestCluster::start(3).await;
    let ledger = consumer::story(&c.client(), "m").await.unwrap();
    let ledger = ledger.lock().unwrap().clone();
    assert_eq!(ledger.get("m-42"), Some(&1), "{ledger:?}");
    assert_eq!(ledger.get("m-43"), Some(&1), "{ledger:?}");
    c.shutdown().await;
}
