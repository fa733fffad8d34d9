//! A recorded history: every operation a client invoked, when, and what came
//! back, or "unknown" when the call timed out or the connection broke (then
//! the operation may or may not have taken effect).
//!
//! Times are the test machine's wall clock in milliseconds, the same clock
//! the servers stamp lease deadlines with (they run on this machine; the
//! checker allows a stated drift between them).

use serde::{Deserialize, Serialize};

/// What a client asked for, on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    Claim {
        owner: String,
        claim_id: String,
        lease_ms: u64,
        /// Set for items of a ClaimBatch: the batch's id (its items share
        /// one Raft entry, so an applied batch grants one token to all).
        batch: Option<u64>,
        /// The batch was all-or-nothing: every item acquired, or none.
        #[serde(default)]
        all_or_nothing: bool,
        /// The retention asked for (`None`: the default, 24 h).
        #[serde(default)]
        retention_ms: Option<u64>,
        /// The request fingerprint sent (`None`: none; histories recorded
        /// before fingerprints were sent load as none).
        #[serde(default)]
        fingerprint: Option<String>,
    },
    Renew {
        token: u64,
        lease_ms: u64,
    },
    Complete {
        token: u64,
        result: String,
    },
    Release {
        token: u64,
    },
    /// Delete, fenced by a token or not.
    Delete {
        token: Option<u64>,
    },
    /// A linearizable Get, or an Await (which starts from a read index and
    /// returns a state the record had within the call).
    Read,
}

/// The record as a read returned it (the fields the model predicts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seen {
    InProgress {
        owner: String,
        token: u64,
        deadline_ms: u64,
        attempts: u32,
    },
    Available {
        attempts: u32,
    },
    Completed {
        token: u64,
        result: String,
    },
    Failed {
        attempts: u32,
    },
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    Acquired {
        token: u64,
        deadline_ms: u64,
        attempt: u32,
    },
    InProgress {
        owner: String,
    },
    Completed {
        token: u64,
        result: String,
    },
    Failed,
    /// A batch item not acquired because the all-or-nothing batch was not
    /// applied (the item itself could have been acquired).
    NotAttempted,
    Renewed {
        deadline_ms: u64,
    },
    /// Complete succeeded.
    Done,
    Released {
        failed: bool,
    },
    /// Delete succeeded (the key is absent now).
    Deleted,
    LeaseLost,
    AlreadyCompleted,
    /// FAILED_PRECONDITION, reason FINGERPRINT_MISMATCH: the claim's
    /// fingerprint differs from the stored one (a claim, or a batch item).
    FingerprintMismatch,
    Record(Option<Seen>),
    /// Timed out, connection broken, no leader: maybe applied, maybe not.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: usize,
    /// The client (worker) that issued it; one operation at a time each.
    pub process: usize,
    pub key: String,
    pub call: Call,
    pub ret: Ret,
    pub invoke_ms: u64,
    /// `None` when the outcome is unknown.
    pub complete_ms: Option<u64>,
}

impl Op {
    /// When the operation is known to have finished taking effect, if ever.
    pub fn end(&self) -> u64 {
        match (&self.ret, self.complete_ms) {
            (Ret::Unknown, _) | (_, None) => u64::MAX,
            (_, Some(t)) => t,
        }
    }

    pub fn is_unknown(&self) -> bool {
        self.ret == Ret::Unknown
    }
}

/// Write one operation per line (JSON).
pub fn save(ops: &[Op], path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for op in ops {
        serde_json::to_writer(&mut f, op)?;
        f.write_all(b"\n")?;
    }
    f.flush()
}

pub fn load(path: &std::path::Path) -> std::io::Result<Vec<Op>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}

/// Milliseconds since the Unix epoch on this machine's wall clock.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The test's clock: the wall clock when first read, then the monotonic
/// clock's progress, as the servers' stamps advance (SPEC §2 Time). The
/// wall clock itself can step under a test: a virtual machine the host
/// froze for seconds has its wall clock put right on resume while the
/// monotonic clock skipped the pause (a CI run saw a 7 s step), and a
/// history on the wall clock would then show every later lease as 7 s off.
/// A run shifts its history by [`wall_step_ms`] at its start, so it lines
/// up with a cluster that started from the wall clock then.
pub fn now_ms() -> u64 {
    let (at, wall) = *origin();
    wall + at.elapsed().as_millis() as u64
}

fn origin() -> &'static (std::time::Instant, u64) {
    static ORIGIN: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(|| (std::time::Instant::now(), wall_ms()))
}

/// How far the wall clock has stepped away from [`now_ms`] (ms, ahead
/// positive).
pub fn wall_step_ms() -> i64 {
    let wall = wall_ms() as i64;
    wall - now_ms() as i64
}
