//! Protocol-aware recovery of a damaged log tail.
//!
//! At open, a bad record at the end of the last segment is cut so the node
//! can start. When the bad bytes were a write the crash interrupted (a
//! sector of it reads as the zero-filled room's zeros, see `log.rs`),
//! nothing was lost: this node never acknowledged it. When they are a *whole*
//! record that fails its check (a flipped bit, a damaged sector), the node
//! may have acknowledged that entry, and the leader may have counted the
//! acknowledgement toward a commit. The entry now lives on fewer nodes than
//! Raft assumes, and this node, voting with one that never had it, would
//! make a majority that elects a leader without an acknowledged write.
//!
//! So the node records, durably and before cutting, the highest index it
//! may have acknowledged, and until its log holds that index again
//! (durably, from a leader, or under a snapshot installed from one) it
//! neither campaigns nor grants votes; it does follow a leader, which is
//! how it gets the entries back. The marker survives restarts: a node that
//! dies again before catching up still waits.

use std::io;
use std::sync::Arc;

use tokio::sync::watch;

use super::durable::{sled_err, Syncer};
use super::keys::REJOIN_UNTIL;
use crate::codec::{decode, encode};

/// Shared by the log (which sets and clears it) and the node (which keeps
/// out of elections while it is set).
pub struct Rejoin {
    meta: sled::Tree,
    sled_sync: Arc<Syncer>,
    until: watch::Sender<Option<u64>>,
}

impl Rejoin {
    pub(super) fn open(meta: sled::Tree, sled_sync: Arc<Syncer>) -> io::Result<Rejoin> {
        let stored = match meta.get(REJOIN_UNTIL).map_err(sled_err)? {
            Some(v) => Some(decode::<u64>(&v)?),
            None => None,
        };
        Ok(Rejoin {
            meta,
            sled_sync,
            until: watch::Sender::new(stored),
        })
    }

    /// The entry this node must hold again before it votes; `None` once it
    /// does (or if nothing it may have acknowledged was ever cut).
    pub fn until(&self) -> Option<u64> {
        *self.until.borrow()
    }

    /// Waits until [`Rejoin::until`] is `None`.
    pub async fn wait(&self) {
        let mut rx = self.until.subscribe();
        let _ = rx.wait_for(|u| u.is_none()).await;
    }

    /// Before cutting entries up to `index` that may have been
    /// acknowledged: remember it, durably.
    pub(super) fn must_regain(&self, index: u64) -> io::Result<()> {
        let index = self.until().map_or(index, |u| u.max(index));
        self.meta
            .insert(REJOIN_UNTIL, encode(&index)?)
            .map_err(sled_err)?;
        self.sled_sync.sync_now()?;
        self.until.send_replace(Some(index));
        Ok(())
    }

    /// The log durably holds entries up to `index` (appended and fsynced,
    /// or under a durable snapshot): clear the marker if that covers it.
    pub(super) fn regained(&self, index: u64) {
        if self.until().is_none_or(|u| index < u) {
            return;
        }
        self.forget("the log holds it again");
    }

    /// Clear the marker (also when no node could ever give the entry back:
    /// the only voter).
    pub fn forget(&self, why: &str) {
        let Some(until) = self.until() else {
            return;
        };
        let res = self
            .meta
            .remove(REJOIN_UNTIL)
            .map_err(sled_err)
            .and_then(|_| self.sled_sync.sync_now());
        match res {
            Ok(()) => {
                tracing::info!(
                    entry = until,
                    why,
                    "votes again after cutting a damaged log record"
                );
                self.until.send_replace(None);
            }
            // Kept: the next durable entry tries again.
            Err(e) => tracing::warn!(error = %e, "cannot clear the rejoin marker"),
        }
    }
}
