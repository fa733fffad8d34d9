//! `idemkv snapshot status FILE`: read a saved snapshot (`ctl snapshot
//! save`) whole and check it, as `etcdutl snapshot status` does.
//! `idemkv snapshot restore FILE --dir DIR`: data directories for a new
//! cluster holding the snapshot's records, as `etcdutl snapshot restore`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use idemkv::raft::PeerNode;

use super::up::UpArgs;
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
    /// Make data directories for a new cluster holding FILE's records and
    /// token counter (checked whole first): DIR/node-1 ... DIR/node-N with
    /// the addresses `idemkv up` gives them (same --dir, --nodes, --host
    /// and ports), or one per member of --peers for nodes run with `serve`.
    /// The new cluster has its own membership and cluster id, and starts
    /// its log after the snapshot's last entry: nodes of the old cluster
    /// are refused by its id.
    Restore {
        file: PathBuf,
        #[command(flatten)]
        layout: UpArgs,
        /// Members as ID=API_ADDR/PEER_ADDR,... for nodes run with `serve`
        /// (each gets DIR/node-ID), instead of --nodes, --host and ports.
        #[arg(long)]
        peers: Option<String>,
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
                say!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                say!(
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
        SnapshotOp::Restore {
            file,
            layout,
            peers,
        } => restore(&file, &layout, peers.as_deref()),
    }
}

fn restore(file: &Path, layout: &UpArgs, peers: Option<&str>) -> anyhow::Result<i32> {
    let members = match peers {
        Some(p) => super::serve::parse_peers(p)?,
        None => {
            layout.check_addresses()?;
            (1..=layout.nodes)
                .map(|id| {
                    let node = PeerNode {
                        api_addr: layout.api_addr(id),
                        raft_addr: layout.peer_addr(id),
                    };
                    (id, node)
                })
                .collect()
        }
    };
    let i = idemkv::store::inspect_snapshot(file)
        .with_context(|| format!("{} is not a sound idemkv snapshot", file.display()))?;
    // Every directory is checked before any is made: a refusal leaves
    // nothing half restored.
    for id in members.keys() {
        idemkv::store::refuse_non_empty(&layout.node_dir(*id))?;
    }
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    // One new identity for every node of the new cluster.
    let cluster_id = idemkv::store::ClusterId::fresh();
    let mut done: Vec<(std::path::PathBuf, bool)> = Vec::new();
    for id in members.keys() {
        let dir = layout.node_dir(*id);
        let existed = dir.exists();
        if let Err(e) =
            idemkv::store::restore_snapshot(file, &dir, members.clone(), wall_ms, &cluster_id)
        {
            // Nothing half restored: the nodes done so far are undone too
            // (emptied again where the directory was there, empty, before).
            for (d, existed) in done {
                idemkv::store::undo_restore(&d, existed);
            }
            return Err(anyhow::Error::new(e).context(format!(
                "cannot restore {} into {}",
                file.display(),
                dir.display()
            )));
        }
        done.push((dir, existed));
    }
    say!(
        "RESTORED {} into {}: {} nodes, {} records ({} completed), entry {}, last token {}",
        file.display(),
        layout.dir.display(),
        members.len(),
        i.records,
        i.completed,
        i.last_log_id,
        i.last_token
    );
    if peers.is_some() {
        let list = peers.unwrap_or_default();
        say!("start each node on its host with its data directory:");
        for (id, m) in &members {
            say!(
                "  idemkv serve --id {id} --listen {} --peer-listen {} --data-dir {} --peers {list}",
                m.api_addr,
                m.raft_addr,
                layout.node_dir(*id).display()
            );
        }
    } else {
        say!(
            "start it with: idemkv up --dir {} --nodes {} --host {} --api-port {} --peer-port {}",
            layout.dir.display(),
            layout.nodes,
            layout.host,
            layout.api_port,
            layout.peer_port
        );
    }
    Ok(0)
}
