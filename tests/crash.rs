//! kill -9 under load: a three-process cluster takes claims from several
//! clients and is SIGKILLed as a whole at random moments, several times.
//! After each restart every claim that was acknowledged must still be there
//! with the token it was acknowledged with, and every acknowledged Complete
//! must still replay its result. Snapshots and log purges happen often
//! (`snapshot_every = 200`), so they are crashed through too.
mod support;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::procs;

use idemkv::client::ClientOptions;
use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;
use procs::ProcCluster;
use rand::{Rng, SeedableRng};

/// (key, token, completed result if the Complete was acknowledged)
type Acked = Arc<Mutex<Vec<(String, u64, Option<String>)>>>;

async fn load(
    client: Client,
    worker: usize,
    round: usize,
    acked: Acked,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut i = 0;
    while !*stop.borrow() {
        i += 1;
        let key = format!("r{round}-w{worker}-{i}");
        let req = api::ClaimRequest {
            namespace: "crash".into(),
            key: key.clone().into_bytes(),
            owner: format!("w{worker}"),
            lease_ms: 60_000,
            ..Default::default()
        };
        let Ok(Outcome::Acquired(a)) = client.claim(req).await else {
            continue;
        };
        acked.lock().unwrap().push((key.clone(), a.token, None));
        if i % 2 == 0 {
            let result = format!("done-{key}");
            let done = client
                .complete(api::CompleteRequest {
                    namespace: "crash".into(),
                    key: key.clone().into_bytes(),
                    token: a.token,
                    result: result.clone().into_bytes(),
                    ..Default::default()
                })
                .await;
            if done.is_ok() {
                acked.lock().unwrap().push((key, a.token, Some(result)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_whole_cluster() {
    let seed: u64 = std::env::var("IDEMKV_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let rounds: usize = std::env::var("IDEMKV_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    eprintln!("crash test seed {seed} (IDEMKV_CRASH_SEED), {rounds} rounds");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = ProcCluster::new(dir.path(), 3, "snapshot_every = 200\n");
    cluster.start_all();
    cluster.wait_ready(Duration::from_secs(30)).await;

    let acked: Acked = Arc::default();
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry_for: Duration::from_millis(500),
        ..Default::default()
    };
    for round in 0..rounds {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let client = Client::with_options(&cluster.api, opts.clone()).unwrap();
                tokio::spawn(load(client, w, round, acked.clone(), stop_rx.clone()))
            })
            .collect();
        // Kill right after the N-th acknowledgement of this round, when the
        // newest acknowledged writes are the most exposed.
        let target = acked.lock().unwrap().len() + rng.random_range(20..300);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < target && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cluster.kill9_all();
        stop_tx.send(true).unwrap();
        for w in workers {
            w.await.unwrap();
        }
        cluster.start_all();
        cluster.wait_ready(Duration::from_secs(30)).await;

        let client = cluster.client();
        let acked_now = acked.lock().unwrap().clone();
        assert!(
            !acked_now.is_empty(),
            "round {round}: no claim was acknowledged at all"
        );
        for (key, token, result) in &acked_now {
            let rec = client
                .get(api::GetRequest {
                    namespace: "crash".into(),
                    key: key.clone().into_bytes(),
                    consistency: api::Consistency::Linearizable as i32,
                })
                .await
                .unwrap_or_else(|e| panic!("round {round}: get {key}: {e}"))
                .unwrap_or_else(|| panic!("round {round}: acknowledged claim {key} (token {token}) was lost (seed {seed})"));
            assert_eq!(
                rec.token, *token,
                "round {round}: {key} has another token (seed {seed})"
            );
            if let Some(r) = result {
                assert_eq!(
                    rec.state,
                    api::RecordState::Completed as i32,
                    "{key} lost its completion"
                );
                assert_eq!(String::from_utf8_lossy(&rec.result), *r);
            }
        }
        eprintln!(
            "round {round}: {} acknowledged writes verified",
            acked_now.len()
        );
    }
}
