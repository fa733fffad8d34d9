//! The run-once helper against a real three-node cluster: the work's effect
//! happens once, duplicates get the saved result, failures release, lost
//! leases stop the work, checkpoints reach the next attempt. The client
//! times its own lease (SPEC §2 Time): a worker cut off from the cluster (a
//! proxy that can cut or delay its path) stops before the server's lease
//! ends and saves nothing, and a grant that arrives too late is not started.
mod support;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::inproc;

use idemkv::client::{LeaseLoss, RunError, RunOptions, RunOutcome};
use idemkv::pb::api;
use inproc::TestCluster;

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

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failed_run_releases_and_hands_its_checkpoint_to_the_next() {
    let (c, _wall) = TestCluster::start_virtual(3).await;
    let client = c.client();
    let opts = RunOptions::new("w1", Duration::from_secs(30));
    let first = client
        .run_once("import", b"batch-7", &opts, |claimed| async move {
            assert_eq!(claimed.attempt, 1);
            claimed.save_checkpoint("row-1200");
            // Long enough for a renewal (every lease/3) to carry it.
            tokio::time::sleep(Duration::from_secs(25)).await;
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

/// A failed run whose error is longer than the server takes in a Release
/// (4,096 bytes) still releases: the next run goes ahead at once instead
/// of meeting the first one's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_with_a_long_error_still_releases() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let opts = RunOptions::new("w1", Duration::from_secs(60));
    let long = "é".repeat(5_000);
    let first = client
        .run_once("import", b"batch-9", &opts, |_| {
            let long = long.clone();
            async move { Err::<Vec<u8>, _>(long) }
        })
        .await;
    assert!(matches!(&first, Err(RunError::Work(_))), "{first:?}");
    let rec = client
        .get(api::GetRequest {
            namespace: "import".into(),
            key: b"batch-9".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .expect("the record");
    assert_eq!(
        rec.state,
        api::RecordState::Available as i32,
        "the failed run left the key held: {rec:?}"
    );
    assert!(rec.last_error.starts_with("éé") && rec.last_error.ends_with("[cut]"));
    let second = client
        .run_once(
            "import",
            b"batch-9",
            &RunOptions::new("w2", Duration::from_secs(5)),
            |_| async { Ok::<_, String>("imported") },
        )
        .await
        .unwrap();
    assert!(matches!(second, RunOutcome::Ran { .. }), "{second:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn losing_the_lease_stops_the_work_and_saves_nothing() {
    let (c, _wall) = TestCluster::start_virtual(3).await;
    let client = c.client();
    let other = c.client();
    let res = client
        .run_once(
            "orders",
            b"o-9",
            &RunOptions::new("w1", Duration::from_secs(30)),
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
                tokio::time::timeout(Duration::from_secs(15), claimed.lost())
                    .await
                    .expect("lost() fires after the lease is taken away");
                Ok::<_, String>("too late")
            },
        )
        .await;
    assert!(
        matches!(
            res,
            Err(RunError::LeaseLost {
                why: LeaseLoss::Fenced,
                ..
            })
        ),
        "{res:?}"
    );
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

// ------------------------------------------------------------ lease timing

/// A TCP proxy between one client and one node. It can cut the path (drop
/// every open connection and refuse new ones) or hold back what the node
/// sends, which is how a worker loses the cluster without root.
struct Proxy {
    addr: std::net::SocketAddr,
    path: tokio::sync::watch::Sender<PathState>,
}

#[derive(Debug, Clone, Copy, Default)]
struct PathState {
    cut: bool,
    /// How long the node's bytes are held before they reach the client.
    reply_delay: Duration,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (path, _) = tokio::sync::watch::channel(PathState::default());
        let rx = path.subscribe();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if rx.borrow().cut {
                    continue; // dropped: the client sees a reset
                }
                let (target, rx) = (target.clone(), rx.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ci, co) = inbound.into_split();
                    let (ni, no) = outbound.into_split();
                    tokio::join!(pump(ci, no, rx.clone(), false), pump(ni, co, rx, true));
                });
            }
        });
        Proxy { addr, path }
    }

    fn cut(&self) {
        self.path.send_modify(|p| p.cut = true);
    }

    fn heal(&self) {
        self.path.send_modify(|p| *p = PathState::default());
    }

    fn delay_replies(&self, by: Duration) {
        self.path.send_modify(|p| p.reply_delay = by);
    }

    /// A client whose only way to the cluster is this proxy.
    fn client(&self, request_timeout: Duration, retry_for: Duration) -> idemkv::Client {
        idemkv::Client::with_options(
            [self.addr.to_string()],
            idemkv::client::ClientOptions {
                request_timeout,
                retry_for,
                ..Default::default()
            },
        )
        .unwrap()
    }
}

/// Copy one direction of a proxied connection until either side closes or
/// the path is cut (then both halves drop: the connection is gone).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    path: tokio::sync::watch::Receiver<PathState>,
    replies: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let delay = path.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let hold = if replies {
                delay.borrow().reply_delay
            } else {
                Duration::ZERO
            };
            if tx
                .send((tokio::time::Instant::now() + hold, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let mut cut = path;
    tokio::select! {
        _ = async { tokio::join!(read, write) } => {}
        _ = cut.wait_for(|p| p.cut) => {}
    }
}

fn get_req(ns: &str, key: &[u8]) -> api::GetRequest {
    api::GetRequest {
        namespace: ns.into(),
        key: key.to_vec(),
        consistency: 0,
    }
}

/// Run `key` as `owner` on a direct client until it is no longer Busy (the
/// previous holder's lease expired), recording the interval the work ran.
async fn take_over(
    client: &idemkv::Client,
    ns: &str,
    key: &[u8],
    owner: &str,
    lease: Duration,
) -> (
    RunOutcome,
    Option<(tokio::time::Instant, tokio::time::Instant)>,
) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ran = Arc::new(std::sync::Mutex::new(None));
        let out = client
            .run_once(ns, key, &RunOptions::new(owner, lease), |_claimed| {
                let ran = ran.clone();
                async move {
                    let start = tokio::time::Instant::now();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    *ran.lock().unwrap() = Some((start, tokio::time::Instant::now()));
                    Ok::<_, String>(format!("from-{owner}"))
                }
            })
            .await
            .unwrap();
        if !matches!(out, RunOutcome::Busy { .. }) {
            let interval = *ran.lock().unwrap();
            return (out, interval);
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{owner} never took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_cluster_stops_before_its_lease_ends_and_saves_nothing() {
    let c = TestCluster::start(3).await;
    let proxy = Proxy::start(c.members[&1].api_addr.clone()).await;
    let worker = proxy.client(Duration::from_millis(300), Duration::from_secs(15));
    let direct = c.client();
    let (ns, key) = ("jobs", &b"cut/1"[..]);
    let lease = Duration::from_secs(1);

    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let w1 = tokio::spawn(async move {
        worker
            .run_once(
                ns,
                key,
                &RunOptions::new("w1", lease),
                |claimed| async move {
                    let start = tokio::time::Instant::now();
                    let _ = started_tx.send(claimed.token);
                    claimed.lost().await;
                    let _ = lost_tx.send((start, tokio::time::Instant::now()));
                    // Told to stop, it still hands back a result: never saved.
                    let _ = go_rx.await;
                    Ok::<_, String>("from-w1")
                },
            )
            .await
    });
    let token1 = tokio::time::timeout(Duration::from_secs(5), started_rx)
        .await
        .expect("w1 starts")
        .unwrap();

    proxy.cut();
    let probe = proxy.client(Duration::from_millis(200), Duration::from_millis(300));
    let through = probe.get(get_req(ns, key)).await;
    assert!(through.is_err(), "the cut took effect: {through:?}");

    let (w1_start, w1_end) = tokio::time::timeout(Duration::from_secs(3), lost_rx)
        .await
        .expect("lost() fires once no renewal got through by the deadline")
        .unwrap();
    // At that moment the server still counts w1's lease as live: lost()
    // fired before the server-side deadline, not after it.
    match direct
        .claim(inproc::claim_req(ns, "cut/1", "w2", 1000))
        .await
    {
        Ok(api::claim_response::Outcome::InProgress(p)) => {
            assert_eq!(p.owner, "w1");
            assert!(p.lease_remaining_ms > 0, "{p:?}");
        }
        other => panic!("w1's lease should still be live on the server: {other:?}"),
    }

    // Heal the path, so a Complete would get through, and let w1 return.
    proxy.heal();
    let healed = proxy.client(Duration::from_millis(300), Duration::from_secs(3));
    healed
        .get(get_req(ns, key))
        .await
        .expect("the path is back");
    go_tx.send(()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), w1)
        .await
        .expect("w1's run returns")
        .unwrap();
    assert!(
        matches!(res, Err(RunError::LeaseLost { token, why: LeaseLoss::Expired }) if token == token1),
        "{res:?}"
    );
    let rec = direct.get(get_req(ns, key)).await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.token),
        (api::RecordState::InProgress as i32, token1),
        "w1's result was not saved: {rec:?}"
    );

    let (out, w2) = take_over(&direct, ns, key, "w2", lease).await;
    let (w2_start, w2_end) = w2.expect("w2 ran the work");
    assert!(matches!(out, RunOutcome::Ran { .. }), "{out:?}");
    assert!(
        w1_end < w2_start,
        "w1 [{w1_start:?}, {w1_end:?}] overlaps w2 [{w2_start:?}, {w2_end:?}]"
    );
    let rec = direct.get(get_req(ns, key)).await.unwrap().unwrap();
    assert_eq!(rec.state, api::RecordState::Completed as i32);
    assert_eq!(rec.result, b"from-w2");
    assert_ne!(rec.token, token1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_arrives_after_its_lease_deadline_is_not_started() {
    let c = TestCluster::start(3).await;
    let proxy = Proxy::start(c.members[&1].api_addr.clone()).await;
    let worker = proxy.client(Duration::from_secs(3), Duration::from_secs(15));
    let direct = c.client();
    let (ns, key) = ("jobs", &b"slow/1"[..]);
    let lease = Duration::from_millis(400);
    let delay = Duration::from_millis(700);
    worker
        .status()
        .await
        .expect("connected while the path is fast");

    proxy.delay_replies(delay);
    let t = tokio::time::Instant::now();
    worker.get(get_req(ns, key)).await.unwrap();
    assert!(
        t.elapsed() >= delay,
        "the delay took effect: {:?}",
        t.elapsed()
    );

    let ran = Arc::new(AtomicU32::new(0));
    let res = {
        let ran = ran.clone();
        worker
            .run_once(
                ns,
                key,
                &RunOptions::new("slow", lease),
                |_claimed| async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>("from-slow")
                },
            )
            .await
    };
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the work was not started");
    assert!(
        matches!(&res, Err(RunError::GrantExpired { waited, .. }) if *waited >= delay),
        "{res:?}"
    );

    let (out, _) = take_over(&direct, ns, key, "w2", lease).await;
    assert!(matches!(out, RunOutcome::Ran { .. }), "{out:?}");
    let rec = direct.get(get_req(ns, key)).await.unwrap().unwrap();
    assert_eq!(rec.result, b"from-w2");
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_deadline_counts_from_before_the_claim_and_moves_with_each_renewal() {
    let (c, _wall) = TestCluster::start_virtual(3).await;
    let opts = RunOptions::new("w1", Duration::from_secs(30));
    assert_eq!(opts.margin(), Duration::from_secs(3));
    let valid = Duration::from_secs(27);
    let before = tokio::time::Instant::now();
    let out = c
        .client()
        .run_once("jobs", b"deadline/1", &opts, |claimed| async move {
            let first = claimed.deadline();
            assert!(first >= before + valid, "not earlier than the send allows");
            assert!(
                first <= tokio::time::Instant::now() + valid,
                "from the send, not the reply"
            );
            assert!(claimed.remaining() <= valid && !claimed.remaining().is_zero());
            // Renewals go every lease / 3.
            tokio::time::sleep(Duration::from_secs(20)).await;
            assert!(claimed.deadline() > first, "a renewal moved the deadline");
            assert!(!claimed.is_lost());
            Ok::<_, String>("done")
        })
        .await
        .unwrap();
    assert!(matches!(out, RunOutcome::Ran { .. }), "{out:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_margin_as_long_as_the_lease_is_refused_before_claiming() {
    // Nothing listens there: the options are refused before any call.
    let client = idemkv::Client::new(["127.0.0.1:1"]).unwrap();
    let mut opts = RunOptions::new("w1", Duration::from_millis(500));
    opts.safety_margin = Some(Duration::from_millis(500));
    let res = client
        .run_once("jobs", b"k", &opts, |_| async { Ok::<_, String>("never") })
        .await;
    assert!(
        matches!(&res, Err(RunError::Client(e)) if e.to_string().contains("safety_margin")),
        "{res:?}"
    );
}

/// A duplicate that waits for another worker's result, and sees that
/// worker's lease run out instead (it died holding the key), claims the key
/// and runs the work itself. Before, it returned `Busy` naming the dead
/// worker, and a consumer that acks on `Busy` dropped the message.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_waiting_duplicate_runs_the_work_once_the_holders_lease_runs_out() {
    let (c, _wall) = TestCluster::start_virtual(3).await;
    let client = c.client();
    let held = client
        .claim(api::ClaimRequest {
            namespace: "mail".into(),
            key: b"welcome/42".to_vec(),
            owner: "crashed".into(),
            lease_ms: 2_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        matches!(held, api::claim_response::Outcome::Acquired(_)),
        "{held:?}"
    );
    let mut opts = RunOptions::new("w2", Duration::from_secs(30));
    opts.wait_for_duplicate = Some(Duration::from_secs(10));
    let out = client
        .run_once("mail", b"welcome/42", &opts, |claimed| async move {
            assert_eq!(claimed.previous_owner.as_deref(), Some("crashed"));
            Ok::<_, String>("sent")
        })
        .await
        .unwrap();
    match out {
        RunOutcome::Ran { completion, .. } => assert_eq!(completion.result, b"sent"),
        other => panic!("the waiting duplicate did not take the key over: {other:?}"),
    }
    c.shutdown().await;
}

/// Work that ran but whose result the store refuses as too large (over its
/// result limit) is never run again: the helper marks the key FAILED with
/// a permanent Release and says the result was not saved, and a later
/// delivery, even one that waits past the first run's lease, gets FAILED
/// instead of running the work a second time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn work_whose_result_is_too_large_to_save_is_not_run_again() {
    let (clock, _wall) = idemkv::clock::Clock::virtual_wall();
    let c = TestCluster::start_with(3, |cfg| {
        cfg.clock = clock.clone();
        cfg.limits.result_max = 1024;
    })
    .await;
    let client = c.client();
    let effects = Arc::new(AtomicU32::new(0));
    let run = |owner: &str| {
        let mut opts = RunOptions::new(owner, Duration::from_secs(5));
        opts.wait_for_duplicate = Some(Duration::from_secs(20));
        let effects = effects.clone();
        let client = client.clone();
        async move {
            client
                .run_once("exports", b"report/9", &opts, |_| async move {
                    effects.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, String>(vec![7u8; 4096])
                })
                .await
        }
    };
    let first = run("w1").await;
    assert!(
        matches!(
            &first,
            Err(RunError::ResultTooLarge {
                bytes: 4096,
                marked_failed: true,
                ..
            })
        ),
        "{first:?}"
    );
    let rec = client
        .get(api::GetRequest {
            namespace: "exports".into(),
            key: b"report/9".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .expect("the record");
    assert_eq!(rec.state, api::RecordState::Failed as i32, "{rec:?}");
    assert!(
        rec.last_error.contains("4096 bytes was not saved"),
        "{}",
        rec.last_error
    );

    let second = run("w2").await.unwrap();
    match second {
        RunOutcome::Failed { last_error, .. } => {
            assert!(last_error.contains("does not run again"), "{last_error}")
        }
        other => panic!("a later delivery must not run the work again: {other:?}"),
    }
    assert_eq!(
        effects.load(Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    c.shutdown().await;
}

/// Work that ran while the cluster became unreachable: its Complete fails
/// after the client's retries, and `run_once` says the work ran and hands
/// back the result with its token (not the same error as a claim that
/// failed before any work), so the caller can save it once the cluster is
/// back; later calls then replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_could_not_be_saved_comes_back_with_its_token() {
    let c = TestCluster::start(3).await;
    let proxy = Proxy::start(c.members[&1].api_addr.clone()).await;
    let worker = proxy.client(Duration::from_millis(300), Duration::from_secs(1));
    let (ns, key) = ("jobs", &b"unsaved/1"[..]);
    let res = worker
        .run_once(
            ns,
            key,
            &RunOptions::new("w1", Duration::from_secs(30)),
            |_| async {
                // The effect happens; then the worker loses the cluster.
                proxy.cut();
                Ok::<_, String>("shipped")
            },
        )
        .await;
    let probe = proxy.client(Duration::from_millis(200), Duration::from_millis(300));
    assert!(
        probe.get(get_req(ns, key)).await.is_err(),
        "the cut took effect"
    );
    let Err(RunError::CompleteFailed {
        token, completion, ..
    }) = res
    else {
        panic!("expected CompleteFailed, got {res:?}");
    };
    assert_eq!(completion.result, b"shipped");

    let direct = c.client();
    direct
        .complete(api::CompleteRequest {
            namespace: ns.into(),
            key: key.to_vec(),
            token,
            result: completion.result,
            code: completion.code,
            retention_ms: 0,
        })
        .await
        .expect("saved with the token handed back");
    let again = direct
        .run_once(
            ns,
            key,
            &RunOptions::new("w2", Duration::from_secs(5)),
            |_| async { Err::<Vec<u8>, _>("must not run again") },
        )
        .await
        .unwrap();
    assert!(
        matches!(&again, RunOutcome::Replayed { completion, .. } if completion.result == b"shipped"),
        "{again:?}"
    );
    c.shutdown().await;
}

/// A result over the gRPC message limit (16 MiB), refused before the
/// store's own check (`OUT_OF_RANGE`, not `RESOURCE_EXHAUSTED`), is too
/// large all the same: the key is marked FAILED and the work never runs
/// again. (It used to be a failed Complete, the key left to run again
/// after the lease.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_message_limit_is_too_large_too() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let opts = RunOptions::new("w1", Duration::from_secs(30));
    let res = client
        .run_once("exports", b"huge/1", &opts, |_| async {
            Ok::<_, String>(vec![1u8; 17 << 20])
        })
        .await;
    assert!(
        matches!(
            &res,
            Err(RunError::ResultTooLarge {
                marked_failed: true,
                ..
            })
        ),
        "{:?}",
        res.as_ref()
            .map(|_| "an outcome")
            .map_err(|e| e.to_string())
    );
    let again = client
        .run_once(
            "exports",
            b"huge/1",
            &RunOptions::new("w2", Duration::from_secs(5)),
            |_| async { Err::<Vec<u8>, _>("must not run again") },
        )
        .await
        .unwrap();
    assert!(matches!(again, RunOutcome::Failed { .. }), "{again:?}");
    c.shutdown().await;
}
