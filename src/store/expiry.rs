//! The expiry index: every record of a state machine tree by the time its
//! retention ends, so a sweep finds the records it may remove in time
//! order without scanning the tree.
//!
//! It lives in memory only. It is derived state: opening a data directory
//! builds it from the records (the same scan that builds the key filter),
//! a snapshot install builds it while it fills the new tree, and apply keeps
//! it in step with every record it stages. Kept in sled, as before, it cost
//! a second tree insert per record written, on every node: sled copies a
//! leaf per insert, which made the index a third of the cost of writing
//! applied records to sled (BENCHMARKS.md). Entries take about 80 bytes
//! each (the encoded record key, the time and the tree's share).
//!
//! The order is (expiry time, encoded record key), the order the sled index
//! had, so every replica sweeps the same records in the same order.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

/// `(expires_at_ms, encoded record key)` of every record of one tree.
#[derive(Default)]
pub(super) struct ExpiryIndex {
    set: Mutex<BTreeSet<(u64, Box<[u8]>)>>,
}

impl ExpiryIndex {
    /// An index of `entries`, in any order: built whole (sorted once,
    /// then laid out), which at a million records is several times faster
    /// than inserting them one by one as they come from the tree.
    pub(super) fn of(entries: Vec<(u64, Box<[u8]>)>) -> ExpiryIndex {
        ExpiryIndex {
            set: Mutex::new(entries.into_iter().collect()),
        }
    }

    fn set(&self) -> MutexGuard<'_, BTreeSet<(u64, Box<[u8]>)>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record under `rk` (an encoded record key) expires at `at_ms`.
    pub(super) fn insert(&self, at_ms: u64, rk: &[u8]) {
        self.set().insert((at_ms, rk.into()));
    }

    /// The record under `rk` no longer expires at `at_ms` (it changed or
    /// went).
    pub(super) fn remove(&self, at_ms: u64, rk: &[u8]) {
        self.set().remove(&(at_ms, rk.into()));
    }

    /// Whether some record's retention has ended at `now_ms`.
    pub(super) fn any_due(&self, now_ms: u64) -> bool {
        self.set().first().is_some_and(|(at, _)| *at <= now_ms)
    }

    /// The first `limit` entries due at `now_ms`, oldest first.
    pub(super) fn due(&self, now_ms: u64, limit: usize) -> Vec<(u64, Box<[u8]>)> {
        self.set()
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(limit)
            .cloned()
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_in_time_then_key_order_up_to_the_limit() {
        let x = ExpiryIndex::default();
        x.insert(30, b"rb");
        x.insert(10, b"rz");
        x.insert(20, b"ra");
        x.insert(20, b"r0");
        x.insert(40, b"rc");
        assert!(!x.any_due(9));
        assert!(x.any_due(10));
        let due: Vec<_> = x
            .due(30, 10)
            .into_iter()
            .map(|(at, k)| (at, k.to_vec()))
            .collect();
        assert_eq!(
            due,
            [
                (10, b"rz".to_vec()),
                (20, b"r0".to_vec()),
                (20, b"ra".to_vec()),
                (30, b"rb".to_vec())
            ]
        );
        assert_eq!(x.due(30, 2).len(), 2);
        x.remove(10, b"rz");
        x.remove(10, b"ra"); // not there at that time: nothing changes
        assert_eq!(x.len(), 4);
        assert!(!x.any_due(19));
    }
}
