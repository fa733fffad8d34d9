//! The commit point Raft asks the log to keep (`save_committed`), written
//! to sled by a thread of its own so that saving it never waits.
//!
//! It is only a hint: a restart applies the entries up to it before it
//! hears from a leader, and a stale or missing one merely means it waits
//! for the leader to say what is committed. But writing it to sled on
//! Raft's path made every commit wait on sled: sled 0.34 guards its trees
//! with one process-wide lock, which `apply_batch` takes for writing, so
//! while the state machine wrote a layer of applied records (5–13 ms for
//! 1,024 keys under load), each node's Raft loop stood still at its next
//! commit. That stall was most of the claim tail (BENCHMARKS.md).
//!
//! Now `save` records the value in memory and the writer writes the
//! newest value it finds, at most once per [`WRITE_EVERY`] (values saved
//! meanwhile collapse into one write: each is a sled insert, about 4% of a
//! loaded follower's CPU when written at every commit). `newest` answers
//! from memory, so the node's own reads are exact. Closing (node
//! shutdown, or the last handle dropped) writes the newest value before it
//! returns.
//!
//! `save` wakes the writer only when it waits for a value to write. While
//! it lets values gather until the next write is due, a save only records
//! the value. Waking it there at every commit (about 480 times a second
//! per node at 64 clients, each a context switch to find nothing to do)
//! was about 3% of a loaded follower's profile samples: the writer's
//! wake-ups and the `futex` calls that woke it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::durable::sled_err;
use super::keys::COMMITTED;
use crate::codec::encode;
use crate::raft::types::LogId;

/// The most often the commit point is written.
const WRITE_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    /// The newest commit point saved in this process (`Some(None)`: saved
    /// as "nothing committed").
    newest: Option<Option<LogId>>,
    /// `newest` is not yet in sled.
    unwritten: bool,
    /// The writer waits for a value to write: the next save wakes it.
    idle: bool,
    closed: bool,
    /// Times the writer came back from a wait, timeouts included (kept in
    /// every build: a unit test reads it).
    wakeups: u64,
}

struct Shared {
    meta: sled::Tree,
    state: Mutex<State>,
    wake: Condvar,
    /// Held across taking the newest value and writing it, so the write
    /// that lands last is always of the newest value.
    writing: Mutex<()>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the newest value if it is not in sled yet.
    fn write_newest(&self) -> std::io::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let value = {
            let mut s = self.state();
            if !s.unwritten {
                return Ok(());
            }
            s.unwritten = false;
            s.newest
        };
        if let Some(v) = value {
            self.meta.insert(COMMITTED, encode(&v)?).map_err(sled_err)?;
        }
        Ok(())
    }

    fn run(&self) {
        loop {
            {
                let mut s = self.state();
                while !s.unwritten && !s.closed {
                    s.idle = true;
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                    s.wakeups += 1;
                }
                s.idle = false;
                if s.closed {
                    return;
                }
            }
            if let Err(e) = self.write_newest() {
                tracing::warn!(error = %e, "cannot write the commit point; a restart may apply less before it hears from the leader");
            }
            // Let newer values gather until the next write is due; saves
            // meanwhile do not wake the writer, a close does.
            let s = self.state();
            // The condition is checked once, then again at each wake-up.
            let mut checks = 0;
            let (mut s, _) = self
                .wake
                .wait_timeout_while(s, WRITE_EVERY, |s| {
                    checks += 1;
                    !s.closed
                })
                .unwrap_or_else(|p| p.into_inner());
            s.wakeups += checks - 1;
            if s.closed {
                return;
            }
        }
    }
}

/// The log's commit point; dropping it closes it.
pub(super) struct CommitHint {
    shared: Arc<Shared>,
    /// The writer, until it is stopped: it holds the tree, and so sled's
    /// lock on its files, while it runs.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl CommitHint {
    /// Keep the commit point in `meta` (the Raft tree), written by a
    /// thread this starts.
    pub fn start(meta: sled::Tree) -> std::io::Result<CommitHint> {
        let shared = Arc::new(Shared {
            meta,
            state: Mutex::default(),
            wake: Condvar::new(),
            writing: Mutex::new(()),
        });
        let writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("idemkv-commit".into())
            .spawn(move || writer.run())?;
        Ok(CommitHint {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Save `committed`; it reaches sled shortly after, without waiting.
    pub fn save(&self, committed: Option<LogId>) {
        let mut s = self.shared.state();
        s.newest = Some(committed);
        s.unwritten = true;
        let idle = s.idle;
        drop(s);
        if idle {
            self.shared.wake.notify_one();
        }
    }

    /// The newest commit point saved in this process, if any was.
    pub fn newest(&self) -> Option<Option<LogId>> {
        self.shared.state().newest
    }

    /// Stop the writer and write the newest value now (node shutdown); a
    /// failed write is logged, as the writer's are.
    pub fn close(&self) {
        self.shared.state().closed = true;
        self.shared.wake.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = writer {
            // It only ever panics if sled does.
            let _ = w.join();
        }
        if let Err(e) = self.shared.write_newest() {
            tracing::warn!(error = %e, "cannot write the commit point at close");
        }
    }
}

impl Drop for CommitHint {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use openraft::testing::log_id;

    use super::*;
    use crate::codec::decode;
    use crate::raft::types::TypeConfig;

    fn stored(meta: &sled::Tree) -> Option<Option<LogId>> {
        let v = meta.get(COMMITTED).unwrap()?;
        Some(decode(&v).unwrap())
    }

    /// Saved at every commit (hundreds a second under load), the writer
    /// must not wake for each: it wakes for a value only when it waits for
    /// one, and lets the rest gather until its next write. Each value still
    /// reaches sled: the one saved after a quiet spell soon, and the newest
    /// at close.
    #[test]
    fn saving_at_every_commit_wakes_the_writer_once_per_write_not_per_save() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let meta = db.open_tree("raft").unwrap();
        let hint = CommitHint::start(meta.clone()).unwrap();

        // A save after a quiet spell is written: the writer waited for it
        // (a lost wake-up would leave it unwritten).
        hint.save(Some(log_id::<TypeConfig>(1, 1, 1)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored(&meta) != Some(Some(log_id::<TypeConfig>(1, 1, 1))) {
            assert!(
                Instant::now() < deadline,
                "the first value never reached sled"
            );
            std::thread::sleep(Duration::from_millis(1));
        }

        // Commits at a loaded node's pace: one every 500 µs.
        let began = Instant::now();
        let saves = 400;
        for i in 2..2 + saves {
            hint.save(Some(log_id::<TypeConfig>(1, 1, i)));
            std::thread::sleep(Duration::from_micros(500));
        }
        let took = began.elapsed();
        let woke = hint.shared.state().wakeups;
        hint.close();
        assert_eq!(
            stored(&meta),
            Some(Some(log_id::<TypeConfig>(1, 1, 1 + saves))),
            "close writes the newest value"
        );
        // Per write (at most one per WRITE_EVERY, plus the first): one
        // wake for a value and one for the end of its gathering; the rest
        // is room for spurious wake-ups. A wake per save would be hundreds.
        let writes = (took.as_millis() / WRITE_EVERY.as_millis()) as u64 + 2;
        let allowed = 3 * writes + 6;
        assert!(
            woke <= allowed,
            "{saves} saves in {took:?} woke the writer {woke} times (at most {allowed} expected)"
        );
    }
}
