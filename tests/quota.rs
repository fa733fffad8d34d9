//! The data-size quota (like etcd's NOSPACE alarm), with real processes: a
//! cluster run with a small `quota_bytes` fills up; every node raises
//! NOSPACE in `Status`; claims are refused with `RESOURCE_EXHAUSTED`
//! (reason `NOSPACE`) and change nothing, on the leader and through a
//! follower, while complete, renew, release, get and delete still work;
//! once the sweep removes the expired records the alarm clears itself and
//! claims are granted again.
mod support;
use std::time::{Duration, Instant};
use support::procs;

use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::Client;
use procs::ProcCluster;

const NS: &str = "quota";

fn claim(key: &str, retention_ms: u64) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: NS.into(),
        key: key.as_bytes().to_vec(),
        owner: "w1".into(),
        claim_id: format!("c-{key}"),
        lease_ms: 60_000,
        retention_ms,
        ..Default::default()
    }
}

fn key_req(key: &str) -> api::GetRequest {
    api::GetRequest {
        namespace: NS.into(),
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Every node's alarms, as `Status` reports them.
async fn alarms(client: &Client) -> Vec<Vec<String>> {
    client
        .status_all()
        .await
        .into_iter()
        .map(|(ep, s)| s.unwrap_or_else(|e| panic!("{ep}: {e}")).alarms)
        .collect()
}

fn is_nospace(e: &idemkv::client::ClientError) -> bool {
    e.code() == Some(tonic::Code::ResourceExhausted) && e.reason() == Some("NOSPACE")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_quota_claims_get_nospace_until_the_sweep_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ProcCluster::new(
        dir.path(),
        3,
        "quota_bytes = 4000\nsweep_interval_ms = 200\n",
    );
    c.start_all();
    let client = Client::new(&c.api).unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();

    // A claim held throughout (kept: a day's retention).
    let Outcome::Acquired(held) = client.claim(claim("held", 86_400_000)).await.unwrap() else {
        panic!("held not acquired");
    };
    // Fill with completed records that expire 4 s after completion.
    let mut filled = Vec::new();
    let refused = loop {
        assert!(filled.len() < 200, "4000 bytes never filled");
        let key = format!("fill-{}", filled.len());
        match client.claim(claim(&key, 4_000)).await {
            Ok(Outcome::Acquired(a)) => {
                client
                    .complete(api::CompleteRequest {
                        namespace: NS.into(),
                        key: key.clone().into_bytes(),
                        token: a.token,
                        result: vec![7; 100],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                filled.push(key);
            }
            Ok(other) => panic!("{key}: {other:?}"),
            Err(e) => break (key, e),
        }
    };
    let filled_at = Instant::now();
    assert!(is_nospace(&refused.1), "{refused:?}");
    assert!(
        refused.1.message().contains("quota"),
        "{}",
        refused.1.message()
    );
    assert!(filled.len() >= 5, "only {} records fit", filled.len());
    // The refused claim changed nothing.
    let none = client.get(key_req(&refused.0)).await.unwrap();
    assert!(none.is_none(), "{none:?}");
    // Every node says so.
    for a in alarms(&client).await {
        assert_eq!(a, vec!["NOSPACE".to_string()]);
    }
    let status = client.status().await.unwrap();
    assert!(status.data_bytes > status.quota_bytes && status.quota_bytes == 4000);

    // Through a follower the forwarded claim is refused the same way.
    let follower = c
        .api
        .iter()
        .find(|a| **a != status.leader_api_addr)
        .unwrap();
    let mut raw = api::idempotency_client::IdempotencyClient::connect(format!("http://{follower}"))
        .await
        .unwrap();
    let e = raw.claim(claim("via-follower", 4_000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("NOSPACE"), "{e:?}");
    // A claim that only replays a stored result stores nothing: it is
    // answered, through the follower too.
    let replay = raw
        .claim(claim(&filled[1], 4_000))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(replay.outcome, Some(Outcome::Completed(_))),
        "{replay:?}"
    );
    // A batch is refused whole.
    let batch = client
        .claim_batch(api::ClaimBatchRequest {
            items: vec![claim("b-1", 4_000), claim("b-2", 4_000)],
            all_or_nothing: false,
        })
        .await;
    assert!(matches!(&batch, Err(e) if is_nospace(e)), "{batch:?}");

    // What frees or finishes work still works.
    let renewed = client
        .renew(api::RenewRequest {
            namespace: NS.into(),
            key: b"held".to_vec(),
            token: held.token,
            lease_ms: 60_000,
            ..Default::default()
        })
        .await;
    assert!(renewed.is_ok(), "renew under NOSPACE: {renewed:?}");
    let done = client
        .complete(api::CompleteRequest {
            namespace: NS.into(),
            key: b"held".to_vec(),
            token: held.token,
            // Big: the records stay over the quota after the delete below.
            result: vec![b'k'; 2_000],
            ..Default::default()
        })
        .await;
    assert!(done.is_ok(), "complete under NOSPACE: {done:?}");
    let rec = client.get(key_req("held")).await.unwrap().unwrap();
    assert_eq!(rec.result, vec![b'k'; 2_000], "{rec:?}");
    let deleted = client
        .delete(api::DeleteRequest {
            namespace: NS.into(),
            key: filled[0].clone().into_bytes(),
            ..Default::default()
        })
        .await;
    assert!(deleted.is_ok(), "delete under NOSPACE: {deleted:?}");
    assert!(client.get(key_req(&filled[0])).await.unwrap().is_none());
    for a in alarms(&client).await {
        assert_eq!(a, vec!["NOSPACE".to_string()], "still over the quota");
    }
    assert!(
        filled_at.elapsed() < Duration::from_secs(4),
        "the checks outlasted the records' retention: the alarm was not shown to hold"
    );

    // The sweep removes the expired records and the alarm clears itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    while alarms(&client).await.iter().any(|a| !a.is_empty()) {
        assert!(Instant::now() < deadline, "NOSPACE never cleared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        filled_at.elapsed() >= Duration::from_secs(4),
        "cleared before any record expired"
    );
    let again = client.claim(claim(&refused.0, 4_000)).await.unwrap();
    assert!(matches!(again, Outcome::Acquired(_)), "{again:?}");
    assert!(
        client.get(key_req(&filled[1])).await.unwrap().is_none(),
        "not swept"
    );
}
