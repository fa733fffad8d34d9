//! Durable storage per node: the Raft log in segment files of our own
//! ([`LogStore`]), the vote and the state machine ([`StateMachineStore`]) in
//! one sled database, and snapshots (files beside it).
//!
//! Layout of a data directory:
//! - `log/` the Raft log segments,
//! - `sled/` the sled database (trees `raft`: vote, purge point; `sm` and
//!   `sm-b`, the state machine in force and the one a snapshot install
//!   fills; the default tree names the one in force),
//! - `sled.mark` what sled last made durable of Raft's state, to check
//!   sled against at open (see `sled_mark.rs`),
//! - `snapshots/` the latest snapshot file (and an install's or build's
//!   `*.tmp`, removed at open; `*.refused`, files that failed their check).
//!
//! This module never decides an idempotency rule; see `record.rs`.

pub mod boot_clock;
mod commit_hint;
pub mod durable;
mod expiry;
mod identity;
mod key_filter;
pub mod keys;
mod log;
mod reading;
mod rejoin;
pub mod sled_mark;
mod snapfile;
mod snapshot;
mod state_machine;
pub mod test_hooks;
pub mod watch;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::clock::Clock;
use crate::raft::types::{NodeId, PeerNode};

pub use durable::Syncer;
pub use identity::ClusterId;
pub use log::{record_spans as log_record_spans, SEGMENT_BYTES, ZEROED_AHEAD};
pub use log::{Encodings, LogStore};
pub use rejoin::Rejoin;
pub use snapshot::check_received as check_received_snapshot;
pub use snapshot::{inspect as inspect_snapshot, Inspection};
pub use state_machine::{StateHash, StateMachineStore};

/// What an operator does about a data directory that must not be used: the
/// end of every refusal to open one.
pub const REMEDY: &str = "Restore its data directory from a backup, or wipe the data \
     directory and add the node back as a new member (ctl member remove, then member add) \
     so it catches up from the leader";

/// An opened data directory.
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachineStore,
    pub syncer: Arc<Syncer>,
    pub identity: Arc<ClusterId>,
}

/// Open sled, turning a panic in its recovery (a damaged file can cause
/// one) into an error that says what to do.
fn open_sled(sled_dir: &Path) -> io::Result<sled::Db> {
    let config = sled::Config::new()
        .path(sled_dir)
        .cache_capacity(32 * 1024 * 1024)
        .mode(sled::Mode::HighThroughput);
    let damaged = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: sled could not open the database ({why}): it is damaged. \
                 This node must not start. {REMEDY}",
                sled_dir.display()
            ),
        )
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e))) => Err(e),
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(panic) => Err(damaged(format!(
            "it panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        ))),
    }
}

/// The clock anchor's file in a data directory (boot_clock.rs).
const ANCHOR_FILE: &str = "clock-anchor";

/// Whether the data directory `dir` has applied log entries, so belongs to
/// a cluster: its clock anchor, written with every apply, is not empty.
/// `idemkv up` asks, so that node 1 wiped to be added again does not found
/// a cluster of its own. Always false on a host with no boot clock, which
/// writes no anchor.
pub fn has_applied(dir: &Path) -> bool {
    std::fs::metadata(dir.join(ANCHOR_FILE)).is_ok_and(|m| m.len() > 0)
}

/// Restore never writes over a data directory: `dir` must not exist or be
/// empty.
pub fn refuse_non_empty(dir: &Path) -> io::Result<()> {
    let empty = match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_none(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    if !empty {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is not empty: restore makes new data directories and never writes over one",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Make `dir` the data directory of one node of a new cluster whose state
/// is the saved snapshot `file` (`idemkv snapshot restore`): its records
/// and token counter, `members` as the membership, an empty log after the
/// snapshot's last entry (so a node added later gets the records by
/// snapshot, never by replaying a log that lacks them) and the clock at
/// `wall_ms` or the snapshot's, whichever is later. `dir` must not exist or
/// be empty; a file that fails any check while it loads is refused and
/// what was made of `dir` removed again. Every node of the new cluster is
/// restored from the same file, which the caller checks whole once first
/// ([`inspect_snapshot`]), before any directory is made.
pub fn restore_snapshot(
    file: &Path,
    dir: &Path,
    members: BTreeMap<NodeId, PeerNode>,
    wall_ms: u64,
    cluster_id: &str,
) -> io::Result<()> {
    refuse_non_empty(dir)?;
    let existed = dir.exists();
    let restore = || -> io::Result<()> {
        let store = Store::open(dir)?;
        let last = store.state_machine.restore_from(file, members, wall_ms)?;
        if let Some(last) = last {
            store.log.restored_at(&last)?;
        }
        store.identity.adopt(cluster_id)?;
        store.syncer.sync_now()
    };
    restore().inspect_err(|_| undo_restore(dir, existed))
}

/// Undo a restore into `dir`: empty it again if it `existed` (an empty
/// directory the user made, a mount point say), remove it otherwise.
pub fn undo_restore(dir: &Path, existed: bool) {
    if existed {
        if let Ok(d) = std::fs::read_dir(dir) {
            for e in d.flatten() {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Store> {
        Store::open_with(dir, Clock::system(), log::SEGMENT_BYTES)
    }

    /// [`Store::open`] with log segments of `segment_bytes` (tests use small
    /// ones to exercise segment rolling and removal).
    pub fn open_with_segment_bytes(dir: &Path, segment_bytes: u64) -> io::Result<Store> {
        Store::open_with(dir, Clock::system(), segment_bytes)
    }

    /// [`Store::open`] with the node's clock (the state machine's time) and
    /// log segments of `segment_bytes`.
    pub fn open_with(dir: &Path, clock: Clock, segment_bytes: u64) -> io::Result<Store> {
        let sled_dir = dir.join("sled");
        std::fs::create_dir_all(&sled_dir)?;
        let mark = sled_mark::SledMark::load(dir)?;
        let db = open_sled(&sled_dir)?;
        let syncer = Syncer::open(db.clone(), &sled_dir, mark)?;
        syncer.check_mark()?;
        let log = LogStore::open(&dir.join("log"), &db, syncer.clone(), segment_bytes)?;
        let state_machine = StateMachineStore::open(
            &db,
            syncer.clone(),
            dir.join("snapshots"),
            &dir.join(ANCHOR_FILE),
            clock,
        )?;
        // Record what sled holds now, durably (a data directory from before
        // the mark gets one here).
        syncer.sync_now()?;
        let identity = ClusterId::open(&db)?;
        Ok(Store {
            log,
            state_machine,
            syncer,
            identity,
        })
    }
}
