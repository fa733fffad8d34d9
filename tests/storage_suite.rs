//! openraft's storage conformance suite against the sled store.
use std::sync::Mutex;

use idemkv::raft::{Entry, TypeConfig};
use idemkv::record::{Claim, Command, Op, RecordKey, Request};
use idemkv::store::{LogStore, StateMachineStore, Store};
use openraft::storage::EntryResponder;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::testing::log_id;
use openraft::EntryPayload;
use openraft::StorageError;

/// Each build gets a fresh directory, kept alive until the test ends.
struct Builder {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, ()> for Builder {
    async fn build(&self) -> Result<((), LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        self.dirs.lock().unwrap().push(dir);
        Ok(((), store.log, store.state_machine))
    }
}

fn key(k: &str) -> RecordKey {
    RecordKey {
        namespace: "ns".into(),
        key: k.as_bytes().to_vec(),
    }
}

fn claim_of(k: &str, owner: &str, lease_ms: u64, retention_ms: u64) -> Claim {
    Claim {
        owner: owner.into(),
        claim_id: format!("{owner}-{k}"),
        lease_ms,
        fingerprint: None,
        max_attempts: 0,
        retention_ms,
    }
}

fn claim(k: &str, owner: &str, lease_ms: u64, retention_ms: u64) -> Command {
    Command::Op {
        key: key(k),
        op: Op::Claim(claim_of(k, owner, lease_ms, retention_ms)),
    }
}

/// Log entry `i` of term 1 carrying `command`, as `apply` takes it.
fn entry(
    i: u64,
    stamped_ms: u64,
    command: Command,
) -> Result<EntryResponder<TypeConfig>, std::io::Error> {
    Ok((
        Entry {
            log_id: log_id::<TypeConfig>(1, 1, i),
            payload: EntryPayload::Normal(Request {
                stamped_ms,
                command: command.into(),
            }),
        },
        None,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_passes_openraft_suite() {
    let builder = Builder {
        dirs: Mutex::new(Vec::new()),
    };
    Suite::test_all(builder).await.expect("storage suite");
}

/// An append is acknowledged only after a flush+fsync that started after it;
/// a vote returns only after one; 1 MiB entries survive a
/// reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_votes_are_acknowledged_only_after_fsync() {
    use idemkv::raft::{Entry, Vote};
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::testing::log_id;
    use openraft::{EntryPayload, RaftLogReader};

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut log = store.log;
    let (syncs_before, _) = store.syncer.stats();
    let vote = Vote::new(3, 1);
    log.save_vote(&vote).await.unwrap();
    let (syncs_after_vote, _) = store.syncer.stats();
    assert!(
        syncs_after_vote > syncs_before,
        "save_vote returned without an fsync"
    );

    // Entries as large as the biggest result allowed.
    let big = idemkv::record::Request {
        stamped_ms: 1,
        command: idemkv::record::Command::Op {
            key: idemkv::record::RecordKey {
                namespace: "ns".into(),
                key: b"k".to_vec(),
            },
            op: idemkv::record::Op::Complete {
                token: 1,
                result: vec![7u8; 1024 * 1024],
                code: None,
                retention_ms: None,
            },
        }
        .into(),
    };
    let entries: Vec<Entry> = (1..=3)
        .map(|i| Entry {
            log_id: log_id::<TypeConfig>(1, 1, i),
            payload: EntryPayload::Normal(big.clone()),
        })
        .collect();
    let (log_syncs_before, _) = log.sync_stats();
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
    let (log_syncs_after, released) = log.sync_stats();
    assert!(
        log_syncs_after > log_syncs_before,
        "append acknowledged without an fsync of the log"
    );
    assert!(released >= 1);

    // Reopen: the vote and the three 1 MiB entries are all there.
    log.close();
    drop(log);
    store.syncer.close();
    drop(store.state_machine);
    drop(store.syncer);
    drop(store.identity);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let store = Store::open(dir.path()).unwrap();
    let mut log = store.log;
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    let got = log.try_get_log_entries(1..4).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got
        .iter()
        .all(|e| matches!(&e.payload, EntryPayload::Normal(r) if *r == big)));
}

/// A snapshot built on one node and installed on another replaces the whole
/// state: records, the expiry index (a sweep still finds expired records),
/// the applied log id and the clock; and it survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_install_replaces_the_whole_state() {
    use futures::stream;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    let claim = |k: &str, retention_ms: u64| claim(k, "w", 100, retention_ms);
    let src_dir = tempfile::tempdir().unwrap();
    let mut src = Store::open(src_dir.path()).unwrap().state_machine;
    src.apply(stream::iter(vec![
        entry(1, 1_000, claim("short", 1_000)),
        entry(2, 1_000, claim("long", 86_400_000)),
    ]))
    .await
    .unwrap();
    let snap = src.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index(), 2);

    let dst_dir = tempfile::tempdir().unwrap();
    let dst_store = Store::open(dst_dir.path()).unwrap();
    let mut dst = dst_store.state_machine;
    // Something the snapshot must wipe out.
    dst.apply(stream::iter(vec![entry(1, 5, claim("stale", 1_000))]))
        .await
        .unwrap();
    dst.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert!(
        dst.get(&key("stale")).unwrap().is_none(),
        "install replaced the old state"
    );
    assert!(dst.get(&key("short")).unwrap().is_some());
    assert_eq!(dst.clock_ms(), 1_000);
    assert_eq!(dst.applied_state().await.unwrap().0.unwrap().index(), 2);
    // The expiry index was rebuilt: a sweep after the retention removes "short" only.
    assert!(dst.has_expired(1_000 + 100 + 1_000));
    dst.apply(stream::iter(vec![entry(
        3,
        2_200,
        Command::Sweep { limit: 10 },
    )]))
    .await
    .unwrap();
    assert!(
        dst.get(&key("short")).unwrap().is_none(),
        "swept after install"
    );
    assert!(dst.get(&key("long")).unwrap().is_some());
    // And the installed snapshot is what a restart serves.
    let current = dst
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("snapshot kept");
    assert_eq!(current.meta.last_log_id.unwrap().index(), 2);
}

/// Applied entries reach sled many per batch, and are read from memory
/// until then: 600 apply calls of one entry each (claims, then completes
/// of the same keys) write fewer than 10 sled batches; every record reads
/// as applied all along, and, once written at shutdown, after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_entries_reach_sled_many_per_batch() {
    use futures::stream;
    use openraft::storage::RaftStateMachine;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut sm = store.state_machine.clone();
    let names: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let before = sm.sled_batches();
    let mut index = 0;
    for n in &names {
        index += 1;
        let e = entry(index, 1_000, claim(n, "w", 60_000, 3_600_000));
        sm.apply(stream::iter(vec![e])).await.unwrap();
        assert!(sm.get(&key(n)).unwrap().is_some(), "{n} claimed");
    }
    for n in &names {
        let token = match sm.get(&key(n)).unwrap().unwrap().state {
            idemkv::record::State::InProgress { token, .. } => token,
            other => panic!("{n}: not claimed: {other:?}"),
        };
        index += 1;
        let complete = Command::Op {
            key: key(n),
            op: Op::Complete {
                token,
                result: n.as_bytes().to_vec(),
                code: None,
                retention_ms: None,
            },
        };
        sm.apply(stream::iter(vec![entry(index, 1_000, complete)]))
            .await
            .unwrap();
    }
    let batches = sm.sled_batches() - before;
    assert!(batches < 10, "600 apply calls wrote {batches} sled batches");
    let done = |sm: &StateMachineStore| {
        names.iter().all(|n| {
            matches!(sm.get(&key(n)), Ok(Some(r)) if format!("{:?}", r.state).contains("Completed"))
        })
    };
    assert!(done(&sm), "every complete reads as applied");
    assert_eq!(sm.applied_state().await.unwrap().0.unwrap().index(), index);

    sm.persist().await.unwrap();
    store.log.close();
    store.syncer.close();
    drop((sm, store));
    let store = loop {
        match Store::open(dir.path()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let mut sm = store.state_machine.clone();
    assert_eq!(sm.applied_state().await.unwrap().0.unwrap().index(), index);
    assert!(done(&sm), "after a reopen, from sled");
    store.log.close();
}

/// A coalesced entry (`Command::Many`, made by a leader under load) leaves
/// exactly the state its commands leave as entries of their own: the same
/// records, the same tokens, in the same order, refusals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_entry_applies_like_its_commands_one_by_one() {
    use futures::stream;
    use openraft::storage::RaftStateMachine;

    let claim = |k: &str, owner: &str| claim(k, owner, 60_000, 3_600_000);
    let complete = |k: &str, token: u64| Command::Op {
        key: key(k),
        op: Op::Complete {
            token,
            result: format!("done-{k}").into_bytes(),
            code: None,
            retention_ms: None,
        },
    };
    let batch = |ks: &[&str]| Command::ClaimBatch {
        items: ks
            .iter()
            .map(|k| (key(k), claim_of(k, "b", 60_000, 3_600_000)))
            .collect(),
        all_or_nothing: false,
    };
    // Tokens start at 1 on a fresh store: "a" gets 1, "b" 2; the
    // complete with token 2 on "a" is refused, the one with 1 succeeds.
    let commands = vec![
        claim("a", "w1"),
        claim("b", "w1"),
        claim("a", "w2"),
        complete("a", 2),
        complete("a", 1),
        claim("a", "w3"),
        batch(&["c", "b", "d"]),
        claim("e", "w1"),
    ];
    let one_by_one_dir = tempfile::tempdir().unwrap();
    let mut one_by_one = Store::open(one_by_one_dir.path()).unwrap().state_machine;
    let entries: Vec<_> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| entry(i as u64 + 1, 1_000, c.clone()))
        .collect();
    one_by_one.apply(stream::iter(entries)).await.unwrap();
    let coalesced_dir = tempfile::tempdir().unwrap();
    let mut coalesced = Store::open(coalesced_dir.path()).unwrap().state_machine;
    coalesced
        .apply(stream::iter(vec![entry(1, 1_000, Command::Many(commands))]))
        .await
        .unwrap();
    for k in ["a", "b", "c", "d", "e"] {
        let want = one_by_one.get(&key(k)).unwrap();
        assert!(want.is_some(), "{k} was written");
        assert_eq!(coalesced.get(&key(k)).unwrap(), want, "record {k}");
    }
    let done = one_by_one.get(&key("a")).unwrap().unwrap();
    assert!(
        format!("{done:?}").contains("Completed"),
        "the complete with the holder's token took effect: {done:?}"
    );
    // A coalesced entry never comes from a peer: the peer port refuses it.
    let limits = idemkv::Limits::default();
    let err =
        idemkv::api::validate::command(&limits, &Command::Many(vec![claim("x", "w")])).unwrap_err();
    assert!(
        err.to_string().contains("never accepted from a peer"),
        "{err}"
    );
}

/// A follower's append after a quiet spell is made durable before `append`
/// returns (on the appending task); the leader's own entries go to the
/// group commit's round thread. Either way the callback comes only after
/// an fsync. (`GroupCommit`'s unit tests cover appends in quick succession.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_lone_append_is_synced_on_its_own_task_and_the_leaders_never() {
    use futures::FutureExt;
    use openraft::storage::{IOFlushed, RaftLogStorage};

    let dir = tempfile::tempdir().unwrap();
    let mut log = Store::open(dir.path()).unwrap().log;
    log.set_node_id(1);
    let req = Request {
        stamped_ms: 1,
        command: claim("k", "o", 1_000, 1_000).into(),
    };
    for (index, leader) in [(1, 1), (2, 2)] {
        // Longer than any quiet spell the log asks for.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (syncs_before, _) = log.sync_stats();
        let inline_before = log.inline_syncs();
        let (tx, mut rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
        let e = Entry {
            log_id: log_id::<TypeConfig>(1, leader, index),
            payload: EntryPayload::Normal(req.clone()),
        };
        log.append([e], IOFlushed::signal(tx)).await.unwrap();
        let done_on_return = (&mut rx).now_or_never().is_some();
        let ran_here = log.inline_syncs() - inline_before;
        if leader == 1 {
            assert_eq!(ran_here, 0, "the leader's own entry was synced on its task");
            rx.await.unwrap().unwrap();
        } else {
            assert_eq!(
                ran_here, 1,
                "a follower's lone append went to a round thread"
            );
            assert!(done_on_return, "not durable when append returned");
        }
        assert_eq!(
            log.sync_stats().0 - syncs_before,
            1,
            "entry {index}: one fsync"
        );
    }
}

/// Close a store, its writes synced.
fn close(store: Store) {
    store.syncer.sync_now().unwrap();
    store.log.close();
    store.syncer.close();
}

/// sled's database in `dir`, once the store that had it open let go.
fn sled_of(dir: &std::path::Path) -> sled::Db {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir.join("sled")) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() > until => panic!("sled still held: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// The keys of the state machine tree `sm` that start with `prefix`.
fn sled_keys(dir: &std::path::Path, prefix: u8) -> usize {
    let db = sled_of(dir);
    let n = db.open_tree("sm").unwrap().scan_prefix([prefix]).count();
    db.flush().unwrap();
    n
}

/// A record costs sled one key (the expiry index is in memory), and the
/// index is built again from the records when a store opens: a sweep after
/// a reopen removes what expired and nothing else. The index entries older
/// versions kept in sled are dropped at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_index_is_built_from_the_records_at_open() {
    use futures::stream;
    use openraft::storage::RaftStateMachine;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Stamped at 1,000 with a 100 ms lease and 1 s retention: "short"
    // expires at 2,100.
    store
        .state_machine
        .clone()
        .apply(stream::iter(vec![
            entry(1, 1_000, claim("short", "w", 100, 1_000)),
            entry(2, 1_000, claim("long", "w", 100, 86_400_000)),
        ]))
        .await
        .unwrap();
    store.state_machine.persist().await.unwrap();
    close(store);
    assert_eq!(sled_keys(dir.path(), b'r'), 2);
    assert_eq!(sled_keys(dir.path(), b'x'), 0, "no index entries in sled");

    // An index entry as versions before wrote it (expiry, then the key).
    {
        let db = sled_of(dir.path());
        let mut legacy = vec![b'x'];
        legacy.extend_from_slice(&2_100u64.to_be_bytes());
        legacy.extend_from_slice(b"ns\0short");
        db.open_tree("sm").unwrap().insert(legacy, &[][..]).unwrap();
        db.flush().unwrap();
    }

    let store = Store::open(dir.path()).unwrap();
    let mut sm = store.state_machine.clone();
    assert!(!sm.has_expired(2_099));
    assert!(sm.has_expired(2_100));
    sm.apply(stream::iter(vec![entry(
        3,
        2_200,
        Command::Sweep { limit: 10 },
    )]))
    .await
    .unwrap();
    assert!(sm.get(&key("short")).unwrap().is_none(), "swept");
    assert!(sm.get(&key("long")).unwrap().is_some());
    assert!(!sm.has_expired(2_200));
    sm.persist().await.unwrap();
    drop(sm);
    close(store);
    assert_eq!(sled_keys(dir.path(), b'r'), 1);
    assert_eq!(
        sled_keys(dir.path(), b'x'),
        0,
        "the old index entry was dropped"
    );
}

/// The copies of an entry the log hands out (one per follower's
/// replication, one to apply) share the leader's command instead of each
/// copying every key and value; and sharing it changed no byte of an
/// entry's encoding, so logs and peers of earlier builds still decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copies_of_an_entry_share_its_command_and_its_encoding_is_unchanged() {
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::RaftLogReader;

    let dir = tempfile::tempdir().unwrap();
    let mut log = Store::open(dir.path()).unwrap().log;
    log.set_node_id(1);
    let req = Request {
        stamped_ms: 7,
        command: Command::Many(vec![
            claim("a", "w1", 1_000, 60_000),
            claim("b", "w2", 1_000, 60_000),
        ])
        .into(),
    };
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    let appended = Entry {
        log_id: log_id::<TypeConfig>(1, 1, 1),
        payload: EntryPayload::Normal(req.clone()),
    };
    log.append([appended], IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();

    let command_of = |e: &Entry| match &e.payload {
        EntryPayload::Normal(r) => r.command.clone(),
        other => panic!("not a normal entry: {other:?}"),
    };
    let mut readers = [log.get_log_reader().await, log.get_log_reader().await];
    let mut copies = Vec::new();
    for r in &mut readers {
        let got = r.try_get_log_entries(1..2).await.unwrap();
        assert_eq!(got.len(), 1);
        copies.push(command_of(&got[0]));
    }
    assert!(
        copies
            .iter()
            .all(|c| std::sync::Arc::ptr_eq(c, &req.command)),
        "a copy handed out by the log holds a command of its own"
    );

    // The encoding of the shape before the command was shared.
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Unshared {
        stamped_ms: u64,
        command: Command,
    }
    let unshared = Unshared {
        stamped_ms: req.stamped_ms,
        command: (*req.command).clone(),
    };
    let bytes = idemkv::codec::encode(&req).unwrap();
    assert_eq!(bytes, idemkv::codec::encode(&unshared).unwrap());
    assert_eq!(idemkv::codec::decode::<Request>(&bytes).unwrap(), req);
    assert_eq!(idemkv::codec::decode::<Unshared>(&bytes).unwrap(), unshared);
}
