//! Node configuration and the limits of SPEC §4.
//!
//! The defaults written here are the only ones; [`crate::settings`] names
//! every setting for flags, `IDEMKV_*` variables and the config file, and
//! merges them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits enforced at the API edge before anything is proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub namespace_max: usize,
    pub key_max: usize,
    pub owner_max: usize,
    pub claim_id_max: usize,
    pub fingerprint_max: usize,
    pub result_max: usize,
    pub checkpoint_max: usize,
    pub error_max: usize,
    pub lease_min_ms: u64,
    pub lease_max_ms: u64,
    pub retention_min_ms: u64,
    pub retention_max_ms: u64,
    pub retention_default_ms: u64,
    pub batch_max: usize,
    pub await_max_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            namespace_max: 64,
            key_max: 1024,
            owner_max: 256,
            claim_id_max: 128,
            fingerprint_max: 256,
            result_max: 1024 * 1024,
            checkpoint_max: 64 * 1024,
            error_max: 4096,
            lease_min_ms: 100,
            lease_max_ms: 24 * 3600 * 1000,
            retention_min_ms: 1000,
            retention_max_ms: 30 * 24 * 3600 * 1000,
            retention_default_ms: 24 * 3600 * 1000,
            batch_max: 1000,
            await_max_ms: 300_000,
        }
    }
}

/// Size and concurrency caps of the two ports. A message over a size cap is
/// refused by gRPC before it is decoded; a call over `max_in_flight` gets
/// `RESOURCE_EXHAUSTED` (reason `OVERLOADED`) at once and was not started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Caps {
    /// Largest request or reply on the client port. Keep it above
    /// `result_max` and a full batch, so that oversized fields reach
    /// validation and get an error naming them.
    pub max_message_bytes: usize,
    /// Client-port calls running at once on this node (health checks are
    /// not counted).
    pub max_in_flight: usize,
    /// HTTP/2 streams one connection may have open (both ports).
    pub max_streams_per_connection: u32,
    /// Largest message on the peer port (a batch of log entries).
    pub peer_max_message_bytes: usize,
    /// Peer-port calls running at once on this node.
    pub peer_max_in_flight: usize,
    /// Await calls waiting at once on this node. They wait for up to
    /// `await_max_ms`, so they have this cap of their own instead of
    /// holding `max_in_flight` slots.
    pub max_awaits: usize,
    /// Await calls waiting at once in one namespace on this node, so one
    /// tenant cannot take every Await slot.
    pub max_awaits_per_namespace: usize,
    /// Health `Watch` streams open at once on this node (plain health
    /// checks are not counted).
    pub max_health_watches: usize,
    /// Largest snapshot this node accepts from a leader (the spool file is
    /// refused and removed once a stream passes it). Keep it above the
    /// size of the whole state.
    pub peer_max_snapshot_bytes: u64,
    /// How long a client connection may stay quiet before the client port
    /// pings it; one that leaves the ping unanswered for as long (at most
    /// 20 s) is closed. 0: never pinged. A client gone without closing its
    /// connection (a host powered off, a partition) would otherwise keep
    /// it open on the node for good.
    pub client_keepalive_ms: u64,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            max_message_bytes: crate::wire::MAX_API_MESSAGE,
            max_in_flight: 4096,
            max_streams_per_connection: 1024,
            peer_max_message_bytes: crate::wire::MAX_PEER_MESSAGE,
            peer_max_in_flight: 8192,
            max_awaits: 1024,
            max_awaits_per_namespace: 256,
            max_health_watches: 64,
            peer_max_snapshot_bytes: 16 * 1024 * 1024 * 1024,
            client_keepalive_ms: 2 * 3600 * 1000,
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// Client API address (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Peer (Raft) address.
    pub peer_listen: String,
    /// Address other nodes and clients should use, if not the bound one.
    pub advertise_api: Option<String>,
    pub advertise_peer: Option<String>,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    /// How long a request may wait for a quorum before `UNAVAILABLE`.
    pub request_timeout: Duration,
    /// Take a snapshot (and purge the log) every this many entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (a follower further behind gets
    /// the snapshot instead).
    pub snapshot_keep_logs: u64,
    /// How often the leader checks the expiry index for records to sweep.
    pub sweep_interval: Duration,
    /// Most records one sweep entry removes.
    pub sweep_limit: u32,
    /// The data-size quota in bytes (the records' keys and stored values):
    /// past it the NOSPACE alarm is raised and claims are refused until the
    /// sweep makes room. 0: a quarter of the data directory's file system
    /// (room for sled's own overhead, the log and snapshots).
    pub quota_bytes: u64,
    /// Where to serve Prometheus `GET /metrics` (none: not served).
    pub metrics_listen: Option<String>,
    /// TLS on both ports (none: plaintext). See [`crate::tls`].
    pub tls: Option<crate::tls::TlsFiles>,
    /// Bearer-token file (none: no auth). See [`crate::auth`].
    pub auth_tokens: Option<PathBuf>,
    /// Serve peer calls only from members' addresses (default). Turn off
    /// where peers reach each other through address translation, and rely
    /// on mutual TLS alone.
    pub peer_members_only: bool,
    pub caps: Caps,
    /// The time every rule reads (see [`crate::clock`]): the system's,
    /// unless a test injects another. Not a setting.
    pub clock: crate::clock::Clock,
}

impl NodeConfig {
    pub fn new(id: u64, data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            id,
            listen: "127.0.0.1:0".into(),
            peer_listen: "127.0.0.1:0".into(),
            advertise_api: None,
            advertise_peer: None,
            data_dir: data_dir.into(),
            limits: Limits::default(),
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(400), Duration::from_millis(800)),
            request_timeout: Duration::from_secs(5),
            snapshot_every: 50_000,
            snapshot_keep_logs: 1000,
            sweep_interval: Duration::from_secs(1),
            sweep_limit: 1000,
            quota_bytes: 0,
            metrics_listen: None,
            tls: None,
            auth_tokens: None,
            peer_members_only: true,
            caps: Caps::default(),
            clock: crate::clock::Clock::system(),
        }
    }
}

/// The quota a node runs with: `configured`, or for 0 a quarter of the
/// file system holding `data_dir` (8 GiB where that cannot be read).
pub fn quota_bytes(configured: u64, data_dir: &std::path::Path) -> u64 {
    if configured > 0 {
        return configured;
    }
    const FALLBACK: u64 = 8 << 30;
    let Ok(path) = std::ffi::CString::new(data_dir.as_os_str().as_encoded_bytes()) else {
        return FALLBACK;
    };
    // SAFETY: a zeroed statvfs is a valid out-parameter and `path` is a
    // NUL-terminated string that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return FALLBACK;
    }
    (st.f_blocks as u64).saturating_mul(st.f_frsize as u64) / 4
}
