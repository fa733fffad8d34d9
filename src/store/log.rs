//! The Raft log (`RaftLogStorage`): append-only segment files of our own,
//! with the vote, the purge point and the committed id in sled.
//!
//! Why not sled for the log: an append is the one write on the path of every
//! claim, and a sled insert costs a tree update, page-cache churn and, at
//! flush, a `sync_file_range` per buffer. Here an append is one `pwrite` of
//! all its entries, and the group-commit thread makes it durable with one
//! `fdatasync` for everything appended meanwhile. An append is acknowledged
//! only after that. A follower's append that comes after a quiet spell (no
//! round for [`QUIET`]) runs its round on the appending task instead: the
//! follower has nothing to do for those entries until they are durable, and
//! handing the round to a thread and being woken back by it costs two
//! wake-ups on the write's path (about 50 µs each on a KVM guest).
//!
//! Layout: `log/<first index, 20 digits>.seg`, each a run of records
//! `[payload length u32 LE | 1 << 31][crc32 of payload u32 LE][payload][0xA5]`,
//! the payload a bincode [`Entry`]; the entries of a segment have
//! consecutive indexes from the one in its name. (Records written before
//! the end byte existed lack the high bit and the end byte; both kinds are
//! read.)
//!
//! The active segment is kept zero-filled up to [`ZEROED_AHEAD`] bytes past
//! its last record, so an append overwrites blocks the file already has
//! and its `fdatasync` has no file size to commit: on ext4 that is one
//! journal commit fewer per group commit (about 0.2 ms against 0.13 ms per
//! synced 4 KiB write on this project's test machine, 0.38 against 0.26
//! with three nodes on one disk). A segment is cut back to its last record
//! when the next one starts.
//!
//! Recovery at open. A record is valid when it is whole, its checksum
//! matches and it decodes to the entry whose index belongs there.
//! - Kept: zeros from the end of the last record to the end of the last
//!   segment (the zero-filled room ahead of appends).
//! - Cut: a bad or short record in the last segment with nothing valid
//!   after it. "Nothing valid" means that at no byte offset after the bad
//!   point is there a valid-checksum record of an entry whose index could
//!   follow. The segment is cut at the bad record. Two kinds:
//!   - a torn write (zeros, part of a record: a write the crash
//!     interrupted, so never acknowledged). In the zero-filled room a torn
//!     record is as long as its length field says, but its end byte is
//!     missing: the part of it in its last 512-byte sector is zeros;
//!   - a damaged record: whole by its length field but failing its check,
//!     or one whose length field alone was hit (the rest of the file
//!     matches its checksum). This node may have acknowledged it, so
//!     before cutting it records, durably, that it must regain that entry
//!     before it votes again (see `rejoin.rs`).
//! - Also cut: a torn record in the last segment with valid records after
//!   it. One `pwrite` of several records reaches the disk sector by
//!   sector, in any order, so a crash can leave a later part written and
//!   an earlier one not. Nothing from the torn record on was acknowledged:
//!   an acknowledgement waits for an `fdatasync` begun after its own
//!   write, which would have made the earlier sector durable too. Torn
//!   means a sector of the record still holds the room's zeros where no
//!   written record has them: its header is all zeros, or its end byte
//!   (never zero) lies in a 512-byte sector of zeros that ends before the
//!   next valid record (see [`torn_at`]).
//! - Refused (an `InvalidData` error naming the file, the byte offset, the
//!   entry index expected there and, for the last segment, how many valid
//!   records follow; the file is left untouched and the node must not start):
//!   a bad record that is not torn in the last segment with any valid
//!   record after it, since those may have been acknowledged; a bad record
//!   in any other segment; a valid record holding the wrong index; a gap
//!   between segments.
//! - Every segment kept is fsynced (`sync_data`; `sync_all` for one just
//!   cut) before it is used, and the directory after: what an earlier run
//!   wrote may be in the page cache only, if its fsync failed.
//!
//! Caveats of the rule. A disk that loses a sector it had reported
//! durable (a lost write), reading back the zeros the room held there,
//! looks like a torn write: the records from there on are cut as never
//! acknowledged, with no rejoin mark. So does a write whose earlier
//! `fdatasync` failed if the node then ran on in the same boot (the
//! kernel may keep such pages clean but unwritten) and the power failed
//! later. Both are rarer than a torn write after a power loss, which must
//! not stop the node: every node of a cluster that lost power together
//! might hold one, and none could then be restored but from a backup. A
//! record torn only in its middle (its header and end byte on disk, a
//! sector between them not) is not told from a damaged one holding zeros
//! (a result may), so with valid records after it the log is still
//! refused.
//!
//! Recent entries stay in memory (up to [`CACHE_BYTES`]) for replication;
//! older ones are read back from their segment.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::commit_hint::CommitHint;
use super::durable::{sled_err, GroupCommit, Syncer, Waiter};
use super::keys::{COMMITTED, PURGED, VOTE};
use super::rejoin::Rejoin;
use super::test_hooks;
use crate::codec::{decode, encode};
use crate::raft::types::{Entry, LogId, NodeId, TypeConfig, Vote};

/// The segment appends go to: its path (for the fsync ledger) and file;
/// both shared, so the group commit takes them without allocating.
type ActiveSegment = (Arc<Path>, Arc<File>, Arc<AtomicU64>);

/// By default a new segment is started once the current one is this big.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// The most recent entries kept in memory, by their encoded size (decoded,
/// they take about twice that: a heap profile at 300,000 records showed
/// ~67 MiB of entries for a 32 MiB cache; the bytes written, kept for
/// replication, take that size once more). 8 MiB is some 40,000 claims,
/// more than a follower that is merely slow falls behind; one further back
/// is read from the segments or sent a snapshot.
pub const CACHE_BYTES: usize = 8 * 1024 * 1024;
const HEADER: usize = 8;
/// Set in a record's length field when an [`END`] byte follows its payload.
const ENDED: u32 = 1 << 31;
/// The last byte of every record written now: never zero, so a record
/// that reached the disk whole is told from one a crash cut short in the
/// zero-filled room after the last record.
const END: u8 = 0xA5;
/// How far past its last record the active segment is kept zero-filled
/// (at most a segment's size).
pub const ZEROED_AHEAD: u64 = 1024 * 1024;
/// The unit a disk writes whole or not at all, at the least.
const SECTOR: usize = 512;

struct Segment {
    first: u64,
    /// Index the next entry appended here must have.
    next: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where the next record goes: the end of the last one.
    len: u64,
    /// The file's size: zeros from `len` up to it.
    zeroed: u64,
    /// `len` for the group-commit thread's fsync ledger (test hooks).
    end: Arc<AtomicU64>,
}

/// Where an entry's record sits.
#[derive(Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

struct Inner {
    dir: PathBuf,
    segment_bytes: u64,
    /// In index order; the last one is appended to.
    segments: Vec<Segment>,
    /// Records of entries `first..`, contiguous.
    locs: VecDeque<Loc>,
    first: u64,
    last_log_id: Option<LogId>,
    /// The newest entries, a suffix of the log.
    cache: VecDeque<Cached>,
    cache_bytes: usize,
}

/// A cached entry, its encoded size and, if this run wrote it, the bytes
/// it wrote (which replication sends on as they are: [`Encodings`]).
struct Cached {
    entry: Entry,
    size: usize,
    encoded: Option<bytes::Bytes>,
}

/// The Raft log; clones share it.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    /// The segment appends go to, for the group-commit thread to fsync.
    active: Arc<Mutex<Option<ActiveSegment>>>,
    commit: Arc<GroupCommit>,
    meta: sled::Tree,
    /// The commit point Raft saves, written to `meta` off Raft's path.
    committed: Arc<CommitHint>,
    /// The sled database (vote, purge point, state machine).
    sled_sync: Arc<Syncer>,
    /// Segment files fsynced by `open`: every one it kept.
    synced_at_open: usize,
    rejoin: Arc<Rejoin>,
    /// This node's id, once the node knows it: entries another node led
    /// are made durable on the appending task when the log has been quiet
    /// (see `append`).
    own_id: Arc<OnceLock<NodeId>>,
    /// The bytes of the newest entries as written, which replication sends
    /// on without encoding them again.
    encodings: Encodings,
}

/// The bytes this log wrote for the entries it still caches, found by
/// whole log id (term, leader and index; Raft never gives two entries
/// one), so that an entry is encoded once: replication
/// (`raft::network::encode_append`) copies them into the message to each
/// follower. Entries read back at open have none and are encoded afresh.
#[derive(Clone)]
pub struct Encodings {
    inner: Arc<Mutex<Inner>>,
    hits: Arc<AtomicU64>,
}

impl Encodings {
    /// The bytes of each of `ids`, where the log has them.
    pub fn get<'a>(&self, ids: impl Iterator<Item = &'a LogId>) -> Vec<Option<bytes::Bytes>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let found: Vec<_> = ids
            .map(|id| {
                let c = inner.cached(id.index)?;
                (c.entry.log_id == *id).then(|| c.encoded.clone())?
            })
            .collect();
        let hits = found.iter().flatten().count() as u64;
        self.hits.fetch_add(hits, Ordering::Relaxed);
        found
    }

    /// How many entries [`Self::get`] found.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// How long the log's group commit must have been idle before a
/// follower's append is synced on its own task rather than handed to a
/// round thread: shorter gaps mean a stream of appends, which rounds
/// group.
const QUIET: std::time::Duration = std::time::Duration::from_micros(250);

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `e`, naming the file (or directory) and what was being done to it.
fn at(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

/// Why a damaged segment is refused rather than cut, and what the operator
/// can do about it.
fn damaged(path: &Path, offset: u64, want: u64, valid_after: usize, is_last: bool) -> io::Error {
    let why = if is_last {
        let records = if valid_after == 1 {
            "record"
        } else {
            "records"
        };
        format!(
            "with {valid_after} valid {records} after it, so not a torn write; \
             entries after it may have been acknowledged and the log is not cut"
        )
    } else {
        "in a segment before the last, where no torn write can be".to_string()
    };
    corrupt(format!(
        "{}: damaged record at byte {offset}, where entry {want} belongs, {why}. \
         This node must not start. {}",
        path.display(),
        super::REMEDY
    ))
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A record's header at `pos`: its payload length, whether an [`END`]
/// byte follows the payload, and the payload's checksum.
fn header_at(bytes: &[u8], pos: usize) -> Option<(usize, bool, u32)> {
    let h = bytes.get(pos..pos.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    Some(((len & !ENDED) as usize, len & ENDED != 0, crc))
}

/// The bytes a record with this header takes, from its header on.
fn record_len(len: usize, ended: bool) -> usize {
    HEADER + len + usize::from(ended)
}

/// A record from `pos` to `end` whose end byte is missing the way a crash
/// leaves it in the zero-filled room: its part in its last sector (from
/// its start at most) is all zeros, end byte included.
fn cut_short_in_zeros(bytes: &[u8], pos: usize, end: usize) -> bool {
    let from = pos.max(last_sector(end));
    bytes[from..end].iter().all(|&b| b == 0)
}

/// Where the 512-byte sector holding the last byte before `end` starts.
fn last_sector(end: usize) -> usize {
    (end - 1) / SECTOR * SECTOR
}

/// Whether the bad record at `pos`, with a valid record starting at
/// `limit`, is part of a write the crash interrupted: a sector of it still
/// holds the zero-filled room's zeros where a written record never has
/// them. Either its header is all zeros (no record has a zero length), or
/// its end byte (never zero) lies in a 512-byte sector of zeros that
/// starts within it and ends before `limit`. Not when its length
/// field alone is damaged (what lies between its header and `limit` is
/// the payload its checksum names), nor when it would run past `limit`.
fn torn_at(bytes: &[u8], pos: usize, limit: usize) -> bool {
    let limit = limit.min(bytes.len());
    let Some((len, ended, crc)) = header_at(bytes, pos) else {
        return false;
    };
    if (len, ended, crc) == (0, false, 0) {
        // An all-zero header.
        return true;
    }
    let end = pos.saturating_add(record_len(len, ended));
    if len == 0 || !ended || end > limit || payload_alone(&bytes[pos + HEADER..limit], crc) {
        return false;
    }
    let sector = last_sector(end);
    sector >= pos
        && sector + SECTOR <= limit
        && bytes[sector..sector + SECTOR].iter().all(|&b| b == 0)
}

/// `(offset, length)` of each whole, valid record from the start of a
/// segment's bytes, up to the first that is not (for tools and tests that
/// look inside a segment).
pub fn record_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some((_, end)) = record_at(bytes, pos, |_| true) {
        out.push((pos, end - pos));
        pos = end;
    }
    out
}

/// Decode and check one record's payload.
fn decode_record(payload: &[u8], crc: u32) -> io::Result<Entry> {
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("log record checksum mismatch".into()));
    }
    decode(payload)
}

/// A whole record at `pos` with a correct checksum, decoding to an entry:
/// the entry and where the record ends. `accept` sees the entry's log id
/// (decoded from the payload's start, before the checksum is computed)
/// and can turn it away cheaply.
fn record_at(bytes: &[u8], pos: usize, accept: impl Fn(u64) -> bool) -> Option<(Entry, usize)> {
    let (len, ended, crc) = header_at(bytes, pos)?;
    // No entry encodes to nothing.
    if len == 0 {
        return None;
    }
    let payload = bytes.get(pos + HEADER..(pos + HEADER).checked_add(len)?)?;
    let end = pos + record_len(len, ended);
    if ended && bytes.get(end - 1) != Some(&END) {
        return None;
    }
    // An entry's encoding starts with its log id (the first field of
    // `Entry`), so a wrong index is seen without hashing the payload.
    let id: LogId = decode(payload).ok()?;
    if !accept(id.index()) {
        return None;
    }
    let entry = decode_record(payload, crc).ok()?;
    Some((entry, end))
}

/// How many whole, valid records lie after a bad record at `bad`, where
/// entry `want` belongs. Past damage the record boundaries are unknown, so
/// every byte offset is tried. A record found counts only if its index
/// could follow: at least `want`, and no further ahead than the records
/// that fit between `bad` and it (each takes more than `HEADER` bytes).
/// Also where the first of them starts.
fn valid_records_after(bytes: &[u8], bad: usize, want: u64) -> (usize, Option<usize>) {
    let mut count = 0;
    let mut first = None;
    let mut pos = bad + 1;
    while pos + HEADER < bytes.len() {
        let fit = ((pos - bad) / (HEADER + 1)) as u64;
        match record_at(bytes, pos, |i| i >= want && i - want <= fit) {
            Some((_, end)) => {
                count += 1;
                first.get_or_insert(pos);
                pos = end;
            }
            None => pos += 1,
        }
    }
    (count, first)
}

/// What [`scan`] found in a segment.
struct Scanned {
    /// The whole, valid records from the start, in order.
    records: Vec<(Entry, Loc)>,
    /// Where they end. Anything after is a bad record (or a torn tail).
    valid: u64,
    /// Whole valid records found after the bad one: 0 for a torn tail.
    valid_after: usize,
    /// With valid records after it, the bad record shows a write the
    /// crash interrupted ([`torn_at`]).
    torn: bool,
    /// How many entries the bad bytes may hold that were acknowledged:
    /// 0 for a torn write (see [`possibly_acknowledged`]).
    damaged: u64,
    /// Nothing but zeros after the records: the zero-filled room.
    zero_tail: bool,
}

/// How many records from `bad` on may be entries this node acknowledged,
/// though they fail their check: records that are whole by their length
/// fields, chained from `bad`; or one whose length field alone is damaged
/// (what follows its header is exactly the payload its checksum names,
/// with its end byte and the zero-filled room after it, if it has them).
/// A torn write is neither: it ends before its length says, is zeros, or
/// (in the zero-filled room) lacks its end byte.
fn possibly_acknowledged(bytes: &[u8], bad: usize) -> u64 {
    let mut count = 0;
    let mut pos = bad;
    while let Some((len, ended, crc)) = header_at(bytes, pos) {
        let end = pos.saturating_add(record_len(len, ended));
        if len > 0 && end <= bytes.len() {
            if ended && cut_short_in_zeros(bytes, pos, end) {
                // Torn, unless its length field alone is damaged and points
                // into the zero-filled room.
                if payload_alone(&bytes[pos + HEADER..], crc) {
                    count += 1;
                }
                break;
            }
            count += 1;
            pos = end;
            continue;
        }
        if payload_alone(&bytes[pos + HEADER..], crc) {
            count += 1;
        }
        break;
    }
    count
}

/// Whether `rest` (all that follows a header) is the payload `crc` names:
/// alone, or followed by its end byte and zeros.
fn payload_alone(rest: &[u8], crc: u32) -> bool {
    if !rest.is_empty() && crc32fast::hash(rest) == crc {
        return true;
    }
    let body = match rest.iter().rposition(|&b| b != 0) {
        Some(last) => &rest[..=last],
        None => return false,
    };
    matches!(body.split_last(), Some((&END, payload)) if !payload.is_empty() && crc32fast::hash(payload) == crc)
}

/// Read a segment: its run of whole, valid records from the start, and
/// whether anything valid follows the first bad one.
fn scan(path: &Path, first: u64) -> io::Result<Scanned> {
    let bytes = fs::read(path).map_err(|e| at(path, "read", e))?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let want = first + records.len() as u64;
        let Some((entry, end)) = record_at(&bytes, pos, |_| true) else {
            if bytes[pos..].iter().all(|&b| b == 0) {
                return Ok(Scanned {
                    records,
                    valid: pos as u64,
                    valid_after: 0,
                    torn: false,
                    damaged: 0,
                    zero_tail: true,
                });
            }
            let (valid_after, next_valid) = valid_records_after(&bytes, pos, want);
            // With nothing valid after it, a bad record is judged by
            // `possibly_acknowledged`; with valid records after, only one
            // shown torn is cut.
            let torn = next_valid.is_some_and(|next| torn_at(&bytes, pos, next));
            return Ok(Scanned {
                records,
                valid: pos as u64,
                valid_after,
                torn,
                damaged: if valid_after > 0 {
                    0
                } else {
                    possibly_acknowledged(&bytes, pos)
                },
                zero_tail: false,
            });
        };
        if entry.index() != want {
            return Err(corrupt(format!(
                "{}: entry {} at byte {pos} where entry {want} belongs",
                path.display(),
                entry.index()
            )));
        }
        let loc = Loc {
            segment: first,
            offset: pos as u64,
            len: (end - pos) as u32,
        };
        records.push((entry, loc));
        pos = end;
    }
    Ok(Scanned {
        records,
        valid: pos as u64,
        valid_after: 0,
        torn: false,
        damaged: 0,
        zero_tail: false,
    })
}

impl Segment {
    /// A segment found at open, usable only once fsynced: what an earlier
    /// run wrote may sit in the page cache alone (its fsync failed, or the
    /// process died first), and nothing may be acknowledged or built on it
    /// until it is on disk. A segment just cut gets `sync_all` (its length
    /// changed), the others `sync_data`. Counts itself in `synced`.
    #[allow(clippy::too_many_arguments)]
    fn recovered(
        first: u64,
        next: u64,
        path: PathBuf,
        file: File,
        len: u64,
        zeroed: u64,
        cut: bool,
        synced: &mut usize,
    ) -> io::Result<Segment> {
        let res = if cut {
            file.sync_all()
        } else {
            file.sync_data()
        };
        res.map_err(|e| at(&path, "fsync at open", e))?;
        test_hooks::synced(&path, len);
        *synced += 1;
        Ok(Segment {
            first,
            next,
            path,
            file: Arc::new(file),
            len,
            zeroed,
            end: Arc::new(AtomicU64::new(len)),
        })
    }
}

impl Segment {
    /// What the group-commit thread needs of the segment appends go to.
    fn active(&self) -> ActiveSegment {
        (
            Arc::from(self.path.as_path()),
            self.file.clone(),
            self.end.clone(),
        )
    }
}

impl Inner {
    fn last_index(&self) -> Option<u64> {
        self.last_log_id.map(|l| l.index())
    }

    fn segment(&self, first: u64) -> io::Result<&Segment> {
        let i = self.segments.partition_point(|s| s.first < first);
        match self.segments.get(i) {
            Some(s) if s.first == first => Ok(s),
            _ => Err(corrupt(format!("log segment {first} is missing"))),
        }
    }

    fn cache_first(&self) -> u64 {
        self.last_index().map_or(0, |l| l + 1) - self.cache.len() as u64
    }

    fn push_cache(&mut self, entry: Entry, size: usize, encoded: Option<bytes::Bytes>) {
        self.cache.push_back(Cached {
            entry,
            size,
            encoded,
        });
        self.cache_bytes += size;
        while self.cache_bytes > CACHE_BYTES && self.cache.len() > 1 {
            if let Some(c) = self.cache.pop_front() {
                self.cache_bytes -= c.size;
            }
        }
    }

    fn cached(&self, index: u64) -> Option<&Cached> {
        self.cache
            .get(usize::try_from(index.checked_sub(self.cache_first())?).ok()?)
    }

    fn read(&self, index: u64) -> io::Result<Entry> {
        if let Some(c) = self.cached(index) {
            return Ok(c.entry.clone());
        }
        let loc = self.locs[(index - self.first) as usize];
        let seg = self.segment(loc.segment)?;
        let mut buf = vec![0u8; loc.len as usize];
        seg.file.read_exact_at(&mut buf, loc.offset)?;
        let (len, _, crc) = header_at(&buf, 0).expect("a whole header");
        let payload = buf
            .get(HEADER..HEADER + len)
            .ok_or_else(|| corrupt(format!("log record of entry {index} changed on disk")))?;
        decode_record(payload, crc)
    }

    /// Start a new segment whose first entry will be `first`.
    fn roll(&mut self, first: u64) -> io::Result<()> {
        if let Some(last) = self.segments.last() {
            if last.len == 0 {
                // Never written: drop it rather than leave an empty file.
                let last = self.segments.pop().expect("checked");
                fs::remove_file(&last.path)?;
            } else {
                // Everything in it must be durable before appends move on,
                // and it ends at its last record (only the last segment
                // may have zeros after its records).
                if last.zeroed > last.len {
                    last.file.set_len(last.len)?;
                }
                last.file.sync_all()?;
                test_hooks::synced(&last.path, last.len);
            }
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        test_hooks::synced(&path, 0);
        self.segments.push(Segment {
            first,
            next: first,
            path,
            file: Arc::new(file),
            len: 0,
            zeroed: 0,
            end: Arc::new(AtomicU64::new(0)),
        });
        Ok(())
    }
}

impl LogStore {
    pub(super) fn open(
        dir: &Path,
        db: &sled::Db,
        sled_sync: Arc<Syncer>,
        segment_bytes: u64,
    ) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let meta = db.open_tree(super::keys::RAFT_TREE).map_err(sled_err)?;
        let purged: Option<LogId> = match meta.get(PURGED).map_err(sled_err)? {
            Some(v) => Some(decode(&v)?),
            None => None,
        };
        let keep_after = purged.map_or(0, |p| p.index() + 1);
        let rejoin = Arc::new(Rejoin::open(meta.clone(), sled_sync.clone())?);

        let mut firsts = Vec::new();
        for e in fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: Vec::new(),
            locs: VecDeque::new(),
            first: keep_after,
            last_log_id: None,
            cache: VecDeque::new(),
            cache_bytes: 0,
        };
        let count = firsts.len();
        let mut synced_at_open = 0;
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(segment_name(first));
            let is_last = i + 1 == count;
            let Scanned {
                records,
                valid,
                valid_after,
                torn,
                damaged: maybe_acked,
                zero_tail,
            } = scan(&path, first)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| at(&path, "open", e))?;
            let on_disk = file.metadata().map_err(|e| at(&path, "stat", e))?.len();
            // The zero-filled room after the last segment's records stays.
            let room = zero_tail && is_last;
            let cut = valid < on_disk && !room;
            if cut {
                let want = first + records.len() as u64;
                if !is_last || (valid_after > 0 && !torn) {
                    return Err(damaged(&path, valid, want, valid_after, is_last));
                }
                if maybe_acked > 0 {
                    let until = want + maybe_acked - 1;
                    tracing::error!(
                        path = %path.display(), valid, on_disk, entry = want, until,
                        "cutting a damaged log record this node may have acknowledged; \
                         it will neither vote nor campaign until it holds entry {until} again"
                    );
                    rejoin.must_regain(until)?;
                } else {
                    tracing::warn!(
                        path = %path.display(), valid, on_disk, entry = want, valid_after,
                        "cutting a torn write off the log (never acknowledged: with the \
                         records the same unfinished write left after it, if any)"
                    );
                }
                file.set_len(valid)
                    .map_err(|e| at(&path, &format!("cut at byte {valid}"), e))?;
            }
            let next = first + records.len() as u64;
            if next <= keep_after && !is_last {
                // Purged entirely.
                fs::remove_file(&path).map_err(|e| at(&path, "remove", e))?;
                continue;
            }
            let zeroed = if room { on_disk } else { valid };
            let segment = Segment::recovered(
                first,
                next,
                path,
                file,
                valid,
                zeroed,
                cut,
                &mut synced_at_open,
            )?;
            for (entry, loc) in records {
                if entry.index() < keep_after {
                    continue;
                }
                let expect = inner.last_index().map_or(entry.index(), |l| l + 1);
                if entry.index() != expect {
                    return Err(corrupt(format!(
                        "log has a gap: entry {} after {:?}",
                        entry.index(),
                        inner.last_index()
                    )));
                }
                if inner.locs.is_empty() {
                    inner.first = entry.index();
                }
                inner.last_log_id = Some(entry.log_id());
                inner.locs.push_back(loc);
                let size = loc.len as usize;
                inner.push_cache(entry, size, None);
            }
            inner.segments.push(segment);
        }
        sync_dir(dir).map_err(|e| at(dir, "fsync", e))?;
        // A marker left by an earlier run that got the entries back but
        // died before clearing it: what is kept is on disk now.
        if let Some(held) = inner.last_index().or(purged.map(|p| p.index())) {
            rejoin.regained(held);
        }

        let active = Arc::new(Mutex::new(inner.segments.last().map(Segment::active)));
        let to_sync = active.clone();
        let commit = GroupCommit::new("idemkv-log-sync", move || {
            let file = to_sync.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match file {
                Some((path, f, end)) => {
                    // The records' end before the fsync: all of them are on
                    // disk after.
                    let len = test_hooks::enabled().then(|| end.load(Ordering::Acquire));
                    let started = std::time::Instant::now();
                    let r = test_hooks::before_fsync().and_then(|()| f.sync_data());
                    crate::metrics::fsync(started.elapsed());
                    if let (Ok(()), Some(len)) = (&r, len) {
                        test_hooks::synced(&path, len);
                    }
                    r
                }
                None => Ok(()),
            }
        });
        let inner = Arc::new(Mutex::new(inner));
        Ok(LogStore {
            encodings: Encodings {
                inner: inner.clone(),
                hits: Arc::default(),
            },
            inner,
            active,
            commit: Arc::new(commit),
            committed: Arc::new(CommitHint::start(meta.clone())?),
            meta,
            sled_sync,
            synced_at_open,
            rejoin,
            own_id: Arc::new(OnceLock::new()),
        })
    }

    /// Tell the log which node it belongs to (see `own_id`).
    pub fn set_node_id(&self, id: NodeId) {
        let _ = self.own_id.set(id);
    }

    /// Rounds of the log's group commit run on the appending task.
    pub fn inline_syncs(&self) -> u64 {
        self.commit.inline_rounds()
    }

    /// The marker a damaged tail leaves (see `rejoin.rs`).
    pub fn rejoin(&self) -> Arc<Rejoin> {
        self.rejoin.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_active(&self, inner: &Inner) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) =
            inner.segments.last().map(Segment::active);
    }

    /// The segment files, oldest first.
    pub fn segment_files(&self) -> Vec<PathBuf> {
        self.lock()
            .segments
            .iter()
            .map(|s| s.path.clone())
            .collect()
    }

    /// How many segment files `open` fsynced before the log could be used:
    /// all it kept, or the log trusted what the page cache said.
    pub fn synced_at_open(&self) -> usize {
        self.synced_at_open
    }

    /// `(fsync rounds, appends they acknowledged)` of the log.
    pub fn sync_stats(&self) -> (u64, u64) {
        self.commit.stats()
    }

    /// Refuse further fsync waiters and write the commit point (node
    /// shutdown).
    pub fn close(&self) {
        self.commit.close();
        self.committed.close();
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.meta.get(key).map_err(sled_err)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        self.meta.insert(key, encode(value)?).map_err(sled_err)?;
        Ok(())
    }

    /// Start a new log after `last` (a restored snapshot's last entry): as
    /// if every entry up to it had been purged, and with the vote that
    /// elected its leader, so the new cluster's first election is in a
    /// later term than any entry it holds.
    pub(super) fn restored_at(&self, last: &LogId) -> io::Result<()> {
        use openraft::vote::RaftLeaderId;
        let leader = last.committed_leader_id();
        self.put_meta(VOTE, &Vote::new(leader.term(), *leader.node_id()))?;
        self.put_meta(PURGED, last)
    }

    /// Write `entries` to the active segment (not yet durable); the log's
    /// last id after.
    fn write(&self, entries: impl IntoIterator<Item = Entry>) -> io::Result<Option<LogId>> {
        let mut inner = self.lock();
        let mut buf = Vec::new();
        let mut rolled = false;
        for entry in entries {
            let index = entry.index();
            if let Some(last) = inner.last_index() {
                if index != last + 1 {
                    return Err(io::Error::other(format!(
                        "append of entry {index} after {last}"
                    )));
                }
            }
            let needs_roll = match inner.segments.last() {
                None => true,
                Some(s) => s.next != index || (buf.is_empty() && s.len >= inner.segment_bytes),
            };
            if needs_roll {
                flush_buf(&mut inner, &mut buf)?;
                inner.roll(index)?;
                rolled = true;
            }
            let payload = encode(&entry)?;
            let size = u32::try_from(payload.len())
                .ok()
                .filter(|n| n & ENDED == 0)
                .ok_or_else(|| io::Error::other(format!("entry {index} is too large to log")))?;
            let seg = inner.segments.last_mut().expect("rolled above");
            let loc = Loc {
                segment: seg.first,
                offset: seg.len + buf.len() as u64,
                len: record_len(payload.len(), true) as u32,
            };
            seg.next = index + 1;
            buf.extend_from_slice(&(size | ENDED).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            buf.push(END);
            if inner.locs.is_empty() {
                inner.first = index;
            }
            inner.locs.push_back(loc);
            inner.last_log_id = Some(entry.log_id());
            inner.push_cache(entry, loc.len as usize, Some(payload.into()));
        }
        flush_buf(&mut inner, &mut buf)?;
        if rolled {
            self.set_active(&inner);
        }
        Ok(inner.last_log_id)
    }

    /// The bytes of the newest entries as this log wrote them.
    pub fn encodings(&self) -> Encodings {
        self.encodings.clone()
    }
}

/// Write `buf` at the end of the active segment, and keep zeros ahead of it.
fn flush_buf(inner: &mut Inner, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let segment_bytes = inner.segment_bytes;
    let seg = inner.segments.last_mut().expect("a segment to write to");
    seg.file.write_all_at(buf, seg.len)?;
    seg.len += buf.len() as u64;
    seg.end.store(seg.len, Ordering::Release);
    buf.clear();
    if seg.len > seg.zeroed {
        // Past the room: make more. The next fsync commits the new size
        // once; the appends after it need no size change.
        static ZEROS: [u8; ZEROED_AHEAD as usize] = [0; ZEROED_AHEAD as usize];
        let room = &ZEROS[..ZEROED_AHEAD.min(segment_bytes) as usize];
        seg.file.write_all_at(room, seg.len)?;
        seg.zeroed = seg.len + room.len() as u64;
    }
    Ok(())
}

fn bound_index(b: Bound<&u64>, lower: bool) -> Option<u64> {
    match (b, lower) {
        (Bound::Included(x), _) => Some(*x),
        (Bound::Excluded(x), true) => x.checked_add(1),
        (Bound::Excluded(x), false) => x.checked_sub(1),
        (Bound::Unbounded, true) => Some(0),
        (Bound::Unbounded, false) => Some(u64::MAX),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (Some(start), Some(end)) = (
            bound_index(range.start_bound(), true),
            bound_index(range.end_bound(), false),
        ) else {
            return Ok(Vec::new());
        };
        let inner = self.lock();
        let Some(last) = inner.last_index() else {
            return Ok(Vec::new());
        };
        let (start, end) = (start.max(inner.first), end.min(last));
        if start > end || inner.locs.is_empty() {
            return Ok(Vec::new());
        }
        (start..=end).map(|i| inner.read(i)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        let last = self.lock().last_log_id;
        let last_log_id = match (last, last_purged_log_id) {
            (Some(l), Some(p)) => Some(if l.index() >= p.index() { l } else { p }),
            (l, p) => l.or(p),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(VOTE, vote)?;
        self.sled_sync.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced on its own: it only speeds up recovery. Written by a
        // thread of its own: a sled write here waited for every batch of
        // applied records (commit_hint.rs).
        self.committed.save(committed);
        Ok(())
    }

    /// The stored commit point, never beyond the log's last entry: it is
    /// saved unsynced, and may reach the disk (with another sled flush)
    /// ahead of entries this node had not yet fsynced; if those were then
    /// lost (a cut tail), Raft would try to apply entries that are gone and
    /// the node would never start. Capped, it stays a correct hint: what
    /// the log holds up to it was committed, the rest comes from the leader.
    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let stored = match self.committed.newest() {
            Some(saved) => saved,
            None => self.get_meta::<Option<LogId>>(COMMITTED)?.flatten(),
        };
        let last = match self.lock().last_log_id {
            Some(l) => Some(l),
            None => self.get_meta::<LogId>(PURGED)?,
        };
        Ok(match (stored, last) {
            (Some(c), Some(l)) if c.index() > l.index() => Some(l),
            (Some(_), None) => None,
            (c, _) => c,
        })
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let last = self.write(entries)?;
        // Once durable, these entries may be the ones a damaged tail lost.
        let regained = match self.rejoin.until() {
            Some(_) => last.map(|l| (self.rejoin.clone(), l.index())),
            None => None,
        };
        // Acknowledged by the next fdatasync of the active segment, which
        // starts after this write.
        let waiter = Waiter::Callback(Box::new(move |res| {
            if let (Ok(()), Some((rejoin, last))) = (&res, regained) {
                rejoin.regained(last);
            }
            callback.io_completed(res)
        }));
        // A follower (entries another node led) can do nothing for them
        // before they are durable, and its leader waits for the answer:
        // after a quiet spell the fdatasync runs here, saving two thread
        // wake-ups on the write's critical path. The leader's own entries
        // always go to a round thread, since openraft replicates them only
        // after `append` returns.
        let led_elsewhere = {
            use openraft::vote::RaftLeaderId;
            match (self.own_id.get(), last) {
                (Some(me), Some(l)) => l.committed_leader_id().node_id() != me,
                _ => false,
            }
        };
        if !led_elsewhere {
            self.commit.submit(waiter);
        } else if self.commit.run_here_if_quiet(waiter, QUIET) {
            crate::metrics::log_fsync_on_append();
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        {
            let mut inner = self.lock();
            let Some(last) = inner.last_index() else {
                return Ok(());
            };
            if from > last {
                return Ok(());
            }
            if from < inner.first {
                return Err(io::Error::other(format!(
                    "truncate from {from} reaches purged entries (first is {})",
                    inner.first
                )));
            }
            let cut = inner.locs[(from - inner.first) as usize];
            // Later segments go whole, newest first; the one holding `from`
            // is cut at its record.
            while let Some(seg) = inner.segments.last() {
                if seg.first <= cut.segment {
                    break;
                }
                let seg = inner.segments.pop().expect("checked");
                fs::remove_file(&seg.path)?;
            }
            let seg = inner
                .segments
                .last_mut()
                .expect("the segment holding the cut");
            seg.file.set_len(cut.offset)?;
            seg.file.sync_all()?;
            test_hooks::synced(&seg.path, cut.offset);
            seg.len = cut.offset;
            seg.zeroed = cut.offset;
            seg.end.store(cut.offset, Ordering::Release);
            seg.next = from;
            sync_dir(&inner.dir)?;
            let keep = (from - inner.first) as usize;
            inner.locs.truncate(keep);
            let drop_cached = (last + 1 - from) as usize;
            for _ in 0..drop_cached.min(inner.cache.len()) {
                if let Some(c) = inner.cache.pop_back() {
                    inner.cache_bytes -= c.size;
                }
            }
            inner.last_log_id = if inner.locs.is_empty() {
                None
            } else {
                last_log_id
            };
            self.set_active(&inner);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Entries are only dropped once the state machine that holds their
        // effect is durable, and the purge point with it.
        self.put_meta(PURGED, &log_id)?;
        self.sled_sync.sync().await?;
        let upto = log_id.index();
        self.rejoin.regained(upto);
        let mut inner = self.lock();
        while inner.first <= upto && !inner.locs.is_empty() {
            inner.locs.pop_front();
            inner.first += 1;
        }
        inner.first = inner.first.max(upto + 1);
        while !inner.cache.is_empty() && inner.cache_first() <= upto {
            if let Some(c) = inner.cache.pop_front() {
                inner.cache_bytes -= c.size;
            }
        }
        // Whole segments below the purge point go; the active one stays.
        while inner.segments.len() > 1 && inner.segments[0].next <= upto + 1 {
            let seg = inner.segments.remove(0);
            fs::remove_file(&seg.path)?;
        }
        if inner.last_index().is_some_and(|l| l <= upto) {
            inner.last_log_id = None;
        }
        Ok(())
    }
}
