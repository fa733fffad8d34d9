//! The `idemkv` command line: `serve` (one node), `up` (a local three-node
//! cluster), `ctl` (talk to a cluster), `bench` (load), `certs` (development
//! TLS certificates). `main.rs` only parses and installs
//! logging; everything else is here. The command line is the binary's own:
//! the library (`idemkv::…`) has no clap or anyhow in its API, except the
//! bench tool's arguments, which its tests drive.

/// `println!` for the commands' output: a reader that went away is not
/// a panic ([`idemkv::out::print_line`]).
macro_rules! say {
    ($($arg:tt)*) => {
        idemkv::out::print_line(format_args!($($arg)*))
    };
}

/// `eprintln!` for the commands' errors and warnings: a closed standard
/// error is not a panic ([`idemkv::out::print_error_line`]).
macro_rules! say_err {
    ($($arg:tt)*) => {
        idemkv::out::print_error_line(format_args!($($arg)*))
    };
}

pub mod certs;
pub mod ctl;
pub mod gateway;
pub mod serve;
pub mod snapshot;
pub mod up;

use clap::{Parser, Subcommand};
pub use idemkv::bench::{parse_duration_ms, ClientConnArgs};

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
    Serve(Box<serve::ServeArgs>),
    /// Start a local three-node cluster (child processes), print its
    /// endpoints, stop it cleanly on Ctrl-C.
    Up(up::UpArgs),
    /// Talk to a cluster: claim, complete, renew, release, get, await, delete, status.
    Ctl(ctl::CtlArgs),
    /// Load a cluster (or etcd, or Redis) with a workload and report
    /// throughput, latency percentiles and whether every check held.
    Bench(idemkv::bench::BenchArgs),
    /// Draw throughput and p99 against clients from `bench --json` reports
    /// into an SVG (`cluster/bench.sh --sweep` calls it).
    Plot(idemkv::bench::plot::PlotArgs),
    /// Saved snapshots: `status FILE` checks one whole, `restore FILE`
    /// makes a new cluster of it.
    Snapshot(snapshot::SnapshotArgs),
    /// Idempotency-Key for any HTTP service (SPEC §8): a proxy that claims
    /// each keyed request in idemkv, saves the upstream's response and
    /// replays it to retries.
    Gateway(Box<gateway::GatewayArgs>),
    /// Write a development CA, per-node certificates and a client
    /// certificate for TLS (`serve --tls-*`, `ctl --tls-*`).
    Certs(certs::CertsArgs),
    /// One follower of `bench --target replicated-floor`, which starts two
    /// of these itself: prints its address, serves until its stdin closes.
    #[command(hide = true)]
    FloorFollower,
}

/// Run the parsed command; `matches` are the same parse's, for where a
/// setting came from.
pub async fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(a) => {
            let given = matches
                .subcommand_matches("serve")
                .map(idemkv::settings::Settings::given)
                .unwrap_or_default();
            serve::run(*a, given).await.map(|_| 0)
        }
        Command::Up(a) => up::run(a).await.map(|_| 0),
        Command::Ctl(a) => ctl::run(a).await,
        Command::Bench(a) => idemkv::bench::run(a).await,
        Command::Plot(a) => idemkv::bench::plot::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Gateway(a) => {
            let a = a.with_file(matches.subcommand_matches("gateway"))?;
            gateway::run(a).await.map(|_| 0)
        }
        Command::Certs(a) => certs::run(a).map(|_| 0),
        Command::FloorFollower => idemkv::bench::replicate::follow().await.map(|_| 0),
    }
}
