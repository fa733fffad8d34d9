//! A damaged sled database: sled takes its first bad message for the end of
//! its log and silently goes back to the state before it (or panics at
//! open). The node must then either start with every vote and purge point
//! it made durable, or refuse to start and name the operator's remedy;
//! never start with a vote taken back (it could vote twice in one term).

mod log_files;

use std::path::Path;

use idemkv::raft::Vote;
use idemkv::store::Store;
use openraft::storage::RaftLogStorage;
use openraft::RaftLogReader;

const REMEDY: &str = "add the node back as a new member";

fn copy_dir(from: &Path, to: &Path) {
    idemkv::store::test_hooks::copy_dir(from, to).unwrap();
}

async fn vote(store: &Store, term: u64) {
    let mut log = store.log.clone();
    log.save_vote(&Vote::new(term, term)).await.unwrap();
}

async fn stored_vote(store: &Store) -> Option<Vote> {
    let mut log = store.log.clone();
    log.read_vote().await.unwrap()
}

/// sled lost a vote it had fsynced (here: its directory put back to a copy
/// taken after an earlier vote's fsync, as a flipped bit in the later
/// vote's message leaves it). Without the mark the node opened with the
/// older vote and could grant a second vote in term 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_that_lost_a_durable_vote_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("sled-old");
    let store = Store::open(dir.path()).unwrap();
    vote(&store, 1).await;
    copy_dir(&dir.path().join("sled"), &old);
    vote(&store, 5).await;
    log_files::close(store);

    // Reopened as it is, it has the vote of term 5.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(stored_vote(&store).await, Some(Vote::new(5, 5)));
    log_files::close(store);

    std::fs::remove_dir_all(dir.path().join("sled")).unwrap();
    std::fs::rename(&old, dir.path().join("sled")).unwrap();
    let err = Store::open(dir.path())
        .err()
        .expect("a sled that lost the vote of term 5 must not open");
    let msg = err.to_string();
    assert!(
        msg.contains("the vote") && msg.contains(REMEDY),
        "the refusal must say what was lost and what to do: {msg}"
    );
}

/// A byte flipped anywhere in sled's file: the store opens with its last
/// vote, or refuses naming the remedy; it never panics (sled does, for
/// some offsets) and never opens with an older vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_sled_opens_intact_or_is_refused_with_the_remedy() {
    let base = tempfile::tempdir().unwrap();
    let store = Store::open(base.path()).unwrap();
    const VOTES: u64 = 200;
    for term in 1..=VOTES {
        vote(&store, term).await;
    }
    log_files::close(store);
    let len = std::fs::metadata(base.path().join("sled/db"))
        .unwrap()
        .len();
    let (mut intact, mut refused) = (0, 0);
    for k in 0..24u64 {
        // Most offsets in the newest part of the file, where the last
        // votes are; some anywhere.
        let at = if k % 3 == 0 {
            len * k / 24
        } else {
            len.saturating_sub(1 + (k * 997) % len.min(48 * 1024))
        };
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        let db = dir.path().join("sled/db");
        let mut bytes = std::fs::read(&db).unwrap();
        bytes[at as usize] ^= 0x10;
        std::fs::write(&db, bytes).unwrap();
        let opened = std::panic::catch_unwind(|| Store::open(dir.path()))
            .unwrap_or_else(|_| panic!("opening sled with byte {at} flipped panicked"));
        match opened {
            Ok(store) => {
                let v = stored_vote(&store).await;
                assert_eq!(
                    v,
                    Some(Vote::new(VOTES, VOTES)),
                    "byte {at} flipped: opened with an older vote"
                );
                log_files::close(store);
                intact += 1;
            }
            Err(e) => {
                assert!(
                    e.to_string().contains(REMEDY),
                    "byte {at} flipped: refused without the remedy: {e}"
                );
                refused += 1;
            }
        }
    }
    eprintln!("flipped bytes: {intact} opened intact, {refused} refused");
    assert!(
        refused > 0,
        "no flipped byte was noticed: the test hit nothing"
    );
}
