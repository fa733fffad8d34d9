//! What sled has made durable of Raft's own state, recorded outside sled,
//! and the check at open that sled still holds it.
//!
//! sled checks every message of its log with a CRC, but at open it takes
//! the first bad one for the end of its log: a flipped bit silently takes
//! the whole database back to the moment before it was written. (Tried on
//! sled 0.34.7 with a byte flipped at 40 offsets of a 2 MB database: 20
//! opened with everything, 10 opened without the last 77 to 644 of 3,000
//! writes and no error, 10 panicked at open.) For the state machine that
//! is what a power cut does, and the Raft log makes it good by applying
//! its entries again. For Raft's own state it is not: a vote taken back
//! lets this node vote twice in one term (two leaders), a purge point
//! taken back leaves the state machine behind entries the log no longer
//! has, and a lost rejoin marker lets a node that cut an acknowledged
//! record vote without it (`rejoin.rs`).
//!
//! So after every sled fsync the values it covered (read before its flush)
//! are written to `sled.mark` beside the database, only when they changed
//! (votes and purges are rare: this costs no fsync on the write path). At
//! open sled must hold at least the vote and purge point recorded there,
//! or the node refuses to start with the operator's remedy; a recorded
//! rejoin marker that sled lacks is put back (a crash between sled's
//! fsync and this file's write after the marker was cleared looks the
//! same, and keeping the marker is the safe reading: the log clears it at
//! open if it holds the entry).
//!
//! This module decides nothing about Raft; it only compares what was made
//! durable with what is found.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::durable::sled_err;
use super::keys::{PURGED, RAFT_TREE, REJOIN_UNTIL, VOTE};
use crate::codec::{decode, encode};
use crate::raft::types::{LogId, Vote};

/// The file, in the data directory (beside `sled/`, never inside it).
pub const FILE: &str = "sled.mark";

/// Raft's state in sled, as one fsync covered it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Marked {
    pub vote: Option<Vote>,
    pub purged: Option<LogId>,
    pub rejoin_until: Option<u64>,
}

impl Marked {
    /// The values in sled now (written, durable or not).
    pub fn read(db: &sled::Db) -> io::Result<Marked> {
        let meta = db.open_tree(RAFT_TREE).map_err(sled_err)?;
        let get = |k: &[u8]| meta.get(k).map_err(sled_err);
        Ok(Marked {
            vote: get(VOTE)?.map(|v| decode(&v)).transpose()?,
            purged: get(PURGED)?.map(|v| decode(&v)).transpose()?,
            rejoin_until: get(REJOIN_UNTIL)?.map(|v| decode(&v)).transpose()?,
        })
    }
}

/// `found` is not behind `recorded` (both only ever grow).
fn at_least<T: PartialOrd>(found: &Option<T>, recorded: &Option<T>) -> bool {
    matches!(
        found.partial_cmp(recorded),
        Some(Ordering::Greater | Ordering::Equal)
    )
}

/// The mark file of one data directory.
pub struct SledMark {
    path: PathBuf,
    /// What the file holds (`None`: no file yet, e.g. a data directory from
    /// before it existed; the first sync writes one).
    written: Mutex<Option<Marked>>,
}

impl SledMark {
    /// Read `dir/sled.mark`, if there is one. Its CRC must match: it is
    /// replaced by rename, so a bad one is damage, not a torn write.
    pub fn load(dir: &Path) -> io::Result<SledMark> {
        let path = dir.join(FILE);
        let written = match fs::read(&path) {
            Ok(bytes) => Some(parse(&bytes).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: damaged (its checksum does not match), so this node cannot tell \
                         whether sled kept its vote. {}",
                        path.display(),
                        super::REMEDY
                    ),
                )
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        Ok(SledMark {
            path,
            written: Mutex::new(written),
        })
    }

    /// Compare sled with the mark, at open, before anything reads Raft's
    /// state: refuse a sled that lost a vote or purge point it had made
    /// durable; put back a rejoin marker it lacks.
    pub fn check(&self, db: &sled::Db) -> io::Result<()> {
        let Some(recorded) = self
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let found = Marked::read(db)?;
        let lost = |what: &str, found: String, recorded: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: sled holds {what} {found}, behind the {recorded} it had made durable \
                     ({}): the database is damaged and lost acknowledged state. This node \
                     must not start. {}",
                    db_dir(&self.path).display(),
                    self.path.display(),
                    super::REMEDY
                ),
            )
        };
        if !at_least(&found.vote, &recorded.vote) {
            return Err(lost(
                "the vote",
                format!("{:?}", found.vote),
                format!("{:?}", recorded.vote),
            ));
        }
        if !at_least(&found.purged, &recorded.purged) {
            return Err(lost(
                "the purge point",
                format!("{:?}", found.purged),
                format!("{:?}", recorded.purged),
            ));
        }
        if let (Some(until), true) = (
            recorded.rejoin_until,
            found.rejoin_until < recorded.rejoin_until,
        ) {
            tracing::warn!(
                entry = until,
                "sled lacks the rejoin marker its mark records; putting it back"
            );
            let meta = db.open_tree(RAFT_TREE).map_err(sled_err)?;
            meta.insert(REJOIN_UNTIL, encode(&until)?)
                .map_err(sled_err)?;
        }
        Ok(())
    }

    /// Record `seen` (read before a sled flush that has since been
    /// fsynced). The vote and purge point only grow; the rejoin marker is
    /// taken as seen. Writes the file only when something changed.
    pub fn advance(&self, seen: Marked) -> io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = seen;
        if let Some(old) = written.as_ref() {
            if !at_least(&next.vote, &old.vote) {
                next.vote = old.vote;
            }
            if !at_least(&next.purged, &old.purged) {
                next.purged = old.purged;
            }
        }
        if written.as_ref() == Some(&next) {
            return Ok(());
        }
        self.write(&next)?;
        *written = Some(next);
        Ok(())
    }

    /// Temporary file, fsync, rename, fsync the directory: the old mark or
    /// the new one, whole.
    fn write(&self, m: &Marked) -> io::Result<()> {
        let body = encode(m)?;
        let mut bytes = crc32fast::hash(&body).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let tmp = self.path.with_extension("mark.tmp");
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", tmp.display()));
        let mut f = File::create(&tmp).map_err(named)?;
        f.write_all(&bytes).map_err(named)?;
        f.sync_all().map_err(named)?;
        fs::rename(&tmp, &self.path).map_err(named)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The sled directory beside the mark.
fn db_dir(mark: &Path) -> PathBuf {
    mark.with_file_name("sled")
}

fn parse(bytes: &[u8]) -> Option<Marked> {
    let (crc, body) = bytes.split_first_chunk::<4>()?;
    (u32::from_le_bytes(*crc) == crc32fast::hash(body))
        .then(|| decode(body).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rejoin marker sled lost (or one cleared just before a crash that
    /// kept the old mark) is put back: the node then waits to hold the
    /// entry again before it votes, which is the safe reading of both.
    #[test]
    fn a_rejoin_marker_sled_lacks_is_put_back_and_a_lost_vote_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let mark = SledMark::load(dir.path()).unwrap();
        let vote = Vote::new(4, 2);
        mark.advance(Marked {
            vote: Some(vote),
            rejoin_until: Some(9),
            ..Marked::default()
        })
        .unwrap();
        let meta = db.open_tree(RAFT_TREE).unwrap();
        meta.insert(VOTE, encode(&vote).unwrap()).unwrap();
        mark.check(&db).unwrap();
        assert_eq!(Marked::read(&db).unwrap().rejoin_until, Some(9));

        meta.insert(VOTE, encode(&Vote::new(3, 2)).unwrap())
            .unwrap();
        let Err(err) = mark.check(&db) else {
            panic!("an older vote must be refused")
        };
        assert!(err.to_string().contains(super::super::REMEDY), "{err}");
    }

    #[test]
    fn a_damaged_mark_is_refused_and_a_good_one_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mark = SledMark::load(dir.path()).unwrap();
        let m = Marked {
            rejoin_until: Some(7),
            ..Marked::default()
        };
        mark.advance(m.clone()).unwrap();
        let again = SledMark::load(dir.path()).unwrap();
        assert_eq!(*again.written.lock().unwrap(), Some(m));
        let p = dir.path().join(FILE);
        let mut bytes = fs::read(&p).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&p, bytes).unwrap();
        let Err(err) = SledMark::load(dir.path()) else {
            panic!("a damaged mark must be refused")
        };
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
