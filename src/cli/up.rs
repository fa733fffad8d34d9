//! `idemkv up`: a local three-node cluster of child processes (this same
//! binary running `serve`), data under `./.idemkv/`, logs beside the data.
//! Prints the endpoints once a leader is elected; Ctrl-C or SIGTERM stops
//! every child cleanly. Running it again reuses the data.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::process::{Child, Command};

use idemkv::Client;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the nodes keep their data and logs.
    #[arg(long, default_value = ".idemkv")]
    pub dir: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Client port of node 1; node N uses this + N - 1.
    #[arg(long, default_value_t = 7001)]
    pub api_port: u16,
    /// Peer port of node 1; node N uses this + N - 1.
    #[arg(long, default_value_t = 7101)]
    pub peer_port: u16,
    /// Address to bind and advertise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
}

struct NodeProcess {
    id: u64,
    child: Child,
    log: PathBuf,
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    if a.nodes == 0 {
        bail!("nodes: must be at least 1");
    }
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the idemkv binary")?;
    let addr = |base: u16, id: u64| format!("{}:{}", a.host, base as u64 + id - 1);
    let peers: Vec<String> = (1..=a.nodes)
        .map(|id| format!("{id}={}/{}", addr(a.api_port, id), addr(a.peer_port, id)))
        .collect();
    let peers = peers.join(",");
    let mut children = Vec::new();
    for id in 1..=a.nodes {
        let dir = a.dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir)?;
        let log = a.dir.join(format!("node-{id}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .args(["--id", &id.to_string()])
            .args(["--listen", &addr(a.api_port, id)])
            .args(["--peer-listen", &addr(a.peer_port, id)])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--peers", &peers])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        if id == 1 {
            cmd.arg("--init");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        children.push(NodeProcess { id, child, log });
    }
    let endpoints: Vec<String> = (1..=a.nodes).map(|id| addr(a.api_port, id)).collect();
    let ready = tokio::select! {
        r = wait_ready(&endpoints) => r,
        died = first_exit(&mut children) => Err(died),
    };
    if let Err(e) = ready {
        eprintln!("idemkv up: the cluster did not come up: {e:#}");
        stop_all(&mut children).await;
        bail!(
            "cluster did not start; see the node logs in {}",
            a.dir.display()
        );
    }
    println!(
        "idemkv: {}-node cluster is up (data in {})",
        a.nodes,
        a.dir.display()
    );
    for (i, ep) in endpoints.iter().enumerate() {
        println!(
            "  node {}  {}   log: {}",
            i + 1,
            ep,
            children[i].log.display()
        );
    }
    println!("endpoints: {}", endpoints.join(","));
    println!("try:   idemkv ctl claim orders o-1 --owner w1 --lease 30s");
    println!("Ctrl-C stops the cluster.");
    let died = tokio::select! {
        _ = super::serve::wait_for_signal() => None,
        died = first_exit(&mut children) => Some(died),
    };
    if let Some(e) = died {
        eprintln!("idemkv up: {e:#}; stopping the others");
    }
    stop_all(&mut children).await;
    println!("idemkv: cluster stopped");
    Ok(())
}

/// Resolves when any child exits, with which one.
async fn first_exit(children: &mut [NodeProcess]) -> anyhow::Error {
    let waits = children.iter_mut().map(|c| {
        Box::pin(async move {
            let status = c.child.wait().await;
            anyhow::anyhow!("node {} exited ({status:?}); see {}", c.id, c.log.display())
        })
    });
    futures::future::select_all(waits).await.0
}

async fn wait_ready(endpoints: &[String]) -> anyhow::Result<()> {
    Ok(Client::new(endpoints)?
        .wait_ready(Duration::from_secs(30))
        .await?)
}

/// SIGTERM every child, then SIGKILL whatever is still running after 10 s.
async fn stop_all(children: &mut [NodeProcess]) {
    for c in children.iter() {
        if let Some(pid) = c.child.id() {
            // SAFETY: plain kill(2) on a child we spawned and still own.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.child.wait())
            .await
            .is_err()
        {
            eprintln!("node {} did not stop in 10 s; killing it", c.id);
            let _ = c.child.kill().await;
        }
    }
}
