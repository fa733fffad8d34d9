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
    let builder = Builder { dirs: Mutex::new(Vec::new()) };
    Suite::test_all(builder).await.expect("storage suite");
}
