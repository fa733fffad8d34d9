//! A node's reading of the state machine clock between stamps (SPEC §2
//! Time): what Await, the no-write claim path, the sweep trigger and a new
//! leader's first stamp go by.
//!
//! The leader's stamps advance by its monotonic time, steered toward its
//! wall clock by at most [`SLEW_PERCENT`]: at least `100 − SLEW_PERCENT`
//! percent of real time. A reading must never run ahead of the stamps a
//! leader would give, or a new leader starting from it would end live
//! leases early. So, with `S` the greatest stamp taken:
//!
//! - From `S`, if dated as it reached this node, real time since counts in
//!   full: a stamp is no older than the moment this node took it.
//! - An older stamp `s` (taken at `a`) still bounds the reading from
//!   below, so a stamp taken late (a follower applying a deposed leader's
//!   last entries after the election) cannot set it back, but less what
//!   the stamps may have lagged real time since it: `s + (t − a) −
//!   (S − s)/(100/SLEW_PERCENT − 1)`. From `s` to `S` the stamps took at
//!   most `(S − s)/(1 − SLEW)` of real time, so the term is never ahead of
//!   `S` plus the real time since `S` was stamped.
//!
//! - That argument holds while no leader between `s` and `S` lost time (a
//!   host that rebooted cannot count its downtime, and a leader starting
//!   there begins behind real time). So the reading never goes past the
//!   greatest stamp dated as it reached this node (its entry appended, or
//!   a restart's anchor) plus the time since, unless a stamp taken late is
//!   above even that: a node that stayed up while the others rebooted
//!   follows their stamps, not its own older ones, or leading later it
//!   would end leases early by the downtime. A stamp taken late (the clock
//!   at open, entries read back at open or sent as old news, a snapshot's
//!   clock) raises the reading's floor but never this bound, and older
//!   stamps bridge it as above.
//!
//! Counting every stamp's time since in full (as this clock once did) let
//! a reading pull ahead of stamps steered slow by 1% of all time elapsed:
//! 36 s after an hour. The maximum over all stamps of the term above is one
//! number, kept as [`Reading::best`], so a reading is O(1).
//!
//! Which stamps, and when taken:
//! - A committed entry's stamp, as the node applies it, but dated when the
//!   node's log appended it, unless it may be old news when it arrives
//!   (`raft::consensus::old_news`: its leader had committed it before
//!   sending it, to a follower catching up, or it is of an earlier term than
//!   its sender's, a deposed leader's entry carried on), which is then taken
//!   as known late: counting only from the apply would put every
//!   reading behind by the commit's wait (a majority's fdatasync), a loss
//!   each failover carries into the next leader's clock. An entry appended
//!   but never applied (truncated, a deposed leader's) is never taken: its
//!   leader's clock may have run on ahead of the one that replaced it.
//! - A snapshot's clock as it is installed.
//! - A restart's anchor (`boot_clock.rs`): the greatest dated stamp and
//!   when it reached the node (the reading, if none is), so the downtime
//!   counts and later stamps correct it as they correct any older stamp;
//!   and the reading when the anchor was written, which bridges as a stamp
//!   taken then but raises neither the floor nor the bound, so the downtime
//!   counts even when that dated stamp is old (a follower that got only old
//!   news for a while: from the old stamp alone it lost 1/99 of the rise
//!   since, about 100 ms after ten seconds).
//! - The state machine's clock at open, taken late at open.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, Instant, SLEW_PERCENT};

/// `100 − SLEW_PERCENT`: the slowest stamps advance, in percent of real
/// time.
const SLOWEST: i128 = 100 - SLEW_PERCENT as i128;

pub struct Reading {
    /// Times below are ns since this instant (negative: before it).
    origin: Instant,
    /// Max over every stamp `s` taken at `a` of `100·s − SLOWEST·a`: the
    /// term above multiplied by `SLOWEST`, less what depends only on now
    /// and the greatest stamp.
    best: i128,
    /// The greatest stamp taken, ns.
    top: i128,
    /// The greatest stamp taken with the time it reached this node (see the
    /// module's notes), and that time, ns.
    dated: Option<(i128, i128)>,
}

impl Reading {
    /// A reading that has reached `reached_ms` at `now`.
    pub fn new(now: Instant, reached_ms: u64) -> Reading {
        let mut r = Reading {
            origin: now,
            best: i128::MIN,
            top: 0,
            dated: None,
        };
        r.take_late(reached_ms, now);
        r
    }

    /// Take a stamp (ms) as it reached this node, at `at`.
    pub fn take(&mut self, stamp_ms: u64, at: Instant) {
        let at = self.ns(at);
        self.take_at(stamp_ms, at, true);
    }

    /// Take a stamp (ms) known only to have reached this node by `at`.
    pub fn take_late(&mut self, stamp_ms: u64, at: Instant) {
        let at = self.ns(at);
        self.take_at(stamp_ms, at, false);
    }

    /// Take a stamp (ms) that reached this node `ago` before the origin.
    pub fn take_before(&mut self, stamp_ms: u64, ago: Duration) {
        self.take_at(stamp_ms, -(ago.as_nanos() as i128), true);
    }

    /// Take a reading (ms) this node had reached `ago` before the origin (a
    /// restart's anchor), after the stamps known at open, into the bridge
    /// only: it is no stamp, so it moves neither the floor nor the bound (a
    /// reading counts time a leader that lost it does not). It counts the
    /// time since exactly, less 1/99 of any later rise of the greatest
    /// stamp; taken as a stamp of then, a reading above the greatest stamp
    /// (an idle stretch) gained 1/99 of that excess as well.
    pub fn take_late_before(&mut self, reading_ms: u64, ago: Duration) {
        let r = i128::from(reading_ms) * 1_000_000;
        let ago = ago.as_nanos() as i128;
        self.best = self.best.max(SLOWEST * (r + ago) + self.top);
    }

    fn take_at(&mut self, stamp_ms: u64, at_ns: i128, dated: bool) {
        let s = i128::from(stamp_ms) * 1_000_000;
        self.best = self.best.max(100 * s - SLOWEST * at_ns);
        self.top = self.top.max(s);
        if dated {
            self.dated = match self.dated {
                Some((d, a)) if d > s => Some((d, a)),
                Some((d, a)) if d == s => Some((d, a.min(at_ns))),
                _ => Some((s, at_ns)),
            };
        }
    }

    /// What a restart's anchor should hold at `now`: the greatest dated
    /// stamp (ms) and how long ago it reached this node, if there is one;
    /// else the reading now. Not the reading: one that ran ahead of a leader's
    /// stamps (a node that stayed up while the others rebooted) would come
    /// back as a stamp above theirs, and their stamps would never correct
    /// it.
    pub fn anchor(&self, now: Instant) -> (u64, Duration) {
        match self.dated {
            Some((stamp, at)) => {
                let ago = (self.ns(now) - at).max(0);
                let ms = u64::try_from(stamp / 1_000_000).unwrap_or(0);
                let ago = Duration::from_nanos(u64::try_from(ago).unwrap_or(u64::MAX));
                (ms, ago)
            }
            None => (self.read(now), Duration::ZERO),
        }
    }

    /// The reading at `now`, in ms.
    pub fn read(&self, now: Instant) -> u64 {
        let now = self.ns(now);
        let mut ns = (self.best + SLOWEST * now - i128::from(SLEW_PERCENT) * self.top) / SLOWEST;
        // A stamp taken late (a deposed leader's entry carried on, a
        // snapshot's clock) raises the floor, never this bound: above the
        // greatest dated stamp plus the time since, the reading could be
        // ahead of a leader that lost time.
        if let Some((stamp, at)) = self.dated {
            ns = ns.min((stamp + (now - at)).max(self.top));
        }
        u64::try_from((ns / 1_000_000).max(0)).unwrap_or(u64::MAX)
    }

    fn ns(&self, at: Instant) -> i128 {
        at.saturating_duration_since(self.origin).as_nanos() as i128
    }
}

/// Entries by index, each with when it was appended (`None`: known late).
type Arrivals = VecDeque<(u64, Option<Instant>)>;

/// A node's [`Reading`], fed by its log (when each entry was appended) and
/// its state machine (each stamp as applied).
#[derive(Clone)]
pub struct SharedReading {
    reading: Arc<Mutex<Reading>>,
    /// When the log appended each entry not yet applied, by index
    /// (ascending; an index appended again replaces it and what follows);
    /// `None` for an entry committed before it arrived.
    appended: Arc<Mutex<Arrivals>>,
    /// One past the greatest index a leader sent here as old news
    /// (committed before it was sent, or of an earlier term than the
    /// sender's): when those were appended says nothing of their stamps'
    /// age.
    committed: Arc<AtomicU64>,
    time: Clock,
}

impl SharedReading {
    /// A reading that has reached `clock_ms` by now, each `(stamp, ago)`
    /// of `anchors` arrived that long ago, and each `(reading, ago)` of
    /// `readings` was read that long ago, by `time`.
    pub fn new(
        time: Clock,
        clock_ms: u64,
        anchors: &[(u64, Duration)],
        readings: &[(u64, Duration)],
    ) -> SharedReading {
        let mut reading = Reading::new(time.now(), clock_ms);
        for (stamp, ago) in anchors {
            reading.take_before(*stamp, *ago);
        }
        for (ms, ago) in readings {
            reading.take_late_before(*ms, *ago);
        }
        SharedReading {
            reading: Arc::new(Mutex::new(reading)),
            appended: Default::default(),
            committed: Default::default(),
            time,
        }
    }

    /// A leader sending entries here says entries up to `index` may be old
    /// news (`raft::consensus::old_news`).
    pub fn old_news_through(&self, index: u64) {
        self.committed
            .fetch_max(index.saturating_add(1), Ordering::Relaxed);
    }

    /// The log appended entries `first..=last` now. An index appended again
    /// (after a truncation) takes the later time.
    pub fn appended(&self, first: u64, last: u64) {
        let now = self.time.now();
        let late = self.committed.load(Ordering::Relaxed);
        let mut at = self.appended.lock().unwrap_or_else(|p| p.into_inner());
        while at.back().is_some_and(|(i, _)| *i >= first) {
            at.pop_back();
        }
        at.extend((first..=last).map(|i| (i, (i >= late).then_some(now))));
    }

    /// Take the stamp (ms) of applied entry `index`, dated when it was
    /// appended (known only to be by now, if the log did not say: an
    /// entry read back at open).
    pub fn applied(&self, index: u64, stamp_ms: u64) {
        let mut at = None;
        {
            let mut appended = self.appended.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(&(i, when)) = appended.front() {
                if i > index {
                    break;
                }
                appended.pop_front();
                if i == index {
                    at = when;
                }
            }
        }
        match at {
            Some(at) => self.lock().take(stamp_ms, at),
            None => {
                let now = self.time.now();
                self.lock().take_late(stamp_ms, now)
            }
        }
    }

    /// Take a stamp (ms) known only to have reached this node by now (a
    /// snapshot's clock).
    pub fn take_late(&self, stamp_ms: u64) {
        let now = self.time.now();
        self.lock().take_late(stamp_ms, now);
    }

    /// What a restart's anchor should hold now: a stamp (ms) and how long
    /// ago it reached this node ([`Reading::anchor`]), and the reading now.
    pub fn anchor(&self) -> (u64, Duration, u64) {
        let now = self.time.now();
        let r = self.lock();
        let (stamp, ago) = r.anchor(now);
        (stamp, ago, r.read(now))
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

    /// A node restarts 10 minutes after its anchor while the leader steers
    /// its stamps slow: the downtime counts at once, and the stamps that
    /// follow bring the reading down to theirs instead of it staying ahead
    /// by 1% of the downtime.
    #[test]
    fn a_restart_anchor_counts_the_downtime_and_is_corrected_by_later_stamps() {
        let t0 = Instant::now();
        let anchor = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.take_before(anchor, 600_000 * MS);
        assert_eq!(r.read(t0), anchor + 600_000, "the downtime counts");
        // The leader's stamps advanced 99% of those 10 minutes, and go on
        // so for another minute, one a second.
        let mut stamp = anchor + 594_000;
        let mut at = t0;
        r.take(stamp, at);
        for _ in 0..60 {
            at += 1_000 * MS;
            stamp += 990;
            r.take(stamp, at);
        }
        let reading = r.read(at);
        assert!(
            reading <= stamp + 1,
            "the reading is {} ms ahead of the leader's stamps",
            reading - stamp
        );
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
    /// suite once cost the cluster 1.3 s that way). Below the greatest
    /// stamp nothing moves; above it but dated late (a snapshot's clock),
    /// the older stamps lose 1/99 of the 10 ms it rose, not the 790 ms it
    /// lagged.
    #[test]
    fn a_stamp_taken_late_never_sets_the_reading_back() {
        let t0 = Instant::now();
        let mut r = Reading::new(t0, 1_000_000);
        r.take(1_000_500, t0 + 500 * MS);
        let before = r.read(t0 + 1_300 * MS);
        assert_eq!(before, 1_001_300);
        r.take(1_000_100, t0 + 1_300 * MS);
        assert_eq!(r.read(t0 + 1_300 * MS), before);
        r.take_late(1_000_510, t0 + 1_300 * MS);
        assert_eq!(r.read(t0 + 1_300 * MS), before - 1);
    }

    /// A node stays up while the others reboot for ten minutes and, with
    /// no anchor from this boot, lead on from their last stamps, behind
    /// real time by the downtime. Once their stamps reach this node its
    /// reading follows them: counting on from its own last stamp it stayed
    /// ahead by nearly the whole downtime (and the next leader, were it
    /// this node, ended every lease early by that).
    #[test]
    fn a_node_that_stayed_up_follows_the_stamps_of_a_leader_that_lost_time() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.take(s0, t0);
        let back = t0 + 600_000 * MS;
        r.take(s0 + 50, back);
        assert_eq!(r.read(back), s0 + 50);
        assert_eq!(r.read(back + 1_000 * MS), s0 + 1_050);
    }

    /// The same node, once it follows the leader that lost time, gets that
    /// leader's next stamp as old news (its commit had already covered it,
    /// as for a follower whose append stream lags): taken late, it became
    /// the greatest stamp with no arrival time, the bound went, and the
    /// reading leapt back ahead by the whole downtime, as the bridge from
    /// the node's own older stamps allows. A stamp taken late raises the
    /// floor only.
    #[test]
    fn a_stamp_taken_late_never_lifts_the_bound_of_the_dated_ones() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.take(s0, t0);
        let back = t0 + 600_000 * MS;
        r.take(s0 + 50, back);
        r.take_late(s0 + 60, back + 20 * MS);
        assert_eq!(r.read(back + 1_000 * MS), s0 + 1_050);
        r.take_late(s0 + 5_000, back + 1_000 * MS);
        assert_eq!(r.read(back + 1_000 * MS), s0 + 5_000, "the floor rises");
    }

    /// A follower that got only old news for ten seconds (a lagging append
    /// stream: its leader had committed all it sent) restarts two seconds
    /// later: its greatest dated stamp is ten seconds old, and counting the
    /// downtime from it alone the reading came back 101 ms behind the
    /// leader's stamps, behind by more after a longer stretch. The anchor's
    /// reading, taken late as of when it was written, counts it in full.
    #[test]
    fn a_restart_after_only_old_news_counts_the_downtime() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.take(s0, t0);
        for i in 1..=100u64 {
            r.take_late(s0 + i * 100 - 5, t0 + Duration::from_millis(i * 100));
        }
        let written = t0 + 10_000 * MS;
        let (stamp, ago) = r.anchor(written);
        let reading = r.read(written);
        assert_eq!(reading, s0 + 9_995);
        // Two seconds later, a new process: the clock at open is the last
        // stamp applied, the anchor's stamp and reading as written.
        let open = written + 2_000 * MS;
        let mut back = Reading::new(open, s0 + 9_995);
        back.take_before(stamp, ago + 2_000 * MS);
        back.take_late_before(reading, 2_000 * MS);
        assert_eq!(back.read(open), s0 + 11_995, "the downtime counts in full");
    }

    /// The same, after an idle hour: the anchor's reading is far above the
    /// greatest stamp, and taken as a stamp of when it was read it gained
    /// 1/99 of that hour, up to the bound (the old dated stamp plus the
    /// time since, here a second ahead of the reading, which had bridged
    /// stamps steered slow). It counts only the time since it was read.
    #[test]
    fn an_anchor_reading_above_the_stamps_counts_only_the_time_since() {
        let t0 = Instant::now();
        let d = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.take(d, t0);
        for i in 1..=1_000u64 {
            r.take_late(d + i * 99, t0 + Duration::from_millis(i * 100));
        }
        let written = t0 + 3_700_000 * MS;
        let (stamp, ago) = r.anchor(written);
        let reading = r.read(written);
        assert_eq!(reading, d + 3_699_000);
        let open = written + 2_000 * MS;
        let mut back = Reading::new(open, d + 99_000);
        back.take_before(stamp, ago + 2_000 * MS);
        back.take_late_before(reading, 2_000 * MS);
        assert_eq!(back.read(open), d + 3_701_000, "only the 2 s since count");
    }

    /// The same node, its reading still ahead of the stamps (the leader's
    /// first stamps have not reached it), restarts in the same boot: its
    /// anchor holds its greatest stamp and how long ago that came, not the
    /// reading, so the leader's stamps still overtake it and are followed.
    #[test]
    fn an_anchor_holds_the_greatest_stamp_not_a_reading_ahead_of_it() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.take(s0, t0);
        let later = t0 + 600_000 * MS;
        let (stamp, ago) = r.anchor(later);
        assert_eq!((stamp, ago), (s0, 600_000 * MS));
        let mut back = Reading::new(later, 0);
        back.take_before(stamp, ago);
        assert_eq!(back.read(later), s0 + 600_000, "the downtime counts");
        back.take(s0 + 50, later);
        assert_eq!(
            back.read(later),
            s0 + 50,
            "the leader's stamps are followed"
        );
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

    /// An applied stamp counts from when its entry was appended; an entry
    /// appended again after a truncation from the second time; one never
    /// appended here (read back at open) from its apply.
    #[test]
    fn an_applied_stamp_is_dated_when_its_entry_was_appended() {
        let (clock, _wall) = Clock::virtual_wall();
        let r = SharedReading::new(clock, 0, &[], &[]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            r.appended(5, 6);
            tokio::time::advance(40 * MS).await;
            r.appended(6, 6);
            tokio::time::advance(10 * MS).await;
            r.applied(5, 1_000);
            assert_eq!(r.read(), 1_050, "entry 5 counts from its append");
            r.applied(6, 1_040);
            assert_eq!(r.read(), 1_050, "entry 6 counts from its second append");
            tokio::time::advance(50 * MS).await;
            r.applied(7, 1_100);
            assert_eq!(r.read(), 1_100, "entry 7 was never appended: from now");
            // A follower catching up: entries its leader had committed
            // before sending them are dated late, so the reading follows
            // the older stamp it had on time (less 1/99 of the rise), not
            // the newer one appended just now.
            r.old_news_through(20);
            tokio::time::advance(10_000 * MS).await;
            r.appended(20, 21);
            r.applied(20, 1_200);
            assert_eq!(r.read(), 11_098, "entry 20 came late");
            r.applied(21, 11_105);
            assert_eq!(r.read(), 11_105, "entry 21 came on time");
            // Appended, cut and appended again shorter: the cut entries'
            // times go.
            r.appended(30, 32);
            r.appended(31, 31);
            assert_eq!(r.appended.lock().unwrap().len(), 2);
        });
    }
}
