//! A node's reading of the state machine clock between stamps (SPEC §2
//! Time): what Await, the no-write claim path, the sweep trigger and a new
//! leader's first stamp go by.
//!
//! The leader's stamps advance by its monotonic time, steered toward its
//! wall clock by at most [`SLEW_PERCENT`]: at least `100 − SLEW_PERCENT`
//! percent of real time. A reading must never run ahead of the stamps a
//! leader would give, or a new leader starting from it would end live
//! leases early. So:
//!
//! - From the greatest stamp applied, real time counts in full: that stamp
//!   is no older than the moment it was applied here.
//! - An older stamp `s` (applied at `a`) still bounds the reading from
//!   below, so a stamp applied late (a follower applying a deposed
//!   leader's last entries after the election) cannot set it back: but
//!   only counting real time since `a` at the slowest rate stamps may
//!   advance. Put as one term: `s + (t − a) − k·(S − s)`, with `S` the
//!   greatest stamp and `k = SLEW/(1 − SLEW)`: from `s` to `S` the stamps
//!   took at most `(S − s)/(1 − SLEW)` of real time, so the term is never
//!   ahead of `S` plus the real time since `S` was stamped.
//!
//! Counting every stamp's time since in full (as this clock once did) let
//! a reading pull ahead of stamps steered slow by 1% of all time elapsed:
//! 36 s after an hour. Counting all of it at the slowest rate lost 1% of
//! every failover's gap instead. The maximum over all stamps of the term
//! above is one number, kept as [`Reading::best`], so a reading is O(1).
//!
//! A restart's anchor (a reading reached, `boot_clock.rs`) is taken as a
//! stamp applied at open.
//!
//! Stamps are taken as the log appends them, not only as they are applied:
//! an entry waits for its commit (a majority's fdatasync) before it is
//! applied, and counting from then would put every reading behind by that
//! wait, a loss each failover carries into the next leader's clock. A
//! stamp not yet committed is still a reading of a leader's clock, which
//! never runs ahead of the stamps the cluster committed by more than the
//! steering, so it is as safe to go by.

use std::sync::{Arc, Mutex};

use crate::clock::{Clock, Instant, SLEW_PERCENT};

/// `100 − SLEW_PERCENT`: the slowest stamps advance, in percent of real
/// time.
const SLOWEST: i128 = 100 - SLEW_PERCENT as i128;

pub struct Reading {
    /// Times below are ns since this instant.
    origin: Instant,
    /// Max over every stamp `s` applied at `a` of `100·s − SLOWEST·a`: the
    /// term above multiplied by `SLOWEST`, less what depends only on now
    /// and the greatest stamp.
    best: i128,
    /// The greatest stamp taken, ns.
    top: i128,
    /// The greatest reading given, ms: readings never go back.
    given: u64,
}

impl Reading {
    /// A reading that has reached `reached_ms` at `now`.
    pub fn new(now: Instant, reached_ms: u64) -> Reading {
        let mut r = Reading {
            origin: now,
            best: i128::MIN,
            top: 0,
            given: 0,
        };
        r.take(reached_ms, now);
        r
    }

    /// Take a stamp (ms) applied at `at`.
    pub fn take(&mut self, stamp_ms: u64, at: Instant) {
        let s = i128::from(stamp_ms) * 1_000_000;
        self.best = self.best.max(100 * s - SLOWEST * self.ns(at));
        self.top = self.top.max(s);
    }

    /// The reading at `now`, in ms.
    pub fn read(&mut self, now: Instant) -> u64 {
        let ns =
            (self.best + SLOWEST * self.ns(now) - i128::from(SLEW_PERCENT) * self.top) / SLOWEST;
        let ms = u64::try_from((ns / 1_000_000).max(0)).unwrap_or(u64::MAX);
        self.given = self.given.max(ms);
        self.given
    }

    fn ns(&self, at: Instant) -> i128 {
        at.saturating_duration_since(self.origin).as_nanos() as i128
    }
}

/// A node's [`Reading`], fed by its log and its state machine.
#[derive(Clone)]
pub struct SharedReading {
    reading: Arc<Mutex<Reading>>,
    time: Clock,
}

impl SharedReading {
    /// A reading that has reached `reached_ms` now, by `time`.
    pub fn new(time: Clock, reached_ms: u64) -> SharedReading {
        SharedReading {
            reading: Arc::new(Mutex::new(Reading::new(time.now(), reached_ms))),
            time,
        }
    }

    /// Take a stamp (ms) now.
    pub fn take(&self, stamp_ms: u64) {
        let now = self.time.now();
        self.lock().take(stamp_ms, now);
    }

    /// The reading now, in ms.
    pub fn read(&self) -> u64 {
        let now = self.time.now();
        self.lock().read(now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reading> {
        self.reading.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// A leader whose wall clock is behind its stamps steers them 1% slow.
    /// A follower applying them must not count full real time from old
    /// stamps and end up ahead of the leader's clock: a new leader starts
    /// from that reading, and the jump ends live leases early.
    #[test]
    fn the_reading_never_runs_ahead_of_stamps_steered_slow() {
        let t0 = Instant::now();
        let start = 1_000_000_000u64;
        let mut r = Reading::new(t0, start);
        // An hour of stamps applied 100 ms apart, each 99 ms after the last.
        let mut stamp = start;
        let mut at = t0;
        for _ in 0..36_000 {
            at += 100 * MS;
            stamp += 99;
            r.take(stamp, at);
        }
        // 5 ms after the last apply the leader's clock reads at most
        // stamp + 5.
        let reading = r.read(at + 5 * MS);
        assert!(
            reading <= stamp + 5,
            "the reading is {} ms ahead of the leader's stamps",
            reading - stamp
        );
        assert!(reading >= stamp, "{reading} < {stamp}");
    }

    /// A new leader takes over 2 s after the last stamp it applied: the
    /// whole gap counts, or every failover would set the cluster's clock
    /// back against real time.
    #[test]
    fn the_time_since_the_last_stamp_counts_in_full() {
        let t0 = Instant::now();
        let mut r = Reading::new(t0, 5_000);
        r.take(6_000, t0 + 1_000 * MS);
        assert_eq!(r.read(t0 + 3_000 * MS), 8_000);
    }

    /// A follower applies a deposed leader's last entries only after the
    /// election: their stamps are older than the time that has passed, and
    /// must not set the reading back (a paused leader in the robustness
    /// suite once cost the cluster 1.3 s that way).
    #[test]
    fn a_stamp_applied_late_never_sets_the_reading_back() {
        let t0 = Instant::now();
        let mut r = Reading::new(t0, 1_000_000);
        let before = r.read(t0 + 1_300 * MS);
        assert_eq!(before, 1_001_300);
        r.take(1_000_010, t0 + 1_300 * MS);
        assert_eq!(r.read(t0 + 1_300 * MS), before, "readings never go back");
        // The old stamp still counts at the slowest rate: lost is 1% of
        // the late stamp's lag, not of the time since.
        assert!(r.read(t0 + 2_300 * MS) >= before + 999);
    }

    /// A stamp of a leader whose wall clock is ahead (steered fast) moves
    /// the reading up at once.
    #[test]
    fn a_greater_stamp_moves_the_reading_up() {
        let t0 = Instant::now();
        let mut r = Reading::new(t0, 1_000);
        r.take(1_101, t0 + 100 * MS);
        assert_eq!(r.read(t0 + 100 * MS), 1_101);
        assert_eq!(r.read(t0 + 150 * MS), 1_151);
    }
}
