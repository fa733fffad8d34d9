//! Durable storage in one sled database per node: the Raft log and vote
//! ([`LogStore`]), the state machine ([`StateMachineStore`]) and its
//! snapshots (files beside the database).
//!
//! Layout of a data directory:
//! - `sled/` the sled database (trees `log`, `raft`, `sm`),
//! - `snapshots/` the latest snapshot file.
//!
//! This module never decides an idempotency rule; see `record.rs`.

pub mod durable;
pub mod keys;
mod log;
mod snapshot;
mod state_machine;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use durable::Syncer;
pub use log::LogStore;
pub use state_machine::StateMachineStore;

/// An opened data directory.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachineStore,
    pub syncer: Arc<Syncer>,
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Store> {
        let sled_dir = dir.join("sled");
        std::fs::create_dir_all(&sled_dir)?;
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(durable::sled_err)?;
        let syncer = Syncer::open(db.clone(), &sled_dir)?;
        let log = LogStore::new(&db, syncer.clone())?;
        let state_machine = StateMachineStore::open(&db, syncer.clone(), dir.join("snapshots"))?;
        Ok(Store {
            log,
            state_machine,
            syncer,
        })
    }
}
