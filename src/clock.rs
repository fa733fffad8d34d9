//! The time a node reads for its rules (SPEC §2 Time), injectable.
//!
//! Every lease and retention decision rests on two readings: a monotonic
//! instant (how much real time passed) and the wall clock (only to steer
//! the leader's stamps, see `raft/clock.rs`). Both come from the node's
//! [`Clock`], set in [`crate::NodeConfig::clock`]:
//!
//! - [`Clock::system`] (the default): tokio's monotonic clock, which is the
//!   operating system's unless a test paused it, and the system wall clock.
//! - [`Clock::virtual_wall`]: tokio's monotonic clock, and a wall clock
//!   that moves with it (plus steps the test makes). Under
//!   `tokio::time::pause()` a test then advances lease time exactly with
//!   `tokio::time::advance`, instead of sleeping through it, and can step
//!   the wall clock the way NTP or an operator would.
//!
//! The monotonic reading is [`tokio::time::Instant`], the same clock
//! openraft's timers, request timeouts, Await's wake-up and the sweeper's
//! interval use, so paused time moves all of them together.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// The most by which the leader steers its stamps toward its wall clock,
/// in percent of the elapsed time (`raft/clock.rs`): stamps advance at
/// least `100 − SLEW_PERCENT` and at most `100 + SLEW_PERCENT` percent of
/// real time, which is what a node's reading between stamps relies on
/// (`store/reading.rs`).
pub const SLEW_PERCENT: u32 = 1;

/// A source of time for a node's rules.
pub trait TimeSource: Send + Sync + 'static {
    /// Monotonic now: never goes back, whatever the wall clock does.
    fn now(&self) -> Instant;
    /// The wall clock in ms since the Unix epoch.
    fn wall_ms(&self) -> u64;
}

/// A node's clock: a shared [`TimeSource`].
#[derive(Clone)]
pub struct Clock(Arc<dyn TimeSource>);

impl Clock {
    /// The operating system's clocks (through tokio's monotonic clock).
    pub fn system() -> Clock {
        Clock(Arc::new(System))
    }

    /// A wall clock that starts at the system's and then follows tokio's
    /// monotonic clock, so `tokio::time::advance` moves both; with a handle
    /// to step it ([`VirtualWall::step`]).
    pub fn virtual_wall() -> (Clock, Arc<VirtualWall>) {
        let wall = Arc::new(VirtualWall {
            start: Instant::now(),
            start_wall_ms: System.wall_ms(),
            step_ms: AtomicI64::new(0),
        });
        (Clock(wall.clone()), wall)
    }

    pub fn now(&self) -> Instant {
        self.0.now()
    }

    pub fn wall_ms(&self) -> u64 {
        self.0.wall_ms()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("wall_ms", &self.wall_ms())
            .finish()
    }
}

struct System;

impl TimeSource for System {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// The wall clock of [`Clock::virtual_wall`].
pub struct VirtualWall {
    start: Instant,
    start_wall_ms: u64,
    step_ms: AtomicI64,
}

impl VirtualWall {
    /// Step the wall clock by `ms` (negative: back), as an NTP correction
    /// or an operator would; monotonic time is not moved.
    pub fn step(&self, ms: i64) {
        self.step_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

impl TimeSource for VirtualWall {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_ms(&self) -> u64 {
        let since = Instant::now()
            .saturating_duration_since(self.start)
            .as_millis() as i64;
        (self.start_wall_ms as i64)
            .saturating_add(since)
            .saturating_add(self.step_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_virtual_wall_follows_paused_time_and_its_steps() {
        let (clock, wall) = Clock::virtual_wall();
        let (t0, w0) = (clock.now(), clock.wall_ms());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(clock.now() - t0, Duration::from_secs(30));
        assert_eq!(clock.wall_ms() - w0, 30_000);
        wall.step(-3_600_000);
        assert_eq!(clock.now() - t0, Duration::from_secs(30), "not moved");
        assert_eq!(w0 - clock.wall_ms(), 3_570_000);
    }
}
