//! The `idemkv` binary: parse the command line, install logging, run.
mod cli;

/// mimalloc instead of glibc's malloc for the whole binary (the library
/// leaves the choice to its users). Under load glibc spent about a fifth
/// of the leader's CPU in `_int_malloc`, `malloc_consolidate` and their
/// kin: sled builds and drops a node version per insert, and h2 mixes
/// small frees with large buffers. Measured in BENCHMARKS.md. Without the
/// `mimalloc` feature (a default one) the binary keeps the system's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

fn main() {
    let matches = cli::Cli::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = std::env::var("IDEMKV_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            idemkv::out::print_error_line(format_args!(
                "idemkv: cannot start the async runtime: {e}"
            ));
            std::process::exit(2);
        }
    };
    let code = match runtime.block_on(cli::run(cli, &matches)) {
        Ok(code) => code,
        Err(e) => {
            idemkv::out::print_error_line(format_args!("idemkv: {e:#}"));
            1
        }
    };
    // A command that succeeded but could not deliver its output (its
    // reader went away) must not look like a success to `set -o pipefail`:
    // 141 is what a shell reports for a command a closed pipe stopped.
    let code = if code == 0 && idemkv::out::output_lost() {
        141
    } else {
        code
    };
    std::process::exit(code);
}
