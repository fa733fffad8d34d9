//! Durable storage per node: the Raft log in segment files of our own
//! ([`LogStore`]), the vote and the state machine ([`StateMachineStore`]) in
//! one sled database, and snapshots (files beside it).
//!
//! Layout of a data directory:
//! - `log/` the Raft log segments,
//! - `sled/` the sled database (trees `raft`: vote, purge point; `sm` and
//!   `sm-b`, the state machine in force and the one a snapshot install
//!   fills; the default tree names the one in force),
//! - `snapshots/` the latest snapshot file (and an install's or build's
//!   `*.tmp`, removed at open; `*.refused`, files that failed their check).
//!
//! This module never decides an idempotency rule; see `record.rs`.

pub mod boot_clock;
pub mod durable;
pub mod keys;
mod log;
mod rejoin;
mod snapfile;
mod snapshot;
mod state_machine;
pub mod test_hooks;
pub mod watch;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use durable::Syncer;
pub use log::LogStore;
pub use rejoin::Rejoin;
pub use snapshot::check_received as check_received_snapshot;
pub use state_machine::StateMachineStore;

/// An opened data directory.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachineStore,
    pub syncer: Arc<Syncer>,
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Store> {
        Store::open_with_segment_bytes(dir, log::SEGMENT_BYTES)
    }

    /// [`Store::open`] with log segments of `segment_bytes` (tests use small
    /// ones to exercise segment rolling and removal).
    pub fn open_with_segment_bytes(dir: &Path, segment_bytes: u64) -> io::Result<Store> {
        let sled_dir = dir.join("sled");
        std::fs::create_dir_all(&sled_dir)?;
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(durable::sled_err)?;
        let syncer = Syncer::open(db.clone(), &sled_dir)?;
        let log = LogStore::open(&dir.join("log"), &db, syncer.clone(), segment_bytes)?;
        let state_machine = StateMachineStore::open(&db, syncer.clone(), dir.join("snapshots"))?;
        Ok(Store {
            log,
            state_machine,
            syncer,
        })
    }
}
