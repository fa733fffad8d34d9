//! The Raft log's own segment files: what survives a torn write, damage,
//! segment rolling, purge, truncation and reopening.
use std::io::Write;
use std::path::Path;

mod log_files;

use idemkv::raft::{Entry, TypeConfig};
use idemkv::store::{LogStore, Store};
use log_files::{append, close, entry};
use openraft::storage::RaftLogStorage;
use openraft::testing::log_id;
use openraft::RaftLogReader;

async fn indexes(log: &mut LogStore, range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    log.try_get_log_entries(range)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_write_at_the_end_is_cut_off_and_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    append(&mut store.log, (1..=10).map(|i| entry(i, 1)).collect()).await;
    close(store);

    // A crash in the middle of a write: a header promising 300 bytes, and 12.
    let seg = last_segment(dir.path());
    let len_before = log_files::without_room(&seg).len() as u64;
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&300u32.to_le_bytes()).unwrap();
    f.write_all(&[0xAB; 16]).unwrap();
    drop(f);

    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len_before);
    let state = store.log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(10));
    assert_eq!(
        indexes(&mut store.log, 1..=10).await,
        (1..=10).collect::<Vec<_>>()
    );
    append(&mut store.log, vec![entry(11, 1)]).await;
    close(store);

    let mut store = Store::open(dir.path()).unwrap();
    let got = store.log.try_get_log_entries(1..=11).await.unwrap();
    assert_eq!(got.len(), 11);
    assert_eq!(got[10], entry(11, 1));
    close(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_the_last_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with_segment_bytes(dir.path(), 1024).unwrap();
    for i in 1..=40 {
        append(&mut store.log, vec![entry(i, 1)]).await;
    }
    let segs = store.log.segment_files();
    assert!(segs.len() > 2, "segments: {segs:?}");
    close(store);

    // Flip a byte inside the first record of the first segment.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[20] ^= 0xFF;
    std::fs::write(&segs[0], bytes).unwrap();
    let err = Store::open_with_segment_bytes(dir.path(), 1024)
        .err()
        .expect("a damaged log must not open");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_purge_truncate_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with_segment_bytes(dir.path(), 2048).unwrap();
    for batch in 0..20 {
        let from = batch * 10 + 1;
        append(
            &mut store.log,
            (from..from + 10).map(|i| entry(i, 1)).collect(),
        )
        .await;
    }
    let before = store.log.segment_files().len();
    assert!(before > 5, "expected many segments, got {before}");

    // Purge: entries up to 100 are gone, whole segments with them.
    store
        .log
        .purge(log_id::<TypeConfig>(1, 1, 100))
        .await
        .unwrap();
    let after_purge = store.log.segment_files();
    assert!(after_purge.len() < before);
    assert_eq!(
        indexes(&mut store.log, 1..=200).await,
        (101..=200).collect::<Vec<_>>()
    );

    // Truncate: 151.. go (a new leader's conflicting suffix), then a
    // different term's entries take their place.
    store
        .log
        .truncate_after(Some(log_id::<TypeConfig>(1, 1, 150)))
        .await
        .unwrap();
    assert_eq!(
        indexes(&mut store.log, 1..=200).await,
        (101..=150).collect::<Vec<_>>()
    );
    append(&mut store.log, (151..=160).map(|i| entry(i, 2)).collect()).await;
    close(store);

    let mut store = Store::open_with_segment_bytes(dir.path(), 2048).unwrap();
    let state = store.log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(100));
    assert_eq!(state.last_log_id, Some(log_id::<TypeConfig>(2, 1, 160)));
    let got = store.log.try_get_log_entries(101..=160).await.unwrap();
    let want: Vec<Entry> = (101..=150)
        .map(|i| entry(i, 1))
        .chain((151..=160).map(|i| entry(i, 2)))
        .collect();
    assert_eq!(got, want);
    // No segment file holds only purged entries any more.
    let names: Vec<u64> = store
        .log
        .segment_files()
        .iter()
        .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    assert!(names.windows(2).all(|w| w[1] > 100), "segments: {names:?}");
    close(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_purged_past_its_end_starts_again_after_the_purge_point() {
    // A follower that installed a snapshot newer than its whole log.
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    append(&mut store.log, (1..=5).map(|i| entry(i, 1)).collect()).await;
    store
        .log
        .purge(log_id::<TypeConfig>(3, 1, 500))
        .await
        .unwrap();
    let state = store.log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(500));
    append(&mut store.log, vec![entry(501, 3)]).await;
    close(store);

    let mut store = Store::open(dir.path()).unwrap();
    let state = store.log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id::<TypeConfig>(3, 1, 501)));
    assert_eq!(indexes(&mut store.log, 0..=600).await, vec![501]);
    close(store);
}

/// Segments written before records had an end byte (`[len][crc][payload]`,
/// the length's high bit clear) open as they are, and appends after them
/// go on in the current form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_written_before_the_end_byte_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    append(&mut store.log, (1..=10).map(|i| entry(i, 1)).collect()).await;
    close(store);

    // The same records in the old form, and no zero-filled room.
    let seg = last_segment(dir.path());
    let bytes = std::fs::read(&seg).unwrap();
    let mut old = Vec::new();
    for (at, len) in log_files::records(&bytes) {
        let mut record = bytes[at..at + len - 1].to_vec();
        record[3] &= 0x7F;
        old.extend_from_slice(&record);
    }
    std::fs::write(&seg, &old).unwrap();
    assert!(log_files::records(&old).len() == 10, "not read as records");

    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(
        indexes(&mut store.log, 1..=10).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        old,
        "the old records were changed"
    );
    append(&mut store.log, vec![entry(11, 1)]).await;
    close(store);

    let mut store = Store::open(dir.path()).unwrap();
    let got = store.log.try_get_log_entries(1..=11).await.unwrap();
    assert_eq!(got, (1..=11).map(|i| entry(i, 1)).collect::<Vec<_>>());
    close(store);
}

/// The leader's log encodes an entry once: an AppendEntries message takes
/// the bytes the log wrote (`raft::network::encode_append`), and is byte
/// for byte what encoding the whole message gives, so followers of any
/// build decode it. An entry the log does not hold (another leader's at
/// the same index, or one not written yet) is encoded afresh.
#[tokio::test]
async fn an_append_message_carries_the_bytes_the_log_wrote() {
    use idemkv::codec::{decode, encode};
    use idemkv::raft::network::encode_append;
    use idemkv::raft::types::{AppendEntriesRequest, Vote};
    use openraft::EntryPayload;
    use std::collections::{BTreeMap, BTreeSet};

    let dir = tempfile::tempdir().unwrap();
    let mut log = Store::open(dir.path()).unwrap().log;
    log.set_node_id(1);
    let member = idemkv::raft::types::PeerNode {
        api_addr: "a:1".into(),
        raft_addr: "a:2".into(),
    };
    let membership =
        openraft::Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, member)]))
            .unwrap();
    let mut written = vec![
        Entry {
            log_id: log_id::<TypeConfig>(1, 1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id::<TypeConfig>(1, 1, 2),
            payload: EntryPayload::Membership(membership),
        },
    ];
    written.extend([entry(3, 1), entry(4, 1)]);
    append(&mut log, written.clone()).await;
    let encoded = log.encodings();

    // Entries 2..=4 as the log has them, then 5, which it has not.
    let mut entries = written[1..].to_vec();
    entries.push(entry(5, 1));
    let rpc = AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(log_id::<TypeConfig>(1, 1, 1)),
        entries,
        leader_commit: Some(log_id::<TypeConfig>(1, 1, 2)),
    };
    let hits = encoded.hits();
    let bytes = encode_append(&rpc, &encoded).unwrap();
    assert_eq!(encoded.hits() - hits, 3, "entries 2..=4 taken as written");
    assert_eq!(bytes, encode(&rpc).unwrap());
    let back: AppendEntriesRequest = decode(&bytes).unwrap();
    assert_eq!(back.entries, rpc.entries);

    // Another leader's entry 3 is not the one the log holds.
    let other = AppendEntriesRequest {
        vote: Vote::new_committed(2, 1),
        prev_log_id: Some(log_id::<TypeConfig>(1, 1, 2)),
        entries: vec![entry(3, 2)],
        leader_commit: None,
    };
    let hits = encoded.hits();
    assert_eq!(
        encode_append(&other, &encoded).unwrap(),
        encode(&other).unwrap()
    );
    assert_eq!(encoded.hits(), hits);

    // A heartbeat: no entries.
    let beat = AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(log_id::<TypeConfig>(1, 1, 4)),
        entries: Vec::new(),
        leader_commit: Some(log_id::<TypeConfig>(1, 1, 4)),
    };
    assert_eq!(
        encode_append(&beat, &encoded).unwrap(),
        encode(&beat).unwrap()
    );
    log.close();
}
