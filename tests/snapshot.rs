//! Snapshot files and installs, at the store level: a corrupt or truncated
//! snapshot is refused and changes nothing; an install is never visible
//! half-way to readers; the node reopens after either. And at the peer
//! port: an incoming snapshot stream is bounded, checked, one at a time.
mod support;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::inproc;

use futures::stream;
use idemkv::raft::{Entry, Snapshot, TypeConfig};
use idemkv::record::{Claim, Command, Op, RecordKey, Request, State};
use idemkv::store::{StateMachineStore, Store};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log_id;
use openraft::EntryPayload;

fn key(name: &str) -> RecordKey {
    RecordKey {
        namespace: "ns".into(),
        key: name.as_bytes().to_vec(),
    }
}

/// Apply `commands` as entries `next..`, in calls of 2,000; returns the
/// next free index.
async fn apply(sm: &mut StateMachineStore, mut next: u64, commands: Vec<Command>) -> u64 {
    let mut commands = commands.into_iter().peekable();
    while commands.peek().is_some() {
        let chunk: Vec<_> = commands
            .by_ref()
            .take(2_000)
            .map(|command| {
                let e = Entry {
                    log_id: log_id::<TypeConfig>(1, 1, next),
                    payload: EntryPayload::Normal(Request {
                        stamped_ms: 1_000,
                        command: command.into(),
                    }),
                };
                next += 1;
                Ok((e, None))
            })
            .collect();
        sm.apply(stream::iter(chunk)).await.expect("apply");
    }
    next
}

/// A claim of `name` by worker "w" (60 s lease, a day's retention).
fn claim(name: &str) -> Command {
    Command::Op {
        key: key(name),
        op: Op::Claim(Claim {
            owner: "w".into(),
            claim_id: "c".into(),
            lease_ms: 60_000,
            fingerprint: None,
            max_attempts: 0,
            retention_ms: 86_400_000,
        }),
    }
}

/// Claim and complete every key in `names`; returns the next free index.
async fn complete_all(sm: &mut StateMachineStore, next: u64, names: &[String]) -> u64 {
    let claims = names.iter().map(|n| claim(n)).collect();
    let next = apply(sm, next, claims).await;
    let completes = names
        .iter()
        .map(|n| {
            let token = match sm.get(&key(n)).expect("get").expect("claimed").state {
                State::InProgress { token, .. } => token,
                other => panic!("{n}: not claimed: {other:?}"),
            };
            Command::Op {
                key: key(n),
                op: Op::Complete {
                    token,
                    result: format!("result of {n}").into_bytes(),
                    code: None,
                    retention_ms: None,
                },
            }
        })
        .collect();
    apply(sm, next, completes).await
}

fn is_completed(sm: &StateMachineStore, name: &str) -> bool {
    matches!(
        sm.get(&key(name)),
        Ok(Some(r)) if matches!(r.state, State::Completed { .. })
    )
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:06}")).collect()
}

/// A store opened in `dir`, retried while the previous opening's threads
/// still hold the database.
fn open(dir: &Path) -> Store {
    let mut tries = 0;
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reopen {}: {e}", dir.display()),
        }
    }
}

/// Close `store` as a node's shutdown does (applied changes written).
async fn close(store: Store) {
    store.state_machine.persist().await.unwrap();
    store.log.close();
    store.syncer.close();
}

/// A claim of a fresh key is decided without reading sled (the state
/// machine's key filter knows no record can be there), and no stored record
/// is ever missed by it: not after the writes, not after a restart (the
/// filter is rebuilt from the tree), not after a snapshot install (built
/// with the new tree). A missed record would be granted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_keys_skip_sled_and_every_stored_record_is_found() {
    let all = names("k", 3_000);
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut sm = store.state_machine.clone();
    let fresh = names("fresh", 3_000).iter().map(|n| claim(n)).collect();
    let before = sm.record_reads();
    let next = apply(&mut sm, 1, fresh).await;
    let reads = sm.record_reads() - before;
    assert_eq!(reads, 0, "3,000 fresh claims read sled {reads} times");
    let next = complete_all(&mut sm, next, &all).await;
    let absent = sm.record_reads();
    assert!(sm.get(&key("never-written")).unwrap().is_none());
    assert_eq!(
        sm.record_reads(),
        absent,
        "an absent key was read from sled"
    );
    assert!(all.iter().all(|n| is_completed(&sm, n)), "after the writes");
    let snap = sm.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index(), next - 1);
    drop(sm);
    close(store).await;

    let store = open(dir.path());
    let sm = store.state_machine.clone();
    assert!(all.iter().all(|n| is_completed(&sm, n)), "after a restart");
    let absent = sm.record_reads();
    assert!(sm.get(&key("never-written")).unwrap().is_none());
    assert_eq!(sm.record_reads(), absent, "after a restart too");

    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path());
    let mut installed = other.state_machine.clone();
    installed
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert!(
        all.iter().all(|n| is_completed(&installed, n)),
        "after an install"
    );
    // A claim of a stored key on the installed store is decided on the
    // record (in progress elsewhere: refused with the replay), not granted.
    let tokens = installed.last_token();
    apply(
        &mut installed,
        next,
        vec![Command::Op {
            key: key(&all[0]),
            op: Op::Claim(Claim {
                owner: "late".into(),
                claim_id: "late".into(),
                lease_ms: 60_000,
                fingerprint: None,
                max_attempts: 0,
                retention_ms: 86_400_000,
            }),
        }],
    )
    .await;
    assert!(
        is_completed(&installed, &all[0]),
        "a completed record stays"
    );
    assert_eq!(installed.last_token(), tokens, "no token was granted");
    drop((sm, installed));
    close(store).await;
    close(other).await;
}

/// While a follower installs a snapshot of 20,000 COMPLETED records over a
/// state where the same records are COMPLETED too, a local read of any of
/// them never finds it absent: readers see the old state or the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_an_install_half_way() {
    let all = names("k", 20_000);
    let src_dir = tempfile::tempdir().unwrap();
    let src_store = Store::open(src_dir.path()).unwrap();
    let mut src = src_store.state_machine.clone();
    let next = complete_all(&mut src, 1, &all).await;
    let first = src.build_snapshot().await.unwrap();

    let dst_dir = tempfile::tempdir().unwrap();
    let dst_store = Store::open(dst_dir.path()).unwrap();
    let mut dst = dst_store.state_machine.clone();
    dst.install_snapshot(&first.meta, first.snapshot)
        .await
        .unwrap();
    assert!(all.iter().all(|n| is_completed(&dst, n)));

    // The leader moves on; its next snapshot holds every record again.
    complete_all(&mut src, next, &names("new", 100)).await;
    let second = src.build_snapshot().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..2usize {
        let (dst, stop, reads, all) = (dst.clone(), stop.clone(), reads.clone(), all.clone());
        readers.push(std::thread::spawn(move || {
            let mut missing = Vec::new();
            let mut i = r * 7_919;
            while !stop.load(Ordering::Acquire) {
                let n = &all[i % all.len()];
                if !is_completed(&dst, n) {
                    missing.push(n.clone());
                }
                reads.fetch_add(1, Ordering::Relaxed);
                i += 13;
            }
            missing
        }));
    }
    let before = reads.load(Ordering::Relaxed);
    dst.install_snapshot(&second.meta, second.snapshot)
        .await
        .unwrap();
    let during = reads.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Release);
    let missing: Vec<String> = readers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(during > 0, "no read overlapped the install");
    assert!(
        missing.is_empty(),
        "{} of {during} reads during the install found a COMPLETED record absent (e.g. {:?})",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert!(is_completed(&dst, "new000050"), "the new state is in force");
    assert_eq!(
        dst.applied_state().await.unwrap().0,
        second.meta.last_log_id
    );
    close(src_store).await;
    close(dst_store).await;
}

/// The bytes of a snapshot, and its meta.
fn bytes_of(snap: Snapshot) -> (idemkv::raft::SnapshotMeta, Vec<u8>) {
    let mut f = snap.snapshot;
    let mut buf = Vec::new();
    f.rewind().unwrap();
    f.read_to_end(&mut buf).unwrap();
    (snap.meta, buf)
}

fn file_of(bytes: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

/// Offset of the first key frame's length: after the 8-byte magic and the
/// header frame (`u32 len`, `u32 crc`, payload).
fn first_key_frame(bytes: &[u8]) -> usize {
    let header_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    8 + 8 + header_len
}

/// A corrupt, truncated or oversized-length snapshot is refused with an
/// error naming the file and the byte offset; the follower keeps answering
/// with its old records, keeps its applied index, and reopens with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_refused_and_changes_nothing() {
    let src_dir = tempfile::tempdir().unwrap();
    let src_store = Store::open(src_dir.path()).unwrap();
    let mut src = src_store.state_machine.clone();
    complete_all(&mut src, 1, &names("new", 300)).await;
    let (meta, good) = bytes_of(src.build_snapshot().await.unwrap());

    let dst_dir = tempfile::tempdir().unwrap();
    let mut dst_store = Store::open(dst_dir.path()).unwrap();
    let mut dst = dst_store.state_machine.clone();
    complete_all(&mut dst, 1, &names("old", 50)).await;
    let applied = dst.applied_state().await.unwrap().0;

    let at_key = first_key_frame(&good);
    // Inside the last record frame, just before the end mark and trailer.
    let in_last_record = good.len() - 44 - 3;
    let damages: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "a flipped byte in a record frame",
            {
                let mut b = good.clone();
                b[in_last_record] ^= 0x40;
                b
            },
            "checksum".into(),
        ),
        (
            "a truncated file",
            good[..good.len() / 2].to_vec(),
            "truncated".into(),
        ),
        (
            "a length of 0xFFFFFFFF",
            {
                let mut b = good.clone();
                b[at_key..at_key + 4].copy_from_slice(&u32::MAX.to_le_bytes());
                b
            },
            format!("byte {at_key}: key frame length 4294967295"),
        ),
        (
            "a file cut before its trailer",
            good[..good.len() - 44].to_vec(),
            "end mark".into(),
        ),
        (
            "a flipped byte in the trailer's digest",
            {
                let mut b = good.clone();
                let last = b.len() - 1;
                b[last] ^= 1;
                b
            },
            "sha256".into(),
        ),
    ];
    for (what, bytes, says) in damages {
        let err = dst
            .install_snapshot(&meta, file_of(&bytes))
            .await
            .expect_err(what);
        let msg = err.to_string();
        assert!(
            msg.contains(&says) && msg.contains("snapshot") && msg.contains("byte "),
            "{what}: the error should say where and what ({says:?}): {msg}"
        );
        assert!(is_completed(&dst, "old000007"), "{what}: old record lost");
        assert!(!is_completed(&dst, "new000007"), "{what}: partly installed");
        assert_eq!(dst.applied_state().await.unwrap().0, applied, "{what}");
        assert!(
            dst.get_current_snapshot().await.unwrap().is_none(),
            "{what}: a refused snapshot is served"
        );
    }

    // The node reopens with its old state, and nothing left to finish.
    close(dst_store).await;
    drop(dst);
    dst_store = open(dst_dir.path());
    let mut dst = dst_store.state_machine.clone();
    assert!(is_completed(&dst, "old000049"));
    assert!(!is_completed(&dst, "new000007"));
    assert_eq!(dst.applied_state().await.unwrap().0, applied);
    let leftovers: Vec<_> = std::fs::read_dir(dst_dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // The good file still installs.
    dst.install_snapshot(&meta, file_of(&good)).await.unwrap();
    assert!(is_completed(&dst, "new000299"));
    assert!(!is_completed(&dst, "old000007"));
    close(dst_store).await;
    close(src_store).await;
}

/// A snapshot file that rots on disk is not served after a reopen: it is
/// set aside, and the state it was installed into still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_damaged_on_disk_is_not_served() {
    let src_dir = tempfile::tempdir().unwrap();
    let src_store = Store::open(src_dir.path()).unwrap();
    let mut src = src_store.state_machine.clone();
    complete_all(&mut src, 1, &names("k", 100)).await;
    let snap = src.build_snapshot().await.unwrap();
    let index = snap.meta.last_log_id.unwrap().index();
    close(src_store).await;
    drop(src);

    let path = src_dir
        .path()
        .join("snapshots")
        .join(format!("snap-{index:020}.bin"));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = first_key_frame(&bytes) + 9;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let store = open(src_dir.path());
    let mut sm = store.state_machine.clone();
    assert!(
        sm.get_current_snapshot().await.unwrap().is_none(),
        "a damaged snapshot file was served"
    );
    assert!(path.with_extension("bin.refused").exists(), "set aside");
    assert!(is_completed(&sm, "k000042"));
    // A new build replaces it.
    let again = sm.build_snapshot().await.unwrap();
    assert_eq!(again.meta.last_log_id.unwrap().index(), index);
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
    close(store).await;
}

/// The peer port refuses a snapshot stream over `peer_max_snapshot_bytes`
/// (and keeps no spool of it), a damaged one under the cap, and a second
/// stream while one is being received; the node keeps serving its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_snapshot_streams_are_bounded_checked_and_one_at_a_time() {
    use idemkv::pb::peer::raft_peer_client::RaftPeerClient;
    use idemkv::pb::peer::SnapshotChunk;
    use idemkv::raft::{SnapshotMeta, Vote};

    let cap = 64 * 1024;
    let c = inproc::TestCluster::start_with(1, |cfg| cfg.caps.peer_max_snapshot_bytes = cap).await;
    let client = c.client();
    inproc::acquired(
        client
            .claim(inproc::claim_req("ns", "kept", "w", 60_000))
            .await
            .unwrap(),
    );
    let addr = c.members[&1].raft_addr.clone();
    let mut peer = RaftPeerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // A vote below any real one: nothing here may reach Raft anyway.
    let meta = idemkv::codec::encode(&(Vote::new(0, 9), SnapshotMeta::default())).unwrap();
    let chunks = |n: usize| -> Vec<SnapshotChunk> {
        (0..n)
            .map(|i| SnapshotChunk {
                meta: if i == 0 { meta.clone() } else { Vec::new() },
                data: vec![0xab; 16 * 1024],
            })
            .collect()
    };
    let snapshots_dir = c.dir.path().join("n1").join("snapshots");
    let listing = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&snapshots_dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let before = listing();

    let over = peer
        .install_snapshot(tokio_stream::iter(chunks(8)))
        .await
        .expect_err("a stream twice the cap is refused");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");
    assert!(
        over.message().contains("peer_max_snapshot_bytes") && over.message().contains("65536"),
        "the refusal names the cap: {}",
        over.message()
    );
    assert_eq!(listing(), before, "a spool was left behind");

    let damaged = peer
        .install_snapshot(tokio_stream::iter(chunks(2)))
        .await
        .expect_err("garbage under the cap is refused");
    assert_eq!(damaged.code(), tonic::Code::InvalidArgument, "{damaged:?}");
    assert!(
        damaged.message().contains("damaged") && damaged.message().contains("byte 0"),
        "{}",
        damaged.message()
    );
    assert_eq!(listing(), before, "a spool was left behind");

    // One stream held open; a second one meanwhile is turned away. The
    // probe goes only once the node holds the first: sent any earlier, it
    // could take the gate itself and turn the held stream away instead.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(chunks(1).remove(0)).await.unwrap();
    let mut held = peer.clone();
    let first = tokio::spawn(async move {
        held.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let node = c.node(1).consensus();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !node.receiving_snapshot() {
        if first.is_finished() {
            panic!(
                "the held stream ended before the node took it: {:?}",
                first.await
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held stream never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = peer
        .install_snapshot(tokio_stream::iter(chunks(1)))
        .await
        .expect_err("a second stream is turned away");
    assert_eq!(busy.code(), tonic::Code::ResourceExhausted, "{busy:?}");
    assert!(busy.message().contains("already receiving"), "{busy:?}");
    drop(tx);
    let held = first
        .await
        .unwrap()
        .expect_err("the held garbage is refused");
    assert_eq!(held.code(), tonic::Code::InvalidArgument, "{held:?}");

    let rec = client
        .get(idemkv::pb::api::GetRequest {
            namespace: "ns".into(),
            key: b"kept".to_vec(),
            ..Default::default()
        })
        .await
        .expect("the node still serves");
    assert!(rec.is_some(), "the node still serves its records");
    c.shutdown().await;
}
