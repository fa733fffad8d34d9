//! Per-key change notification for waiters (Await).
//!
//! A waiter registers its key *before* it reads the record, so a change
//! committed between the registration and the read is never missed: the
//! registration remembers the key's version as of then, and the first
//! `changed()` after a later commit returns at once. The state machine calls
//! [`Watches::notify`] with the keys each committed batch wrote, and
//! [`Watches::notify_all`] when a snapshot replaces the whole state.
//!
//! Only keys with a live waiter have an entry: the last waiter of a key to go
//! away removes it, so the registry never outgrows the waiters. This module
//! decides nothing about records; it only says "this key may have changed".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::keys;
use crate::record::RecordKey;

/// The registry of waited-on keys of one state machine.
#[derive(Default)]
pub struct Watches {
    keys: Mutex<HashMap<Vec<u8>, Entry>>,
    /// Times a waiter was woken by a change (for tests and metrics: a
    /// waiter must not wake for other keys' writes).
    wakeups: AtomicU64,
}

struct Entry {
    /// Bumped on every change of the key; each waiter holds a receiver.
    version: watch::Sender<u64>,
    waiters: usize,
}

impl Watches {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Entry>> {
        // A panic while holding this lock leaves the map consistent (every
        // operation is a single insert, bump or remove).
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a waiter on `key` (an encoded record key). Changes from now
    /// on wake it.
    pub fn register(self: &Arc<Self>, key: Vec<u8>) -> KeyWatch {
        let mut keys = self.lock();
        let entry = keys.entry(key.clone()).or_insert_with(|| Entry {
            version: watch::channel(0).0,
            waiters: 0,
        });
        entry.waiters += 1;
        let rx = entry.version.subscribe();
        drop(keys);
        KeyWatch {
            watches: self.clone(),
            key,
            rx,
        }
    }

    /// The keys in `written` changed: wake their waiters.
    pub fn notify<'a>(&self, written: impl IntoIterator<Item = &'a Vec<u8>>) {
        let keys = self.lock();
        if keys.is_empty() {
            return;
        }
        for k in written {
            if let Some(e) = keys.get(k) {
                e.version.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Every key may have changed (a snapshot was installed): wake every
    /// waiter.
    pub fn notify_all(&self) {
        for e in self.lock().values() {
            e.version.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Keys with at least one waiter.
    pub fn watched_keys(&self) -> usize {
        self.lock().len()
    }

    /// Times a waiter was woken by a change of its key.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

/// One waiter's registration; dropping it unregisters.
pub struct KeyWatch {
    watches: Arc<Watches>,
    key: Vec<u8>,
    rx: watch::Receiver<u64>,
}

impl KeyWatch {
    /// Resolves once the key has changed since the registration or the last
    /// `changed()`.
    pub async fn changed(&mut self) {
        // The sender lives in the registry while this receiver does, so
        // this only fails if the registry is gone; then nothing will change.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.watches.wakeups.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut keys = self.watches.lock();
        if let Some(e) = keys.get_mut(&self.key) {
            e.waiters = e.waiters.saturating_sub(1);
            if e.waiters == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl super::StateMachineStore {
    /// Register a waiter on the record at `k`; register before reading the
    /// record, so no change in between is missed.
    pub fn watch_key(&self, k: &RecordKey) -> KeyWatch {
        self.shared.watches.register(keys::record(k))
    }

    /// Wake every waiter: the whole state was replaced (snapshot install).
    pub fn notify_all_watches(&self) {
        self.shared.watches.notify_all();
    }

    /// Times a waiter on this node was woken by a change of its key.
    pub fn watch_wakeups(&self) -> u64 {
        self.shared.watches.wakeups()
    }

    /// Keys some waiter on this node is waiting on.
    pub fn watched_keys(&self) -> usize {
        self.shared.watches.watched_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// Whether `w` has a change to wake for (a change is ready at the first
    /// poll, so one poll tells).
    async fn woke(w: &mut KeyWatch) -> bool {
        w.changed().now_or_never().is_some()
    }

    #[tokio::test]
    async fn wakes_for_its_key_only_and_cleans_up() {
        let reg = Arc::new(Watches::default());
        let mut a = reg.register(b"a".to_vec());
        let mut a2 = reg.register(b"a".to_vec());
        assert_eq!(reg.watched_keys(), 1);
        reg.notify([&b"b".to_vec()]);
        assert!(!woke(&mut a).await, "woken by another key");
        // A change made before the wait started is not missed.
        reg.notify([&b"a".to_vec()]);
        assert!(woke(&mut a).await);
        assert!(woke(&mut a2).await);
        assert!(!woke(&mut a).await, "woken twice for one change");
        reg.notify_all();
        assert!(woke(&mut a).await);
        assert_eq!(reg.wakeups(), 3);
        drop(a);
        assert_eq!(reg.watched_keys(), 1);
        drop(a2);
        assert_eq!(reg.watched_keys(), 0, "an entry outlived its waiters");
    }
}
