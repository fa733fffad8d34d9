//! openraft's storage conformance suite against the sled store.
use std::sync::Mutex;

use idemkv::raft::TypeConfig;
use idemkv::store::{LogStore, StateMachineStore, Store};
use openraft::testing::log::{StoreBuilder, Suite};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_passes_openraft_suite() {
    let builder = Builder {
        dirs: Mutex::new(Vec::new()),
    };
    Suite::test_all(builder).await.expect("storage suite");
}

/// An append is acknowledged only after a flush+fsync that started after it;
/// a vote returns only after one; large results (sled blob files) survive a
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

    // An entry bigger than sled's inline limit goes to a blob file.
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
        },
    };
    let entries: Vec<Entry> = (1..=3)
        .map(|i| Entry {
            log_id: log_id::<TypeConfig>(1, 1, i),
            payload: EntryPayload::Normal(big.clone()),
        })
        .collect();
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
    let (syncs_after_append, released) = store.syncer.stats();
    assert!(
        syncs_after_append > syncs_after_vote,
        "append acknowledged without an fsync"
    );
    assert!(released >= 2);

    // Reopen: the vote and the three 1 MiB entries are all there.
    drop(log);
    store.syncer.close();
    drop(store.state_machine);
    drop(store.syncer);
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
