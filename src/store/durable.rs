//! Real durability, with group commit.
//!
//! [`GroupCommit`] runs one round at a time per durable file set: writers
//! hand it their completion callbacks; a round drains everything queued,
//! makes one sync that covers all of it, then completes the callbacks in
//! order.
//! That is what lets one fsync acknowledge many claims. The Raft log uses
//! one for its segment files (`log.rs`); [`Syncer`] uses one for sled.
//!
//! sled's `flush` ends in `sync_file_range` on Linux, which neither flushes
//! the disk cache nor file metadata, and sled never fsyncs its blob files
//! (pages too large for a log segment). [`Syncer`] therefore syncs any blob
//! file written since the last sync (and the blob directory) before each
//! flush, so no durable pointer names a blob a power cut could take, then
//! follows the flush with `sync_data` on the database file and the blobs
//! written meanwhile. The vote, a purge point and an installed snapshot are
//! made durable through it, and so is each overlay layer whose write made
//! sled create a blob (`state_machine.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::sled_mark::{Marked, SledMark};

/// Something waiting for the data written before it to be durable.
pub enum Waiter {
    Callback(Box<dyn FnOnce(io::Result<()>) + Send>),
    Channel(tokio::sync::oneshot::Sender<io::Result<()>>),
}

impl Waiter {
    fn done(self, res: io::Result<()>) {
        match self {
            Waiter::Callback(f) => f(res),
            Waiter::Channel(tx) => {
                let _ = tx.send(res);
            }
        }
    }
}

fn clone_err(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

/// Group commit: one round at a time runs a blocking `sync` for everything
/// queued while the previous round ran, then completes those waiters in
/// order.
///
/// Rounds run on the blocking pool of the tokio runtime the waiter came
/// from (a thread of their own outside one): a runner starts when a waiter
/// arrives and none is running, and keeps taking rounds until the queue is
/// empty. tokio holds its paused clock still while a blocking task runs, so
/// a test under `tokio::time::pause()` never sees timers jump forward
/// while a write waits for its fsync (a thread of our own would let them).
pub struct GroupCommit {
    inner: Arc<Inner>,
}

type SyncFn = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

struct Inner {
    name: String,
    sync: SyncFn,
    queue: Mutex<Queue>,
    /// Rounds run and waiters they released: the ratio is the group-commit
    /// factor.
    rounds: AtomicU64,
    released: AtomicU64,
    inline_rounds: AtomicU64,
}

struct Queue {
    waiters: Vec<Waiter>,
    /// A runner is taking rounds.
    running: bool,
    closed: bool,
    /// When the last runner found nothing more to do (or the group commit
    /// was made).
    idle_since: Instant,
}

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take rounds until nothing is queued.
    fn run(&self) {
        loop {
            let batch = {
                let mut q = self.queue();
                if q.waiters.is_empty() {
                    q.running = false;
                    q.idle_since = Instant::now();
                    return;
                }
                std::mem::take(&mut q.waiters)
            };
            let res = (self.sync)();
            if res.is_ok() {
                self.rounds.fetch_add(1, Ordering::Release);
                self.released
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            for w in batch {
                w.done(res.as_ref().map(|_| ()).map_err(clone_err));
            }
        }
    }
}

impl GroupCommit {
    /// Nothing runs until the first waiter arrives.
    pub fn new(
        name: &str,
        sync: impl Fn() -> io::Result<()> + Send + Sync + 'static,
    ) -> GroupCommit {
        GroupCommit {
            inner: Arc::new(Inner {
                name: name.into(),
                sync: Box::new(sync),
                queue: Mutex::new(Queue {
                    waiters: Vec::new(),
                    running: false,
                    closed: false,
                    idle_since: Instant::now(),
                }),
                rounds: AtomicU64::new(0),
                released: AtomicU64::new(0),
                inline_rounds: AtomicU64::new(0),
            }),
        }
    }

    /// Queue `w` to be completed after the next round.
    pub fn submit(&self, w: Waiter) {
        let mut q = self.inner.queue();
        if q.closed {
            drop(q);
            return w.done(Err(io::Error::other("store closed")));
        }
        q.waiters.push(w);
        if q.running {
            return;
        }
        q.running = true;
        drop(q);
        let inner = self.inner.clone();
        let started = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                drop(rt.spawn_blocking(move || inner.run()));
                Ok(())
            }
            Err(_) => std::thread::Builder::new()
                .name(self.inner.name.clone())
                .spawn(move || inner.run())
                .map(drop),
        };
        if let Err(e) = started {
            let waiters = {
                let mut q = self.inner.queue();
                q.running = false;
                std::mem::take(&mut q.waiters)
            };
            for w in waiters {
                w.done(Err(clone_err(&e)));
            }
        }
    }

    /// Complete `w` after a round run on the calling thread, when the group
    /// commit has been idle for at least `quiet`: for a caller that has
    /// nothing else to do until its write is durable (a follower's append),
    /// this saves waking a thread for the round and being woken back by it.
    /// Otherwise (a round is under way or ended lately, so more writes are
    /// likely to join the next one) `w` is queued as by [`GroupCommit::submit`].
    /// True when the round ran here.
    pub fn run_here_if_quiet(&self, w: Waiter, quiet: Duration) -> bool {
        let mut q = self.inner.queue();
        let quiet = !q.closed && !q.running && q.idle_since.elapsed() >= quiet;
        if !quiet {
            drop(q);
            self.submit(w);
            return false;
        }
        q.waiters.push(w);
        q.running = true;
        drop(q);
        self.inner.inline_rounds.fetch_add(1, Ordering::Relaxed);
        self.inner.run();
        true
    }

    /// Rounds run on a caller's thread by [`GroupCommit::run_here_if_quiet`].
    pub fn inline_rounds(&self) -> u64 {
        self.inner.inline_rounds.load(Ordering::Relaxed)
    }

    /// Wait until everything written so far is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Waiter::Channel(tx));
        rx.await.map_err(|_| io::Error::other("fsync stopped"))?
    }

    /// `(rounds completed, waiters released by them)`.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.inner.rounds.load(Ordering::Acquire),
            self.inner.released.load(Ordering::Relaxed),
        )
    }

    /// Refuse new waiters; those queued are still completed.
    pub fn close(&self) {
        self.inner.queue().closed = true;
    }
}

/// Makes everything written to the sled database so far durable.
pub struct Syncer {
    db: sled::Db,
    data_file: File,
    /// The sled directory.
    dir: PathBuf,
    blob_dir: PathBuf,
    /// Blob files already synced, with the length they had then.
    synced_blobs: Mutex<HashMap<std::ffi::OsString, u64>>,
    commit: OnceLock<GroupCommit>,
    /// Completed flush+fsync rounds, from the group commit or [`Syncer::sync_now`].
    syncs: AtomicU64,
    /// Raft's state as the last sync covered it, kept outside sled.
    mark: SledMark,
}

impl Syncer {
    pub fn open(db: sled::Db, dir: &Path, mark: SledMark) -> io::Result<Arc<Syncer>> {
        let data_file = File::open(dir.join("db"))?;
        let syncer = Arc::new(Syncer {
            db,
            data_file,
            dir: dir.to_path_buf(),
            blob_dir: dir.join("blobs"),
            synced_blobs: Mutex::new(HashMap::new()),
            commit: OnceLock::new(),
            syncs: AtomicU64::new(0),
            mark,
        });
        // The directory entries of the files sled created must be durable too.
        File::open(dir)?.sync_all()?;
        let worker = Arc::downgrade(&syncer);
        let commit = GroupCommit::new("idemkv-sled-sync", move || match worker.upgrade() {
            Some(s) => s.sync_now(),
            None => Err(io::Error::other("store closed")),
        });
        let _ = syncer.commit.set(commit);
        Ok(syncer)
    }

    fn commit(&self) -> &GroupCommit {
        self.commit.get().expect("set in open")
    }

    /// Queue `w` to be completed after the next flush+fsync.
    pub fn submit(&self, w: Waiter) {
        self.commit().submit(w)
    }

    /// Wait until everything written so far is durable.
    pub async fn sync(&self) -> io::Result<()> {
        self.commit().sync().await
    }

    /// Flush sled, then fsync for real, then record in the mark what of
    /// Raft's state that covered (read before the flush). Blocking.
    pub fn sync_now(&self) -> io::Result<()> {
        let covered = Marked::read(&self.db)?;
        // Blob files first: the flush below makes sled's pointers to them
        // durable, and a pointer must not outlive a blob a power cut took.
        // Then again for any written during the flush.
        self.sync_blobs()?;
        self.db.flush().map_err(sled_err)?;
        self.data_file.sync_data()?;
        self.sync_blobs()?;
        super::test_hooks::sled_synced(&self.dir);
        self.mark.advance(covered)?;
        self.syncs.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// At open: sled must still hold what the mark says it made durable.
    pub fn check_mark(&self) -> io::Result<()> {
        self.mark.check(&self.db)
    }

    /// `(flush+fsync rounds completed, waiters the group commit released)`.
    pub fn stats(&self) -> (u64, u64) {
        (self.syncs.load(Ordering::Acquire), self.commit().stats().1)
    }

    /// Whether sled wrote a blob file (or more of one) since the last sync.
    /// sled writes a whole page as a blob once it outgrows a quarter of a
    /// segment (128 KiB), whatever the size of each value in it: a leaf of
    /// sixteen records with 8 KiB results is one. Such a page holds records
    /// whose log entries may be purged, and sled never fsyncs it.
    pub fn blobs_unsynced(&self) -> io::Result<bool> {
        let synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .blob_files()?
            .iter()
            .any(|(name, len, _)| synced.get(name) != Some(len)))
    }

    /// The blob files as they are now: name, length, path. None while sled
    /// has no blob directory; a file sled removed meanwhile is left out.
    fn blob_files(&self) -> io::Result<Vec<(std::ffi::OsString, u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.blob_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry?;
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            files.push((entry.file_name(), len, entry.path()));
        }
        Ok(files)
    }

    fn sync_blobs(&self) -> io::Result<()> {
        let files = self.blob_files()?;
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashMap::new();
        let mut any_new = false;
        for (name, len, path) in files {
            if synced.get(&name) != Some(&len) {
                match File::open(path) {
                    Ok(f) => f.sync_data()?,
                    // sled garbage-collected it meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                any_new = true;
            }
            present.insert(name, len);
        }
        if any_new {
            File::open(&self.blob_dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }

    /// Refuse new waiters; those queued are still synced.
    pub fn close(&self) {
        self.commit().close()
    }
}

pub fn sled_err(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread::ThreadId;

    /// A group commit whose rounds report the thread they ran on.
    fn recording() -> (GroupCommit, mpsc::Receiver<ThreadId>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let gc = GroupCommit::new("test-sync", move || {
            let _ = tx.lock().unwrap().send(std::thread::current().id());
            Ok(())
        });
        (gc, rx)
    }

    fn done_flag() -> (Waiter, Arc<Mutex<Option<ThreadId>>>) {
        let flag = Arc::new(Mutex::new(None));
        let f = flag.clone();
        let w = Waiter::Callback(Box::new(move |res| {
            res.unwrap();
            *f.lock().unwrap() = Some(std::thread::current().id());
        }));
        (w, flag)
    }

    #[test]
    fn after_a_quiet_spell_the_round_runs_on_the_callers_thread_and_completes_before_returning() {
        let (gc, rounds) = recording();
        let (w, done) = done_flag();
        assert!(gc.run_here_if_quiet(w, Duration::ZERO));
        let me = std::thread::current().id();
        assert_eq!(
            *done.lock().unwrap(),
            Some(me),
            "completed here, before returning"
        );
        assert_eq!(rounds.try_recv().unwrap(), me);
        assert_eq!(gc.inline_rounds(), 1);
        assert_eq!(gc.stats(), (1, 1));
    }

    #[test]
    fn right_after_a_round_the_waiter_goes_to_a_round_thread() {
        let (gc, rounds) = recording();
        // A round just ended: nothing has been quiet for an hour.
        let (w, _) = done_flag();
        gc.run_here_if_quiet(w, Duration::ZERO);
        rounds.recv().unwrap();
        let (w, done) = done_flag();
        assert!(!gc.run_here_if_quiet(w, Duration::from_secs(3600)));
        let ran_on = rounds.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(ran_on, std::thread::current().id());
        while done.lock().unwrap().is_none() {
            std::thread::yield_now();
        }
        assert_eq!(*done.lock().unwrap(), Some(ran_on));
        assert_eq!(gc.inline_rounds(), 1, "only the first ran here");
    }

    #[test]
    fn a_closed_group_commit_refuses_an_inline_waiter_too() {
        let (gc, rounds) = recording();
        gc.close();
        let (tx, rx) = mpsc::channel();
        assert!(!gc.run_here_if_quiet(
            Waiter::Callback(Box::new(move |res| tx.send(res.is_err()).unwrap())),
            Duration::ZERO,
        ));
        assert!(rx.recv().unwrap(), "refused");
        assert!(rounds.try_recv().is_err(), "no round ran");
    }
}
