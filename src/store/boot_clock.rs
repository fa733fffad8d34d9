//! The host's boot clock, so the state machine clock keeps counting the
//! time a node was down (SPEC §2 Time: a new leader continues from the
//! node's reading of the clock, `reading.rs`).
//!
//! A process that restarts has lost its in-memory monotonic reference, so
//! the last stamp it re-applies from its log would be taken as "now", and
//! the cluster clock would fall behind real time by the downtime (leases
//! and retention then last longer than asked). Instead the node records an
//! [`Anchor`] (every 100 ms of applies, and every second a leader's clock
//! is heard): "at this point of the boot clock, the node's reading of the
//! clock was this". `CLOCK_BOOTTIME` is system-wide and monotonic and keeps
//! counting across process restarts (and suspend), so after a restart in
//! the same boot the anchor plus the boot time since is where the reading
//! resumes, until the first clock heard from a leader replaces it
//! (`reading.rs`). After a reboot (another boot
//! id) no such bound exists and the downtime is simply not counted, which
//! errs on the side of longer leases. Nothing here reads the wall clock.
//!
//! The anchor lives in its own small file ([`AnchorFile`]), written in
//! place and never fsynced. It counts only within the boot that wrote it,
//! and within one boot the page cache outlives every process: a write that
//! returned survives a `kill -9`, an OOM kill or a crash of the node, which
//! are the only failures after which it can be used. A power cut or kernel
//! panic loses it, but also starts another boot, where it would not count.
//! (It used to be a sled key: sled keeps recent writes in its own memory
//! for up to half a second, so a node killed soon after its first stamps,
//! or a whole cluster killed twice in quick succession, lost every anchor
//! and resumed its clock from the last stamp in its log, behind real time
//! by the outage; a CI power-loss run saw 618 ms.)

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

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

    /// The reading this anchor gives now (the boot time since counted), if
    /// it was taken in the current boot.
    pub fn reached_ms(&self, boot_id: &Option<String>) -> Option<u64> {
        if boot_id.as_deref() != Some(self.boot_id.as_str()) {
            return None;
        }
        let since = boot_ms()?.checked_sub(self.boot_ms)?;
        Some(self.clock_ms.saturating_add(since))
    }
}

/// Every anchor is written at offset 0 padded to this length, so a
/// shorter one never leaves the tail of a longer one behind.
const ANCHOR_BYTES: usize = 128;

/// The file holding a node's latest [`Anchor`] (see the module doc for why
/// it is never fsynced).
pub struct AnchorFile {
    file: Mutex<File>,
}

impl AnchorFile {
    /// Open (or create) the file at `path` and read the anchor it holds.
    /// A file that does not parse (a byte flipped, or written by someone
    /// else) holds none: the clock then starts from its last stamp, which
    /// errs towards longer leases.
    pub fn open(path: &Path) -> io::Result<(AnchorFile, Option<Anchor>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut buf = vec![0; ANCHOR_BYTES];
        let n = file.read_at(&mut buf, 0)?;
        let anchor = Anchor::parse(&buf[..n]);
        if anchor.is_none() && n > 0 {
            tracing::warn!(
                path = %path.display(),
                "the clock anchor does not parse; the clock resumes from its last stamp"
            );
        }
        Ok((
            AnchorFile {
                file: Mutex::new(file),
            },
            anchor,
        ))
    }

    /// Replace the anchor held (one `pwrite`, no fsync).
    pub fn write(&self, a: &Anchor) -> io::Result<()> {
        let bytes = a.to_line();
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all_at(&bytes, 0)
    }
}

impl Anchor {
    const MAGIC: &'static str = "idemkv-clock-anchor-1";

    /// `MAGIC clock_ms boot_id boot_ms crc32`, space-padded to
    /// [`ANCHOR_BYTES`] and ended by a newline.
    fn to_line(&self) -> Vec<u8> {
        let body = format!(
            "{} {} {} {}",
            Self::MAGIC,
            self.clock_ms,
            self.boot_id,
            self.boot_ms
        );
        let crc = crc32fast::hash(body.as_bytes());
        let mut line = format!("{body} {crc:08x}").into_bytes();
        line.resize(ANCHOR_BYTES - 1, b' ');
        line.push(b'\n');
        line
    }

    fn parse(bytes: &[u8]) -> Option<Anchor> {
        let text = std::str::from_utf8(bytes).ok()?.trim_end();
        let (body, crc) = text.rsplit_once(' ')?;
        if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
            return None;
        }
        let mut f = body.split(' ');
        if f.next()? != Self::MAGIC {
            return None;
        }
        let clock_ms = f.next()?.parse().ok()?;
        let boot_id = f.next()?.to_string();
        let boot_ms = f.next()?.parse().ok()?;
        f.next().is_none().then_some(Anchor {
            clock_ms,
            boot_id,
            boot_ms,
        })
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

    #[test]
    fn the_anchor_file_keeps_the_latest_anchor_and_refuses_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock-anchor");
        let (f, none) = AnchorFile::open(&path).unwrap();
        assert_eq!(none, None, "a new file holds no anchor");
        let long = Anchor {
            clock_ms: 1_796_408_343_968,
            boot_id: "0f4c6a52-5b6e-4c8e-9b1a-2d3e4f5a6b7c".into(),
            boot_ms: 123_456_789,
        };
        let short = Anchor {
            clock_ms: 7,
            boot_id: "b".into(),
            boot_ms: 1,
        };
        f.write(&long).unwrap();
        f.write(&short).unwrap();
        drop(f);
        let (f, read) = AnchorFile::open(&path).unwrap();
        assert_eq!(read, Some(short), "the last one written, whole");
        f.write(&long).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(AnchorFile::open(&path).unwrap().1, None);
    }
}
