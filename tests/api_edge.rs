//! Bad input gets the documented error, a message naming the field, and
//! changes nothing.
mod support;
use idemkv::pb::api;
use inproc::{claim_req, TestCluster};
use support::inproc;
use tonic::Code;

async fn assert_nothing_stored(client: &idemkv::Client, ns: &str, key: &[u8]) {
    let get = api::GetRequest {
        namespace: ns.into(),
        key: key.to_vec(),
        consistency: 0,
    };
    assert!(
        client.get(get).await.unwrap().is_none(),
        "a rejected request stored something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_the_field_named_and_changes_nothing() {
    let c = TestCluster::start(3).await;
    let client = c.client();

    let cases: Vec<(&str, api::ClaimRequest, Code, &str)> = vec![
        (
            "empty key",
            claim_req("orders", "", "w1", 30_000),
            Code::InvalidArgument,
            "key",
        ),
        (
            "2 KiB key",
            claim_req("orders", &"k".repeat(2048), "w1", 30_000),
            Code::InvalidArgument,
            "key",
        ),
        (
            "bad namespace",
            claim_req("bad ns!", "k", "w1", 30_000),
            Code::InvalidArgument,
            "namespace",
        ),
        (
            "65-char namespace",
            claim_req(&"n".repeat(65), "k", "w1", 30_000),
            Code::InvalidArgument,
            "namespace",
        ),
        (
            "0 ms lease",
            claim_req("orders", "k", "w1", 0),
            Code::InvalidArgument,
            "lease_ms",
        ),
        (
            "25 h lease",
            claim_req("orders", "k", "w1", 25 * 3600 * 1000),
            Code::InvalidArgument,
            "lease_ms",
        ),
        (
            "no owner",
            claim_req("orders", "k", "", 30_000),
            Code::InvalidArgument,
            "owner",
        ),
        (
            "retention 500 ms",
            api::ClaimRequest {
                retention_ms: 500,
                ..claim_req("orders", "k", "w1", 30_000)
            },
            Code::InvalidArgument,
            "retention_ms",
        ),
    ];
    for (what, req, code, field) in cases {
        let (ns, key) = (req.namespace.clone(), req.key.clone());
        let err = client.claim(req).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{what}: {err}");
        assert!(
            err.message().starts_with(field),
            "{what}: message must name {field}: {err}"
        );
        if !key.is_empty() && key.len() <= 1024 && ns == "orders" {
            assert_nothing_stored(&client, &ns, &key).await;
        }
    }

    // A real claim to test the fenced operations against.
    let a = inproc::acquired(
        client
            .claim(claim_req("orders", "o-1", "w1", 30_000))
            .await
            .unwrap(),
    );
    let big = api::CompleteRequest {
        namespace: "orders".into(),
        key: b"o-1".to_vec(),
        token: a.token,
        result: vec![0u8; 2 * 1024 * 1024],
        ..Default::default()
    };
    let err = client.complete(big).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.message().starts_with("result"), "{err}");

    let cp = api::RenewRequest {
        namespace: "orders".into(),
        key: b"o-1".to_vec(),
        token: a.token,
        lease_ms: 30_000,
        checkpoint: Some(vec![0u8; 65 * 1024]),
    };
    let err = client.renew(cp).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.message().starts_with("checkpoint"), "{err}");

    let unknown = api::CompleteRequest {
        namespace: "orders".into(),
        key: b"o-1".to_vec(),
        token: a.token + 1000,
        result: b"x".to_vec(),
        ..Default::default()
    };
    let err = client.complete(unknown).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert_eq!(err.reason(), Some("LEASE_LOST"));

    // Still exactly as claimed: IN_PROGRESS by w1, no result, no checkpoint.
    let rec = client
        .get(api::GetRequest {
            namespace: "orders".into(),
            key: b"o-1".to_vec(),
            consistency: 0,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, api::RecordState::InProgress as i32);
    assert_eq!(rec.token, a.token);
    assert!(rec.result.is_empty() && rec.checkpoint.is_none());

    // Batches: duplicate keys and oversize batches are refused whole.
    let dup = api::ClaimBatchRequest {
        items: vec![
            claim_req("orders", "b-1", "w1", 30_000),
            claim_req("orders", "b-1", "w1", 30_000),
        ],
        all_or_nothing: false,
    };
    let err = client.claim_batch(dup).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.message().starts_with("items[1].key"), "{err}");
    let huge = api::ClaimBatchRequest {
        items: (0..1001)
            .map(|i| claim_req("orders", &format!("h-{i}"), "w1", 30_000))
            .collect(),
        all_or_nothing: false,
    };
    let err = client.claim_batch(huge).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.message().starts_with("items"), "{err}");
    // A batch over gRPC's message limit (16 MiB) gets a status that says
    // so, not a reset stream ("h2 protocol error").
    let over = api::ClaimBatchRequest {
        items: (0..40)
            .map(|i| api::ClaimRequest {
                fingerprint: Some(vec![b'f'; 512 * 1024]),
                ..claim_req("orders", &format!("m-{i}"), "w1", 30_000)
            })
            .collect(),
        all_or_nothing: false,
    };
    let err = client.claim_batch(over).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::OutOfRange), "{err}");
    assert!(err.is_too_large(), "{err}");
    assert!(
        err.message().contains("ClaimBatch request is") && err.message().contains("limited to"),
        "{err}"
    );
    assert_nothing_stored(&client, "orders", b"b-1").await;
    assert_nothing_stored(&client, "orders", b"h-0").await;
    assert_nothing_stored(&client, "orders", b"m-0").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_mismatch_and_already_completed_are_reported() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let with_fp = |fp: &str| api::ClaimRequest {
        fingerprint: Some(fp.as_bytes().to_vec()),
        ..claim_req("pay", "inv-1", "w1", 30_000)
    };
    let a = inproc::acquired(client.claim(with_fp("aaa")).await.unwrap());
    let err = client.claim(with_fp("bbb")).await.unwrap_err();
    assert_eq!(err.reason(), Some("FINGERPRINT_MISMATCH"), "{err}");
    let done = |r: &str| api::CompleteRequest {
        namespace: "pay".into(),
        key: b"inv-1".to_vec(),
        token: a.token,
        result: r.as_bytes().to_vec(),
        code: Some(201),
        ..Default::default()
    };
    client.complete(done("ok")).await.unwrap();
    client
        .complete(done("ok"))
        .await
        .expect("same token and result: succeeds again");
    let err = client.complete(done("other")).await.unwrap_err();
    assert_eq!(err.reason(), Some("ALREADY_COMPLETED"), "{err}");
    match client.claim(with_fp("aaa")).await.unwrap() {
        api::claim_response::Outcome::Completed(c) => {
            assert_eq!(c.result, b"ok");
            assert_eq!(c.code, Some(201));
        }
        other => panic!("expected the replay, got {other:?}"),
    }
    c.shutdown().await;
}
