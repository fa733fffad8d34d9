//! Clusters of real `idemkv serve` child processes, for crash and CLI tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use idemkv::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_idemkv");

/// `kill SIG pid` (`-STOP`, `-CONT`, ...), which must be delivered.
pub fn signal_pid(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

/// The state letter of process `pid` in /proc (`T` stopped, `Z` zombie);
/// `None` once it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

/// Whether process `pid` is stopped (state `T`) within `within`. A signal
/// is delivered asynchronously: on a loaded machine the process can still
/// be running for a moment after `kill -STOP` returns.
pub fn stopped_within(pid: u32, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if process_state(pid) == Some('T') {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether process `pid` runs (a zombie counts as gone: it no longer
/// serves).
pub fn running(pid: u32) -> bool {
    process_state(pid).is_some_and(|s| s != 'Z')
}

/// `n` distinct free loopback ports for child processes to bind.
///
/// They are chosen at random *below* the kernel's ephemeral range
/// (`ip_local_port_range`): a port taken from that range with bind-to-0
/// and released can be handed out again as the source port of any
/// outgoing connection (a client reconnecting to a killed node) before the
/// child binds it, or when it restarts. Ports below the range are never
/// used that way. Each is checked bindable, and none is handed out twice
/// in one test process.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (1024, low.max(2048))
    };
    let mut given = GIVEN.lock().unwrap();
    let mut out = Vec::with_capacity(n);
    for _ in 0..10_000 {
        if out.len() == n {
            break;
        }
        let p = rand::random_range(from..to);
        if given.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.insert(p);
            out.push(p);
        }
    }
    assert_eq!(out.len(), n, "no {n} free ports in {from}..{to}");
    out
}

pub struct ProcCluster {
    pub dir: PathBuf,
    pub api: Vec<String>,
    pub peer: Vec<String>,
    pub children: Vec<Option<Child>>,
    /// Extra TOML for every node's config file.
    pub extra_config: String,
    /// Per node: a command the node runs under (e.g. `ip netns exec NS`).
    pub wrap: Vec<Vec<String>>,
    /// Per node: extra environment (e.g. libfaketime's).
    pub envs: Vec<Vec<(String, String)>>,
    /// Whether node 1 starts with `--init` (off once the cluster exists, so
    /// a wiped node 1 rejoins instead of founding a new cluster).
    pub init: bool,
    /// How many nodes (the first ones) `--peers` names: the founding
    /// members. Later nodes join with `ctl member add`.
    pub initial: usize,
}

impl ProcCluster {
    pub fn new(dir: &Path, n: usize, extra_config: &str) -> ProcCluster {
        let hosts = vec!["127.0.0.1".to_string(); n];
        ProcCluster::on_hosts(dir, &hosts, extra_config)
    }

    /// Node `i` listens on `hosts[i]` (e.g. its network namespace's address).
    pub fn on_hosts(dir: &Path, hosts: &[String], extra_config: &str) -> ProcCluster {
        let n = hosts.len();
        let ports = free_ports(2 * n);
        ProcCluster {
            dir: dir.to_path_buf(),
            api: (0..n)
                .map(|i| format!("{}:{}", hosts[i], ports[i]))
                .collect(),
            peer: (0..n)
                .map(|i| format!("{}:{}", hosts[i], ports[n + i]))
                .collect(),
            children: (0..n).map(|_| None).collect(),
            extra_config: extra_config.to_string(),
            wrap: vec![Vec::new(); n],
            envs: vec![Vec::new(); n],
            init: true,
            initial: n,
        }
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}", i + 1))
    }

    /// Node `i`'s log: its stdout and stderr, kept across restarts.
    pub fn log_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}.log", i + 1))
    }

    /// How many bytes node `i` has logged so far (for `logged_since`).
    pub fn log_len(&self, i: usize) -> usize {
        std::fs::metadata(self.log_file(i)).map_or(0, |m| m.len() as usize)
    }

    /// What node `i` logged past its first `from` bytes (all of it for 0).
    pub fn logged_since(&self, i: usize, from: usize) -> String {
        let log = std::fs::read(self.log_file(i)).unwrap_or_default();
        String::from_utf8_lossy(&log[from.min(log.len())..]).into_owned()
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(|c| c.id())
    }

    /// Has node `i` exited on its own (crashed)? Reaps it if so.
    pub fn exited(&mut self, i: usize) -> bool {
        let gone = match self.children[i].as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if gone {
            self.children[i] = None;
        }
        gone
    }

    /// SIGSTOP / SIGCONT node `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(pid) = self.pid(i) {
            signal_pid(pid, sig);
        }
    }

    /// The index of the node the cluster names as its leader now.
    pub async fn leader_index(&self) -> usize {
        let s = self.client().status().await.expect("status");
        s.leader_id.expect("a leader") as usize - 1
    }

    /// SIGSTOP node `i` and check that it stopped (the fault took effect).
    pub fn pause(&self, i: usize) {
        let pid = self.pid(i).expect("node running");
        signal_pid(pid, "-STOP");
        assert!(
            stopped_within(pid, Duration::from_secs(5)),
            "node {} was not stopped: state {:?}",
            i + 1,
            process_state(pid)
        );
    }

    pub fn peers_arg(&self) -> String {
        (0..self.initial)
            .map(|i| format!("{}={}/{}", i + 1, self.api[i], self.peer[i]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start (or restart) node `i` (0-based).
    pub fn start_node(&mut self, i: usize) {
        let id = i + 1;
        let data = self.data_dir(i);
        let conf = self.dir.join(format!("node-{id}.toml"));
        std::fs::write(&conf, &self.extra_config).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(i))
            .expect("log file");
        let mut cmd = match self.wrap[i].split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        // A node's own environment (self.envs) wins over this default.
        cmd.env("RUST_LOG", "info,openraft=warn");
        cmd.envs(self.envs[i].iter().map(|(k, v)| (k, v)));
        cmd.arg("serve")
            .arg("--config")
            .arg(&conf)
            .args(["--id", &id.to_string()])
            .args(["--listen", &self.api[i]])
            .args(["--peer-listen", &self.peer[i]])
            .arg("--data-dir")
            .arg(&data)
            .args(["--peers", &self.peers_arg()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if i == 0 && self.init {
            cmd.arg("--init");
        }
        self.children[i] = Some(cmd.spawn().expect("spawn idemkv serve"));
    }

    pub fn start_all(&mut self) {
        for i in 0..self.api.len() {
            self.start_node(i);
        }
    }

    /// SIGKILL node `i`: no shutdown path runs.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL every node at once (signals first, then reap).
    pub fn kill9_all(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
        }
        for i in 0..self.children.len() {
            self.kill9(i);
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.api).expect("client")
    }

    /// Wait until every node answers and agrees on a leader.
    pub async fn wait_ready(&self, within: Duration) {
        if let Err(e) = self.client().wait_ready(within).await {
            panic!("{e}; logs in {}", self.dir.display());
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        self.kill9_all();
    }
}

/// A peer-port client whose connections come from `source` (any 127/8
/// address reaches a loopback listener), as a stranger on another host
/// would.
pub async fn peer_from(
    source: &str,
    to: &str,
) -> idemkv::pb::peer::raft_peer_client::RaftPeerClient<tonic::transport::Channel> {
    let source: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    let to: std::net::SocketAddr = to.parse().unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| async move {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(source)?;
            let stream = s.connect(to).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }))
        .await
        .unwrap();
    idemkv::pb::peer::raft_peer_client::RaftPeerClient::new(ch)
}

/// A claim of `namespace`/`key` by `owner` as the leader's peer port takes
/// it (a minute's lease and retention).
pub fn claim_command(namespace: &str, key: &str, owner: &str) -> idemkv::record::Command {
    use idemkv::record::{Claim, Command, Op, RecordKey};
    Command::Op {
        key: RecordKey {
            namespace: namespace.into(),
            key: key.as_bytes().to_vec(),
        },
        op: Op::Claim(Claim {
            owner: owner.into(),
            claim_id: format!("{owner}-1"),
            lease_ms: 60_000,
            fingerprint: None,
            max_attempts: 0,
            retention_ms: 60_000,
        }),
    }
}

/// That claim forwarded to a leader's peer port, as a follower sends it.
pub fn forwarded_claim(namespace: &str, key: &str, owner: &str) -> idemkv::pb::peer::Payload {
    let cmd = claim_command(namespace, key, owner);
    idemkv::pb::peer::Payload {
        data: idemkv::codec::encode(&idemkv::raft::consensus::Forwarded::Write(cmd)).unwrap(),
        ..Default::default()
    }
}
