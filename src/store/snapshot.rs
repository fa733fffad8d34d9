//! Snapshots of the state machine: building, installing, finding the latest.
//!
//! A snapshot is one file in `<data>/snapshots/`:
//! `IDKVSNP1`, then a length-prefixed header (snapshot meta, the state
//! machine clock and the token counter), then length-prefixed `(key, record)` pairs. The expiry
//! index is not stored: it is derived from the records on install.
//!
//! Building holds the state machine's read lock for the whole scan, so the
//! copy is consistent. Installing marks the tree as "installing" first, so a
//! crash half-way is finished from the same file when the node reopens.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use openraft::RaftSnapshotBuilder;

use super::durable::sled_err;
use super::keys;
use super::state_machine::StateMachineStore;
use crate::codec::{decode, encode};
use crate::raft::{Snapshot, SnapshotMeta, TypeConfig};
use crate::record::{self, Record};

const MAGIC: &[u8; 8] = b"IDKVSNP2";
const PREFIX: &str = "snap-";

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    meta: SnapshotMeta,
    clock_ms: u64,
    /// The token counter: a node restored from this snapshot must never
    /// grant a token already given.
    last_token: u64,
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(bytes.len()).map_err(|_| io::Error::other("snapshot frame over 4 GiB"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)
}

/// Read one frame; `None` at a clean end of file.
fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

fn read_header(r: &mut impl Read) -> io::Result<Header> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an idemkv snapshot",
        ));
    }
    let header = read_frame(r)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "snapshot has no header"))?;
    decode(&header)
}

fn file_name(meta: &SnapshotMeta) -> String {
    let index = meta.last_log_id.as_ref().map_or(0, |l| l.index());
    format!("{PREFIX}{index:020}.bin")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl StateMachineStore {
    fn snapshot_files(&self) -> io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.shared.snapshot_dir)?
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

    /// Keep only the newest snapshot file (open handles stay readable).
    fn remove_older_snapshots(&self, keep: &Path) -> io::Result<()> {
        for f in self.snapshot_files()? {
            if f != keep {
                let _ = std::fs::remove_file(f);
            }
        }
        Ok(())
    }

    /// Write a snapshot file atomically (temp file, fsync, rename, fsync dir).
    fn write_snapshot_file(
        &self,
        meta: &SnapshotMeta,
        write_body: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> io::Result<PathBuf> {
        let dir = &self.shared.snapshot_dir;
        let path = dir.join(file_name(meta));
        let tmp = dir.join(format!("{}.tmp", file_name(meta)));
        let mut w = BufWriter::new(File::create(&tmp)?);
        write_body(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        self.remove_older_snapshots(&path)?;
        Ok(path)
    }

    pub(super) fn current_snapshot(&self) -> io::Result<Option<Snapshot>> {
        let Some(path) = self.snapshot_files()?.pop() else {
            return Ok(None);
        };
        let mut f = File::open(&path)?;
        let header = read_header(&mut BufReader::new(&mut f))?;
        f.rewind()?;
        Ok(Some(Snapshot {
            meta: header.meta,
            snapshot: f,
        }))
    }

    /// Replace the whole state with the snapshot in `file`.
    pub(super) async fn install(&self, meta: &SnapshotMeta, mut file: File) -> io::Result<()> {
        let lock = self.shared.lock.clone();
        let _guard = lock.write().await;
        // Keep the snapshot as our current one first: it is also what an
        // interrupted install is finished from.
        file.rewind()?;
        let path = self.write_snapshot_file(meta, |w| io::copy(&mut file, w).map(|_| ()))?;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.load_snapshot_file(&path, Some(&meta)))
            .await
            .map_err(io::Error::other)??;
        self.shared.syncer.sync().await
    }

    /// Clear the tree and load `path` into it. Blocking.
    fn load_snapshot_file(&self, path: &Path, expect: Option<&SnapshotMeta>) -> io::Result<()> {
        let tree = &self.shared.tree;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        tree.insert(keys::INSTALLING, name.as_bytes())
            .map_err(sled_err)?;
        let mut r = BufReader::new(File::open(path)?);
        let header = read_header(&mut r)?;
        if let Some(meta) = expect {
            if header.meta.last_log_id != meta.last_log_id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "snapshot file does not match its meta",
                ));
            }
        }
        for prefix in [keys::RECORD, keys::EXPIRY] {
            let mut batch = sled::Batch::default();
            for item in tree.scan_prefix([prefix]) {
                batch.remove(item.map_err(sled_err)?.0);
            }
            tree.apply_batch(batch).map_err(sled_err)?;
        }
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        while let Some(k) = read_frame(&mut r)? {
            let v = read_frame(&mut r)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated snapshot"))?;
            let rk = keys::parse_record(&k).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "bad record key in snapshot")
            })?;
            let rec: Record = decode(&v)?;
            batch.insert(keys::expiry(record::expires_at(&rec), &rk), &[] as &[u8]);
            batch.insert(k, v);
            pending += 1;
            if pending == 10_000 {
                tree.apply_batch(std::mem::take(&mut batch))
                    .map_err(sled_err)?;
                pending = 0;
            }
        }
        batch.insert(keys::APPLIED, encode(&header.meta.last_log_id)?);
        batch.insert(keys::MEMBERSHIP, encode(&header.meta.last_membership)?);
        batch.insert(keys::CLOCK, encode(&header.clock_ms)?);
        batch.insert(keys::LAST_TOKEN, encode(&header.last_token)?);
        batch.remove(keys::INSTALLING);
        tree.apply_batch(batch).map_err(sled_err)?;
        self.set_clock(header.clock_ms);
        self.shared
            .last_token
            .store(header.last_token, std::sync::atomic::Ordering::Release);
        let applied = header.meta.last_log_id.as_ref().map_or(0, |l| l.index());
        self.shared.applied.send_replace(applied);
        self.notify_all_watches();
        Ok(())
    }

    /// If the node stopped while installing a snapshot, finish it now.
    pub(super) fn finish_interrupted_install(&self) -> io::Result<()> {
        let Some(name) = self.shared.tree.get(keys::INSTALLING).map_err(sled_err)? else {
            return Ok(());
        };
        let path = self
            .shared
            .snapshot_dir
            .join(String::from_utf8_lossy(&name).as_ref());
        tracing::warn!(path = %path.display(), "finishing an interrupted snapshot install");
        self.load_snapshot_file(&path, None)?;
        self.shared.syncer.sync_now()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = File;

    #[tracing::instrument(level = "info", skip_all)]
    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let guard = self.shared.lock.clone().read_owned().await;
        let this = self.clone();
        let path = tokio::task::spawn_blocking(move || -> io::Result<(PathBuf, SnapshotMeta)> {
            let _guard = guard;
            let meta = SnapshotMeta {
                last_log_id: this.applied_log_id()?,
                last_membership: this.membership()?,
            };
            let header = Header {
                meta: meta.clone(),
                clock_ms: this.clock_ms(),
                last_token: this.last_token(),
            };
            let path = this.write_snapshot_file(&meta, |w| {
                w.write_all(MAGIC)?;
                write_frame(w, &encode(&header)?)?;
                for item in this.shared.tree.scan_prefix([keys::RECORD]) {
                    let (k, v) = item.map_err(sled_err)?;
                    write_frame(w, &k)?;
                    write_frame(w, &v)?;
                }
                Ok(())
            })?;
            Ok((path, meta))
        })
        .await
        .map_err(io::Error::other)??;
        let (path, meta) = path;
        tracing::info!(path = %path.display(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: File::open(path)?,
        })
    }
}
