//! A follower whose last *acknowledged* log record is damaged on disk (a
//! flipped byte, found at restart). The record is whole, so it is not a
//! torn write: the node may have acknowledged it, and the leader may have
//! counted that acknowledgement toward a commit. The node cuts it to start,
//! but must then behave as a node that lost data (protocol-aware recovery):
//! - it neither campaigns nor votes until it holds that entry again, since
//!   with another node that never had the entry it would form a majority
//!   that elects a leader without an acknowledged write;
//! - the leader, whose progress says the follower holds the entry, must
//!   start replicating to it again instead of waiting for ever.
//!
//! The follower's state machine must not hold the entry either (else the
//! node still holds it, applied): each test rolls the follower's sled
//! directory back to a copy taken before the write, which is what a kill
//! or power loss does to applies sled had not flushed yet. Each test first
//! proves the damage took effect: opened on its own, the follower's log
//! ends one entry short of what it acknowledged, and it says so.
mod support;
use std::path::{Path, PathBuf};
mod log_files;
use std::time::Duration;
use support::inproc;

use idemkv::pb::api;
use idemkv::store::{log_record_spans, Store};
use inproc::{acquired, claim_req, TestCluster};
use openraft::storage::RaftLogStorage;
use openraft::RaftLogReader;

fn last_segment(node_dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(node_dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs.pop().expect("a log segment")
}

/// Flip one byte in the middle of the payload of the last record of the
/// node's log, and return the index of the last entry before it.
async fn damage_last_record(node_dir: &Path) -> u64 {
    let seg = last_segment(node_dir);
    let last_before = log_last_index(node_dir).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, len) = *log_record_spans(&bytes).last().expect("a record");
    bytes[at + 8 + (len - 9) / 2] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();

    // The fault took effect: opened now, the log has lost that entry.
    let mut store = Store::open(node_dir).unwrap();
    let after = store
        .log
        .get_log_state()
        .await
        .unwrap()
        .last_log_id
        .map_or(0, |l| l.index);
    let rejoin = store.log.rejoin().until();
    close(store);
    assert_eq!(
        after,
        last_before - 1,
        "the damaged record was not cut: the fault did not take effect"
    );
    assert_eq!(
        rejoin,
        Some(after + 1),
        "the cut was taken for a torn write"
    );
    after
}

/// The index of a segment's first entry, from its file name.
fn segment_first(seg: &Path) -> u64 {
    seg.file_stem().unwrap().to_string_lossy().parse().unwrap()
}

/// The last index of a stopped node's log, read without opening the store
/// (which would cut): the records of the last segment.
async fn log_last_index(node_dir: &Path) -> u64 {
    let seg = last_segment(node_dir);
    let first = segment_first(&seg);
    let bytes = std::fs::read(&seg).unwrap();
    first + log_record_spans(&bytes).len() as u64 - 1
}

fn close(store: Store) {
    store.log.close();
    store.syncer.close();
    drop(store);
}

fn copy_dir(from: &Path, to: &Path) {
    idemkv::store::test_hooks::copy_dir(from, to).unwrap();
}

/// Stop node `id`, keep a copy of its sled directory, start it again.
async fn copy_sled(c: &mut TestCluster, id: u64) -> PathBuf {
    c.stop(id).await;
    let copy = c.dir.path().join(format!("sled-copy-{id}"));
    copy_dir(&node_dir(c, id).join("sled"), &copy);
    c.restart(id).await;
    copy
}

/// Stop node `id`, roll its sled back to `copy`, damage its last record.
/// Returns the last index its log keeps.
async fn stop_and_damage(c: &mut TestCluster, id: u64, copy: &Path) -> u64 {
    c.stop(id).await;
    let sled = node_dir(c, id).join("sled");
    std::fs::remove_dir_all(&sled).unwrap();
    copy_dir(copy, &sled);
    damage_last_record(&node_dir(c, id)).await
}

/// Wait until follower `id` holds everything the leader's log does.
async fn caught_up(c: &TestCluster, leader: u64, id: u64) {
    let want = c.node(leader).consensus().status().last_log_index;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.node(id).consensus().status().last_log_index < want {
        assert!(tokio::time::Instant::now() < deadline, "node {id} lags");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn node_dir(c: &TestCluster, id: u64) -> PathBuf {
    c.dir.path().join(format!("n{id}"))
}

fn get(key: &str) -> api::GetRequest {
    api::GetRequest {
        namespace: "dmg".into(),
        key: key.as_bytes().to_vec(),
        consistency: api::Consistency::Linearizable as i32,
    }
}

/// Claim and complete `key`; both acknowledged.
async fn write_completed(c: &TestCluster, leader: u64, key: &str) {
    let client = c.client_of(leader);
    let a = acquired(
        client
            .claim(claim_req("dmg", key, "w", 60_000))
            .await
            .expect("claim acknowledged"),
    );
    client
        .complete(api::CompleteRequest {
            namespace: "dmg".into(),
            key: key.as_bytes().to_vec(),
            token: a.token,
            result: format!("result of {key}").into_bytes(),
            ..Default::default()
        })
        .await
        .expect("complete acknowledged");
}

fn followers(leader: u64) -> (u64, u64) {
    let f: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    (f[0], f[1])
}

/// The follower comes back short of an entry it acknowledged while the
/// other follower is down: the leader must replicate to it again, so the
/// cluster (leader + this follower) goes on committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_replicates_again_to_a_follower_that_cut_an_acknowledged_record() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let (damaged, down) = followers(leader);
    c.stop(down).await;
    let copy = copy_sled(&mut c, damaged).await;
    write_completed(&c, leader, "before").await;
    caught_up(&c, leader, damaged).await;

    stop_and_damage(&mut c, damaged, &copy).await;
    c.restart(damaged).await;

    // Only the leader and the damaged follower are up: a write commits
    // only if the leader replicates to it again.
    tokio::time::timeout(
        Duration::from_secs(20),
        write_completed(&c, leader, "after"),
    )
    .await
    .expect("the cluster committed nothing after the follower came back short");
    for key in ["before", "after"] {
        let rec = c.client_of(leader).get(get(key)).await.unwrap();
        assert_eq!(
            rec.map(|r| r.state),
            Some(api::RecordState::Completed as i32),
            "{key}"
        );
    }
    c.shutdown().await;
}

/// The write was acknowledged by the leader and one follower only; that
/// follower's copy is then damaged and the leader goes down. The damaged
/// follower and the one that never had the write are a majority, but must
/// not elect a leader: it would lack an acknowledged write. Once the old
/// leader is back, the write is there and the damaged node votes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cut_an_acknowledged_record_does_not_vote_until_it_has_it_again() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let (damaged, lagging) = followers(leader);
    c.stop(lagging).await;
    let copy = copy_sled(&mut c, damaged).await;
    let term = c.node(leader).consensus().status().term;
    write_completed(&c, leader, "acked").await;
    caught_up(&c, leader, damaged).await;
    assert_eq!(
        c.node(leader).consensus().status().term,
        term,
        "an election since the sled copy: the copy's vote would be stale"
    );

    c.stop(leader).await;
    let kept = stop_and_damage(&mut c, damaged, &copy).await;
    c.restart(damaged).await;
    c.restart(lagging).await;

    // Many election timeouts (400–800 ms) pass without a leader.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < quiet_until {
        for id in [damaged, lagging] {
            let s = c.node(id).consensus().status();
            assert!(
                s.leader.is_none() || s.leader.as_ref().map(|l| l.0) == Some(leader),
                "node {id} sees leader {:?} elected without the acknowledged write \
                 (the damaged node's log ends at {})",
                s.leader.map(|l| l.0),
                s.last_log_index
            );
        }
        let rejoin = c.node(damaged).consensus().status().rejoin_until;
        assert_eq!(
            rejoin,
            Some(kept + 1),
            "the damaged node does not say what it waits for"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    c.restart(leader).await;
    c.wait_leader(Duration::from_secs(20)).await;
    let rec = c
        .client()
        .get(get("acked"))
        .await
        .unwrap()
        .expect("the acknowledged write is there");
    assert_eq!(rec.state, api::RecordState::Completed as i32);
    assert_eq!(rec.result, b"result of acked");

    // The damaged node has the entry again and votes again: with the
    // leader down, the two others elect one of themselves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.node(damaged).consensus().status().rejoin_until.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the damaged node never rejoined: {:?}",
            c.node(damaged).consensus().status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.node(damaged).consensus().status().last_log_index > kept);
    let old = c.wait_leader(Duration::from_secs(10)).await;
    c.stop(old).await;
    let new = c.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(new, old);
    let rec = c.client().get(get("acked")).await.unwrap().expect("kept");
    assert_eq!(rec.result, b"result of acked");
    c.shutdown().await;
}

/// The leader's newest entry is on both followers (committed, acknowledged)
/// but a power cut takes it from the leader's own log before its fsync
/// finished (and from its state machine: sled is rolled back to a copy
/// from before the write). Restarted at once, before the followers'
/// election timeouts, it must not go on leading in its old term: its next
/// entry would take the lost one's log id, the followers would take it for
/// the entry they hold, and the replicas would differ for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_unsynced_tail_does_not_reuse_its_log_ids() {
    let mut c = TestCluster::start_with(3, |cfg| {
        cfg.election_timeout = (Duration::from_secs(3), Duration::from_secs(4));
    })
    .await;
    // Every node's sled as of now, taken with the cluster stopped.
    for id in 1..=3 {
        c.stop(id).await;
    }
    for id in 1..=3 {
        copy_dir(
            &node_dir(&c, id).join("sled"),
            &c.dir.path().join(format!("sled-copy-{id}")),
        );
        // What sled had made durable of the vote then, kept beside it.
        std::fs::copy(
            node_dir(&c, id).join(idemkv::store::sled_mark::FILE),
            c.dir.path().join(format!("sled-mark-{id}")),
        )
        .unwrap();
    }
    for id in 1..=3 {
        c.restart(id).await;
    }
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let copy = c.dir.path().join(format!("sled-copy-{leader}"));
    let term = c.node(leader).consensus().status().term;
    write_completed(&c, leader, "acked").await;
    let (a, b) = followers(leader);
    caught_up(&c, leader, a).await;
    caught_up(&c, leader, b).await;
    assert_eq!(c.node(leader).consensus().status().term, term);

    // The power cut: the leader's last record and its sled since the copy.
    c.stop(leader).await;
    let seg = last_segment(&node_dir(&c, leader));
    let bytes = std::fs::read(&seg).unwrap();
    let (last_at, _) = *log_record_spans(&bytes).last().expect("a record");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(last_at as u64)
        .unwrap();
    // The vote is fsynced when cast, so no power cut loses it: put the
    // current one into the rolled-back sled.
    let vote = {
        let mut st = Store::open(&node_dir(&c, leader)).unwrap();
        let v = st.log.read_vote().await.unwrap().expect("a vote");
        close(st);
        v
    };
    let sled = node_dir(&c, leader).join("sled");
    std::fs::remove_dir_all(&sled).unwrap();
    copy_dir(&copy, &sled);
    std::fs::copy(
        c.dir.path().join(format!("sled-mark-{leader}")),
        node_dir(&c, leader).join(idemkv::store::sled_mark::FILE),
    )
    .unwrap();
    {
        let mut st = Store::open(&node_dir(&c, leader)).unwrap();
        st.log.save_vote(&vote).await.unwrap();
        close(st);
    }
    c.restart(leader).await;

    // Writes go on (to whichever node leads), then every replica must
    // hold the same records, the acknowledged completion among them.
    let now = c.wait_leader(Duration::from_secs(30)).await;
    let client = c.client_of(now);
    acquired(
        client
            .claim(claim_req("dmg", "after", "w", 60_000))
            .await
            .expect("claim after the restart"),
    );
    for id in 1..=3 {
        if id != now {
            caught_up(&c, now, id).await;
        }
    }
    for key in ["acked", "after"] {
        let copies: Vec<Option<api::Record>> = {
            let mut v = Vec::new();
            for id in 1..=3 {
                let r = c
                    .client_of(id)
                    .get(api::GetRequest {
                        consistency: api::Consistency::Serializable as i32,
                        ..get(key)
                    })
                    .await
                    .unwrap();
                v.push(r);
            }
            v
        };
        assert!(
            copies.iter().all(|r| *r == copies[0]),
            "replicas differ on {key} (leader was {leader}, now {now}): {copies:#?}"
        );
    }
    let rec = c.client().get(get("acked")).await.unwrap().unwrap();
    assert_eq!(rec.state, api::RecordState::Completed as i32);
    c.shutdown().await;
}

/// A follower that died while its last write was on its way to the disk,
/// and the disk got a later part of that write but not an earlier one (a
/// disk writes a request's sectors in any order): a hole of zeros, then
/// whole records of the same write. That write was never synced, so never
/// acknowledged: the node must start, cut it whole, catch up and vote (a
/// refusal would keep the node down; a rejoin mark would keep it from
/// voting, and every node of a cluster that lost power together may hold
/// such a write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_last_write_was_torn_with_records_after_the_hole_starts_and_votes() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let (torn, other) = followers(leader);
    write_completed(&c, leader, "before").await;
    caught_up(&c, leader, torn).await;
    c.stop(torn).await;
    let kept = log_last_index(&node_dir(&c, torn)).await;
    for i in 0..8 {
        write_completed(&c, leader, &format!("while-down-{i}")).await;
    }

    // What the torn node would have written next: the leader's records
    // after `kept`, byte for byte, from where its own records end.
    let from_leader = {
        let seg = last_segment(&node_dir(&c, leader));
        let first = segment_first(&seg);
        let bytes = std::fs::read(&seg).unwrap();
        let spans = log_record_spans(&bytes);
        let (start, _) = spans[(kept + 1 - first) as usize];
        let (at, len) = *spans.last().unwrap();
        bytes[start..at + len].to_vec()
    };
    let seg = last_segment(&node_dir(&c, torn));
    let mut bytes = std::fs::read(&seg).unwrap();
    let end = log_files::records_end(&bytes);
    if bytes.len() < end + from_leader.len() {
        bytes.resize(end + from_leader.len(), 0);
    }
    bytes[end..end + from_leader.len()].copy_from_slice(&from_leader);
    // The hole: from its end to the end of that sector, and one more.
    let hole = (end / 512 + 2) * 512;
    bytes[end..hole].fill(0);
    std::fs::write(&seg, &bytes).unwrap();

    // The fault took effect: the log's records stop at `kept`, and whole
    // records of the write lie after the hole.
    assert_eq!(log_last_index(&node_dir(&c, torn)).await, kept);
    let whole_after = log_record_spans(&from_leader)
        .iter()
        .filter(|(at, _)| *at >= hole - end)
        .count();
    assert!(whole_after > 0, "no whole record after the hole");

    c.restart(torn).await;
    caught_up(&c, leader, torn).await;
    assert_eq!(
        c.node(torn).consensus().status().rejoin_until,
        None,
        "a torn write was taken for damaged acknowledged records"
    );
    // It votes: with the leader down, it and the other follower elect one
    // of themselves, which has every acknowledged write.
    c.stop(leader).await;
    let new = c.wait_leader(Duration::from_secs(20)).await;
    assert!(new == torn || new == other, "{new}");
    for key in ["before", "while-down-7"] {
        let rec = c.client_of(new).get(get(key)).await.unwrap();
        assert_eq!(
            rec.map(|r| r.state),
            Some(api::RecordState::Completed as i32),
            "{key}"
        );
    }
    c.shutdown().await;
}
