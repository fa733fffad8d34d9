//! Raft's path must not wait on sled's process-wide lock. sled 0.34 guards
//! every tree of every database in a process with one lock, which a batch
//! holds for writing until it is done; the tests here write such a batch,
//! so they run in a binary of their own (in `log_recovery.rs` it stalled
//! the other tests' sled databases from closing).
mod log_files;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::raft::TypeConfig;
use idemkv::store::Store;
use log_files::{append, close, entry};
use openraft::storage::RaftLogStorage;
use openraft::testing::log_id;

/// The state machine writes its applied records in sled batches. Raft saves the
/// commit point at every commit; written to sled on Raft's path, the save
/// waited for whatever batch was being written (5–13 ms per 1,024 records
/// under load), and the node's Raft loop with it: most of the claim tail
/// (BENCHMARKS.md). The save must return while a batch holds sled's lock,
/// the node must read back what it saved, and a reopened log must find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_the_commit_point_does_not_wait_for_a_sled_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    append(&mut store.log, (1..=10).map(|i| entry(i, 1)).collect()).await;
    let ten = log_id::<TypeConfig>(1, 1, 10);

    // A big batch into another database: the lock is process-wide.
    let other = sled::Config::new().temporary(true).open().unwrap();
    let mut batch = sled::Batch::default();
    for i in 0..200_000u32 {
        batch.insert(&i.to_be_bytes()[..], &[7u8; 64][..]);
    }
    let started = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let writer = {
        let (started, finished) = (started.clone(), finished.clone());
        std::thread::spawn(move || {
            started.store(true, Ordering::SeqCst);
            let t0 = Instant::now();
            other.apply_batch(batch).unwrap();
            let end = Instant::now();
            finished.store(true, Ordering::SeqCst);
            (t0, end)
        })
    };
    while !started.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // Let the batch take the lock (it holds it for far longer than this).
    std::thread::sleep(Duration::from_millis(50));

    store.log.save_committed(Some(ten)).await.unwrap();
    let batch_running = !finished.load(Ordering::SeqCst);
    assert_eq!(store.log.read_committed().await.unwrap(), Some(ten));

    // The fault took effect: the batch held sled's lock, so a plain insert
    // into a third database waited until it was done.
    let probe = sled::Config::new().temporary(true).open().unwrap();
    let probed = tokio::task::spawn_blocking(move || {
        probe.insert(b"probe", &b"x"[..]).unwrap();
        Instant::now()
    })
    .await
    .unwrap();
    let (batch_start, batch_end) = writer.join().unwrap();
    let held = batch_end - batch_start;
    assert!(
        held > Duration::from_millis(100) && probed + held / 5 >= batch_end,
        "sled's lock was not held by the batch ({held:?}; the probe got through {:?} before it ended)",
        batch_end.saturating_duration_since(probed)
    );
    assert!(
        batch_running,
        "saving the commit point waited for a sled batch of {held:?}"
    );

    close(store);
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(store.log.read_committed().await.unwrap(), Some(ten));
}
