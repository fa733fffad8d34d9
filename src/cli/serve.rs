//! `idemkv serve`: run one node until SIGINT/SIGTERM.
//!
//! Settings come from flags, then `IDEMKV_*` environment variables (clap
//! reads both, flags first), then the TOML file given with `--config`, then
//! the defaults of [`NodeConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use idemkv::config::{Caps, Limits, NodeConfig};
use idemkv::raft::PeerNode;
use idemkv::tls::TlsFiles;
use idemkv::Node;

#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and env win).
    #[arg(long, env = "IDEMKV_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long, env = "IDEMKV_ID")]
    pub id: Option<u64>,
    /// Client API address.
    #[arg(long, env = "IDEMKV_LISTEN")]
    pub listen: Option<String>,
    /// Peer (Raft) address.
    #[arg(long, env = "IDEMKV_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Client address to advertise, if not the bound one.
    #[arg(long, env = "IDEMKV_ADVERTISE_API")]
    pub advertise_api: Option<String>,
    /// Peer address to advertise, if not the bound one.
    #[arg(long, env = "IDEMKV_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,
    #[arg(long, env = "IDEMKV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long, env = "IDEMKV_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// The initial members: `ID=API_ADDR/PEER_ADDR,...` (used with --init).
    #[arg(long, env = "IDEMKV_PEERS")]
    pub peers: Option<String>,
    /// Initialise a new cluster from --peers (ignored if this node's data
    /// already belongs to a cluster).
    #[arg(long, env = "IDEMKV_INIT")]
    pub init: bool,
    /// This node's TLS certificate (PEM): serve TLS on both ports. Also its
    /// identity towards peers. Needs --tls-key and --tls-ca.
    #[arg(long, env = "IDEMKV_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "IDEMKV_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) whose certificates peers must present (the peer port is
    /// always mutual TLS), and clients too with --client-auth.
    #[arg(long, env = "IDEMKV_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Require clients of the client port to present a certificate signed
    /// by --tls-ca.
    #[arg(long, env = "IDEMKV_CLIENT_AUTH")]
    pub client_auth: bool,
    /// Bearer-token file (TOML): every client call must carry a token
    /// listed there and may touch only that token's namespaces. Re-read on
    /// SIGHUP.
    #[arg(long, env = "IDEMKV_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve the peer port without TLS although --auth-tokens is on and a
    /// peer address is not loopback. Without TLS anyone who can reach the
    /// peer port from a member's address can forward writes past the
    /// tokens; say so explicitly.
    #[arg(long, env = "IDEMKV_INSECURE_PEERS")]
    pub insecure_peers: bool,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub id: Option<u64>,
    pub listen: Option<String>,
    pub peer_listen: Option<String>,
    pub advertise_api: Option<String>,
    pub advertise_peer: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub peers: Option<String>,
    pub init: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub client_auth: Option<bool>,
    pub auth_tokens: Option<PathBuf>,
    pub insecure_peers: Option<bool>,
    pub peer_members_only: Option<bool>,
    pub heartbeat_ms: Option<u64>,
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub snapshot_every: Option<u64>,
    pub snapshot_keep_logs: Option<u64>,
    pub limits: Option<Limits>,
    pub caps: Option<Caps>,
}

/// Whether `addr` (`host:port`) is on this host only: 127.0.0.0/8, ::1 or
/// `localhost`. Any other name counts as reachable from elsewhere.
fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parse `ID=API/PEER,...`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, PeerNode>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addrs) = part
            .split_once('=')
            .with_context(|| format!("peers: {part:?} is not ID=API_ADDR/PEER_ADDR"))?;
        let (api, raft) = addrs
            .split_once('/')
            .with_context(|| format!("peers: {part:?} is not ID=API_ADDR/PEER_ADDR"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("peers: bad node id {id:?}"))?;
        out.insert(
            id,
            PeerNode {
                api_addr: api.to_string(),
                raft_addr: raft.to_string(),
            },
        );
    }
    Ok(out)
}

/// Merge flags/env over the file over defaults.
pub fn resolve(args: ServeArgs) -> anyhow::Result<(NodeConfig, Option<BTreeMap<u64, PeerNode>>)> {
    let file: FileConfig = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("config: cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("config: {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(id) = args.id.or(file.id) else {
        bail!("id: required (--id, IDEMKV_ID or `id` in the config file)");
    };
    if id == 0 {
        bail!("id: must be a positive integer");
    }
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(format!(".idemkv/node-{id}")));
    let mut cfg = NodeConfig::new(id, data_dir);
    cfg.listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| format!("127.0.0.1:{}", 7000 + id));
    cfg.peer_listen = args
        .peer_listen
        .or(file.peer_listen)
        .unwrap_or_else(|| format!("127.0.0.1:{}", 7100 + id));
    cfg.advertise_api = args.advertise_api.or(file.advertise_api);
    cfg.metrics_listen = args.metrics_listen.or(file.metrics_listen);
    cfg.advertise_peer = args.advertise_peer.or(file.advertise_peer);
    if let Some(ms) = file.heartbeat_ms {
        cfg.heartbeat = Duration::from_millis(ms);
    }
    if let Some(ms) = file.election_timeout_min_ms {
        cfg.election_timeout.0 = Duration::from_millis(ms);
    }
    if let Some(ms) = file.election_timeout_max_ms {
        cfg.election_timeout.1 = Duration::from_millis(ms);
    }
    if let Some(ms) = file.request_timeout_ms {
        cfg.request_timeout = Duration::from_millis(ms);
    }
    if let Some(n) = file.snapshot_every {
        cfg.snapshot_every = n;
    }
    if let Some(n) = file.snapshot_keep_logs {
        cfg.snapshot_keep_logs = n;
    }
    if let Some(l) = file.limits {
        cfg.limits = l;
    }
    if let Some(c) = file.caps {
        cfg.caps = c;
    }
    cfg.auth_tokens = args.auth_tokens.or(file.auth_tokens);
    if let Some(b) = file.peer_members_only {
        cfg.peer_members_only = b;
    }
    let client_auth = args.client_auth || file.client_auth.unwrap_or(false);
    cfg.tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.tls_ca.or(file.tls_ca),
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
            cert,
            key,
            ca,
            client_auth,
        }),
        (None, None, None) if !client_auth => None,
        (Some(_), Some(_), None) => bail!(
            "tls-ca: --tls-ca is required with TLS (peers authenticate each other \
             with certificates signed by it)"
        ),
        (None, _, _) => {
            bail!("tls-cert: --tls-cert is required with --tls-key, --tls-ca or --client-auth")
        }
        (_, None, _) => bail!("tls-key: --tls-key is required with --tls-cert"),
    };
    let init = args.init || file.init.unwrap_or(false);
    let peers = args.peers.or(file.peers);
    let insecure_peers = args.insecure_peers || file.insecure_peers.unwrap_or(false);
    if cfg.auth_tokens.is_some() && cfg.tls.is_none() && !insecure_peers {
        let mut addrs = vec![cfg.peer_listen.clone()];
        addrs.extend(cfg.advertise_peer.clone());
        if let Some(p) = &peers {
            addrs.extend(parse_peers(p)?.into_values().map(|n| n.raft_addr));
        }
        if let Some(a) = addrs.iter().find(|a| !is_loopback(a)) {
            bail!(
                "insecure-peers: --auth-tokens is set but the peer port has no TLS and \
                 peer address {a} is not loopback, so a process that reaches it could \
                 forward writes past the tokens; give --tls-cert/--tls-key/--tls-ca \
                 (see `idemkv certs`), or --insecure-peers to accept the risk"
            );
        }
    }
    let members = if init {
        let Some(p) = peers else {
            bail!("peers: --init needs --peers ID=API_ADDR/PEER_ADDR,...");
        };
        Some(parse_peers(&p)?)
    } else {
        None
    };
    Ok((cfg, members))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (cfg, members) = resolve(args)?;
    let node = Node::start(cfg).await?;
    if let Some(mut members) = members {
        members
            .entry(node.id)
            .or_insert_with(|| node.member.clone());
        if node.is_initialized().await {
            tracing::info!("data directory already belongs to a cluster; not initialising");
        } else {
            node.initialize(members).await?;
            tracing::info!("cluster initialised");
        }
    }
    println!(
        "idemkv node {} serving clients on {} (peers on {})",
        node.id, node.api_addr, node.peer_addr
    );
    if let Some(m) = node.metrics_addr {
        println!("idemkv node {}: metrics on http://{m}/metrics", node.id);
    }
    let reload = reload_on_sighup(&node);
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = reload => {}
        e = node.consensus().fatal() => {
            // Crash-only: a node whose storage failed (a full disk, say)
            // must not linger half-alive; its supervisor restarts it from
            // what is durable, like after kill -9.
            tracing::error!(error = %e, "Raft stopped on a fatal error; exiting");
            eprintln!("idemkv node {}: Raft stopped on a fatal error: {e}", node.id);
            std::process::exit(2);
        }
    }
    tracing::info!("stopping");
    node.shutdown().await;
    Ok(())
}

/// Re-read the token file on every SIGHUP (never returns while it can
/// listen; returns at once when auth is off).
async fn reload_on_sighup(node: &Node) {
    let Some(auth) = node.auth().cloned() else {
        return std::future::pending().await;
    };
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return std::future::pending().await;
    };
    while hup.recv().await.is_some() {
        match auth.reload() {
            Ok(n) => tracing::info!(tokens = n, "auth tokens reloaded"),
            Err(e) => tracing::error!(error = %e, "auth tokens not reloaded; the old ones stay"),
        }
    }
    std::future::pending().await
}

/// Wait for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::NamedTempFile, PathBuf) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let p = f.path().to_path_buf();
        (f, p)
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let (_f, path) = file(
            "id = 2\nlisten = \"127.0.0.1:9002\"\nsnapshot_every = 77\n[limits]\nbatch_max = 5\n",
        );
        let args = ServeArgs {
            config: Some(path),
            listen: Some("127.0.0.1:9999".into()),
            ..Default::default()
        };
        let (cfg, members) = resolve(args).unwrap();
        assert_eq!(cfg.id, 2, "id comes from the file");
        assert_eq!(cfg.listen, "127.0.0.1:9999", "the flag wins");
        assert_eq!(
            cfg.peer_listen, "127.0.0.1:7102",
            "default derived from the id"
        );
        assert_eq!(cfg.snapshot_every, 77);
        assert_eq!(cfg.limits.batch_max, 5);
        assert_eq!(cfg.limits.key_max, 1024, "unset limits keep their defaults");
        assert!(members.is_none());
    }

    #[test]
    fn bad_settings_name_the_field() {
        let err = resolve(ServeArgs::default()).unwrap_err().to_string();
        assert!(err.starts_with("id:"), "{err}");
        let args = ServeArgs {
            id: Some(1),
            init: true,
            ..Default::default()
        };
        let err = resolve(args).unwrap_err().to_string();
        assert!(err.starts_with("peers:"), "{err}");
        let (_f, path) = file("id = 1\nlisten_typo = \"x\"\n");
        let err = format!(
            "{:#}",
            resolve(ServeArgs {
                config: Some(path),
                ..Default::default()
            })
            .unwrap_err()
        );
        assert!(err.contains("listen_typo"), "{err}");
        assert!(parse_peers("1=a:1").is_err());
        let peers = parse_peers("1=a:1/b:1, 2=a:2/b:2").unwrap();
        assert_eq!(peers[&2].raft_addr, "b:2");
    }

    #[test]
    fn tls_needs_cert_key_and_ca() {
        let tls = |cert: Option<&str>, key: Option<&str>, ca: Option<&str>, client_auth| {
            resolve(ServeArgs {
                id: Some(1),
                tls_cert: cert.map(PathBuf::from),
                tls_key: key.map(PathBuf::from),
                tls_ca: ca.map(PathBuf::from),
                client_auth,
                ..Default::default()
            })
        };
        let err = tls(Some("c"), Some("k"), None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-ca"), "{err}");
        let err = tls(None, None, None, true).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        let err = tls(Some("c"), None, Some("a"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
        assert!(tls(None, None, None, false).unwrap().0.tls.is_none());
        let (_f, path) =
            file("id = 1\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_ca = \"a\"\nclient_auth = true\n");
        let (cfg, _) = resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        let files = cfg.tls.unwrap();
        assert_eq!(files.ca, PathBuf::from("a"));
        assert!(files.client_auth);
    }

    #[test]
    fn auth_without_peer_tls_off_loopback_needs_insecure_peers() {
        let args = |peer: &str, insecure| ServeArgs {
            id: Some(1),
            peer_listen: Some(peer.into()),
            auth_tokens: Some("tokens.toml".into()),
            insecure_peers: insecure,
            ..Default::default()
        };
        let err = resolve(args("0.0.0.0:7101", false))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("insecure-peers:"), "{err}");
        assert!(
            err.contains("0.0.0.0:7101") && err.contains("--tls-cert"),
            "{err}"
        );
        assert!(resolve(args("0.0.0.0:7101", true)).is_ok());
        assert!(resolve(args("127.0.0.1:7101", false)).is_ok());
        assert!(resolve(args("[::1]:7101", false)).is_ok());
        assert!(resolve(args("localhost:7101", false)).is_ok());
        // A member elsewhere counts too, whatever this node binds.
        let mut a = args("127.0.0.1:7101", false);
        a.peers = Some("2=10.0.0.2:7002/10.0.0.2:7102".into());
        assert!(resolve(a)
            .unwrap_err()
            .to_string()
            .contains("10.0.0.2:7102"));
    }
}
