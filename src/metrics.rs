//! Prometheus metrics: process-wide counters bumped where things happen,
//! Raft gauges read at scrape time, and `GET /metrics` on
//! `--metrics-listen` (OpenMetrics text, from `prometheus-client`; served
//! by axum).
//!
//! Counters count answers given by this node's client port (a write a
//! follower forwards is counted once, by the follower that answered).
//!
//! A leaf: it imports nothing of the crate, so every layer may count here.
//! The caller says what happened; the node hands in the Raft gauges.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the fsync latency histogram's buckets.
const FSYNC_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

type U64Gauge = Gauge<u64, AtomicU64>;

/// Counter handles share their value with the registered series, so
/// counting is one atomic add, never a lookup in a labelled family.
struct Metrics {
    registry: Registry,
    acquired: Counter,
    in_progress: Counter,
    completed: Counter,
    failed: Counter,
    takeovers: Counter,
    fenced: Counter,
    mismatches: Counter,
    unauthenticated: Counter,
    permission_denied: Counter,
    overloaded: Counter,
    peer_refused: Counter,
    append_streams: Counter,
    fsync: Histogram,
    fsync_on_append: Counter,
    term: U64Gauge,
    is_leader: U64Gauge,
    commit_index: U64Gauge,
    applied_index: U64Gauge,
    apply_lag: U64Gauge,
    data_bytes: U64Gauge,
    quota_bytes: U64Gauge,
    nospace: U64Gauge,
    gateway: Family<OutcomeLabel, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut r = Registry::default();
    let claims = Family::<OutcomeLabel, Counter>::default();
    // Every series exists from the start, at 0.
    let outcome = |outcome| claims.get_or_create(&OutcomeLabel { outcome }).clone();
    let [acquired, in_progress, completed, failed] =
        ["acquired", "in_progress", "completed", "failed"].map(outcome);
    r.register(
        "idemkv_claims",
        "Claims answered by this node, by outcome.",
        claims.clone(),
    );
    let takeovers = Counter::default();
    r.register(
        "idemkv_takeovers",
        "Claims acquired from a holder whose lease had expired.",
        takeovers.clone(),
    );
    let fenced = Counter::default();
    r.register(
        "idemkv_fenced_rejections",
        "Token-fenced calls refused with LEASE_LOST.",
        fenced.clone(),
    );
    let mismatches = Counter::default();
    r.register(
        "idemkv_fingerprint_mismatches",
        "Claims refused with FINGERPRINT_MISMATCH (a key reused for another request).",
        mismatches.clone(),
    );
    let auth_refusals = Family::<CodeLabel, Counter>::default();
    let code = |code| auth_refusals.get_or_create(&CodeLabel { code }).clone();
    let [unauthenticated, permission_denied] = ["unauthenticated", "permission_denied"].map(code);
    r.register(
        "idemkv_auth_refusals",
        "Client calls refused by bearer-token auth, by status code.",
        auth_refusals.clone(),
    );
    let overloaded = Counter::default();
    r.register(
        "idemkv_overloaded",
        "Calls refused because a concurrency cap (client or peer port) was reached.",
        overloaded.clone(),
    );
    let peer_refused = Counter::default();
    r.register(
        "idemkv_peer_refused",
        "Peer-port calls refused because they came from a non-member address.",
        peer_refused.clone(),
    );
    let append_streams = Counter::default();
    r.register(
        "idemkv_peer_append_streams",
        "Append streams this node's peer port accepted from a leader. A leader keeps one open per follower for its appends and one for its heartbeats, and opens another after a failed answer or a timeout; a climb that does not stop means they keep being reset.",
        append_streams.clone(),
    );
    let gauge = |r: &mut Registry, name: &str, help: &str| {
        let g = U64Gauge::default();
        r.register(name, help, g.clone());
        g
    };
    let term = gauge(&mut r, "idemkv_raft_term", "Current Raft term.");
    let is_leader = gauge(&mut r, "idemkv_raft_is_leader", "1 if this node leads.");
    let commit_index = gauge(
        &mut r,
        "idemkv_raft_commit_index",
        "Highest log index known committed.",
    );
    let applied_index = gauge(
        &mut r,
        "idemkv_raft_applied_index",
        "Highest log index applied to the state machine.",
    );
    let apply_lag = gauge(
        &mut r,
        "idemkv_raft_apply_lag",
        "Committed entries not yet applied.",
    );
    let data_bytes = gauge(
        &mut r,
        "idemkv_data_bytes",
        "What the records take (keys and stored values): the data-size quota's measure.",
    );
    let quota_bytes = gauge(&mut r, "idemkv_quota_bytes", "The data-size quota.");
    let nospace = gauge(
        &mut r,
        "idemkv_alarm_nospace",
        "1 while the records exceed the quota and claims are refused (NOSPACE).",
    );
    let gateway = Family::<OutcomeLabel, Counter>::default();
    r.register(
        "idemkv_gateway_requests",
        "Requests the HTTP gateway answered, by outcome (saved, replayed, in_progress, mismatch, \
         missing_key, released_5xx, unavailable, passed_through, ...).",
        gateway.clone(),
    );
    let fsync = Histogram::new(FSYNC_BUCKETS);
    r.register(
        "idemkv_log_fsync_seconds",
        "fdatasync latency of the Raft log (one per group commit).",
        fsync.clone(),
    );
    let fsync_on_append = Counter::default();
    r.register(
        "idemkv_log_fsync_on_append",
        "Raft log fdatasyncs a follower ran on the task that appended the entries, after a \
         quiet spell, instead of on a group-commit thread (two thread wake-ups fewer on the \
         write's path).",
        fsync_on_append.clone(),
    );
    Metrics {
        registry: r,
        acquired,
        in_progress,
        completed,
        failed,
        takeovers,
        fenced,
        mismatches,
        unauthenticated,
        permission_denied,
        overloaded,
        peer_refused,
        append_streams,
        fsync,
        fsync_on_append,
        term,
        is_leader,
        commit_index,
        applied_index,
        apply_lag,
        data_bytes,
        quota_bytes,
        nospace,
        gateway,
    }
});

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
    let m = &*METRICS;
    let counter = match a {
        ClaimAnswer::Acquired { takeover } => {
            if takeover {
                m.takeovers.inc();
            }
            &m.acquired
        }
        ClaimAnswer::InProgress => &m.in_progress,
        ClaimAnswer::Completed => &m.completed,
        ClaimAnswer::Failed => &m.failed,
    };
    counter.inc();
}

/// A token-fenced call refused with `LEASE_LOST`.
pub fn fenced_rejection() {
    METRICS.fenced.inc();
}

/// A claim refused with `FINGERPRINT_MISMATCH`.
pub fn fingerprint_mismatch() {
    METRICS.mismatches.inc();
}

/// A call refused because a concurrency cap was reached (`OVERLOADED`).
pub fn overloaded() {
    METRICS.overloaded.inc();
}

/// A client call refused by auth: `denied` for PERMISSION_DENIED, else
/// UNAUTHENTICATED.
pub fn auth_refused(denied: bool) {
    let m = &*METRICS;
    if denied {
        m.permission_denied.inc();
    } else {
        m.unauthenticated.inc();
    }
}

/// A peer call refused because it came from a non-member address.
pub fn peer_refused() {
    METRICS.peer_refused.inc();
}

/// The peer port accepted an append stream.
pub fn peer_append_stream() {
    METRICS.append_streams.inc();
}

/// The HTTP gateway answered a request with `outcome`.
pub fn gateway(outcome: &'static str) {
    METRICS
        .gateway
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// One fdatasync of the Raft log.
pub fn fsync(took: Duration) {
    METRICS.fsync.observe(took.as_secs_f64());
}

/// A follower's append made durable on the appending task (see `log.rs`).
pub fn log_fsync_on_append() {
    METRICS.fsync_on_append.inc();
}

/// The Raft state the gauges show, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct RaftGauges {
    pub term: u64,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    pub data_bytes: u64,
    pub quota_bytes: u64,
}

/// Reads the Raft gauges at scrape time.
pub type GaugeSource = Arc<dyn Fn() -> RaftGauges + Send + Sync>;

/// The text exposition of every metric, with the Raft gauges at `s`.
pub fn render(s: &RaftGauges) -> String {
    let m = &*METRICS;
    m.term.set(s.term);
    m.is_leader.set(u64::from(s.is_leader));
    m.commit_index.set(s.commit_index);
    m.applied_index.set(s.applied_index);
    m.apply_lag
        .set(s.commit_index.saturating_sub(s.applied_index));
    m.data_bytes.set(s.data_bytes);
    m.quota_bytes.set(s.quota_bytes);
    m.nospace.set(u64::from(s.data_bytes > s.quota_bytes));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

/// Serve `GET /metrics` on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    gauges: GaugeSource,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::http::{header, StatusCode};
    // One answer per connection, as a scraper expects of a small endpoint.
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let gauges = gauges.clone();
                async move {
                    (
                        [
                            (
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                            (header::CONNECTION, "close"),
                        ],
                        render(&gauges()),
                    )
                }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CONNECTION, "close")],
                "try GET /metrics\n",
            )
        });
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
