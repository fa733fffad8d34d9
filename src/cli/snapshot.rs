//! `idemkv snapshot status FILE`: read a saved snapshot (`ctl snapshot
//! save`) whole and check it, as `etcdutl snapshot status` does.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub op: SnapshotOp,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotOp {
    /// Check FILE whole (every frame's checksum, every record, the
    /// trailer's count and SHA-256) and show its last entry (index, term),
    /// records by state, token counter and size; exit 1 naming the byte
    /// where a damaged or truncated file fails.
    Status {
        file: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(a: SnapshotArgs) -> anyhow::Result<i32> {
    match a.op {
        SnapshotOp::Status { file, json } => {
            let i = idemkv::store::inspect_snapshot(&file)
                .with_context(|| format!("{} is not a sound idemkv snapshot", file.display()))?;
            if json {
                let mut v = serde_json::to_value(&i)?;
                v["checksum_valid"] = serde_json::Value::Bool(true);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: entry {} (index {}, term {}), {} records ({} in progress, {} available, {} completed, {} failed), last token {}, {} bytes, checksums valid",
                    file.display(),
                    i.last_log_id,
                    i.index,
                    i.term,
                    i.records,
                    i.in_progress,
                    i.available,
                    i.completed,
                    i.failed,
                    i.last_token,
                    i.bytes
                );
            }
            Ok(0)
        }
    }
}
