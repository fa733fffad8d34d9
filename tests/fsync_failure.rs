//! A node whose log fsync fails (EIO: fsyncgate) must stop, not go on as
//! if the data were safe, and its clients must be told to go elsewhere
//! (UNAVAILABLE), not that their request broke the server (INTERNAL).
//! The failure is injected with the test hook `IDEMKV_TEST_FSYNC_CONTROL`.
mod support;
use std::time::Duration;
use support::{inproc, procs};

use idemkv::client::{ClientError, ClientOptions};
use idemkv::store::test_hooks::FSYNC_CONTROL_ENV;
use idemkv::Client;
use procs::ProcCluster;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_node_and_clients_hear_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("fsync-control");
    let mut cl = ProcCluster::new(dir.path(), 1, "");
    cl.envs[0].push((FSYNC_CONTROL_ENV.into(), control.display().to_string()));
    cl.start_all();
    let client = Client::with_options(
        &cl.api,
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            retry_for: Duration::ZERO,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    inproc::acquired(
        client
            .claim(inproc::claim_req("ns", "before", "w", 60_000))
            .await
            .unwrap(),
    );

    std::fs::write(&control, "eio\n").unwrap();
    let err = client
        .claim(inproc::claim_req("ns", "after", "w", 60_000))
        .await
        .expect_err("a write whose fsync failed was acknowledged");
    // The fault took effect: the hook failed an fsync.
    let taken = std::fs::read_to_string(dir.path().join("fsync-control.taken")).unwrap_or_default();
    assert!(taken.contains("eio"), "no fsync failed");
    // Either the node answered before it stopped (UNAVAILABLE: go
    // elsewhere), or it was gone first (a transport error). Never a
    // server-sent INTERNAL. (`Consensus` unit tests pin the mapping.)
    let from_server =
        matches!(&err, ClientError::Status(s) if std::error::Error::source(s).is_none());
    assert!(
        !from_server || err.code() == Some(Code::Unavailable),
        "the server answered {err}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cl.exited(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node went on after a failed fsync"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
