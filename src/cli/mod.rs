//! The `idemkv` command line: `serve` (one node), `up` (a local three-node
//! cluster), `ctl` (talk to a cluster), `bench` (load), `certs` (development
//! TLS certificates). `main.rs` only parses and installs
//! logging; everything else is here.

pub mod certs;
pub mod ctl;
pub mod serve;
pub mod up;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::client::ClientTls;

/// The client endpoints of the cluster `idemkv up` starts by default.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

#[derive(Debug, Parser)]
#[command(
    name = "idemkv",
    version,
    about = "A CP idempotency store: claim, complete, replay — exactly-once effect"
)]
pub struct Cli {
    /// Log format: text or json (filter with RUST_LOG).
    #[arg(long, global = true, env = "IDEMKV_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node.
    Serve(serve::ServeArgs),
    /// Start a local three-node cluster (child processes), print its
    /// endpoints, stop it cleanly on Ctrl-C.
    Up(up::UpArgs),
    /// Talk to a cluster: claim, complete, renew, release, get, await, delete, status.
    Ctl(ctl::CtlArgs),
    /// Load a cluster (or etcd, or Redis) with a workload and report
    /// throughput, latency percentiles and whether every check held.
    Bench(crate::bench::BenchArgs),
    /// Write a development CA, per-node certificates and a client
    /// certificate for TLS (`serve --tls-*`, `ctl --tls-*`).
    Certs(certs::CertsArgs),
}

/// A client's connection flags (`ctl`, `bench`): TLS (none given means
/// plaintext) and the bearer token.
#[derive(Debug, Args, Default, Clone)]
pub struct ClientConnArgs {
    /// Connect over TLS, trusting this CA (PEM).
    #[arg(long, env = "IDEMKV_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a cluster run with --client-auth.
    #[arg(long, env = "IDEMKV_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "IDEMKV_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Bearer token, for a cluster run with --auth-tokens (not to be
    /// confused with a claim's fencing token).
    #[arg(long, env = "IDEMKV_AUTH_TOKEN", global = true, hide_env_values = true)]
    pub auth_token: Option<String>,
}

impl ClientConnArgs {
    /// Client options with these TLS settings and token.
    pub fn options(&self) -> anyhow::Result<crate::client::ClientOptions> {
        Ok(crate::client::ClientOptions {
            tls: self.load()?,
            token: self.auth_token.clone().filter(|t| !t.is_empty()),
            ..Default::default()
        })
    }

    /// The client TLS setting (none without --tls-ca).
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        ClientTls::from_options(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}

/// Parse a duration such as `30s`, `250ms`, `24h`, or a bare number of ms.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| format!("{s:?} is not a duration (try 30s, 250ms, 24h): {e}"))
}

pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(a) => serve::run(a).await.map(|_| 0),
        Command::Up(a) => up::run(a).await.map(|_| 0),
        Command::Ctl(a) => ctl::run(a).await,
        Command::Bench(a) => crate::bench::run(a).await,
        Command::Certs(a) => certs::run(a).map(|_| 0),
    }
}
