//! An in-memory filter of the record keys a state machine tree holds, so a
//! read of a key the tree cannot hold (every fresh claim: on the leader's
//! no-write check and on every node's apply) is answered without sled.
//!
//! A Bloom filter ([`fastbloom`]): it may say "maybe" of a key that is not
//! stored (then sled is read, as before), never "absent" of one that is.
//! That one-sidedness is the whole safety argument, so every path that puts
//! a record into a tree adds its key first: apply (before its sled batch),
//! a snapshot install (while it fills the new tree) and opening a data
//! directory (a scan of the tree in force). Removed records stay in the
//! filter; they cost a read each until the filter is rebuilt from the
//! tree, which apply does once [`REBUILD_AFTER`] keys were added.

use std::sync::atomic::{AtomicU64, Ordering};

use fastbloom::AtomicBloomFilter;

use super::keys;

/// Bits of the filter: 4 MiB of memory per node.
const BITS: usize = 1 << 25;
/// Bits set per key: few, since each is a memory access (with 2^25 bits,
/// about 1 false "maybe" in 50,000 at 1M keys, 1 in 100 at 4M).
const HASHES: u32 = 6;
/// Keys added since the last build after which apply rebuilds the filter
/// from the tree (dropping the keys of removed records).
pub(super) const REBUILD_AFTER: u64 = 4_000_000;

/// Which record keys a tree may hold.
pub(super) struct KeyFilter {
    bloom: AtomicBloomFilter,
    /// Keys added since the filter was built (each add counts once more,
    /// even of a key it already holds).
    added: AtomicU64,
}

impl KeyFilter {
    pub(super) fn new() -> KeyFilter {
        KeyFilter {
            bloom: AtomicBloomFilter::with_num_bits(BITS).hashes(HASHES),
            added: AtomicU64::new(0),
        }
    }

    /// A filter of the record keys in `tree` (a full scan of the records).
    pub(super) fn of_tree(tree: &sled::Tree) -> sled::Result<KeyFilter> {
        let f = KeyFilter::new();
        for item in tree.scan_prefix([keys::RECORD]) {
            let (k, _) = item?;
            f.load(&k);
        }
        Ok(f)
    }

    /// `rk` (an encoded record key, [`keys::record`]) may be stored from
    /// now on. Call before the write reaches sled.
    pub(super) fn add(&self, rk: &[u8]) {
        self.bloom.insert(rk);
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    /// `rk` is stored in the tree this filter is being built for.
    pub(super) fn load(&self, rk: &[u8]) {
        self.bloom.insert(rk);
    }

    /// `false`: the tree certainly holds no record under `rk`.
    pub(super) fn may_hold(&self, rk: &[u8]) -> bool {
        self.bloom.contains(rk)
    }

    /// Enough keys were added that rebuilding would drop stale ones.
    pub(super) fn due_for_rebuild(&self) -> bool {
        self.added.load(Ordering::Relaxed) >= REBUILD_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_says_absent_of_a_key_it_was_given() {
        let f = KeyFilter::new();
        let keys: Vec<Vec<u8>> = (0..200_000u32)
            .map(|i| format!("rns\0key-{i}").into_bytes())
            .collect();
        for k in &keys {
            f.add(k);
        }
        assert!(keys.iter().all(|k| f.may_hold(k)));
        let maybes = (0..200_000u32)
            .filter(|i| f.may_hold(format!("rns\0other-{i}").as_bytes()))
            .count();
        assert!(maybes < 20, "{maybes} false maybes in 200,000 absent keys");
    }
}
