//! Delete as the client library sends it (SPEC §2 Delete): a fenced Delete
//! is retried like any fenced write; an unfenced one is sent once, and when
//! its reply is lost the caller is told the outcome is unknown instead of
//! the library retrying it (a retry could delete a newer claim).
mod support;
use support::{inproc, procs};

use std::time::Duration;

use idemkv::client::{ClientError, ClientOptions};
use idemkv::pb::api;
use idemkv::Client;
use inproc::{acquired, black_hole, claim_req, TestCluster};

fn del(key: &str, token: Option<u64>) -> api::DeleteRequest {
    api::DeleteRequest {
        namespace: "del".into(),
        key: key.into(),
        token,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_fenced_deletes_are_retried() {
    let c = TestCluster::start(3).await;
    let direct = c.client();
    let (hole, _task) = black_hole().await;
    // The black hole first: every call's first attempt is lost.
    let mut endpoints = vec![hole.clone()];
    endpoints.extend(c.endpoints());
    let client = Client::with_options(
        endpoints,
        ClientOptions {
            request_timeout: Duration::from_millis(300),
            retry_for: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    let a = acquired(
        direct
            .claim(claim_req("del", "k", "w", 60_000))
            .await
            .unwrap(),
    );

    // The fault took effect: a call to the black hole alone times out.
    let lone = Client::with_options(
        [hole.clone()],
        ClientOptions {
            request_timeout: Duration::from_millis(300),
            retry_for: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .unwrap();
    let err = lone.delete(del("k", Some(a.token))).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Timeout"), "{err}");

    // Unfenced: sent once, lost, reported as unknown; not retried on the
    // nodes that would have answered, so the record is still there.
    let err = client.delete(del("k", None)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::OutcomeUnknown { .. }),
        "an unfenced delete with a lost reply must not be retried: {err:?}"
    );
    assert!(err.to_string().contains("outcome unknown"), "{err}");
    let still = direct
        .get(api::GetRequest {
            namespace: "del".into(),
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(still.is_some(), "the unfenced delete was retried elsewhere");

    // Fenced: the lost attempt is retried on another node and succeeds.
    let res = client.delete(del("k", Some(a.token))).await.unwrap();
    assert!(res.existed);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfenced_delete_moves_past_an_endpoint_that_refuses_the_connection() {
    let c = TestCluster::start(3).await;
    let direct = c.client();
    // Where nothing listens (a port outside the OS's ephemeral range, from
    // the shared picker): a connection there is refused, so a request sent
    // there never leaves the client.
    let dead = format!("127.0.0.1:{}", procs::free_ports(1)[0]);
    let opts = ClientOptions {
        request_timeout: Duration::from_millis(500),
        retry_for: Duration::from_secs(5),
        ..Default::default()
    };
    // The fault took effect: the dead endpoint alone refuses, at once and
    // with UNAVAILABLE, not a timeout.
    let lone = Client::with_options(
        [dead.clone()],
        ClientOptions {
            retry_for: Duration::from_millis(1),
            ..opts.clone()
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = lone.delete(del("k", None)).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(400), "{err:?}");
    // Never sent, so not "outcome unknown": it certainly did not happen.
    assert!(matches!(err, ClientError::Status(_)), "{err:?}");

    // A record to delete, and the dead endpoint listed first, as a user
    // with one node down would have it.
    acquired(
        direct
            .claim(claim_req("del", "gone", "w", 60_000))
            .await
            .unwrap(),
    );
    let mut endpoints = vec![dead];
    endpoints.extend(c.endpoints());
    let client = Client::with_options(endpoints, opts).unwrap();
    // The request never left the client, so trying the next node is safe:
    // the delete happens, exactly once.
    let res = client.delete(del("gone", None)).await;
    assert!(
        matches!(res, Ok(api::DeleteResponse { existed: true, .. })),
        "an unfenced delete never sent must go to the next node: {res:?}"
    );
    let still = direct
        .get(api::GetRequest {
            namespace: "del".into(),
            key: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(still.is_none(), "{still:?}");
    c.shutdown().await;
}
