//! A node's reading of the state machine clock between stamps (SPEC §2
//! Time): what Await, the no-write claim path, the sweep trigger and a new
//! leader's first stamp go by.
//!
//! The leader's stamps advance by its monotonic time, steered toward its
//! wall clock by at most [`SLEW_PERCENT`]: at least `100 − SLEW_PERCENT`
//! percent of real time. A reading must never run ahead of the stamps a
//! leader would give, or a new leader starting from it would end live
//! leases early; and it should not fall behind them either, or every lease
//! the new leader grants lasts longer than asked. So, with `S` the greatest
//! stamp taken:
//!
//! - The bridge: a stamp `s` (taken at `a`) carries the reading on at
//!   the real time since, so a stamp taken late (a follower applying a
//!   deposed leader's last entries after the election) cannot set it
//!   back, less what the stamps may have lagged real time since it: `s +
//!   (t − a) − (S − s)/(100/SLEW_PERCENT − 1)`. From `s` to `S` the stamps took at most
//!   `(S − s)/(1 − SLEW)` of real time, so the term is never ahead of `S`
//!   plus the real time since `S` was stamped. The maximum over all stamps
//!   is one number (`Stamps::best`), so a reading is O(1).
//! - The bound: that argument holds while no leader between `s` and `S`
//!   lost time (a host that rebooted cannot count its downtime, and a
//!   leader starting there begins behind real time). So the reading never
//!   goes past what the clocks heard from the latest leader (by term, then
//!   node: openraft may elect two in one term) say, by the same bridge
//!   over those clocks alone (nor past the bridge over all stamps), unless
//!   the greatest stamp taken late (below) is above even that: that
//!   stamp is the reading's floor. A node that stayed up while the others rebooted
//!   follows the leader that came back, not its own older clocks, or
//!   leading later it would end leases early by the downtime.
//!
//! What is heard, and when: every AppendEntries a leader sends carries its
//! clock as it sent it (`raft::network`), taken as heard when it arrives
//! (a leader's own stamps as it takes them). An entry's stamp says nothing
//! of when it arrives: a leader that lost its majority stamps entries that
//! reach a follower only when one comes back, seconds later. Dated on
//! arrival such stamps held a follower's reading, and the stamps it gave
//! once it led, a second behind real time (robustness kill run). So an
//! entry's stamp, as applied, is taken late and only raises the floor; so
//! do a snapshot's clock and the state machine's clock at open. A
//! restart's anchor (`boot_clock.rs`: the reading when written plus the
//! boot time since) is taken as a clock heard at open, which the first
//! clock heard from a leader replaces.

use std::sync::{Arc, Mutex};

use crate::clock::{Clock, Instant, SLEW_PERCENT};

/// `100 − SLEW_PERCENT`: the slowest stamps advance, in percent of real
/// time.
const SLOWEST: i128 = 100 - SLEW_PERCENT as i128;

pub struct Reading {
    /// Times below are ns since this instant (negative: before it).
    origin: Instant,
    /// Every stamp taken: the bridge of the module's notes.
    all: Stamps,
    /// The greatest stamp taken late (applied, a snapshot's, the clock at
    /// open), ns: the reading never goes below it. Not the clocks heard:
    /// this node's own, or those of a leader that has since been replaced,
    /// may be ahead of a leader that lost time.
    taken_top: i128,
    /// The leader clocks heard from the latest leader heard, `(term,
    /// node)` (openraft's order: a later leader's is greater, even in the
    /// same term; [`ANCHOR`] is a restart's anchor): the bound of the
    /// module's notes.
    heard: Option<((u64, u64), Stamps)>,
}

/// A restart's anchor (the reading it held plus the boot time since),
/// taken as the clock of a leader before any: it bounds the reading until
/// the first clock heard from a leader replaces it, so a node whose
/// reading ran ahead of a leader that lost time (it stayed up while the
/// others rebooted) follows that leader once it hears it.
pub const ANCHOR: (u64, u64) = (0, 0);

/// Stamps taken, as far as the bridge of the module's notes needs them.
#[derive(Clone, Copy)]
struct Stamps {
    /// Max over every stamp `s` taken at `a` of `100·s − SLOWEST·a`: the
    /// term of the module's notes multiplied by `SLOWEST`, less what
    /// depends only on now and the greatest stamp.
    best: i128,
    /// The greatest stamp taken, ns.
    top: i128,
}

impl Stamps {
    const NONE: Stamps = Stamps {
        best: i128::MIN,
        top: 0,
    };

    fn take(&mut self, s: i128, at: i128) {
        self.best = self.best.max(100 * s - SLOWEST * at);
        self.top = self.top.max(s);
    }

    /// `(best + SLOWEST·now − SLEW·top) / SLOWEST`: the greatest of the
    /// terms of the module's notes at `now`, ns.
    fn bridge(&self, now: i128) -> i128 {
        (self.best + SLOWEST * now - i128::from(SLEW_PERCENT) * self.top) / SLOWEST
    }
}

impl Reading {
    /// A reading that has reached `reached_ms` at `now`.
    pub fn new(now: Instant, reached_ms: u64) -> Reading {
        let mut r = Reading {
            origin: now,
            all: Stamps::NONE,
            taken_top: 0,
            heard: None,
        };
        r.take_late(reached_ms, now);
        r
    }

    /// Take the clock (ms) of `leader` (`(term, node)`), heard at `at`: a
    /// message of its, sent with it, arrived then (or it is this node's
    /// own stamp, taken then). A leader before the latest heard is
    /// ignored; a later one replaces it.
    pub fn heard(&mut self, leader: (u64, u64), clock_ms: u64, at: Instant) {
        let at = self.ns(at);
        let s = i128::from(clock_ms) * 1_000_000;
        match &mut self.heard {
            Some((latest, _)) if *latest > leader => return,
            Some((latest, stamps)) if *latest == leader => stamps.take(s, at),
            _ => {
                let mut stamps = Stamps::NONE;
                stamps.take(s, at);
                self.heard = Some((leader, stamps));
            }
        }
        self.all.take(s, at);
    }

    /// Take a stamp (ms) known only to have reached this node by `at`.
    pub fn take_late(&mut self, stamp_ms: u64, at: Instant) {
        let at = self.ns(at);
        let s = i128::from(stamp_ms) * 1_000_000;
        self.all.take(s, at);
        self.taken_top = self.taken_top.max(s);
    }

    /// The reading at `now`, in ms.
    pub fn read(&self, now: Instant) -> u64 {
        let now = self.ns(now);
        let mut ns = self.all.bridge(now);
        // The greatest stamp taken late is the floor, but above the clocks
        // heard from the latest leader the reading could be ahead of a
        // leader that lost time.
        if let Some((_, heard)) = self.heard {
            ns = ns.min(heard.bridge(now).max(self.taken_top));
        }
        u64::try_from((ns / 1_000_000).max(0)).unwrap_or(u64::MAX)
    }

    fn ns(&self, at: Instant) -> i128 {
        at.saturating_duration_since(self.origin).as_nanos() as i128
    }
}

/// A node's [`Reading`], fed by its state machine (each stamp as applied),
/// the leader clocks its peers send and, leading, its own stamps.
#[derive(Clone)]
pub struct SharedReading {
    reading: Arc<Mutex<Reading>>,
    time: Clock,
}

impl SharedReading {
    /// A reading at least `clock_ms` (the state machine's clock at open)
    /// now, and from `anchor_ms` (a restart's anchor plus the boot time
    /// since, if there is one) until a leader's clock is heard.
    pub fn new(time: Clock, clock_ms: u64, anchor_ms: Option<u64>) -> SharedReading {
        let now = time.now();
        let mut reading = Reading::new(now, clock_ms);
        if let Some(ms) = anchor_ms {
            reading.heard(ANCHOR, ms, now);
        }
        SharedReading {
            reading: Arc::new(Mutex::new(reading)),
            time,
        }
    }

    /// Take the clock (ms) of `leader` (`(term, node)`), heard now.
    pub fn heard(&self, leader: (u64, u64), clock_ms: u64) {
        let now = self.time.now();
        self.lock().heard(leader, clock_ms, now);
    }

    /// Take a stamp (ms) known only to have reached this node by now (an
    /// applied entry's, a snapshot's clock).
    pub fn take_late(&self, stamp_ms: u64) {
        let now = self.time.now();
        self.lock().take_late(stamp_ms, now);
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
            r.heard((1, 1), stamp, at);
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
        r.heard(ANCHOR, anchor + 600_000, t0);
        assert_eq!(r.read(t0), anchor + 600_000, "the downtime counts");
        // The leader's stamps advanced 99% of those 10 minutes, and go on
        // so for another minute, one a second.
        let mut stamp = anchor + 594_000;
        let mut at = t0;
        r.heard((1, 1), stamp, at);
        for _ in 0..60 {
            at += 1_000 * MS;
            stamp += 990;
            r.heard((1, 1), stamp, at);
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
        r.heard((1, 1), 6_000, t0 + 1_000 * MS);
        assert_eq!(r.read(t0 + 3_000 * MS), 8_000);
    }

    /// A follower applies a deposed leader's last entries only after the
    /// election: their stamps are older than the time that has passed, and
    /// must not set the reading back (a paused leader in the robustness
    /// suite once cost the cluster 1.3 s that way). Below the greatest
    /// stamp nothing moves; above it but taken late (a snapshot's clock),
    /// the older stamps lose 1/99 of the 10 ms it rose, not the 790 ms it
    /// lagged.
    #[test]
    fn a_stamp_taken_late_sets_the_reading_back_by_1_99_of_its_rise_at_most() {
        let t0 = Instant::now();
        let mut r = Reading::new(t0, 1_000_000);
        r.heard((1, 1), 1_000_500, t0 + 500 * MS);
        let before = r.read(t0 + 1_300 * MS);
        assert_eq!(before, 1_001_300);
        r.take_late(1_000_100, t0 + 1_300 * MS);
        assert_eq!(r.read(t0 + 1_300 * MS), before);
        r.take_late(1_000_510, t0 + 1_300 * MS);
        assert_eq!(r.read(t0 + 1_300 * MS), before - 1);
    }

    /// A node stays up while the others reboot for ten minutes and, with
    /// no anchor from this boot, lead on from their last stamps, behind
    /// real time by the downtime. Once their stamps reach this node its
    /// reading follows them: counting on from its own last stamp it stayed
    /// ahead by nearly the whole downtime (and the next leader, were it
    /// this node, ended every lease early by that). Then it applies that
    /// leader's entries: an entry's stamp says nothing of when it arrived,
    /// so one above the heard clocks raises the floor only; as a bound it
    /// would let the reading leap back ahead by the whole downtime, as the
    /// bridge from the node's own older stamps allows.
    #[test]
    fn a_node_that_stayed_up_follows_the_stamps_of_a_leader_that_lost_time() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.heard((1, 1), s0, t0);
        let back = t0 + 600_000 * MS;
        r.heard((2, 1), s0 + 50, back);
        assert_eq!(r.read(back), s0 + 50);
        r.take_late(s0 + 60, back + 20 * MS);
        assert_eq!(r.read(back + 1_000 * MS), s0 + 1_050);
        r.take_late(s0 + 5_000, back + 1_000 * MS);
        assert_eq!(r.read(back + 1_000 * MS), s0 + 5_000, "the floor rises");
    }

    /// A stamp of a leader whose wall clock is ahead (steered fast) moves
    /// the reading up at once.
    #[test]
    fn a_greater_stamp_moves_the_reading_up() {
        let t0 = Instant::now();
        let mut r = Reading::new(t0, 1_000);
        r.heard((1, 1), 1_101, t0 + 100 * MS);
        assert_eq!(r.read(t0 + 100 * MS), 1_101);
        assert_eq!(r.read(t0 + 150 * MS), 1_151);
    }

    /// A follower back from a restart gets entries its leader stamped
    /// while it had no majority, two seconds before they arrive, and the
    /// leader's clock with them: only the clock dates, the stale stamps
    /// raise the floor at most (dated on arrival, such stamps once held a
    /// follower two seconds behind). A clock heard late (a heartbeat that
    /// waited 400 ms in a queue) leaves the bound an earlier, timely one
    /// set: the greatest clock heard alone put it 449 ms behind.
    #[test]
    fn stale_stamps_and_late_messages_do_not_hold_the_reading_back() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        r.heard(ANCHOR, s0 + 3_000, t0);
        assert_eq!(r.read(t0), s0 + 3_000, "the anchor counts the downtime");
        r.heard((1, 1), s0 + 3_100, t0 + 100 * MS);
        r.take_late(s0 + 1_100, t0 + 150 * MS);
        assert_eq!(r.read(t0 + 200 * MS), s0 + 3_200);
        r.heard((1, 1), s0 + 3_150, t0 + 600 * MS);
        let reading = r.read(t0 + 600 * MS);
        assert!(
            reading >= s0 + 3_599,
            "{} ms behind the leader",
            s0 + 3_600 - reading
        );
    }

    /// The same node restarts in the same boot, its reading still ahead of
    /// the leader that came back (whose clock has not reached it yet): its
    /// anchor is that reading plus the downtime, and gives way to the
    /// first clock it hears.
    #[test]
    fn a_restart_anchor_gives_way_to_the_first_clock_heard() {
        let s0 = 1_000_000_000u64;
        let later = Instant::now();
        let mut back = Reading::new(later, 0);
        back.heard(ANCHOR, s0 + 600_000, later);
        assert_eq!(back.read(later), s0 + 600_000, "the downtime counts");
        back.heard((2, 1), s0 + 50, later);
        assert_eq!(back.read(later), s0 + 50, "the leader's clock is followed");
    }

    /// A node that led (or followed a leader) for ten minutes while the
    /// others rebooted, stamping on with no majority; the leader they
    /// elect lost the downtime. Its own clocks, never committed, are no
    /// floor: counted as one they held the reading at them, ahead of the
    /// new leader by the downtime. A later leader of the same term (node 2
    /// after node 1) is followed too, and an earlier one, heard late, is
    /// not.
    #[test]
    fn clocks_of_a_replaced_leader_do_not_hold_the_reading_up() {
        let t0 = Instant::now();
        let s0 = 1_000_000_000u64;
        let mut r = Reading::new(t0, 0);
        for i in 0..=6_000u64 {
            r.heard((1, 1), s0 + i * 100, t0 + Duration::from_millis(i * 100));
        }
        let back = t0 + 600_000 * MS;
        r.heard((2, 1), s0 + 50, back);
        assert_eq!(r.read(back), s0 + 50);
        r.heard((2, 2), s0 + 20, back);
        assert_eq!(r.read(back), s0 + 20, "node 2 leads term 2 after node 1");
        r.heard((2, 1), s0 + 600_000, back);
        assert_eq!(r.read(back), s0 + 20, "node 1's clock came late");
    }
}
