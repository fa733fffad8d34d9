//! The host's boot clock, so the state machine clock keeps counting the
//! time a node was down (SPEC §2 Time: a new leader continues from the
//! state machine clock plus the monotonic time since it last applied).
//!
//! A process that restarts has lost its in-memory monotonic reference, so
//! the last stamp it re-applies from its log would be taken as "now", and
//! the cluster clock would fall behind real time by the downtime (leases
//! and retention then last longer than asked). Instead every apply batch
//! records an [`Anchor`]: "at this point of the boot clock, the state
//! machine clock read at least this". `CLOCK_BOOTTIME` is system-wide and
//! monotonic and keeps counting across process restarts (and suspend), so
//! after a restart in the same boot the anchor plus the boot time since is
//! a reading the clock has certainly reached. After a reboot (another boot
//! id) no such bound exists and the downtime is simply not counted, which
//! errs on the side of longer leases. Nothing here reads the wall clock.

use serde::{Deserialize, Serialize};

/// A reading of the state machine clock at a point of the boot clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub clock_ms: u64,
    pub boot_id: String,
    pub boot_ms: u64,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or `None` where the
/// host does not say (then no anchor is kept).
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Milliseconds on `CLOCK_BOOTTIME`.
pub fn boot_ms() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000 + ts.tv_nsec as u64 / 1_000_000)
}

impl Anchor {
    /// The anchor for `clock_ms` now, if this host has a boot clock.
    pub fn now(boot_id: &Option<String>, clock_ms: u64) -> Option<Anchor> {
        Some(Anchor {
            clock_ms,
            boot_id: boot_id.clone()?,
            boot_ms: boot_ms()?,
        })
    }

    /// What the state machine clock has certainly reached by now, if this
    /// anchor was taken in the current boot.
    pub fn reached_ms(&self, boot_id: &Option<String>) -> Option<u64> {
        if boot_id.as_deref() != Some(self.boot_id.as_str()) {
            return None;
        }
        let since = boot_ms()?.checked_sub(self.boot_ms)?;
        Some(self.clock_ms.saturating_add(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_anchor_of_this_boot_counts_the_time_since_and_another_boot_none() {
        let id = boot_id();
        let Some(mut a) = Anchor::now(&id, 1_000) else {
            return; // no boot clock on this host
        };
        a.boot_ms -= 5_000; // taken five seconds ago
        let reached = a.reached_ms(&id).unwrap();
        assert!((6_000..7_000).contains(&reached), "{reached}");
        assert_eq!(a.reached_ms(&Some("another-boot".into())), None);
    }
}
