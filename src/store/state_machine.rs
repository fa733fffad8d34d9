//! The replicated state machine in sled (`RaftStateMachine`).
//!
//! It carries commands from log entries to [`crate::record`] and writes the
//! decided changes back, keeping the expiry index (in memory, `expiry.rs`)
//! exact. It must not decide anything itself: every rule lives in
//! `record.rs`.
//!
//! Applied changes are served from memory first ([`Layers`]) and written to
//! sled together, with the `last_applied` they reach, in one atomic batch
//! once [`FLUSH_WRITES`] keys are waiting, by a thread of its own while
//! apply goes on (and at once before a snapshot is built or a big value is
//! written). sled is never
//! fsynced per entry anyway: the Raft log is what keeps applied entries
//! durable, and a restart applies again whatever sled had not written, as
//! it does after a power cut. Writing many entries per batch is what makes
//! apply cheap: sled's cost is per batch and per distinct key, and a key
//! written twice between flushes (a claim, then its complete) is written
//! once.
//!
//! The state lives in one of two sled trees, `sm` and `sm-b`; a key of the
//! database's default tree ([`keys::ACTIVE_TREE`], absent: `sm`) names the
//! one in force, and [`ActiveTree`] holds it in memory. Installing a
//! snapshot fills the other tree and then flips both (see `snapshot.rs`),
//! so a reader sees the old state or the new one, never a mix.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::OptionalSend;
use tokio::sync::{watch, RwLock};

use super::boot_clock;
use super::durable::{sled_err, Syncer};
use super::expiry::ExpiryIndex;
use super::key_filter::KeyFilter;
use super::keys;
use super::reading::SharedReading;
use crate::clock::{Clock, Instant};
use crate::codec::{decode, decode_borrowed, encode, encoded_len};
use crate::raft::types::{
    EntryPayload, LogId, Response, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::record::{self, Change, Command, Outcome, Record, RecordKey, Request};

/// Handle to the state machine; cheap to clone. Reads ([`Self::get`]) go
/// straight to sled and never wait for apply or a snapshot install.
#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) db: sled::Db,
    /// The tree in force; swapped whole when a snapshot is installed.
    pub(super) tree: ActiveTree,
    pub(super) syncer: Arc<Syncer>,
    pub(super) snapshot_dir: PathBuf,
    /// Held for writing while entries are applied or a snapshot installed,
    /// for reading while a snapshot is built: sled has no point-in-time
    /// views, so this is what makes a snapshot consistent.
    pub(super) lock: Arc<RwLock<()>>,
    /// The state machine clock: max of every stamp applied so far.
    pub(super) clock: AtomicU64,
    /// What [`StateMachineStore::now_ms`] reads between stamps
    /// (`reading.rs`).
    pub(super) reading: SharedReading,
    /// The node's source of time (monotonic and wall).
    pub(super) time: Clock,
    pub(super) boot_id: Option<String>,
    /// The last fencing token granted (SPEC §2 Tokens), as committed.
    pub(super) last_token: AtomicU64,
    /// What the records take ([`stored_bytes`] summed): the data-size
    /// quota's measure, the same on every replica at one applied index.
    pub(super) data_bytes: AtomicU64,
    /// Index of the last applied entry, for waiters (Await).
    pub(super) applied: watch::Sender<u64>,
    /// Waiters on single keys (Await), woken by the commits that write them.
    pub(super) watches: Arc<super::watch::Watches>,
    /// The snapshot file last checked whole (built, installed or checked
    /// at open): served without reading it again.
    pub(super) verified: std::sync::Mutex<Option<PathBuf>>,
    /// Record reads that went to sled (the key filter answers the rest).
    pub(super) record_reads: AtomicU64,
    /// Applied changes not yet written to sled (see the module docs).
    pub(super) overlay: std::sync::RwLock<Layers>,
    /// The thread writing [`Layers::writing`] to sled, if one runs.
    pub(super) flusher: std::sync::Mutex<Option<std::thread::JoinHandle<io::Result<()>>>>,
    /// Batches written to sled by apply.
    pub(super) sled_batches: AtomicU64,
    /// When the clock's anchor was last written.
    pub(super) anchored: std::sync::Mutex<Option<Instant>>,
    /// Where the anchors go (`boot_clock.rs`).
    pub(super) anchor_file: boot_clock::AnchorFile,
    /// The state hashes of the last [`HASHES_KEPT`] hash entries applied.
    pub(super) hashes: std::sync::Mutex<std::collections::VecDeque<StateHash>>,
}

/// Hash entries whose hashes a node keeps for `ctl check` to ask about.
const HASHES_KEPT: usize = 16;

/// The state as of one applied hash entry: a SHA-256 of every record (key
/// and stored bytes, in key order) and the token counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHash {
    pub index: u64,
    pub hash: Vec<u8>,
    pub records: u64,
}

/// The state machine tree in force and the filter of its record keys.
/// Every read and write goes through it; [`ActiveTree::swap`] waits for the
/// calls running on the old tree, so once it returns nobody reads that tree
/// any more.
pub(super) struct ActiveTree {
    tree: std::sync::RwLock<InForce>,
}

/// The tree in force, the filter of its record keys and its expiry index.
type InForce = (sled::Tree, Arc<KeyFilter>, Arc<ExpiryIndex>);

impl ActiveTree {
    fn new(tree: sled::Tree, filter: KeyFilter, expiry: ExpiryIndex) -> Self {
        ActiveTree {
            tree: std::sync::RwLock::new((tree, Arc::new(filter), Arc::new(expiry))),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, InForce> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The expiry index of the tree in force.
    pub(super) fn expiry(&self) -> Arc<ExpiryIndex> {
        self.read().2.clone()
    }

    /// Run `f` on the tree in force; a swap waits until it returns.
    pub(super) fn with<R>(&self, f: impl FnOnce(&sled::Tree) -> R) -> R {
        f(&self.read().0)
    }

    /// A handle of the tree in force (to learn its name, or to iterate
    /// under `Shared::lock`, which keeps an install from swapping it).
    pub(super) fn current(&self) -> sled::Tree {
        self.with(|t| t.clone())
    }

    /// The filter of the record keys in the tree in force.
    pub(super) fn filter(&self) -> Arc<KeyFilter> {
        self.read().1.clone()
    }

    /// Put a filter rebuilt from the tree in force in place (under
    /// `Shared::lock` for writing, so no key is added meanwhile).
    pub(super) fn set_filter(&self, filter: KeyFilter) {
        self.tree.write().unwrap_or_else(|p| p.into_inner()).1 = Arc::new(filter);
    }

    pub(super) fn get(&self, k: impl AsRef<[u8]>) -> sled::Result<Option<sled::IVec>> {
        self.with(|t| t.get(k))
    }

    /// The stored record under `rk` (an encoded record key), without
    /// reading sled when the filter knows the tree cannot hold it;
    /// `reads` counts the reads that went to sled.
    fn get_record(&self, rk: &[u8], reads: &AtomicU64) -> sled::Result<Option<sled::IVec>> {
        let cur = self.read();
        if !cur.1.may_hold(rk) {
            return Ok(None);
        }
        reads.fetch_add(1, Ordering::Relaxed);
        cur.0.get(rk)
    }

    pub(super) fn apply_batch(&self, batch: sled::Batch) -> sled::Result<()> {
        self.with(|t| t.apply_batch(batch))
    }

    /// Only under `Shared::lock` (apply, snapshot build): the iterator
    /// outlives this call.
    pub(super) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> sled::Iter {
        self.with(|t| t.scan_prefix(prefix))
    }

    /// Put `new` (whose record keys `filter` holds, and whose records
    /// `expiry` indexes) in force and run `then` before any reader can see
    /// it (the clock, token and applied-index atomics); returns the old tree.
    pub(super) fn swap(
        &self,
        new: sled::Tree,
        filter: KeyFilter,
        expiry: ExpiryIndex,
        then: impl FnOnce(),
    ) -> sled::Tree {
        let mut cur = self.tree.write().unwrap_or_else(|p| p.into_inner());
        let (old, _, _) = std::mem::replace(&mut *cur, (new, Arc::new(filter), Arc::new(expiry)));
        then();
        old
    }
}

/// The two state machine trees: the one in force and the one a snapshot
/// install fills.
pub(super) const TREES: [&str; 2] = ["sm", "sm-b"];

/// Writes for sled: key to value (`None`: remove).
type Writes = std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>;

/// Changes of the entries applied so far in one `apply` call.
#[derive(Default)]
struct Pending {
    /// The change to [`Shared::data_bytes`] the staged records make.
    data_delta: i64,
    writes: Writes,
    /// Records written by this call, for reads by later entries in it.
    records: std::collections::HashMap<Vec<u8>, Option<Record>>,
    /// The token counter as the call leaves it (`None`: unchanged).
    last_token: Option<u64>,
    last: Option<LogId>,
    /// A value big enough for sled to put in a blob file was written.
    large: bool,
}

/// Applied changes that sled does not hold yet; readers look here first.
/// Handed to a sled batch only while the apply lock is held; a written
/// layer is emptied afterwards outside the overlay lock (and off the apply
/// lock when the flush thread wrote it), to be used again.
#[derive(Default)]
pub(super) struct Overlay {
    writes: Writes,
    /// The records among `writes`, decoded.
    records: std::collections::HashMap<Vec<u8>, Option<Record>>,
    large: bool,
}

impl Overlay {
    /// Empty, keeping the maps' room up to [`SPARE_ROOM`] keys (rounded up
    /// by the table; a smaller table stays as it is): one apply call that
    /// caught up hundreds of thousands of keys must not keep tables that
    /// size for good.
    fn clear(&mut self) {
        self.writes.clear();
        self.records.clear();
        self.writes.shrink_to(SPARE_ROOM);
        self.records.shrink_to(SPARE_ROOM);
        self.large = false;
    }
}

/// What one record takes towards the data-size quota: its key twice (the
/// record, and its expiry index entry with the 8-byte expiry; the index
/// is in memory now, and still counted) and its stored value.
pub(super) fn stored_bytes(rk: &[u8], value_len: usize) -> u64 {
    (2 * rk.len() + 8 + value_len) as u64
}

/// How often apply writes the clock's anchor to its file.
const ANCHOR_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// How often a leader's clock heard (with no apply) writes it: a quiet
/// cluster's anchor stays fresh, and the append path pays for a write
/// (which may wait on the file system's journal) at most once a second.
const ANCHOR_EVERY_HEARD: std::time::Duration = std::time::Duration::from_secs(1);

/// The overlay: what apply added since the last flush began (`current`),
/// and what a flush is writing to sled now (`writing`). Readers look at
/// `current`, then `writing`, then sled; never at `spare`.
#[derive(Default)]
pub(super) struct Layers {
    current: Overlay,
    writing: Option<Arc<Overlay>>,
    /// A written layer, emptied, for the next `current`: its maps keep
    /// their room (up to [`SPARE_ROOM`]), so apply does not grow two fresh
    /// hash tables to a thousand keys (and fault in their memory) after
    /// every flush.
    spare: Option<Overlay>,
}

impl Layers {
    fn record(&self, rk: &[u8]) -> Option<&Option<Record>> {
        self.current
            .records
            .get(rk)
            .or_else(|| self.writing.as_ref()?.records.get(rk))
    }

    fn value(&self, k: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.current
            .writes
            .get(k)
            .or_else(|| self.writing.as_ref()?.writes.get(k))
    }

    /// Every record the layers hold, each key once (the newest).
    fn records(&self) -> impl Iterator<Item = (&Vec<u8>, &Option<Record>)> {
        let older = self.writing.iter().flat_map(|w| {
            w.records
                .iter()
                .filter(|(k, _)| !self.current.records.contains_key(*k))
        });
        self.current.records.iter().chain(older)
    }
}

/// Keys waiting in the overlay from which apply writes them to sled. A
/// sled batch holds the tree's lock while it is written, stalling every
/// other sled write (Raft's commit hint, the clock anchor): at 8,192 keys
/// that was tens of ms and claim p99 went from 12 to 80 ms; at 1,024 it
/// stays near where it was.
pub(super) const FLUSH_WRITES: usize = 1024;

/// The most room a reused overlay layer keeps: two flushes' worth of keys.
const SPARE_ROOM: usize = 2 * FLUSH_WRITES;

/// Values from this size may go to sled blob files (its threshold is a
/// quarter of a 512 KiB segment), which sled never fsyncs.
const BLOB_RISK_BYTES: usize = 64 * 1024;

/// The token counter of a store that has none stored (`read_last_token`).
pub(super) const NO_COUNTER: u64 = u64::MAX;

impl StateMachineStore {
    pub(super) fn open(
        db: &sled::Db,
        syncer: Arc<Syncer>,
        snapshot_dir: PathBuf,
        anchor_path: &Path,
        time: Clock,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&snapshot_dir)?;
        // A data directory from before the second tree has no pointer: `sm`.
        let active = match db.get(keys::ACTIVE_TREE).map_err(sled_err)? {
            Some(name) => TREES
                .into_iter()
                .find(|t| t.as_bytes() == &name[..])
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "sled key {:?} names an unknown state machine tree {:?}",
                            String::from_utf8_lossy(keys::ACTIVE_TREE),
                            String::from_utf8_lossy(&name)
                        ),
                    )
                })?,
            None => TREES[0],
        };
        let tree = db.open_tree(active).map_err(sled_err)?;
        let snapshot_check = super::snapshot::check_newest_meanwhile(&snapshot_dir);
        let filter = KeyFilter::new();
        let mut expiring = Vec::new();
        let mut data_bytes = 0;
        for item in tree.scan_prefix([keys::RECORD]) {
            let (k, v) = item.map_err(sled_err)?;
            filter.load(&k);
            data_bytes += stored_bytes(&k, v.len());
            let view: record::RetentionView = decode_borrowed(&v)?;
            expiring.push((view.expires_at(), Box::from(&k[..])));
        }
        let expiry = ExpiryIndex::of(expiring);
        drop_stored_expiry_index(&tree)?;
        let clock = match tree.get(keys::CLOCK).map_err(sled_err)? {
            Some(v) => decode::<u64>(&v)?,
            None => 0,
        };
        let (applied, _) = watch::channel(0);
        let last_token = Self::read_last_token(&tree, &syncer)?;
        let boot_id = boot_clock::boot_id();
        // The time this node was down counts: the last anchor of this boot
        // plus the boot time since (none without one). Versions before the
        // anchor file kept it in sled.
        let (anchor_file, anchor) = boot_clock::AnchorFile::open(anchor_path)?;
        let in_sled = match tree.get(keys::CLOCK_ANCHOR).map_err(sled_err)? {
            Some(v) => Some(decode::<boot_clock::Anchor>(&v)?),
            None => None,
        };
        let floor_ms = [anchor, in_sled]
            .iter()
            .flatten()
            .filter_map(|a| a.reached_ms(&boot_id))
            .max();
        let sm = StateMachineStore {
            shared: Arc::new(Shared {
                db: db.clone(),
                tree: ActiveTree::new(tree, filter, expiry),
                syncer,
                snapshot_dir,
                lock: Arc::new(RwLock::new(())),
                clock: AtomicU64::new(clock),
                reading: SharedReading::new(time.clone(), clock, floor_ms),
                time,
                boot_id,
                last_token: AtomicU64::new(last_token),
                data_bytes: AtomicU64::new(data_bytes),
                applied,
                watches: Default::default(),
                verified: std::sync::Mutex::new(None),
                record_reads: AtomicU64::new(0),
                overlay: Default::default(),
                flusher: std::sync::Mutex::new(None),
                sled_batches: AtomicU64::new(0),
                anchored: std::sync::Mutex::new(None),
                anchor_file,
                hashes: std::sync::Mutex::new(std::collections::VecDeque::new()),
            }),
        };
        let checked = snapshot_check.and_then(|h| h.join().ok().flatten());
        sm.recover_snapshots(checked)?;
        let applied = sm.applied_log_id()?.map_or(0, |l| l.index());
        sm.shared.applied.send_replace(applied);
        Ok(sm)
    }

    /// The stored token counter, or [`NO_COUNTER`]. A new store starts
    /// with one (0). A store without one, from before tokens had a counter
    /// (every token was the log index of its grant) or that applied entries
    /// but granted nothing yet, counts as if the counter stood at the index
    /// before each entry until its first grant (see [`Self::token_base`]).
    /// That is what every node computes alike, whenever it restarted; the
    /// applied index found at open, used here before, is not.
    fn read_last_token(tree: &sled::Tree, syncer: &Syncer) -> io::Result<u64> {
        if let Some(v) = tree.get(keys::LAST_TOKEN).map_err(sled_err)? {
            return decode::<u64>(&v);
        }
        if tree.get(keys::APPLIED).map_err(sled_err)?.is_none() {
            // Durable before anything is applied, else a crash could leave
            // applied entries and no counter.
            tree.insert(keys::LAST_TOKEN, encode(&0u64)?)
                .map_err(sled_err)?;
            syncer.sync_now()?;
            return Ok(0);
        }
        Ok(NO_COUNTER)
    }

    /// The counter the grants of the entry at `index` start from.
    fn token_base(&self, index: u64) -> u64 {
        match self.shared.last_token.load(Ordering::Acquire) {
            NO_COUNTER => index.saturating_sub(1),
            t => t,
        }
    }

    /// The counter as it stands, [`NO_COUNTER`] included.
    pub(super) fn stored_token_counter(&self) -> u64 {
        self.shared.last_token.load(Ordering::Acquire)
    }

    /// The last fencing token granted, as of the last applied entry.
    pub fn last_token(&self) -> u64 {
        match self.shared.last_token.load(Ordering::Acquire) {
            NO_COUNTER => *self.shared.applied.borrow(),
            t => t,
        }
    }

    fn overlay(&self) -> std::sync::RwLockReadGuard<'_, Layers> {
        self.shared
            .overlay
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn overlay_mut(&self) -> std::sync::RwLockWriteGuard<'_, Layers> {
        self.shared
            .overlay
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A state machine value by key (`m:…`), as of the last applied entry.
    fn meta(&self, k: &[u8]) -> io::Result<Option<sled::IVec>> {
        if let Some(v) = self.overlay().value(k) {
            return Ok(v.as_deref().map(sled::IVec::from));
        }
        self.shared.tree.get(k).map_err(sled_err)
    }

    /// The record stored under `k`, as of the last applied entry.
    pub fn get(&self, k: &RecordKey) -> io::Result<Option<Record>> {
        let rk = keys::record(k);
        if let Some(r) = self.overlay().record(&rk) {
            return Ok(r.clone());
        }
        let stored = self.shared.tree.get_record(&rk, &self.shared.record_reads);
        match stored.map_err(sled_err)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Record reads that went to sled since the node started (a read of a
    /// key the tree cannot hold is answered from memory and not counted).
    pub fn record_reads(&self) -> u64 {
        self.shared.record_reads.load(Ordering::Relaxed)
    }

    /// Batches apply wrote to sled since the node started (each carries
    /// the changes of many entries).
    pub fn sled_batches(&self) -> u64 {
        self.shared.sled_batches.load(Ordering::Relaxed)
    }

    /// What the records take, the data-size quota's measure: every
    /// record's key (twice: the record and its expiry index entry) and
    /// stored bytes.
    pub fn data_bytes(&self) -> u64 {
        self.shared.data_bytes.load(Ordering::Acquire)
    }

    fn add_data_bytes(&self, delta: i64) {
        let _ = self
            .shared
            .data_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_add_signed(delta))
            });
    }

    /// The state machine clock (ms since the epoch, leader-stamped).
    pub fn clock_ms(&self) -> u64 {
        self.shared.clock.load(Ordering::Acquire)
    }

    /// The state machine clock as of now: the leader's clock as this node
    /// last heard it plus the monotonic time since, never below the
    /// greatest stamp applied, never ahead of stamps a leader steers slow
    /// (`reading.rs`). Immune to wall-clock jumps; a restart counts its
    /// downtime through the anchor.
    /// Every lease decision outside `apply` (Await, the no-write claim path,
    /// the sweep trigger) and a new leader's first stamp read this.
    pub fn now_ms(&self) -> u64 {
        self.shared.reading.read().max(self.clock_ms())
    }

    /// The node's clock: the source of monotonic and wall time for every
    /// rule (the leader's stamps read it too).
    pub fn time(&self) -> &Clock {
        &self.shared.time
    }

    /// Take the stamp `now` into the clock (on apply and snapshot install).
    pub(super) fn set_clock(&self, now: u64) {
        self.shared.reading.take_late(now);
        self.shared.clock.store(now, Ordering::Release);
    }

    /// The leader `(term, node)` says its clock reads `clock_ms` now (or
    /// this node, leading, stamped it now): what bounds the reading
    /// (`reading.rs`). The restart anchor follows (at most every
    /// [`ANCHOR_EVERY_HEARD`]), so a quiet cluster's is no older.
    pub fn heard_leader_clock(&self, leader: (u64, u64), clock_ms: u64) {
        self.shared.reading.heard(leader, clock_ms);
        if let Err(e) = self.anchor_clock(ANCHOR_EVERY_HEARD) {
            tracing::warn!(error = %e, "could not write the clock anchor");
        }
    }

    /// Watch the index of the last applied entry.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// Whether some record's retention has passed at `now` (so a sweep has
    /// work to do).
    pub fn has_expired(&self, now: u64) -> bool {
        self.shared.tree.expiry().any_due(now)
    }

    /// Number of stored records (a full scan: for status and tests).
    pub fn record_count(&self) -> usize {
        let overlay = self.overlay();
        let in_sled = self.shared.tree.with(|t| {
            t.scan_prefix([keys::RECORD])
                .keys()
                .filter(|k| !matches!(k, Ok(k) if overlay.record(k).is_some()))
                .count()
        });
        in_sled + overlay.records().filter(|(_, r)| r.is_some()).count()
    }

    pub(super) fn applied_log_id(&self) -> io::Result<Option<LogId>> {
        match self.meta(keys::APPLIED)? {
            Some(v) => decode(&v),
            None => Ok(None),
        }
    }

    pub(super) fn membership(&self) -> io::Result<StoredMembership> {
        match self.meta(keys::MEMBERSHIP)? {
            Some(v) => decode(&v),
            None => Ok(StoredMembership::default()),
        }
    }

    /// The record at `k` as the pending changes leave it.
    fn get_pending(&self, p: &Pending, k: &RecordKey) -> io::Result<Option<Record>> {
        match p.records.get(&keys::record(k)) {
            Some(r) => Ok(r.clone()),
            None => self.get(k),
        }
    }

    /// Write `change` of the record at `k` (currently `cur`) into the
    /// pending changes, keeping the expiry index in step.
    fn stage(
        &self,
        p: &mut Pending,
        k: &RecordKey,
        cur: Option<&Record>,
        change: Change,
    ) -> io::Result<()> {
        if matches!(change, Change::Keep) {
            return Ok(());
        }
        let rk = keys::record(k);
        let expiry = self.shared.tree.expiry();
        if let Some(old) = cur {
            expiry.remove(record::expires_at(old), &rk);
            p.data_delta -= stored_bytes(&rk, encoded_len(old)?) as i64;
        }
        match change {
            Change::Put(new) => {
                // Before the batch reaches sled: the filter must never say
                // "absent" of a stored key.
                self.shared.tree.filter().add(&rk);
                expiry.insert(record::expires_at(&new), &rk);
                let value = encode(&new)?;
                p.data_delta += stored_bytes(&rk, value.len()) as i64;
                p.large |= value.len() >= BLOB_RISK_BYTES;
                p.writes.insert(rk.clone(), Some(value));
                p.records.insert(rk, Some(new));
            }
            Change::Remove => {
                p.writes.insert(rk.clone(), None);
                p.records.insert(rk, None);
            }
            Change::Keep => {}
        }
        Ok(())
    }

    /// Hand the call's changes and its `last_applied` to the readers (the
    /// overlay), and write them to sled once enough are waiting.
    fn commit(&self, p: &mut Pending) -> io::Result<()> {
        let Some(last) = p.last else {
            return Ok(());
        };
        let mut done = std::mem::take(p);
        done.writes
            .insert(keys::APPLIED.to_vec(), Some(encode(&Some(last))?));
        // Only a hint for a later restart: a failed write (EIO, a full
        // copy-on-write disk) must not stop apply.
        if let Err(e) = self.anchor_clock(ANCHOR_EVERY) {
            tracing::warn!(error = %e, "cannot write the clock anchor; a restart may not count its downtime");
        }
        if let Some(t) = done.last_token {
            done.writes
                .insert(keys::LAST_TOKEN.to_vec(), Some(encode(&t)?));
        }
        let written: Vec<Vec<u8>> = done.records.keys().cloned().collect();
        let (due, large) = {
            let mut l = self.overlay_mut();
            let o = &mut l.current;
            o.writes.extend(done.writes);
            o.records.extend(done.records);
            o.large |= done.large;
            (o.writes.len() >= FLUSH_WRITES, o.large)
        };
        if let Some(t) = done.last_token {
            self.shared.last_token.store(t, Ordering::Release);
        }
        self.add_data_bytes(done.data_delta);
        if large || self.shared.tree.filter().due_for_rebuild() {
            self.flush()?;
        } else if due {
            self.start_flush()?;
        }
        self.shared.watches.notify(&written);
        self.shared.applied.send_replace(last.index());
        Ok(())
    }

    /// Write where the clock stands against the host's boot clock straight
    /// to its file, unless it was written less than `every` ago: it says nothing about the
    /// applied state, and it must not wait for the overlay, or a restart
    /// would lose the time the node was down (`boot_clock.rs`).
    fn anchor_clock(&self, every: std::time::Duration) -> io::Result<()> {
        // Before the first stamp there is no clock to anchor.
        if self.clock_ms() == 0 {
            return Ok(());
        }
        let now = self.shared.time.now();
        {
            let mut last = self
                .shared
                .anchored
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if matches!(*last, Some(at) if now.saturating_duration_since(at) < every) {
                return Ok(());
            }
            *last = Some(now);
        }
        if let Some(a) = boot_clock::Anchor::now(&self.shared.boot_id, self.now_ms()) {
            self.shared.anchor_file.write(&a)?;
        }
        Ok(())
    }

    /// Write `layer` to sled in one atomic batch.
    fn write_layer(&self, layer: &Overlay) -> io::Result<()> {
        if layer.writes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in &layer.writes {
            match v {
                Some(v) => batch.insert(&k[..], &v[..]),
                None => batch.remove(&k[..]),
            }
        }
        self.shared.tree.apply_batch(batch).map_err(sled_err)?;
        self.shared.sled_batches.fetch_add(1, Ordering::Relaxed);
        if layer.large || self.shared.syncer.blobs_unsynced()? {
            // The log holds the layer's values durably, but a blob file lost
            // in a power cut would leave the tree pointing at nothing, and
            // the entry would not be applied again; and a page sled rewrote
            // as a blob can hold records whose entries are purged: sync now.
            self.shared.syncer.sync_now()?;
        }
        Ok(())
    }

    /// Make `current` the layer being written and return it (the caller
    /// writes it, then calls [`Self::written`]).
    ///
    /// Refused while the layer frozen before is still unwritten: its write
    /// failed (apply reported that once), and writing a later layer over it
    /// would record in sled an applied index past changes sled never got, so
    /// a restart would not apply them again.
    fn freeze(&self) -> io::Result<Arc<Overlay>> {
        let mut l = self.overlay_mut();
        if l.writing.is_some() {
            return Err(io::Error::other(
                "applied changes could not be written to sled earlier; \
                 nothing later is written over them (a restart applies them again from the log)",
            ));
        }
        let fresh = l.spare.take().unwrap_or_default();
        let layer = Arc::new(std::mem::replace(&mut l.current, fresh));
        l.writing = Some(layer.clone());
        Ok(layer)
    }

    /// `layer` is in sled: readers need not look at it any more, and it
    /// becomes the spare (emptied here, outside the overlay lock).
    fn written(&self, layer: Arc<Overlay>) {
        {
            let mut l = self.overlay_mut();
            if matches!(&l.writing, Some(w) if Arc::ptr_eq(w, &layer)) {
                l.writing = None;
            }
        }
        if let Ok(mut spare) = Arc::try_unwrap(layer) {
            spare.clear();
            self.overlay_mut().spare = Some(spare);
        }
    }

    /// Wait for the flush thread, if one runs; its error is apply's.
    pub(super) fn finish_flush(&self) -> io::Result<()> {
        let running = self
            .shared
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match running {
            None => Ok(()),
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the flush thread panicked"))),
        }
    }

    /// Write `current` to sled on a thread of its own, so apply goes on
    /// meanwhile (a batch of thousands of keys takes sled tens of ms);
    /// first waits for the previous one. Only with the apply lock held.
    fn start_flush(&self) -> io::Result<()> {
        self.finish_flush()?;
        let layer = self.freeze()?;
        let this = self.clone();
        let handle = std::thread::Builder::new()
            .name("idemkv-flush".into())
            .spawn(move || {
                this.write_layer(&layer)?;
                this.written(layer);
                Ok(())
            })?;
        *self
            .shared
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Write the whole overlay to sled before returning. Only with the
    /// apply lock held for writing (apply, snapshot build, shutdown), so
    /// nothing is added meanwhile.
    pub(super) fn flush(&self) -> io::Result<()> {
        self.finish_flush()?;
        let layer = self.freeze()?;
        self.write_layer(&layer)?;
        self.written(layer);
        if self.shared.tree.filter().due_for_rebuild() {
            // Drop the keys of removed records; every key is in sled now.
            let fresh = KeyFilter::of_tree(&self.shared.tree.current()).map_err(sled_err)?;
            self.shared.tree.set_filter(fresh);
        }
        Ok(())
    }

    /// Write the applied changes still in memory to sled (at shutdown, so
    /// a restart need not apply them again).
    pub async fn persist(&self) -> io::Result<()> {
        let _guard = self.shared.lock.write().await;
        self.flush()
    }

    /// Forget the overlay: a snapshot replaced the whole state (the
    /// installer waited for the flush thread first).
    pub(super) fn drop_overlay(&self) {
        *self.overlay_mut() = Layers::default();
    }

    fn apply_request(&self, p: &mut Pending, req: Request, index: u64) -> io::Result<Response> {
        let now = record::advance_clock(self.clock_ms(), req.stamped_ms);
        self.set_clock(now);
        p.writes.insert(keys::CLOCK.to_vec(), Some(encode(&now)?));
        if matches!(*req.command, Command::Hash) {
            return self.hash_entry(p, index);
        }
        let mut tokens = p.last_token.unwrap_or_else(|| self.token_base(index));
        let before = tokens;
        let out = self.apply_command(p, &req.command, now, &mut tokens);
        if tokens != before {
            p.last_token = Some(tokens);
        }
        out
    }

    /// Apply a hash entry: everything applied before it goes to sled (the
    /// apply lock is held, so nothing else changes), then the records and
    /// the token counter are hashed and the hash kept.
    fn hash_entry(&self, p: &mut Pending, index: u64) -> io::Result<Response> {
        use sha2::Digest;
        self.commit(p)?;
        self.flush()?;
        let mut h = sha2::Sha256::new();
        let mut records = 0u64;
        for item in self.shared.tree.scan_prefix([keys::RECORD]) {
            let (k, v) = item.map_err(sled_err)?;
            h.update((k.len() as u64).to_le_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_le_bytes());
            h.update(&v);
            records += 1;
        }
        h.update(self.last_token().to_le_bytes());
        let hashed = StateHash {
            index,
            hash: h.finalize().to_vec(),
            records,
        };
        let mut kept = self.shared.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == HASHES_KEPT {
            kept.pop_front();
        }
        kept.push_back(hashed.clone());
        Ok(Ok(Outcome::Hashed {
            index,
            hash: hashed.hash,
            records,
        }))
    }

    /// The hash this node computed when it applied the hash entry at
    /// `index` (none if it never applied that entry itself: it was down,
    /// or a snapshot took it past it, or too many checks ran since).
    pub fn hash_at(&self, index: u64) -> Option<StateHash> {
        let kept = self.shared.hashes.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().find(|h| h.index == index).cloned()
    }

    fn apply_command(
        &self,
        p: &mut Pending,
        command: &Command,
        now: u64,
        tokens: &mut u64,
    ) -> io::Result<Response> {
        match command {
            Command::Op { key, op } => {
                let cur = self.get_pending(p, key)?;
                let (change, out) = record::apply_op(cur.as_ref(), op, now, tokens);
                self.stage(p, key, cur.as_ref(), change)?;
                Ok(out)
            }
            Command::ClaimBatch {
                items,
                all_or_nothing,
            } => {
                let current = items
                    .iter()
                    .map(|(k, _)| self.get_pending(p, k))
                    .collect::<io::Result<Vec<_>>>()?;
                let claims: Vec<_> = items.iter().map(|(_, c)| c).collect();
                let (changes, out) =
                    record::apply_claim_batch(&current, &claims, *all_or_nothing, now, tokens);
                for (((k, _), cur), change) in items.iter().zip(&current).zip(changes) {
                    self.stage(p, k, cur.as_ref(), change)?;
                }
                Ok(Ok(out))
            }
            Command::Many(commands) => {
                let mut outs = Vec::with_capacity(commands.len());
                for c in commands {
                    if matches!(c, Command::Sweep { .. } | Command::Many(_) | Command::Hash) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a coalesced entry holds a sweep, a hash or another coalesced entry",
                        ));
                    }
                    outs.push(self.apply_command(p, c, now, tokens)?);
                }
                Ok(Ok(Outcome::Many(outs)))
            }
            Command::Sweep { limit } => {
                // The index holds what was staged before this entry too.
                let expiry = self.shared.tree.expiry();
                let mut removed = 0;
                for (at, rk) in expiry.due(now, *limit as usize) {
                    let cur = match keys::parse_record(&rk) {
                        Some(k) => self.get_pending(p, &k)?.map(|r| (k, r)),
                        None => None,
                    };
                    match cur {
                        Some((k, r)) if record::is_expired(&r, now) => {
                            self.stage(p, &k, Some(&r), Change::Remove)?;
                            removed += 1;
                        }
                        // An entry with no matching record (the index is
                        // kept exact, so never expected): drop it.
                        _ => expiry.remove(at, &rk),
                    }
                }
                Ok(Ok(Outcome::Swept { removed }))
            }
            Command::Hash => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a hash entry inside another command",
            )),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = std::fs::File;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied_log_id()?, self.membership()?))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let lock = self.shared.lock.clone();
        let _guard = lock.write().await;
        let mut pending = Pending::default();
        let mut replies = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let response = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Nothing),
                EntryPayload::Normal(req) => {
                    self.apply_request(&mut pending, req, log_id.index())?
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(log_id), m);
                    pending
                        .writes
                        .insert(keys::MEMBERSHIP.to_vec(), Some(encode(&stored)?));
                    Ok(Outcome::Nothing)
                }
            };
            pending.last = Some(log_id);
            if let Some(responder) = responder {
                replies.push((responder, response));
            }
        }
        self.commit(&mut pending)?;
        for (responder, response) in replies {
            responder.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: std::fs::File,
    ) -> Result<(), io::Error> {
        self.install(meta, snapshot).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<crate::raft::types::Snapshot>, io::Error> {
        self.current_snapshot()
    }
}

/// Versions before kept the expiry index in the tree (`x` keys): drop it,
/// now that it is built in memory. Its removal need not be durable: a
/// crash before the next sync leaves keys this drops again at next open.
fn drop_stored_expiry_index(tree: &sled::Tree) -> io::Result<()> {
    let mut w = BulkWriter::new(tree);
    for k in tree.scan_prefix([keys::EXPIRY]).keys() {
        w.remove(k.map_err(sled_err)?)?;
    }
    w.finish([])
}

/// Writes many keys to a tree in sled batches of [`BulkWriter::KEYS`]
/// (opening, a snapshot install): one batch for all would hold the whole
/// write in memory twice, and sled's tree lock for as long as it takes.
pub(super) struct BulkWriter<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    pending: usize,
}

impl<'a> BulkWriter<'a> {
    const KEYS: usize = 10_000;

    pub(super) fn new(tree: &'a sled::Tree) -> Self {
        BulkWriter {
            tree,
            batch: sled::Batch::default(),
            pending: 0,
        }
    }

    pub(super) fn insert(
        &mut self,
        k: impl Into<sled::IVec>,
        v: impl Into<sled::IVec>,
    ) -> io::Result<()> {
        self.batch.insert(k, v);
        self.added()
    }

    pub(super) fn remove(&mut self, k: impl Into<sled::IVec>) -> io::Result<()> {
        self.batch.remove(k);
        self.added()
    }

    fn added(&mut self) -> io::Result<()> {
        self.pending += 1;
        if self.pending == Self::KEYS {
            self.tree
                .apply_batch(std::mem::take(&mut self.batch))
                .map_err(sled_err)?;
            self.pending = 0;
        }
        Ok(())
    }

    /// Write what is left in one batch with `last` (keys that must land
    /// together, after everything else).
    pub(super) fn finish(
        mut self,
        last: impl IntoIterator<Item = (&'static [u8], Vec<u8>)>,
    ) -> io::Result<()> {
        for (k, v) in last {
            self.batch.insert(k, v);
        }
        self.tree.apply_batch(self.batch).map_err(sled_err)
    }
}

#[cfg(test)]
mod tests {
    use super::SPARE_ROOM;

    /// Stage `keys` in the overlay's current layer, each written as
    /// `value` (with no decoded record), as apply leaves them for a flush.
    fn stage(sm: &super::StateMachineStore, keys: impl IntoIterator<Item = Vec<u8>>, value: &[u8]) {
        let mut l = sm.overlay_mut();
        for k in keys {
            l.current.writes.insert(k.clone(), Some(value.to_vec()));
            l.current.records.insert(k, None);
        }
    }

    /// sled writes a page as a blob file (which it never fsyncs) once the
    /// page outgrows a quarter of a segment, whatever each value's size: a
    /// leaf of 20 KiB results is one after seven. Its layer syncs it, as a
    /// layer with one large value did already.
    #[test]
    fn a_page_sled_wrote_as_a_blob_is_synced_with_its_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let sm = &store.state_machine;
        for round in 0..3 {
            let keys = (0..20).map(|i| format!("test-blob-{round}-{i:02}").into_bytes());
            stage(sm, keys, &[7; 20 * 1024]);
            assert!(
                !sm.overlay().current.large,
                "no value is large enough to flag"
            );
            sm.flush().unwrap();
        }
        let blobs = std::fs::read_dir(dir.path().join("sled").join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(blobs > 0, "sled wrote no blob file: nothing was shown");
        assert!(
            !store.syncer.blobs_unsynced().unwrap(),
            "a blob file sled wrote with a layer was not synced ({blobs} files)"
        );
        store.log.close();
    }

    /// A layer whose write to sled failed is never passed over: the next
    /// flush (shutdown's, after apply stopped on the error) fails too and
    /// writes nothing. It used to write the later layer, with its applied
    /// index, so sled claimed changes it never got and a restart skipped
    /// them.
    #[test]
    fn a_flush_after_a_failed_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let sm = &store.state_machine;
        let put = |k: &[u8]| stage(sm, [k.to_vec()], &[1]);
        put(b"test-lost");
        // What a failed write leaves: the layer frozen, never written.
        let failed = sm.freeze().unwrap();
        drop(failed);
        put(b"test-later");
        assert!(sm.flush().is_err(), "a later layer was written");
        for k in [&b"test-lost"[..], b"test-later"] {
            assert!(sm.shared.tree.get(k).unwrap().is_none());
        }
        // Reads still see both: nothing applied was dropped from memory.
        let l = sm.overlay();
        assert!(l.value(b"test-lost").is_some() && l.value(b"test-later").is_some());
        drop(l);
        store.log.close();
    }

    /// A flush hands a layer it wrote back, emptied, to be a later
    /// `current`: apply does not grow fresh hash tables to a thousand keys
    /// after every flush (their growth and page faults were 2.5% of the
    /// machine at claim@64). Nothing of a written layer may show through,
    /// and a layer one apply call filled with far more keys than a flush
    /// (a follower catching up) keeps room for at most [`SPARE_ROOM`] keys
    /// as the table rounds it (3,584).
    #[test]
    fn a_written_layer_is_reused_emptied_with_bounded_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let sm = &store.state_machine;
        let put = |from: u32, to: u32| {
            stage(
                sm,
                (from..to).map(|i| format!("test-{i}").into_bytes()),
                &[1],
            );
        };
        let room = || {
            let l = sm.overlay();
            (l.current.writes.capacity(), l.current.records.capacity())
        };
        put(0, 2000);
        sm.flush().unwrap();
        put(2000, 2001);
        sm.flush().unwrap();
        let (writes, records) = room();
        assert!(
            writes >= 2000 && records >= 2000,
            "the layer after two flushes has room for {writes} writes and {records} records"
        );
        let l = sm.overlay();
        assert!(l.current.writes.is_empty() && l.current.records.is_empty());
        assert!(l.value(b"test-5").is_none() && l.record(b"test-2000").is_none());
        drop(l);
        assert_eq!(
            sm.shared.tree.get(b"test-5").unwrap().as_deref(),
            Some(&[1u8][..])
        );
        assert!(sm.shared.tree.get(b"test-2000").unwrap().is_some());

        // One call's worth of 50,000 keys, then two more flushes.
        put(10_000, 60_000);
        sm.flush().unwrap();
        sm.flush().unwrap();
        let (writes, records) = room();
        assert!(
            writes <= 2 * SPARE_ROOM && records <= 2 * SPARE_ROOM,
            "after 50,000 keys the reused layer keeps room for {writes} writes and {records} records"
        );
        store.log.close();
    }

    /// A store from before the token counter (none stored: its tokens
    /// follow the log index until its first grant) sends a snapshot that
    /// says so, and the node that installs it mints the tokens the sender
    /// mints. The snapshot used to carry the applied index as the counter:
    /// after an entry that granted nothing, the two gave one claim
    /// different tokens (and the installer, once leading, could grant a
    /// token again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_of_a_store_without_a_counter_keeps_tokens_in_step() {
        use crate::raft::types::{Entry, TypeConfig};
        use crate::record::{Claim, Command, Op, RecordKey, Request, State};
        use futures::stream;
        use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
        use std::sync::atomic::Ordering;

        let entry = |i: u64, command: Command| {
            Ok((
                Entry {
                    log_id: openraft::testing::log_id::<TypeConfig>(1, 1, i),
                    payload: openraft::EntryPayload::Normal(Request {
                        stamped_ms: 1_000,
                        command: command.into(),
                    }),
                },
                None,
            ))
        };
        let idle = || Command::Sweep { limit: 10 };
        let key = RecordKey {
            namespace: "ns".into(),
            key: b"k".to_vec(),
        };
        let claim = Command::Op {
            key: key.clone(),
            op: Op::Claim(Claim {
                owner: "w".into(),
                claim_id: "w-1".into(),
                lease_ms: 60_000,
                fingerprint: None,
                max_attempts: 0,
                retention_ms: 60_000,
            }),
        };
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let sender = crate::store::Store::open(dirs[0].path()).unwrap();
        let mut sender = sender.state_machine;
        // As a data directory of the first version opens: no counter.
        sender
            .shared
            .last_token
            .store(super::NO_COUNTER, Ordering::Release);
        sender
            .apply(stream::iter(vec![entry(1, idle()), entry(2, idle())]))
            .await
            .unwrap();
        let snap = sender.build_snapshot().await.unwrap();
        let installer = crate::store::Store::open(dirs[1].path()).unwrap();
        let mut installer = installer.state_machine;
        installer
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        let mut tokens = Vec::new();
        for sm in [&mut sender, &mut installer] {
            sm.apply(stream::iter(vec![
                entry(3, idle()),
                entry(4, claim.clone()),
            ]))
            .await
            .unwrap();
            match sm.get(&key).unwrap().expect("claimed").state {
                State::InProgress { token, .. } => tokens.push(token),
                other => panic!("not claimed: {other:?}"),
            }
        }
        assert_eq!(
            tokens[0], tokens[1],
            "the sender and the installer minted different tokens for one grant"
        );
        assert_eq!(installer.last_token(), sender.last_token());
    }
}
