//! The `idemkv` binary: parse the command line, install logging, run.
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = idemkv::cli::Cli::parse();
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("idemkv: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = match runtime.block_on(idemkv::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idemkv: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
