//! The leader's stamping clock (SPEC §2 Time).
//!
//! Every command the leader proposes carries a stamp; the state machine
//! takes `max(previous, stamp)` as its clock, and every lease and retention
//! decision reads that clock. The stamp must therefore advance with *real*
//! time, whatever the wall clock of the node does:
//!
//! - During one leadership term the stamp is `base + monotonic elapsed`,
//!   where `base` is the node's reading of the clock (the previous
//!   leader's clock as last heard plus the monotonic time since,
//!   `store/reading.rs`) when the term began. A wall-clock jump forward or
//!   back therefore moves nothing at once.
//! - The stamp is steered toward the wall clock by at most [`SLEW`] of the
//!   elapsed time (1 ms per 100 ms), so a wrong wall clock gains or loses
//!   at most 1% on lease and retention timing, and a fixed one is followed
//!   again without ever going backwards.
//! - A cluster that never stamped anything (state machine clock 0) starts
//!   from the wall clock.
//!
//! This module must not decide a rule: it only produces stamps.

use std::sync::Mutex;

use crate::clock::Instant;

/// The largest share of elapsed time by which a stamp is steered toward
/// the wall clock, per unit of elapsed time.
pub const SLEW: f64 = crate::clock::SLEW_PERCENT as f64 / 100.0;

struct Term {
    term: u64,
    base_ms: u64,
    base_at: Instant,
    /// Total steering applied so far in this term, ms.
    steer_ms: f64,
    /// Elapsed ms (since `base_at`) at the previous stamp.
    last_elapsed_ms: f64,
    last_stamp: u64,
}

/// One per node; only its leader terms stamp.
#[derive(Default)]
pub struct LeaderClock {
    state: Mutex<Option<Term>>,
}

impl LeaderClock {
    /// The stamp for a command proposed at monotonic instant `now` (the
    /// node's [`crate::clock::Clock`]) in leader term `term`. `sm_now_ms`
    /// gives the node's reading of the clock now, read only when a term
    /// begins (`store/reading.rs`),
    /// `sm_clock_ms` the state machine's greatest stamp (0: the cluster
    /// never stamped), `wall_ms` the node's wall clock.
    pub fn stamp(
        &self,
        now: Instant,
        term: u64,
        sm_now_ms: impl FnOnce() -> u64,
        sm_clock_ms: u64,
        wall_ms: u64,
    ) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            Some(t) if t.term == term => {
                let elapsed = now.saturating_duration_since(t.base_at).as_secs_f64() * 1e3;
                let dt = (elapsed - t.last_elapsed_ms).max(0.0);
                let mono = t.base_ms as f64 + elapsed + t.steer_ms;
                let max = dt * SLEW;
                t.steer_ms += (wall_ms as f64 - mono).clamp(-max, max);
                // Callers race from `now` to the lock: a late one must not
                // set the mark back and have its stretch steered twice.
                t.last_elapsed_ms = t.last_elapsed_ms.max(elapsed);
                let stamp = (t.base_ms as f64 + elapsed + t.steer_ms).max(0.0) as u64;
                t.last_stamp = t.last_stamp.max(stamp);
                t.last_stamp
            }
            _ => {
                // A new term continues from the state machine clock; a
                // fresh cluster has none and starts from the wall clock.
                let base_ms = if sm_clock_ms == 0 {
                    wall_ms
                } else {
                    sm_now_ms()
                };
                *state = Some(Term {
                    term,
                    base_ms,
                    base_at: now,
                    steer_ms: 0.0,
                    last_elapsed_ms: 0.0,
                    last_stamp: base_ms,
                });
                base_ms
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const H: u64 = 3_600_000;

    #[test]
    fn a_wall_clock_jump_gains_at_most_the_slew() {
        let c = LeaderClock::default();
        let t = Instant::now();
        let first = c.stamp(t, 3, || 50_000, 49_000, 50_000);
        assert_eq!(
            first, 50_000,
            "a new term continues from the state machine clock"
        );
        // The wall clock jumps 25 h ahead; 10 s of real time pass.
        let later = c.stamp(t + Duration::from_secs(10), 3, || 0, 1, 50_000 + 25 * H);
        assert_eq!(later - first, 10_100, "10 s real plus 1% steering");
        // The wall clock is put right again (now 25 h behind the stamps'
        // view): stamps keep advancing, 1% slower, never backwards.
        let fixed = c.stamp(t + Duration::from_secs(20), 3, || 0, 1, 70_000);
        assert_eq!(fixed - later, 9_900);
    }

    #[test]
    fn a_new_term_continues_from_the_state_machine() {
        let c = LeaderClock::default();
        let t = Instant::now();
        c.stamp(t, 1, || 10_000, 9_000, 10_000);
        assert_eq!(c.stamp(t, 2, || 77_000, 76_000, 10 * H), 77_000);
    }

    #[test]
    fn a_fresh_cluster_starts_from_the_wall_clock() {
        let c = LeaderClock::default();
        assert_eq!(
            c.stamp(Instant::now(), 1, || 7, 0, 1_700_000_000_000),
            1_700_000_000_000
        );
    }
}
