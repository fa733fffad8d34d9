//! Prometheus metrics: process-wide counters bumped where things happen,
//! Raft gauges read at scrape time, and a tiny HTTP/1.1 endpoint serving
//! the text exposition format on `--metrics-listen` (`GET /metrics`).
//!
//! Counters count answers given by this node's client port (a write a
//! follower forwards is counted once, by the follower that answered).
//!
//! A leaf: it imports nothing of the crate, so every layer may count here.
//! The caller says what happened; the node hands in the Raft gauges.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

static CLAIM_ACQUIRED: AtomicU64 = AtomicU64::new(0);
static CLAIM_IN_PROGRESS: AtomicU64 = AtomicU64::new(0);
static CLAIM_COMPLETED: AtomicU64 = AtomicU64::new(0);
static CLAIM_FAILED: AtomicU64 = AtomicU64::new(0);
static TAKEOVERS: AtomicU64 = AtomicU64::new(0);
static LEASE_LOST: AtomicU64 = AtomicU64::new(0);
static FINGERPRINT_MISMATCH: AtomicU64 = AtomicU64::new(0);
static UNAUTHENTICATED: AtomicU64 = AtomicU64::new(0);
static PERMISSION_DENIED: AtomicU64 = AtomicU64::new(0);
static OVERLOADED: AtomicU64 = AtomicU64::new(0);
static PEER_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Upper bounds (seconds) of the fsync latency histogram's buckets.
const FSYNC_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
static FSYNC_COUNTS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];
static FSYNC_COUNT: AtomicU64 = AtomicU64::new(0);
static FSYNC_SUM_NANOS: AtomicU64 = AtomicU64::new(0);

/// How a claim was answered to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// Granted; `takeover` when taken from a holder whose lease expired.
    Acquired {
        takeover: bool,
    },
    InProgress,
    Completed,
    Failed,
}

/// A claim's outcome, as answered to a client.
pub fn claim(a: ClaimAnswer) {
    let c = match a {
        ClaimAnswer::Acquired { takeover } => {
            if takeover {
                TAKEOVERS.fetch_add(1, Ordering::Relaxed);
            }
            &CLAIM_ACQUIRED
        }
        ClaimAnswer::InProgress => &CLAIM_IN_PROGRESS,
        ClaimAnswer::Completed => &CLAIM_COMPLETED,
        ClaimAnswer::Failed => &CLAIM_FAILED,
    };
    c.fetch_add(1, Ordering::Relaxed);
}

/// A token-fenced call refused with `LEASE_LOST`.
pub fn fenced_rejection() {
    LEASE_LOST.fetch_add(1, Ordering::Relaxed);
}

/// A claim refused with `FINGERPRINT_MISMATCH`.
pub fn fingerprint_mismatch() {
    FINGERPRINT_MISMATCH.fetch_add(1, Ordering::Relaxed);
}

/// A call refused because a concurrency cap was reached (`OVERLOADED`).
pub fn overloaded() {
    OVERLOADED.fetch_add(1, Ordering::Relaxed);
}

/// A client call refused by auth: `denied` for PERMISSION_DENIED, else
/// UNAUTHENTICATED.
pub fn auth_refused(denied: bool) {
    let c = if denied {
        &PERMISSION_DENIED
    } else {
        &UNAUTHENTICATED
    };
    c.fetch_add(1, Ordering::Relaxed);
}

/// A peer call refused because it came from a non-member address.
pub fn peer_refused() {
    PEER_REFUSED.fetch_add(1, Ordering::Relaxed);
}

/// One fdatasync of the Raft log.
pub fn fsync(took: Duration) {
    let secs = took.as_secs_f64();
    for (i, le) in FSYNC_BUCKETS.iter().enumerate() {
        if secs <= *le {
            FSYNC_COUNTS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    FSYNC_COUNT.fetch_add(1, Ordering::Relaxed);
    FSYNC_SUM_NANOS.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
}

fn counter(out: &mut String, name: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// The Raft state the gauges show, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftGauges {
    pub term: u64,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
}

/// Reads the Raft gauges at scrape time.
pub type GaugeSource = Arc<dyn Fn() -> RaftGauges + Send + Sync>;

/// The text exposition of every metric.
pub fn render(s: &RaftGauges) -> String {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::new();
    counter(
        &mut out,
        "idemkv_claims_total",
        "Claims answered by this node, by outcome.",
        &[
            ("{outcome=\"acquired\"}", load(&CLAIM_ACQUIRED)),
            ("{outcome=\"in_progress\"}", load(&CLAIM_IN_PROGRESS)),
            ("{outcome=\"completed\"}", load(&CLAIM_COMPLETED)),
            ("{outcome=\"failed\"}", load(&CLAIM_FAILED)),
        ],
    );
    counter(
        &mut out,
        "idemkv_takeovers_total",
        "Claims acquired from a holder whose lease had expired.",
        &[("", load(&TAKEOVERS))],
    );
    counter(
        &mut out,
        "idemkv_fenced_rejections_total",
        "Token-fenced calls refused with LEASE_LOST.",
        &[("", load(&LEASE_LOST))],
    );
    counter(
        &mut out,
        "idemkv_fingerprint_mismatches_total",
        "Claims refused with FINGERPRINT_MISMATCH (a key reused for another request).",
        &[("", load(&FINGERPRINT_MISMATCH))],
    );
    counter(
        &mut out,
        "idemkv_auth_refusals_total",
        "Client calls refused by bearer-token auth, by status code.",
        &[
            ("{code=\"unauthenticated\"}", load(&UNAUTHENTICATED)),
            ("{code=\"permission_denied\"}", load(&PERMISSION_DENIED)),
        ],
    );
    counter(
        &mut out,
        "idemkv_overloaded_total",
        "Calls refused because max_in_flight (client or peer port) was reached.",
        &[("", load(&OVERLOADED))],
    );
    counter(
        &mut out,
        "idemkv_peer_refused_total",
        "Peer-port calls refused because they came from a non-member address.",
        &[("", load(&PEER_REFUSED))],
    );
    gauge(&mut out, "idemkv_raft_term", "Current Raft term.", s.term);
    gauge(
        &mut out,
        "idemkv_raft_is_leader",
        "1 if this node leads.",
        u64::from(s.is_leader),
    );
    gauge(
        &mut out,
        "idemkv_raft_commit_index",
        "Highest log index known committed.",
        s.commit_index,
    );
    gauge(
        &mut out,
        "idemkv_raft_applied_index",
        "Highest log index applied to the state machine.",
        s.applied_index,
    );
    gauge(
        &mut out,
        "idemkv_raft_apply_lag",
        "Committed entries not yet applied.",
        s.commit_index.saturating_sub(s.applied_index),
    );
    let name = "idemkv_log_fsync_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} fdatasync latency of the Raft log (one per group commit).\n# TYPE {name} histogram"
    );
    for (i, le) in FSYNC_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{le}\"}} {}",
            load(&FSYNC_COUNTS[i])
        );
    }
    let count = load(&FSYNC_COUNT);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = load(&FSYNC_SUM_NANOS) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    out
}

/// Serve `GET /metrics` on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    gauges: GaugeSource,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((mut sock, _)) = conn else { continue };
        let gauges = gauges.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // Read the request head (bounded; bodies are not expected).
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let head = String::from_utf8_lossy(&buf);
            let line = head.lines().next().unwrap_or("");
            let (status, body) = if line.starts_with("GET /metrics ") {
                ("200 OK", render(&gauges()))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
