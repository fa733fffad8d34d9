//! What opening the Raft log does with a damaged last segment: a torn tail
//! (a write that never finished, so never acknowledged) is cut off and the
//! node starts, also one of many records with a hole in its middle and
//! whole records after it; damage with acknowledged records after it is refused, the
//! file left as it was, and `idemkv serve` exits saying what to do. Also:
//! every segment kept is fsynced at open, before anything is acknowledged.
//! And a commit point stored beyond a cut tail is not reported.
mod support;
use support::procs;
mod log_files;
use std::path::{Path, PathBuf};
use std::time::Duration;

use idemkv::raft::TypeConfig;
use idemkv::store::Store;
use log_files::{append, close, entry, records, records_end, without_room};
use openraft::storage::RaftLogStorage;
use openraft::testing::log_id;
use openraft::RaftLogReader;

/// A data directory whose log holds entries 1..=10 (acknowledged), in one
/// segment; returns that segment's path.
async fn ten_entries(dir: &Path) -> PathBuf {
    let mut store = Store::open(dir).unwrap();
    append(&mut store.log, (1..=10).map(|i| entry(i, 1)).collect()).await;
    let segs = store.log.segment_files();
    assert_eq!(segs.len(), 1, "{segs:?}");
    close(store);
    // Without the zero-filled room: byte for byte what the segment holds
    // (tests of the room are below).
    without_room(&segs[0]);
    segs[0].clone()
}

async fn all_indexes(store: &mut Store) -> Vec<u64> {
    let state = store.log.get_log_state().await.unwrap();
    let last = state.last_log_id.map_or(0, |l| l.index);
    let got = store.log.try_get_log_entries(1..=last).await.unwrap();
    assert_eq!(got, (1..=last).map(|i| entry(i, 1)).collect::<Vec<_>>());
    got.iter().map(|e| e.log_id.index).collect()
}

/// Open must refuse, with an error an operator can act on, and leave the
/// segment byte for byte as it was.
fn assert_refused(dir: &Path, seg: &Path, offset: usize, index: u64, after: usize) -> String {
    let before = std::fs::read(seg).unwrap();
    let err = Store::open(dir)
        .err()
        .expect("a log with acknowledged entries after damage must not open");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    let msg = err.to_string();
    for part in [
        seg.display().to_string(),
        format!("byte {offset}"),
        format!("entry {index}"),
        format!("{after} valid records after it"),
        "backup".to_string(),
        "new member".to_string(),
    ] {
        assert!(msg.contains(&part), "{part:?} missing from: {msg}");
    }
    assert_eq!(
        std::fs::read(seg).unwrap(),
        before,
        "the segment was changed"
    );
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_mid_segment_refuses_to_open_and_cuts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let seg = ten_entries(dir.path()).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    let recs = records(&bytes);
    assert_eq!(recs.len(), 10);
    let (at, len) = recs[2];
    bytes[at + len / 2] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    assert_refused(dir.path(), &seg, at, 3, 7);
    // Still refused the second time: nothing was cut meanwhile.
    assert_refused(dir.path(), &seg, at, 3, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_field_mid_segment_refuses_to_open_and_cuts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let seg = ten_entries(dir.path()).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, _) = records(&bytes)[2];
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();

    assert_refused(dir.path(), &seg, at, 3, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_the_last_record_with_a_torn_write_after_it_is_cut() {
    // Nothing valid follows the bad record: still a torn tail.
    let dir = tempfile::tempdir().unwrap();
    let seg = ten_entries(dir.path()).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, _) = records(&bytes)[9];
    bytes[at + 20] ^= 0x01;
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&seg, &bytes).unwrap();

    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(all_indexes(&mut store).await, (1..=9).collect::<Vec<_>>());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), at as u64);
    close(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tails_are_cut_and_every_entry_before_them_kept() {
    let dir = tempfile::tempdir().unwrap();
    let seg = ten_entries(dir.path()).await;
    let whole = std::fs::read(&seg).unwrap();
    let (third, third_len) = records(&whole)[2];
    // Bytes that look like no record: a fixed pseudo-random sequence.
    let mut x: u32 = 0x9E37_79B9;
    let garbage: Vec<u8> = (0..3000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    // A record of entry 11 that was being written when the node died.
    let mut store = Store::open(dir.path()).unwrap();
    append(&mut store.log, vec![entry(11, 1)]).await;
    close(store);
    let with_11 = std::fs::read(&seg).unwrap();
    let record_11 = with_11[whole.len()..records_end(&with_11)].to_vec();
    std::fs::write(&seg, &whole).unwrap();

    let tails: Vec<(&str, Vec<u8>)> = vec![
        ("zeros", vec![0u8; 4096]),
        ("garbage", garbage),
        ("half a record", record_11[..record_11.len() / 2].to_vec()),
        ("a header alone", record_11[..8].to_vec()),
        ("three bytes", record_11[..3].to_vec()),
        // A whole old record (entry 3) after a torn one, say from a reused
        // disk block: its index does not belong after entry 10.
        (
            "a stale old record",
            [
                &record_11[..20],
                &whole[third..third + third_len],
                &[0u8; 100][..],
            ]
            .concat(),
        ),
    ];
    for (what, tail) in tails {
        std::fs::write(&seg, [&whole[..], &tail[..]].concat()).unwrap();
        let mut store = Store::open(dir.path())
            .unwrap_or_else(|e| panic!("{what}: a torn tail must not stop the node: {e}"));
        assert_eq!(
            all_indexes(&mut store).await,
            (1..=10).collect::<Vec<_>>(),
            "{what}"
        );
        // Zeros alone are what the zero-filled room looks like: kept.
        let kept = match what {
            "zeros" => [&whole[..], &tail[..]].concat(),
            _ => whole.clone(),
        };
        assert_eq!(std::fs::read(&seg).unwrap(), kept, "{what}: not cut back");
        close(store);
    }

    // And the log goes on after the cut.
    let mut store = Store::open(dir.path()).unwrap();
    append(&mut store.log, vec![entry(11, 1)]).await;
    close(store);
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(all_indexes(&mut store).await, (1..=11).collect::<Vec<_>>());
    close(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_non_zero_with_the_whole_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-1");
    let seg = ten_entries(&data).await;
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, len) = records(&bytes)[2];
    bytes[at + len / 2] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let child = std::process::Command::new(procs::BIN)
        .args(["serve", "--id", "1"])
        .args(["--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("idemkv serve started on a damaged log");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    for part in [
        seg.display().to_string(),
        format!("byte {at}"),
        "entry 3".to_string(),
        "7 valid records after it".to_string(),
        "backup".to_string(),
    ] {
        assert!(stderr.contains(&part), "{part:?} missing from: {stderr}");
    }
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "the segment was changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_segment_kept_is_fsynced_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with_segment_bytes(dir.path(), 1024).unwrap();
    assert_eq!(store.log.synced_at_open(), 0, "a new log has no segment");
    let mut log = store.log.clone();
    for i in 1..=40 {
        append(&mut log, vec![entry(i, 1)]).await;
    }
    drop(log);
    close(store);

    let mut store = Store::open_with_segment_bytes(dir.path(), 1024).unwrap();
    let segs = store.log.segment_files();
    assert!(segs.len() > 2, "segments: {segs:?}");
    assert_eq!(store.log.synced_at_open(), segs.len());
    // A purge drops whole segments; the next open syncs those left.
    store
        .log
        .purge(log_id::<TypeConfig>(1, 1, 20))
        .await
        .unwrap();
    close(store);

    // With a torn tail on the last segment, which is cut and synced too.
    let last = segs.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    bytes.extend_from_slice(&[0xAB; 300]);
    std::fs::write(last, &bytes).unwrap();
    let mut store = Store::open_with_segment_bytes(dir.path(), 1024).unwrap();
    let kept = store.log.segment_files();
    assert!(
        kept.len() < segs.len(),
        "purge removed no segment: {kept:?}"
    );
    assert_eq!(store.log.synced_at_open(), kept.len());
    assert_eq!(
        all_indexes_from(&mut store, 21).await,
        (21..=40).collect::<Vec<_>>()
    );
    close(store);
}

async fn all_indexes_from(store: &mut Store, from: u64) -> Vec<u64> {
    let got = store
        .log
        .try_get_log_entries(from..=u64::MAX)
        .await
        .unwrap();
    assert_eq!(
        got,
        (from..from + got.len() as u64)
            .map(|i| entry(i, 1))
            .collect::<Vec<_>>()
    );
    got.iter().map(|e| e.log_id.index).collect()
}

/// A follower learns that entries are committed before its own fsync of
/// them returns, and its commit point (a hint, in sled) can reach the disk
/// through another sled flush. If its log then loses its tail (a torn
/// write, or a flipped bit that looks like one), the stored commit point
/// lies beyond the log, and Raft at start tries to apply entries that are
/// gone ("raft start: when Read LogIndex(n)", found by the robustness
/// suite's log-damage nemesis: the node never started again). The log must
/// never report a commit point it does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_point_beyond_a_cut_tail_is_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let seg = ten_entries(dir.path()).await;
    {
        let mut store = Store::open(dir.path()).unwrap();
        let ten = log_id::<TypeConfig>(1, 1, 10);
        store.log.save_committed(Some(ten)).await.unwrap();
        assert_eq!(store.log.read_committed().await.unwrap(), Some(ten));
        close(store);
    }
    let mut bytes = std::fs::read(&seg).unwrap();
    let (at, len) = *records(&bytes).last().expect("a record");
    bytes[at + len - 1] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let mut store = Store::open(dir.path()).unwrap();
    // The fault took effect: entry 10 was cut.
    assert_eq!(all_indexes(&mut store).await, (1..=9).collect::<Vec<_>>());
    let committed = store.log.read_committed().await.unwrap();
    assert_eq!(
        committed,
        Some(log_id::<TypeConfig>(1, 1, 9)),
        "the commit point must not lie beyond the log"
    );
}

/// Entries 1..=10 in one segment with the zero-filled room after them, as
/// the log leaves it; the segment's path and bytes.
async fn ten_entries_with_room(dir: &Path) -> (PathBuf, Vec<u8>) {
    with_room(dir, (1..=10).map(|i| entry(i, 1)).collect()).await
}

/// `entries` (1..=10) appended, with the zero-filled room after them.
async fn with_room(dir: &Path, entries: Vec<idemkv::raft::Entry>) -> (PathBuf, Vec<u8>) {
    let mut store = Store::open(dir).unwrap();
    append(&mut store.log, entries).await;
    let seg = store.log.segment_files()[0].clone();
    close(store);
    let bytes = std::fs::read(&seg).unwrap();
    let end = records_end(&bytes);
    assert_eq!(records(&bytes).len(), 10);
    assert!(bytes.len() > end, "no zero-filled room after the records");
    assert!(bytes[end..].iter().all(|&b| b == 0));
    (seg, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zero_filled_room_is_kept_and_appends_go_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, bytes) = ten_entries_with_room(dir.path()).await;
    let end = records_end(&bytes);

    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(all_indexes(&mut store).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        store.log.rejoin().until(),
        None,
        "the room taken for damage"
    );
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "the room was cut");
    append(&mut store.log, vec![entry(11, 1)]).await;
    close(store);

    let after = std::fs::read(&seg).unwrap();
    assert_eq!(
        after.len(),
        bytes.len(),
        "the append did not go into the room"
    );
    assert_eq!(&after[..end], &bytes[..end]);
    assert_eq!(records(&after).len(), 11);
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(all_indexes(&mut store).await, (1..=11).collect::<Vec<_>>());
    close(store);
}

/// A crash during an append into the room: the disk got the sectors up to
/// one inside a record and none after, so the record is as long as its
/// length field says (zeros follow) but its end is zeros. Never
/// acknowledged: cut as a torn write, and the node keeps its vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cut_short_in_the_room_is_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = ten_entries_with_room(dir.path()).await;
    let recs = records(&bytes);
    // The last record that a sector boundary runs through.
    let (k, &(at, len)) = recs
        .iter()
        .enumerate()
        .rev()
        .find(|(_, (at, len))| (at / 512 + 1) * 512 < at + len)
        .expect("a record across a sector boundary");
    let boundary = (at / 512 + 1) * 512;
    bytes[boundary..].fill(0);
    std::fs::write(&seg, &bytes).unwrap();

    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(
        all_indexes(&mut store).await,
        (1..=k as u64).collect::<Vec<_>>(),
        "entry {} (bytes {at}..{}) was not cut",
        k + 1,
        at + len
    );
    assert_eq!(
        store.log.rejoin().until(),
        None,
        "a torn write was taken for a damaged acknowledged record"
    );
    close(store);
}

/// Damage to the last record, with the room after it, is no torn write:
/// the record may have been acknowledged, so the node must get it back
/// before it votes again. Both a flipped payload byte and a length field
/// that now points into the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_the_last_record_before_the_room_is_not_taken_for_a_torn_write() {
    type Damage = fn(&mut [u8], usize, usize);
    let flip: Damage = |b, at, len| b[at + len / 2] ^= 0x10;
    let long: Damage = |b, at, len| {
        let field = ((len - 9 + 600) as u32) | (1 << 31);
        b[at..at + 4].copy_from_slice(&field.to_le_bytes());
    };
    for (what, damage) in [("a flipped byte", flip), ("a length into the room", long)] {
        let dir = tempfile::tempdir().unwrap();
        let (seg, mut bytes) = ten_entries_with_room(dir.path()).await;
        let (at, len) = *records(&bytes).last().unwrap();
        damage(&mut bytes, at, len);
        std::fs::write(&seg, &bytes).unwrap();

        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(
            all_indexes(&mut store).await,
            (1..=9).collect::<Vec<_>>(),
            "{what}: the damaged record was not cut"
        );
        assert_eq!(
            store.log.rejoin().until(),
            Some(10),
            "{what}: taken for a torn write"
        );
        close(store);
    }
}

/// Entries 1..=10 durable with the room after them, then `more` appended
/// in one write (one `pwrite`, one sync); the segment and its bytes.
async fn one_write_after_ten(dir: &Path, more: Vec<idemkv::raft::Entry>) -> (PathBuf, Vec<u8>) {
    let (seg, _) = ten_entries_with_room(dir).await;
    let mut store = Store::open(dir).unwrap();
    append(&mut store.log, more).await;
    close(store);
    let bytes = std::fs::read(&seg).unwrap();
    (seg, bytes)
}

/// Open a log whose last write lost the sector at `lost` (the disk got
/// the write's sectors after it but not that one): the node starts with
/// every entry before the first record that sector touched, keeps its
/// vote, and the file ends there.
async fn assert_torn_write_cut(
    dir: &Path,
    seg: &Path,
    mut bytes: Vec<u8>,
    lost: usize,
    what: &str,
) {
    let recs = records(&bytes);
    let kept = recs.iter().take_while(|(at, len)| at + len <= lost).count();
    // The fault is the one meant: a sector inside the write lost, and
    // whole records of the same write after it.
    assert!(kept >= 10, "{what}: sector {lost} is not in the last write");
    let after = recs.iter().filter(|(at, _)| *at >= lost + 512).count();
    assert!(
        after > 0,
        "{what}: no record of the write after sector {lost}"
    );
    bytes[lost..lost + 512].fill(0);
    std::fs::write(seg, &bytes).unwrap();

    let mut store = Store::open(dir).unwrap_or_else(|e| panic!("{what}: refused: {e}"));
    assert_eq!(
        all_indexes(&mut store).await,
        (1..=kept as u64).collect::<Vec<_>>(),
        "{what}"
    );
    assert_eq!(
        store.log.rejoin().until(),
        None,
        "{what}: a torn write was taken for damaged acknowledged records"
    );
    assert_eq!(records(&std::fs::read(seg).unwrap()).len(), kept, "{what}");
    // The log goes on from there.
    append(&mut store.log, vec![entry(kept as u64 + 1, 1)]).await;
    close(store);
    let mut store = Store::open(dir).unwrap();
    assert_eq!(all_indexes(&mut store).await.len(), kept + 1, "{what}");
    close(store);
}

/// A crash during one append of many records: a disk writes a request's
/// sectors in any order, so a later part of it can be on disk and an
/// earlier one not. That write was never acknowledged (its sync never
/// finished), so it is cut whole, though whole records of it follow the
/// hole, and the node starts and votes. Every sector of the write that
/// leaves records after it is tried as the lost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_many_records_torn_in_its_middle_is_cut_and_the_node_votes() {
    let probe = tempfile::tempdir().unwrap();
    let (_, written) =
        one_write_after_ten(probe.path(), (11..=40).map(|i| entry(i, 1)).collect()).await;
    let recs = records(&written);
    assert_eq!(recs.len(), 40);
    let first = recs[10].0.div_ceil(512) * 512;
    let last_start = recs[39].0;
    let mut tried = 0;
    for lost in (first..last_start.saturating_sub(512)).step_by(512) {
        let dir = tempfile::tempdir().unwrap();
        let (seg, bytes) =
            one_write_after_ten(dir.path(), (11..=40).map(|i| entry(i, 1)).collect()).await;
        assert_eq!(bytes, written, "the same write every time");
        assert_torn_write_cut(dir.path(), &seg, bytes, lost, &format!("sector at {lost}")).await;
        tried += 1;
    }
    assert!(tried >= 5, "only {tried} sectors tried");
}

/// A large record with a sector of zeros inside and valid records after
/// it is not taken for a torn write, for a result may hold zeros: a
/// record torn only in its middle (header and end byte on disk) and a
/// damaged one holding zeros (one flipped bit) look alike, and the second
/// may have been acknowledged. Both refused, the file left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_record_with_zeros_inside_and_records_after_is_refused() {
    type Fault = fn(&mut [u8], usize, usize);
    let torn_in_middle: Fault = |b, at, _| {
        let lost = (at + 1024).div_ceil(512) * 512;
        b[lost..lost + 512].fill(0);
    };
    let flipped: Fault = |b, at, len| b[at + len - 20] ^= 0x01;
    for (what, result, fault) in [
        ("torn in its middle", vec![0x5A; 4000], torn_in_middle),
        ("zeros and a flipped bit", vec![0; 4000], flipped),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut entries: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        entries[2] = log_files::entry_with_result(3, 1, result);
        let (seg, mut bytes) = with_room(dir.path(), entries).await;
        let (at, len) = records(&bytes)[2];
        assert!(len > 4000, "{what}: entry 3 is {len} bytes");
        fault(&mut bytes, at, len);
        std::fs::write(&seg, &bytes).unwrap();
        // The fault took effect: entry 3 no longer reads.
        assert_eq!(records(&bytes).len(), 2, "{what}");
        assert_refused(dir.path(), &seg, at, 3, 7);
    }
}

/// A length field damaged to a smaller value, its false end inside a run
/// of zeros of the record's own result, with valid records after: what
/// lies between the header and the next valid record is the payload its
/// checksum names, so only the length was hit and it is no torn write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_cut_short_into_zeros_of_its_own_result_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
    entries[2] = log_files::entry_with_result(3, 1, vec![0; 4000]);
    let (seg, mut bytes) = with_room(dir.path(), entries).await;
    let (at, len) = records(&bytes)[2];
    // A false end two sectors into the zeros: its end byte reads 0 there,
    // in a sector of zeros, as a torn write's would.
    let false_end = (at + 2048).div_ceil(512) * 512 + 100;
    assert!(false_end < at + len - 600);
    assert!(bytes[false_end - 1 - 100..false_end - 1 + 412]
        .iter()
        .all(|&b| b == 0));
    let field = ((false_end - at - 9) as u32) | (1 << 31);
    bytes[at..at + 4].copy_from_slice(&field.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();

    assert_refused(dir.path(), &seg, at, 3, 7);
}

/// A length field damaged so that its record seems to reach into the
/// zero-filled room is no torn write, though zeros lie inside what it
/// claims: valid records lie inside it too. Those may have been
/// acknowledged, so the log is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_reaching_over_valid_records_into_the_room_is_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, mut bytes) = ten_entries_with_room(dir.path()).await;
    let recs = records(&bytes);
    let (at, _) = recs[2];
    let end = records_end(&bytes);
    let field = ((end - at - 9 + 2048) as u32) | (1 << 31);
    bytes[at..at + 4].copy_from_slice(&field.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();

    assert_refused(dir.path(), &seg, at, 3, 7);
}
