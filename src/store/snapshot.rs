//! Snapshots of the state machine: building, installing, finding the latest.
//!
//! A snapshot is one file in `<data>/snapshots/`, `snap-<index>.bin`, in the
//! checked format of [`super::snapfile`] (per-frame crc32, bounded frame
//! sizes, a trailer with the record count and a sha256 of the file). The
//! expiry index is not stored: it is derived from the records on install.
//!
//! Guarantees:
//! - Building first writes the applied changes still in memory to sled
//!   (under the state machine's write lock), then holds its read lock for
//!   the whole scan, so the copy is consistent; the file is written to a temp name (every frame
//!   summed as it is written), fsynced and renamed.
//! - A file is checked whole once — when installed or found at open (a
//!   file this node built is trusted as written) — and then served as it
//!   is. A newest file that fails its check at open
//!   (or is of the old, unchecked format) is renamed `*.refused` and not
//!   served; openraft then builds a fresh one from the state if it needs
//!   one. A file that rots on disk after its check is caught by the
//!   follower that receives it, which checks everything before installing.
//! - Installing never touches the tree in force. The received file is copied
//!   next to the snapshots and loaded, checked on the way, into the other
//!   state machine tree (records, applied id, membership,
//!   clock, token counter), which is then flushed. Only a file that passed
//!   every check is renamed into place; then one durable write flips
//!   [`keys::ACTIVE_TREE`] and the in-memory handle is swapped together
//!   with the clock, token and applied-index atomics. Readers see the old
//!   state or the new one. A refused file changes nothing, and a crash at
//!   any point leaves the old state in force or the new one: before the
//!   rename nothing changed; between the rename and the flip the newest
//!   snapshot is newer than the state, and openraft installs it again when
//!   the node starts.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Seek};
use std::path::{Path, PathBuf};

use openraft::RaftSnapshotBuilder;

use super::durable::sled_err;
use super::expiry::ExpiryIndex;
use super::key_filter::KeyFilter;
use super::keys;
use super::snapfile::{Header, Reader, Writer};
use super::state_machine::{stored_bytes, BulkWriter, StateMachineStore, NO_COUNTER, TREES};
use crate::codec::{decode, encode};
use crate::raft::types::{
    LogId, NodeId, PeerNode, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::record::{self, Record};

const PREFIX: &str = "snap-";

fn file_name(meta: &SnapshotMeta) -> String {
    let index = meta.last_log_id.as_ref().map_or(0, |l| l.index());
    format!("{PREFIX}{index:020}.bin")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `e` with the path it happened on.
fn at_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn open_reader(path: &Path, legacy: bool) -> io::Result<(Reader<BufReader<File>>, Header)> {
    let f = File::open(path).map_err(|e| at_path(path, e))?;
    Reader::open(BufReader::new(f), path.display().to_string(), legacy)
}

/// Read `path` whole and check it (every frame, every record, the trailer).
fn verify(path: &Path) -> io::Result<Header> {
    let (r, header) = open_reader(path, false)?;
    check_rest(r)?;
    Ok(header)
}

/// Check every pair after the header, and the trailer.
fn check_rest<R: io::Read>(mut r: Reader<R>) -> io::Result<()> {
    while let Some((k, v, at)) = r.pair()? {
        check_pair(&r, &k, &v, at)?;
    }
    r.finish()
}

fn check_pair<R: io::Read>(
    r: &Reader<R>,
    k: &[u8],
    v: &[u8],
    at: u64,
) -> io::Result<(record::RecordKey, Record)> {
    let rk = keys::parse_record(k).ok_or_else(|| r.err(at, "not a record key"))?;
    let rec: Record = decode(v).map_err(|e| r.err(at, format!("undecodable record: {e}")))?;
    Ok((rk, rec))
}

/// What `idemkv snapshot status` shows of a snapshot file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Inspection {
    /// The last log entry the snapshot holds (`T<term>-N<node>.<index>`).
    pub last_log_id: String,
    pub index: u64,
    pub term: u64,
    /// The token counter: the restored cluster grants tokens above it.
    pub last_token: u64,
    pub records: u64,
    pub in_progress: u64,
    pub available: u64,
    pub completed: u64,
    pub failed: u64,
    pub bytes: u64,
}

/// Read a snapshot file whole and check it (every frame, every record, the
/// trailer's count and SHA-256); an `InvalidData` error names the byte
/// where it fails (truncated, a checksum, not a snapshot).
pub fn inspect(path: &Path) -> io::Result<Inspection> {
    use openraft::vote::RaftLeaderId;
    let (mut r, header) = open_reader(path, false)?;
    let last = header.meta.last_log_id.as_ref();
    let mut out = Inspection {
        last_log_id: last.map_or("none".into(), |l| l.to_string()),
        index: last.map_or(0, |l| l.index()),
        term: last.map_or(0, |l| l.committed_leader_id().term()),
        // A store without a counter grants above the snapshot's index.
        last_token: match header.last_token {
            NO_COUNTER => last.map_or(0, |l| l.index()),
            t => t,
        },
        bytes: std::fs::metadata(path).map_err(|e| at_path(path, e))?.len(),
        ..Inspection::default()
    };
    while let Some((k, v, at)) = r.pair()? {
        let (_, rec) = check_pair(&r, &k, &v, at)?;
        out.records += 1;
        match rec.state {
            record::State::InProgress { .. } => out.in_progress += 1,
            record::State::Available { .. } => out.available += 1,
            record::State::Completed { .. } => out.completed += 1,
            record::State::Failed { .. } => out.failed += 1,
        }
    }
    r.finish()?;
    Ok(out)
}

/// Check a snapshot file received from a leader, whole, before it goes
/// anywhere near the state machine; returns its meta. `label` names it in
/// errors. Blocking.
pub fn check_received(file: &mut File, label: &str) -> io::Result<SnapshotMeta> {
    file.rewind()?;
    let (r, header) = Reader::open(BufReader::new(&mut *file), label, false)?;
    check_rest(r)?;
    file.rewind()?;
    Ok(header.meta)
}

/// The snapshot files in `dir`, oldest first.
fn snapshot_files_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| at_path(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(".bin"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Check the newest snapshot file of `dir` whole on a thread of its own,
/// so that opening a store reads it while it scans the records (reading a
/// snapshot of a million records is about half a second). The thread
/// yields the file's path if it passed; [`StateMachineStore::recover_snapshots`]
/// takes that as checked. Any doubt (no thread, an error, a file that
/// failed) yields `None`, and the check runs again there, as before.
pub(super) fn check_newest_meanwhile(
    dir: &Path,
) -> Option<std::thread::JoinHandle<Option<PathBuf>>> {
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("idemkv-snapcheck".into())
        .spawn(move || {
            let newest = snapshot_files_in(&dir).ok()?.pop()?;
            verify(&newest).ok().map(|_| newest)
        })
        .ok()
}

impl StateMachineStore {
    fn snapshot_files(&self) -> io::Result<Vec<PathBuf>> {
        snapshot_files_in(&self.shared.snapshot_dir)
    }

    /// Keep only the newest snapshot file (open handles stay readable).
    fn remove_older_snapshots(&self, keep: &Path) -> io::Result<()> {
        for f in self.snapshot_files()? {
            if f != keep {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(())
    }

    fn set_verified(&self, path: Option<PathBuf>) {
        *self
            .shared
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = path;
    }

    /// Rename a snapshot that failed its check out of the way.
    fn refuse(&self, path: &Path, e: &io::Error) {
        let aside = path.with_extension("bin.refused");
        tracing::error!(path = %path.display(), error = %e, "snapshot refused; set aside, not served");
        if let Err(e) = std::fs::rename(path, &aside) {
            tracing::error!(path = %path.display(), error = %e, "cannot set the refused snapshot aside");
        }
    }

    /// The newest snapshot, checked once per file.
    pub(super) fn current_snapshot(&self) -> io::Result<Option<Snapshot>> {
        loop {
            let Some(path) = self.snapshot_files()?.pop() else {
                return Ok(None);
            };
            let known = self
                .shared
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let meta = if known.as_deref() == Some(path.as_path()) {
                open_reader(&path, false)?.1.meta
            } else {
                match verify(&path) {
                    Ok(h) => {
                        self.set_verified(Some(path.clone()));
                        h.meta
                    }
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        self.refuse(&path, &e);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            let f = File::open(&path).map_err(|e| at_path(&path, e))?;
            return Ok(Some(Snapshot { meta, snapshot: f }));
        }
    }

    /// The newest snapshot, checked, with its file open (`ctl snapshot
    /// save` streams it).
    pub fn newest_snapshot(&self) -> io::Result<Option<(SnapshotMeta, File)>> {
        Ok(self.current_snapshot()?.map(|s| (s.meta, s.snapshot)))
    }

    /// At open: drop temp files of an interrupted build or install, finish
    /// an in-place install that an earlier version left half-done, and check
    /// the newest snapshot once (`checked`: a file [`check_newest_meanwhile`]
    /// found whole).
    pub(super) fn recover_snapshots(&self, checked: Option<PathBuf>) -> io::Result<()> {
        let dir = &self.shared.snapshot_dir;
        for e in std::fs::read_dir(dir).map_err(|e| at_path(dir, e))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&p);
            }
        }
        if let Some(name) = self.shared.tree.get(keys::INSTALLING).map_err(sled_err)? {
            let path = dir.join(String::from_utf8_lossy(&name).as_ref());
            tracing::warn!(path = %path.display(), "finishing a snapshot install an earlier version left half-done");
            self.install_file(&path, &path, None, true)?;
        } else if let Some(path) = checked {
            // Nothing has touched the snapshot files since it was checked:
            // only this opening store writes them, and it has not yet.
            self.set_verified(Some(path));
        }
        let _ = self.current_snapshot()?;
        Ok(())
    }

    /// Replace the whole state with the snapshot in `file` (received from
    /// the leader); refused, changing nothing, unless every check passes.
    pub(super) async fn install(&self, meta: &SnapshotMeta, file: File) -> io::Result<()> {
        let lock = self.shared.lock.clone();
        let _guard = lock.write().await;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install_received(&meta, file))
            .await
            .map_err(io::Error::other)?
    }

    /// Copy the received file beside the snapshots, then install it. Blocking.
    fn install_received(&self, meta: &SnapshotMeta, mut file: File) -> io::Result<()> {
        let dir = &self.shared.snapshot_dir;
        let path = dir.join(file_name(meta));
        let tmp = dir.join(format!("{}.tmp", file_name(meta)));
        let copied = (|| {
            file.rewind()?;
            let mut w = BufWriter::new(File::create(&tmp)?);
            io::copy(&mut file, &mut w)?;
            super::test_hooks::before_fsync()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })();
        let res = copied
            .map_err(|e| at_path(&tmp, e))
            .and_then(|()| self.install_file(&tmp, &path, Some(meta), false));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Load `src` into the tree not in force, checking it on the way; then
    /// rename it to `dest`, flip the trees and keep `dest` as the current
    /// snapshot. Blocking; the caller holds the write lock (or is `open`).
    fn install_file(
        &self,
        src: &Path,
        dest: &Path,
        expect: Option<&SnapshotMeta>,
        legacy: bool,
    ) -> io::Result<()> {
        let shared = &self.shared;
        // A flush thread writes to the tree in force: let it finish first.
        self.finish_flush()?;
        let active = shared.tree.current().name();
        let other = TREES
            .into_iter()
            .find(|t| t.as_bytes() != &active[..])
            .unwrap_or(TREES[0]);
        let tree = shared.db.open_tree(other).map_err(sled_err)?;
        let (header, filter, expiry, data_bytes) = match self.load_into(&tree, src, expect, legacy)
        {
            Ok(loaded) => loaded,
            Err(e) => {
                if let Err(c) = tree.clear() {
                    tracing::warn!(error = %c, "cannot clear the refused install's tree");
                }
                return Err(e);
            }
        };
        shared.syncer.sync_now()?;
        if src != dest {
            std::fs::rename(src, dest).map_err(|e| at_path(dest, e))?;
        }
        sync_dir(&shared.snapshot_dir).map_err(|e| at_path(&shared.snapshot_dir, e))?;
        shared
            .db
            .insert(keys::ACTIVE_TREE, other.as_bytes())
            .map_err(sled_err)?;
        shared.syncer.sync_now()?;
        let applied = header.meta.last_log_id.as_ref().map_or(0, |l| l.index());
        let old = shared.tree.swap(tree, filter, expiry, || {
            // Changes applied before the snapshot's index are in it.
            self.drop_overlay();
            self.set_clock(header.clock_ms);
            shared
                .last_token
                .store(header.last_token, std::sync::atomic::Ordering::Release);
            shared
                .data_bytes
                .store(data_bytes, std::sync::atomic::Ordering::Release);
            shared.applied.send_replace(applied);
        });
        // Every record may have changed: wake every Await to look again.
        self.notify_all_watches();
        tracing::info!(path = %dest.display(), tree = other, applied, "snapshot installed");
        self.set_verified(Some(dest.to_path_buf()));
        self.remove_older_snapshots(dest)?;
        // Nobody reads the old tree any more (`swap` waited for them).
        if let Err(e) = old.clear() {
            tracing::warn!(error = %e, "cannot clear the state machine tree replaced by a snapshot");
        }
        Ok(())
    }

    /// Clear `tree` and fill it from `path`, with the filter of its record
    /// keys and its expiry index; fails on any check. Blocking.
    fn load_into(
        &self,
        tree: &sled::Tree,
        path: &Path,
        expect: Option<&SnapshotMeta>,
        legacy: bool,
    ) -> io::Result<(Header, KeyFilter, ExpiryIndex, u64)> {
        let (mut r, header) = open_reader(path, legacy)?;
        if let Some(meta) = expect {
            if header.meta.last_log_id != meta.last_log_id {
                return Err(r.err(
                    8,
                    format!(
                        "the header is of log id {:?}, the leader sent it as {:?}",
                        header.meta.last_log_id, meta.last_log_id
                    ),
                ));
            }
        }
        tree.clear().map_err(sled_err)?;
        let filter = KeyFilter::new();
        let mut expiring = Vec::new();
        let mut w = BulkWriter::new(tree);
        let mut data_bytes = 0;
        while let Some((k, v, at)) = r.pair()? {
            let (_, rec) = check_pair(&r, &k, &v, at)?;
            filter.load(&k);
            data_bytes += stored_bytes(&k, v.len());
            expiring.push((record::expires_at(&rec), Box::from(&k[..])));
            w.insert(k, v)?;
        }
        r.finish()?;
        w.finish([
            (keys::APPLIED, encode(&header.meta.last_log_id)?),
            (keys::MEMBERSHIP, encode(&header.meta.last_membership)?),
            (keys::CLOCK, encode(&header.clock_ms)?),
            (keys::LAST_TOKEN, encode(&header.last_token)?),
        ])?;
        Ok((header, filter, ExpiryIndex::of(expiring), data_bytes))
    }
}

impl StateMachineStore {
    /// Fill this (new, empty) store from the saved snapshot at `path` as
    /// the state of a new cluster: the records and token counter as
    /// saved, applied up to the snapshot's last entry, `members` as the
    /// membership and the clock at `clock_ms` or the snapshot's, whichever
    /// is later. Returns the snapshot's last entry. Blocking.
    pub(super) fn restore_from(
        &self,
        path: &Path,
        members: BTreeMap<NodeId, PeerNode>,
        clock_ms: u64,
    ) -> io::Result<Option<LogId>> {
        let tree = self.shared.tree.current();
        let (header, ..) = self.load_into(&tree, path, None, false)?;
        let last = header.meta.last_log_id;
        let voters: BTreeSet<NodeId> = members.keys().copied().collect();
        let membership = openraft::Membership::new(vec![voters], members)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut batch = sled::Batch::default();
        batch.insert(
            keys::MEMBERSHIP,
            encode(&StoredMembership::new(last, membership))?,
        );
        batch.insert(keys::CLOCK, encode(&header.clock_ms.max(clock_ms))?);
        tree.apply_batch(batch).map_err(sled_err)?;
        Ok(last)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = File;

    #[tracing::instrument(level = "info", skip_all)]
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // The snapshot is read from sled: write the applied changes still in
        // memory first, then let readers in again while it is built.
        let guard = self.shared.lock.clone().write_owned().await;
        self.flush()?;
        let guard = guard.downgrade();
        let this = self.clone();
        let (path, meta) =
            tokio::task::spawn_blocking(move || -> io::Result<(PathBuf, SnapshotMeta)> {
                let written = {
                    let _guard = guard;
                    this.write_snapshot()?
                };
                // The writer framed and summed what it wrote; reading it
                // back right after the fsync would only read the page cache.
                this.set_verified(Some(written.0.clone()));
                Ok(written)
            })
            .await
            .map_err(io::Error::other)??;
        tracing::info!(path = %path.display(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: File::open(&path).map_err(|e| at_path(&path, e))?,
        })
    }
}

impl StateMachineStore {
    /// Write the state to a new snapshot file atomically (temp file, fsync,
    /// rename, fsync dir). Blocking; the caller holds the read lock.
    fn write_snapshot(&self) -> io::Result<(PathBuf, SnapshotMeta)> {
        let meta = SnapshotMeta {
            last_log_id: self.applied_log_id()?,
            last_membership: self.membership()?,
        };
        let header = Header {
            meta: meta.clone(),
            clock_ms: self.clock_ms(),
            // The counter as stored, none included: a node that installs
            // this must derive its tokens as this one does. The applied
            // index in its place was a counter the others did not have,
            // and after an entry that granted nothing the two minted
            // different tokens for one grant.
            last_token: self.stored_token_counter(),
        };
        let dir = &self.shared.snapshot_dir;
        let path = dir.join(file_name(&meta));
        let tmp = dir.join(format!("{}.tmp", file_name(&meta)));
        let written = (|| {
            let mut w = Writer::new(BufWriter::new(File::create(&tmp)?), &header)?;
            for item in self.shared.tree.scan_prefix([keys::RECORD]) {
                let (k, v) = item.map_err(sled_err)?;
                w.pair(&k, &v)?;
            }
            let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(dir)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(at_path(&tmp, e));
        }
        self.remove_older_snapshots(&path)?;
        Ok((path, meta))
    }
}
