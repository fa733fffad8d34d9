//! The bytes of the newest log entries, as the log encoded them, so that
//! an entry is encoded once: the log writes these bytes to its segment, and
//! replication (`raft::network`) copies the same bytes into the message to
//! each follower instead of encoding the entry again per follower.
//!
//! An entry is found by its whole log id (term, leader and index). Raft
//! never gives two different entries one log id, so bytes found are the
//! entry's, even if the log was cut back and written again since.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use crate::raft::types::LogId;

/// About how many bytes of encodings are kept: the newest entries, which
/// replication sends next. 4 MiB is some 20,000 claims; a follower further
/// behind gets its entries encoded afresh.
pub const KEPT_BYTES: usize = 4 * 1024 * 1024;

/// Encodings of consecutive entries, the newest last.
#[derive(Default)]
pub struct EncodedEntries {
    ring: Mutex<Ring>,
    /// Entries served from here ([`Self::get`] found them).
    hits: AtomicU64,
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<(LogId, Bytes)>,
    bytes: usize,
}

impl EncodedEntries {
    /// Keep the encodings of entries just written, in index order. One
    /// that does not follow the newest kept (the log was cut back, or
    /// starts again after a snapshot) drops the older ones first.
    pub(super) fn keep(&self, written: Vec<(LogId, Bytes)>) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        for (id, bytes) in written {
            if let Some((last, _)) = ring.entries.back() {
                if last.index + 1 != id.index {
                    ring.entries.clear();
                    ring.bytes = 0;
                }
            }
            ring.bytes += bytes.len();
            ring.entries.push_back((id, bytes));
            while ring.bytes > KEPT_BYTES && ring.entries.len() > 1 {
                if let Some((_, old)) = ring.entries.pop_front() {
                    ring.bytes -= old.len();
                }
            }
        }
    }

    /// The encoding of the entry with log id `id`, if it is kept.
    pub fn get(&self, id: &LogId) -> Option<Bytes> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let first = ring.entries.front()?.0.index;
        let at = usize::try_from(id.index.checked_sub(first)?).ok()?;
        let (kept, bytes) = ring.entries.get(at)?;
        if kept != id {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(bytes.clone())
    }

    /// How many entries [`Self::get`] served.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::log_id;

    use crate::raft::types::TypeConfig;

    fn id(term: u64, index: u64) -> LogId {
        log_id::<TypeConfig>(term, 1, index)
    }

    fn bytes_of(term: u64, index: u64) -> Bytes {
        Bytes::from(format!("{term}/{index}"))
    }

    #[test]
    fn finds_an_entry_by_its_whole_log_id() {
        let e = EncodedEntries::default();
        e.keep((1..=3).map(|i| (id(1, i), bytes_of(1, i))).collect());
        assert_eq!(e.get(&id(1, 2)), Some(bytes_of(1, 2)));
        // Same index, another term: not this entry.
        assert_eq!(e.get(&id(2, 2)), None);
        assert_eq!(e.get(&id(1, 4)), None);
        assert_eq!(e.get(&id(1, 0)), None);
        assert_eq!(e.hits(), 1);
    }

    #[test]
    fn a_log_cut_back_and_written_again_serves_the_new_entries() {
        let e = EncodedEntries::default();
        e.keep((1..=5).map(|i| (id(1, i), bytes_of(1, i))).collect());
        // A new leader's entry 3 replaces the old 3..=5.
        e.keep(vec![(id(2, 3), bytes_of(2, 3))]);
        assert_eq!(e.get(&id(2, 3)), Some(bytes_of(2, 3)));
        assert_eq!(e.get(&id(1, 3)), None);
        assert_eq!(e.get(&id(1, 2)), None, "dropped with the cut");
    }

    #[test]
    fn keeps_about_kept_bytes_of_the_newest() {
        let e = EncodedEntries::default();
        let big = Bytes::from(vec![0u8; KEPT_BYTES / 4]);
        e.keep((1..=10).map(|i| (id(1, i), big.clone())).collect());
        assert_eq!(e.get(&id(1, 10)), Some(big.clone()));
        assert_eq!(e.get(&id(1, 7)), Some(big));
        assert_eq!(e.get(&id(1, 6)), None);
    }
}
