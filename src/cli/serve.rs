//! `idemkv serve`: run one node until SIGINT/SIGTERM.
//!
//! Settings come from flags (and `--set`), then `IDEMKV_*` environment
//! variables, then the TOML file given with `--config`, then the defaults
//! (`idemkv::settings` names them all and merges).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use idemkv::config::NodeConfig;
use idemkv::raft::PeerNode;
use idemkv::settings::{merge, Settings, Sources};
use idemkv::Node;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and IDEMKV_*
    /// variables win).
    #[arg(long, env = "IDEMKV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Set any setting, the `limits` and `caps` tables included (repeat
    /// it): `--set limits.batch_max=500`. Every setting is also an
    /// `IDEMKV_*` variable: `IDEMKV_PEER_LISTEN`, `IDEMKV_LIMITS__BATCH_MAX`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub settings: Settings,
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

/// Merge flags, `IDEMKV_*` variables and the file over the defaults, and
/// check what only makes sense together.
pub fn resolve(
    args: &ServeArgs,
    given: &BTreeSet<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<(NodeConfig, Option<BTreeMap<u64, PeerNode>>)> {
    let settings = merge(Sources {
        flags: &args.settings,
        given,
        set: &args.set,
        env,
        file: args.config.as_deref(),
    })
    .map_err(anyhow::Error::msg)?;
    let cfg = settings.node_config().map_err(anyhow::Error::msg)?;
    let peers = settings.peers.clone();
    if cfg.auth_tokens.is_some() && cfg.tls.is_none() && !settings.insecure_peers {
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
    let members = if settings.init {
        let Some(p) = peers else {
            bail!("peers: --init needs --peers ID=API_ADDR/PEER_ADDR,...");
        };
        Some(parse_peers(&p)?)
    } else {
        None
    };
    Ok((cfg, members))
}

pub async fn run(args: ServeArgs, given: BTreeSet<String>) -> anyhow::Result<()> {
    let (cfg, members) = resolve(&args, &given, &|k| std::env::var(k).ok())?;
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
    say!(
        "idemkv node {} serving clients on {} (peers on {})",
        node.id,
        node.api_addr,
        node.peer_addr
    );
    if let Some(m) = node.metrics_addr {
        say!("idemkv node {}: metrics on http://{m}/metrics", node.id);
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
            say_err!("idemkv node {}: Raft stopped on a fatal error: {e}", node.id);
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
    use clap::FromArgMatches;

    fn file(text: &str) -> (tempfile::NamedTempFile, String) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let p = f.path().display().to_string();
        (f, p)
    }

    /// `idemkv serve ARGS` with no IDEMKV_* variables set.
    fn resolve_args(
        args: &[&str],
    ) -> anyhow::Result<(NodeConfig, Option<BTreeMap<u64, PeerNode>>)> {
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        let m = cmd
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let parsed = ServeArgs::from_arg_matches(&m).map_err(|e| anyhow::anyhow!("{e}"))?;
        resolve(&parsed, &Settings::given(&m), &|_| None)
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let (_f, path) = file(
            "id = 2\nlisten = \"127.0.0.1:9002\"\nsnapshot_every = 77\n[limits]\nbatch_max = 5\n",
        );
        let (cfg, members) =
            resolve_args(&["--config", &path, "--listen", "127.0.0.1:9999"]).unwrap();
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
        let err = resolve_args(&[]).unwrap_err().to_string();
        assert!(err.starts_with("id:"), "{err}");
        let err = resolve_args(&["--id", "1", "--init"])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("peers:"), "{err}");
        let (_f, path) = file("id = 1\nlisten_typo = \"x\"\n");
        let err = format!("{:#}", resolve_args(&["--config", &path]).unwrap_err());
        assert!(err.contains("listen_typo"), "{err}");
        assert!(parse_peers("1=a:1").is_err());
        let peers = parse_peers("1=a:1/b:1, 2=a:2/b:2").unwrap();
        assert_eq!(peers[&2].raft_addr, "b:2");
    }

    #[test]
    fn tls_needs_cert_key_and_ca() {
        let tls = |cert: Option<&str>, key: Option<&str>, ca: Option<&str>, client_auth: bool| {
            let mut args = vec!["--id", "1"];
            for (flag, v) in [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)] {
                if let Some(v) = v {
                    args.extend([flag, v]);
                }
            }
            if client_auth {
                args.push("--client-auth");
            }
            resolve_args(&args)
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
        let (cfg, _) = resolve_args(&["--config", &path]).unwrap();
        let files = cfg.tls.unwrap();
        assert_eq!(files.ca, PathBuf::from("a"));
        assert!(files.client_auth);
    }

    #[test]
    fn auth_without_peer_tls_off_loopback_needs_insecure_peers() {
        let args = |peer: &str, insecure: bool, peers: Option<&str>| {
            let mut a = vec![
                "--id",
                "1",
                "--peer-listen",
                peer,
                "--auth-tokens",
                "tokens.toml",
            ];
            if insecure {
                a.push("--insecure-peers");
            }
            if let Some(p) = peers {
                a.extend(["--peers", p]);
            }
            resolve_args(&a)
        };
        let err = args("0.0.0.0:7101", false, None).unwrap_err().to_string();
        assert!(err.starts_with("insecure-peers:"), "{err}");
        assert!(
            err.contains("0.0.0.0:7101") && err.contains("--tls-cert"),
            "{err}"
        );
        assert!(args("0.0.0.0:7101", true, None).is_ok());
        assert!(args("127.0.0.1:7101", false, None).is_ok());
        assert!(args("[::1]:7101", false, None).is_ok());
        assert!(args("localhost:7101", false, None).is_ok());
        // A member elsewhere counts too, whatever this node binds.
        assert!(args(
            "127.0.0.1:7101",
            false,
            Some("2=10.0.0.2:7002/10.0.0.2:7102")
        )
        .unwrap_err()
        .to_string()
        .contains("10.0.0.2:7102"));
    }
}
