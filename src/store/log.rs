//! The Raft log and vote in sled (`RaftLogStorage`).
//!
//! Entries live in the `log` tree under their big-endian index; the vote, the
//! last purged log id and the committed log id in the `raft` tree. An append
//! is acknowledged, and a vote returns, only after [`Syncer`] made it durable.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::durable::{sled_err, Syncer, Waiter};
use crate::codec::{decode, encode};
use crate::raft::{Entry, LogId, TypeConfig, Vote};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    syncer: Arc<Syncer>,
}

impl LogStore {
    pub(super) fn new(db: &sled::Db, syncer: Arc<Syncer>) -> io::Result<Self> {
        Ok(LogStore {
            log: db.open_tree("log").map_err(sled_err)?,
            meta: db.open_tree("raft").map_err(sled_err)?,
            syncer,
        })
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

    /// Remove entries `start..=end`, one by one: sled batches force a log
    /// buffer write each, and atomicity is not needed here. Purges go
    /// upwards and truncations downwards, so a crash half-way leaves a
    /// contiguous log, never a hole.
    fn remove_range(&self, start: u64, end_inclusive: u64, downwards: bool) -> io::Result<()> {
        let range = self
            .log
            .range(start.to_be_bytes()..=end_inclusive.to_be_bytes());
        let keys: Vec<sled::IVec> = range.keys().collect::<Result<_, _>>().map_err(sled_err)?;
        let ordered: Box<dyn Iterator<Item = sled::IVec>> = if downwards {
            Box::new(keys.into_iter().rev())
        } else {
            Box::new(keys.into_iter())
        };
        for k in ordered {
            self.log.remove(k).map_err(sled_err)?;
        }
        Ok(())
    }
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
        if start > end {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self.log.range(start.to_be_bytes()..=end.to_be_bytes()) {
            let (_, v) = item.map_err(sled_err)?;
            out.push(decode::<Entry>(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        let last = match self.log.last().map_err(sled_err)? {
            Some((_, v)) => Some(decode::<Entry>(&v)?.log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(VOTE, vote)?;
        self.syncer.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced on its own: it only speeds up recovery, and it becomes
        // durable with the next append or vote.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
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
        // In index order, one insert each: a crash keeps a prefix (no hole),
        // and none of it is acknowledged before the sync below.
        for entry in entries {
            self.log
                .insert(entry.index().to_be_bytes(), encode(&entry)?)
                .map_err(sled_err)?;
        }
        self.syncer.submit(Waiter::Callback(Box::new(move |res| {
            callback.io_completed(res)
        })));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        self.remove_range(from, u64::MAX, true)?;
        // Conflicting entries must not come back after a crash.
        self.syncer.sync().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: sled recovers a prefix of writes, so
        // the removals below never survive without it.
        self.put_meta(PURGED, &log_id)?;
        self.remove_range(0, log_id.index(), false)
    }
}
