//! `idemkv up`: a local three-node cluster of child processes (this same
//! binary running `serve`), data under `./.idemkv/`, logs beside the data.
//! Prints the endpoints and each node's PID once a leader is elected, then
//! supervises: a node that exits (a crash, a `kill -9` to watch failover)
//! is reported and restarted on its data after a backoff while the others
//! keep serving; one that keeps crashing is reported with the tail of its
//! log and left down. Ctrl-C or SIGTERM stops every child cleanly. Running
//! it again reuses the data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

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

impl UpArgs {
    /// Node `id`'s client address.
    pub fn api_addr(&self, id: u64) -> String {
        format!("{}:{}", self.host, self.api_port as u64 + id - 1)
    }

    /// Node `id`'s peer address.
    pub fn peer_addr(&self, id: u64) -> String {
        format!("{}:{}", self.host, self.peer_port as u64 + id - 1)
    }

    /// Every node's two ports exist and no address is used twice (say
    /// `--peer-port` one above `--api-port`: node 1's peer port would be
    /// node 2's client port).
    pub fn check_addresses(&self) -> anyhow::Result<()> {
        if self.nodes == 0 {
            bail!("nodes: must be at least 1");
        }
        let last = self.nodes - 1;
        for (flag, port) in [
            ("--api-port", self.api_port),
            ("--peer-port", self.peer_port),
        ] {
            if port as u64 + last > u16::MAX as u64 {
                bail!(
                    "{flag}: {port} + {last} (for node {}) is past the last port, 65535",
                    self.nodes
                );
            }
        }
        let mut seen = std::collections::HashMap::new();
        for id in 1..=self.nodes {
            for (what, addr) in [("client", self.api_addr(id)), ("peer", self.peer_addr(id))] {
                if let Some((other, was)) = seen.insert(addr.clone(), (id, what)) {
                    bail!(
                        "{addr} would be both node {other}'s {was} port and node {id}'s {what} port: \
                         --api-port and --peer-port must be at least --nodes ({}) apart",
                        self.nodes
                    );
                }
            }
        }
        Ok(())
    }

    /// Node `id`'s data directory.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }
}

/// How long a node must run for its exit not to count as a crash loop.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Exits in a row, each within [`STABLE_AFTER`] of starting, before `up`
/// stops restarting a node.
const GIVE_UP_AFTER: u32 = 5;
/// The first restart's wait; doubled for each quick exit in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the start waits for the nodes to agree on a leader.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a majority must agree on a leader before the start is ready
/// while another node runs without one (a node wiped to be added again
/// never has one until `ctl member add`).
const SETTLE: Duration = Duration::from_secs(3);
/// Log lines shown for a node that keeps crashing.
const TAIL_LINES: usize = 20;

/// How to start one node (again).
#[derive(Clone)]
struct NodeSpec {
    id: u64,
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    /// Start with `--init` while this holds: node 1 of a new cluster, until
    /// the cluster is first ready. Never after, so node 1 started again
    /// on an emptied directory (wiped to be re-added) waits to be added
    /// instead of founding a cluster of its own.
    init: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl NodeSpec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let init = self
            .init
            .as_ref()
            .is_some_and(|i| i.load(std::sync::atomic::Ordering::SeqCst));
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .args(init.then_some("--init"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        // The node gets SIGTERM (a clean stop) when `up` dies without
        // stopping it (SIGKILL, a crash), instead of running on with the
        // ports. The kernel sends it when the *thread* that forked exits:
        // first starts fork on the main thread, restarts on tokio workers,
        // which live as long as `up` (nothing here runs `block_in_place`
        // or forks from `spawn_blocking`).
        // SAFETY: prctl(2) and getppid(2) only, between fork and exec, both
        // async-signal-safe. If `up` died before prctl took effect, the
        // parent is no longer `up`: the node is not started.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("idemkv up exited"));
                }
                Ok(())
            });
        }
        cmd.spawn()
            .with_context(|| format!("cannot start node {}", self.id))
    }
}

/// Each node's current PID (none while it is down), for the banner.
type Pids = Arc<Mutex<BTreeMap<u64, Option<u32>>>>;

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    a.check_addresses()?;
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the idemkv binary")?;
    let peers: Vec<String> = (1..=a.nodes)
        .map(|id| format!("{id}={}/{}", a.api_addr(id), a.peer_addr(id)))
        .collect();
    let peers = peers.join(",");
    // A port already taken (another `up`, say) would make a node fail to
    // start while the other cluster answers in its place.
    for id in 1..=a.nodes {
        for port in [a.api_addr(id), a.peer_addr(id)] {
            if let Err(e) = std::net::TcpListener::bind(&port) {
                bail!("cannot use {port} for node {id}: {e} (is another cluster running? see --api-port and --peer-port)");
            }
        }
    }
    // Node 1 founds the cluster (`--init`, a no-op on data that belongs to
    // one) unless it has applied nothing while another node has: then
    // node 1 was wiped to be added again (and may have run since, waiting),
    // and joins like any other.
    let applied = |id| idemkv::store::has_applied(&a.node_dir(id));
    let rejoining = !applied(1) && (2..=a.nodes).any(applied);
    let init = (!rejoining).then(|| Arc::new(std::sync::atomic::AtomicBool::new(true)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (gave_up_tx, mut gave_up) = mpsc::unbounded_channel();
    let pids: Pids = Arc::default();
    let mut supervisors = JoinSet::new();
    let mut specs = Vec::new();
    for id in 1..=a.nodes {
        let dir = a.node_dir(id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let args: Vec<std::ffi::OsString> = vec![
            "serve".into(),
            "--id".into(),
            id.to_string().into(),
            "--listen".into(),
            a.api_addr(id).into(),
            "--peer-listen".into(),
            a.peer_addr(id).into(),
            "--data-dir".into(),
            dir.into_os_string(),
            "--peers".into(),
            peers.clone().into(),
        ];
        let spec = NodeSpec {
            id,
            exe: exe.clone(),
            args,
            log: a.dir.join(format!("node-{id}.log")),
            init: init.clone().filter(|_| id == 1),
        };
        // The first start is not retried: a node that cannot even be
        // spawned (no binary, no log file) stops `up` at once.
        let child = spec.spawn()?;
        specs.push(spec.clone());
        supervisors.spawn(supervise(
            spec,
            child,
            stop_rx.clone(),
            gave_up_tx.clone(),
            pids.clone(),
        ));
    }
    drop(gave_up_tx);
    let stop = |supervisors: JoinSet<()>| async move {
        let _ = stop_tx.send(true);
        supervisors.join_all().await;
    };

    let endpoints: Vec<String> = (1..=a.nodes).map(|id| a.api_addr(id)).collect();
    // Ready once a majority agree on a leader and every other node is down
    // (restarting, or left down): a node that keeps crashing meanwhile,
    // quickly or after a while, is left down as later on, while the others
    // are a majority. Ctrl-C stops the start.
    let client = Client::new(&endpoints)?;
    let majority = a.nodes / 2 + 1;
    let deadline = Instant::now() + READY_WITHIN;
    // One listener for the whole run: a signal that comes while none is
    // listening would be lost.
    let signal = super::serve::wait_for_signal();
    tokio::pin!(signal);
    let mut down = std::collections::BTreeSet::new();
    // Since when a majority has agreed on one leader while another node
    // runs without one (wiped to be added again, say, or still starting).
    let mut agreed_since: Option<Instant> = None;
    let ready = loop {
        if a.nodes - (down.len() as u64) < majority {
            break Err(anyhow::anyhow!(
                "nodes {down:?} kept crashing while the cluster started, and the others are not a majority"
            ));
        }
        let seen = tokio::select! {
            seen = client.status_all() => seen,
            _ = &mut signal => {
                stop(supervisors).await;
                say!("idemkv: stopped while the cluster started");
                return Ok(());
            }
        };
        let running = pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut leaders = Vec::new();
        let mut starting = false;
        for (i, (_, status)) in seen.iter().enumerate() {
            let id = i as u64 + 1;
            match status.as_ref().ok().and_then(|s| s.leader_id) {
                Some(leader) => leaders.push(leader),
                None => starting |= running.get(&id).copied().flatten().is_some(),
            }
        }
        let agreed = leaders.len() as u64 >= majority && leaders.iter().all(|l| *l == leaders[0]);
        agreed_since = agreed.then(|| agreed_since.unwrap_or_else(Instant::now));
        if agreed_since.is_some_and(|t| !starting || t.elapsed() >= SETTLE) {
            break Ok(());
        }
        if Instant::now() >= deadline {
            let said: Vec<String> = seen
                .iter()
                .map(|(ep, r)| match r {
                    Ok(s) => format!("{ep}: {} leader={:?}", s.role, s.leader_id),
                    Err(e) => format!("{ep}: {e}"),
                })
                .collect();
            break Err(anyhow::anyhow!(
                "no agreed leader within {}s: {}",
                READY_WITHIN.as_secs(),
                said.join("; ")
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            id = gave_up.recv() => match id {
                Some(id) => {
                    down.insert(id);
                }
                None => break Err(anyhow::anyhow!("every node stopped")),
            },
            _ = &mut signal => {
                stop(supervisors).await;
                say!("idemkv: stopped while the cluster started");
                return Ok(());
            }
        }
    };
    if let Err(e) = ready {
        say_err!("idemkv up: the cluster did not come up: {e:#}");
        stop(supervisors).await;
        bail!(
            "cluster did not start; see the node logs in {}",
            a.dir.display()
        );
    }
    if let Some(init) = &init {
        init.store(false, std::sync::atomic::Ordering::SeqCst);
    }
    say!(
        "idemkv: {}-node cluster is up (data in {})",
        a.nodes,
        a.dir.display()
    );
    let now = pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (i, ep) in endpoints.iter().enumerate() {
        let id = i as u64 + 1;
        let pid = now.get(&id).copied().flatten();
        say!(
            "  node {id}  {ep}  pid {}  log: {}",
            pid.map_or("-".to_string(), |p| p.to_string()),
            specs[i].log.display()
        );
    }
    say!("endpoints: {}", endpoints.join(","));
    say!("try:   idemkv ctl claim orders o-1 --owner w1 --lease 30s");
    say!("A node that exits is restarted on its data; Ctrl-C stops the cluster.");
    let mut given_up = down.len() as u64;
    let all_gave_up = loop {
        tokio::select! {
            _ = &mut signal => break false,
            id = gave_up.recv() => match id {
                Some(_) => {
                    given_up += 1;
                    if given_up == a.nodes {
                        break true;
                    }
                }
                None => break true,
            },
        }
    };
    stop(supervisors).await;
    if all_gave_up {
        bail!(
            "every node kept crashing; see the node logs in {}",
            a.dir.display()
        );
    }
    say!("idemkv: cluster stopped");
    Ok(())
}

/// Keep one node running: report each exit, restart it on the same data
/// after a backoff, give up (with the tail of its log) after
/// [`GIVE_UP_AFTER`] quick exits in a row; on `stop`, stop it cleanly.
async fn supervise(
    spec: NodeSpec,
    mut child: Child,
    mut stop: watch::Receiver<bool>,
    gave_up: mpsc::UnboundedSender<u64>,
    pids: Pids,
) {
    let id = spec.id;
    let set_pid = |pid: Option<u32>| {
        pids.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, pid);
    };
    let mut backoff = FIRST_BACKOFF;
    let mut quick_exits = 0;
    loop {
        set_pid(child.id());
        let started = Instant::now();
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            stop_child(id, &mut child).await;
            return;
        };
        set_pid(None);
        let ran = started.elapsed();
        let status = status.map_or_else(|e| format!("wait failed: {e}"), |s| s.to_string());
        if ran >= STABLE_AFTER {
            quick_exits = 0;
            backoff = FIRST_BACKOFF;
        } else {
            quick_exits += 1;
        }
        if quick_exits >= GIVE_UP_AFTER {
            say!(
                "node {id} exited ({status}) {quick_exits} times in a row within {}s of starting; \
                 not restarting it. Last lines of {}:",
                STABLE_AFTER.as_secs(),
                spec.log.display()
            );
            for line in tail(&spec.log, TAIL_LINES) {
                say!("  | {line}");
            }
            say!("node {id} is left down; the others keep serving");
            let _ = gave_up.send(id);
            return;
        }
        say!(
            "node {id} exited ({status}) after {:.1}s; restarting it in {} ms on its data",
            ran.as_secs_f64(),
            backoff.as_millis()
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        child = match spec.spawn() {
            Ok(c) => c,
            Err(e) => {
                say!("node {id} could not be restarted: {e:#}");
                let _ = gave_up.send(id);
                return;
            }
        };
        say!(
            "node {id} restarted (pid {})",
            child.id().map_or("?".to_string(), |p| p.to_string())
        );
    }
}

/// The last `n` lines of a log file (empty if it cannot be read).
fn tail(path: &std::path::Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// SIGTERM a node, then SIGKILL it if it still runs after 10 s.
async fn stop_child(id: u64, child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on a child we spawned and still own.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        say_err!("node {id} did not stop in 10 s; killing it");
        let _ = child.kill().await;
    }
}
