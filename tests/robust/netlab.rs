//! A network lab for partition fault injection: one network namespace per
//! node, all joined by a bridge that lives in a private "hub" namespace, and
//! one veth from the root namespace (where the test process runs) to that
//! bridge, so the test reaches every node as a client.
//!
//! ```text
//!   root ns: <ikv..> 10.A.B.1 ──veth── hub ns: br0 ──veth── node i: eth0 10.A.B.(i+2)
//! ```
//!
//! Nothing is bridged or forwarded in the root namespace, so the host's
//! firewall (Docker's `FORWARD DROP`, `br_netfilter`) is never in the path.
//! Cuts are `DROP` rules in the *INPUT* chain of each node namespace, on both
//! ends of a cut pair: packets leave the sender normally and vanish on the
//! wire, like a real partition (connections hang, no RST, no local `EPERM`).
//! Traffic from the root namespace (10.A.B.1) is never dropped.
//!
//! Node indices are 0-based throughout. Every namespace, link and rule is
//! removed on `Drop` (also while unwinding from a panic). Kill processes
//! started in the node namespaces before the lab drops.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Every namespace this module makes is named `ikvlab-<pid>-<counter>-<role>`.
const NS_PREFIX: &str = "ikvlab-";
/// Root-namespace veths are named `ikv<pid hex>x<counter hex>` (≤ 15 chars).
const IF_PREFIX: &str = "ikv";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct NetLab {
    hub: String,
    nodes: Vec<String>,
    root_if: String,
    /// The lab's /24 is `10.{net[0]}.{net[1]}.0/24`.
    net: [u8; 2],
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cut pairs, always `(lo, hi)` with `lo < hi`.
    cuts: BTreeSet<(usize, usize)>,
    /// One-way cuts `(from, to)`: `to` drops what `from` sends it.
    one_way: BTreeSet<(usize, usize)>,
    /// Every node drops this share (percent) of what the others send it.
    loss_pct: u32,
    /// Per node: the rules its INPUT chain holds now.
    applied: Vec<String>,
    /// Packets dropped by rules since replaced (their counters reset).
    dropped: u64,
}

impl NetLab {
    /// `None` (after printing why to stderr) when not root, `ip`/`iptables`
    /// are missing, or setup fails; the caller then skips.
    pub fn new(n: usize) -> Option<NetLab> {
        assert!((1..=250).contains(&n), "NetLab::new({n}): 1..=250 nodes");
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("netlab: not root; network-partition tests need root");
            return None;
        }
        for probe in [&["ip", "-V"][..], &["iptables-restore", "--version"][..]] {
            if let Err(e) = try_run(probe, None) {
                eprintln!("netlab: {e}");
                return None;
            }
        }
        cleanup_stale();

        let pid = std::process::id();
        let ctr = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{NS_PREFIX}{pid}-{ctr}");
        let net = match pick_subnet(pid, ctr) {
            Ok(net) => net,
            Err(e) => {
                eprintln!("netlab: {e}");
                return None;
            }
        };
        // Built before setup so that Drop removes whatever a failed setup made.
        let lab = NetLab {
            hub: format!("{tag}-hub"),
            nodes: (0..n).map(|i| format!("{tag}-n{i}")).collect(),
            root_if: format!("{IF_PREFIX}{pid:x}x{:x}", ctr & 0xffff),
            net,
            state: Mutex::new(State {
                applied: vec![String::new(); n],
                ..State::default()
            }),
        };
        match lab.setup() {
            Ok(()) => Some(lab),
            Err(e) => {
                eprintln!("netlab: setup failed: {e}");
                None
            }
        }
    }

    fn setup(&self) -> Result<(), String> {
        let hub = self.hub.as_str();
        try_run(&["ip", "netns", "add", hub], None)?;
        try_run(&["ip", "-n", hub, "link", "set", "lo", "up"], None)?;
        try_run(
            &[
                "ip",
                "-n",
                hub,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "forward_delay",
                "0",
                "stp_state",
                "0",
            ],
            None,
        )?;
        try_run(&["ip", "-n", hub, "link", "set", "br0", "up"], None)?;
        for (i, ns) in self.nodes.iter().enumerate() {
            let ns = ns.as_str();
            let port = format!("p{i}");
            let addr = format!("{}/24", self.ip(i));
            try_run(&["ip", "netns", "add", ns], None)?;
            try_run(&["ip", "-n", ns, "link", "set", "lo", "up"], None)?;
            try_run(
                &[
                    "ip", "-n", hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
                None,
            )?;
            try_run(
                &["ip", "-n", hub, "link", "set", &port, "master", "br0", "up"],
                None,
            )?;
            try_run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"], None)?;
            try_run(&["ip", "-n", ns, "link", "set", "eth0", "up"], None)?;
            // Start from an empty filter table; proves iptables works in there.
            self.restore(i, "")?;
        }
        let root_if = self.root_if.as_str();
        let root_addr = format!("{}/24", self.root_ip());
        try_run(
            &[
                "ip", "link", "add", root_if, "type", "veth", "peer", "name", "uplink", "netns",
                hub,
            ],
            None,
        )?;
        try_run(
            &[
                "ip", "-n", hub, "link", "set", "uplink", "master", "br0", "up",
            ],
            None,
        )?;
        try_run(&["ip", "addr", "add", &root_addr, "dev", root_if], None)?;
        try_run(&["ip", "link", "set", root_if, "up"], None)?;
        self.self_check()
    }

    /// Prove the root namespace reaches every node (host firewalls, routes).
    fn self_check(&self) -> Result<(), String> {
        for i in 0..self.len() {
            let ip = self.ip(i);
            let listener = self
                .in_node(i, || std::net::TcpListener::bind((ip.as_str(), 0)))
                .map_err(|e| format!("bind {ip}:0 in {}: {e}", self.nodes[i]))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            // The first connect may wait for ARP/link-up; give it some slack.
            let mut last = String::new();
            let ok = (0..20).any(|_| {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(250)) {
                    Ok(_) => true,
                    Err(e) => {
                        last = e.to_string();
                        std::thread::sleep(Duration::from_millis(25));
                        false
                    }
                }
            });
            if !ok {
                return Err(format!(
                    "the root namespace cannot reach {addr} in {}: {last}",
                    self.nodes[i]
                ));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The address of node `i` (0-based), e.g. "10.201.7.2"; reachable from
    /// the root namespace and from every other node namespace.
    pub fn ip(&self, i: usize) -> String {
        assert!(
            i < self.len(),
            "node {i} out of range (lab of {})",
            self.len()
        );
        format!("10.{}.{}.{}", self.net[0], self.net[1], i + 2)
    }

    /// The root namespace's address on the lab network.
    pub fn root_ip(&self) -> String {
        format!("10.{}.{}.1", self.net[0], self.net[1])
    }

    /// The name of node `i`'s network namespace.
    pub fn ns_name(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// Every namespace this lab made (nodes, then the hub).
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = self.nodes.clone();
        all.push(self.hub.clone());
        all
    }

    /// The lab's veth in the root namespace.
    pub fn root_if(&self) -> &str {
        &self.root_if
    }

    /// argv prefix to run a command in node `i`'s namespace:
    /// `["ip","netns","exec","<name>"]`.
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", self.nodes[i].as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Run `f` on a thread inside node `i`'s network namespace. Sockets made
    /// there stay in that namespace after `f` returns.
    pub fn in_node<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.nodes[i], f)
    }

    /// Blackhole (DROP, both directions) traffic between nodes `i` and `j`
    /// only. Client traffic from the root namespace stays up. Adds to the
    /// current cuts.
    pub fn cut(&self, i: usize, j: usize) {
        self.check(i);
        self.check(j);
        assert_ne!(i, j, "cannot cut node {i} from itself");
        let mut st = self.lock();
        st.cuts.insert((i.min(j), i.max(j)));
        self.apply(&mut st);
    }

    /// Cut `i` from every other node. Adds to the current cuts.
    pub fn isolate(&self, i: usize) {
        self.check(i);
        let mut st = self.lock();
        for j in (0..self.len()).filter(|&j| j != i) {
            st.cuts.insert((i.min(j), i.max(j)));
        }
        self.apply(&mut st);
    }

    /// Nodes in different groups cannot talk; nodes within a group can.
    /// Nodes not listed in any group are isolated from all others. Replaces
    /// the current cuts.
    pub fn partition(&self, groups: &[Vec<usize>]) {
        let n = self.len();
        let mut group_of: Vec<Option<usize>> = vec![None; n];
        for (g, members) in groups.iter().enumerate() {
            for &m in members {
                self.check(m);
                assert!(
                    group_of[m].is_none(),
                    "node {m} is in two groups: {groups:?}"
                );
                group_of[m] = Some(g);
            }
        }
        let mut cuts = BTreeSet::new();
        for i in 0..n {
            for j in i + 1..n {
                if group_of[i].is_none() || group_of[i] != group_of[j] {
                    cuts.insert((i, j));
                }
            }
        }
        self.set_cuts(cuts);
    }

    /// Bridge: groups `a` and `b` cannot talk to each other, but node
    /// `bridge` talks to both. Unlisted nodes talk to everyone. Replaces the
    /// current cuts.
    pub fn bridge(&self, a: &[usize], bridge: usize, b: &[usize]) {
        self.check(bridge);
        let mut cuts = BTreeSet::new();
        for &x in a {
            self.check(x);
            assert_ne!(x, bridge, "the bridge node {bridge} is also in group a");
            for &y in b {
                self.check(y);
                assert_ne!(y, bridge, "the bridge node {bridge} is also in group b");
                assert_ne!(x, y, "node {x} is in both groups");
                cuts.insert((x.min(y), x.max(y)));
            }
        }
        self.set_cuts(cuts);
    }

    /// One direction only: `to` drops what `from` sends it (replies from
    /// `to` still leave). Adds to the current cuts.
    pub fn cut_one_way(&self, from: usize, to: usize) {
        self.check(from);
        self.check(to);
        assert_ne!(from, to, "cannot cut node {from} from itself");
        let mut st = self.lock();
        st.one_way.insert((from, to));
        self.apply(&mut st);
    }

    /// Every node drops `pct` percent of the packets the other nodes send
    /// it, at random (iptables' `statistic` match: no netem needed).
    pub fn lossy(&self, pct: u32) {
        assert!(pct <= 100, "loss of {pct}%");
        let mut st = self.lock();
        st.loss_pct = pct;
        self.apply(&mut st);
    }

    /// Remove every cut and all loss.
    pub fn heal(&self) {
        let mut st = self.lock();
        st.cuts.clear();
        st.one_way.clear();
        st.loss_pct = 0;
        self.apply(&mut st);
    }

    /// Packets the lab's rules dropped so far (proof that a cut cut).
    pub fn dropped(&self) -> u64 {
        let st = self.lock();
        st.dropped + (0..self.len()).map(|k| self.counter(k)).sum::<u64>()
    }

    /// Packets node `k`'s current DROP rules matched. A read that fails
    /// is tried again and then said, not taken for 0: a lost count once
    /// left a one-way cut "not shown to take effect".
    fn counter(&self, k: usize) -> u64 {
        let argv = [
            "ip",
            "netns",
            "exec",
            &self.nodes[k],
            "iptables",
            "-w",
            "-L",
            "INPUT",
            "-v",
            "-x",
            "-n",
        ];
        let mut tries = 0;
        let out = loop {
            match try_run(&argv, None) {
                Ok(out) => break out,
                Err(e) if tries < 5 => {
                    tries += 1;
                    eprintln!("netlab: reading node {k}'s drop counters failed ({e}); again");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    eprintln!("netlab: cannot read node {k}'s drop counters: {e}");
                    break String::new();
                }
            }
        };
        out.lines()
            .skip(2)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.get(2) == Some(&"DROP")).then(|| cols[0].parse::<u64>().unwrap_or(0))
            })
            .sum()
    }

    /// The cut pairs right now, each `(lo, hi)`.
    pub fn cuts(&self) -> Vec<(usize, usize)> {
        self.lock().cuts.iter().copied().collect()
    }

    /// For logging: "healed" with no cuts; "0|1,2" when the nodes fall into
    /// groups that talk within and not across; otherwise the cut pairs,
    /// e.g. "cut 0-2,1-2".
    pub fn describe(&self) -> String {
        let (cuts, one_way, loss) = {
            let st = self.lock();
            (st.cuts.clone(), st.one_way.clone(), st.loss_pct)
        };
        let mut extra: Vec<String> = one_way
            .iter()
            .map(|(f, t)| format!("{f}->{t} cut"))
            .collect();
        if loss > 0 {
            extra.push(format!("{loss}% loss"));
        }
        if cuts.is_empty() {
            return if extra.is_empty() {
                "healed".to_string()
            } else {
                extra.join(", ")
            };
        }
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!("; {}", extra.join(", "))
        };
        self.describe_cuts(&cuts) + &extra
    }

    fn describe_cuts(&self, cuts: &BTreeSet<(usize, usize)>) -> String {
        let n = self.len();
        let talk = |i: usize, j: usize| i == j || !cuts.contains(&(i.min(j), i.max(j)));
        // Groups by first-member reachability; a clean partition iff every
        // group is a clique and no edge crosses groups.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for i in 0..n {
            match groups.iter_mut().find(|g| talk(g[0], i)) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        let clean = groups.iter().enumerate().all(|(gi, g)| {
            g.iter().all(|&x| {
                (0..n).all(|y| {
                    let same = groups[gi].contains(&y);
                    talk(x, y) == same
                })
            })
        });
        if clean {
            groups
                .iter()
                .map(|g| {
                    g.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect::<Vec<_>>()
                .join("|")
        } else {
            let pairs: Vec<String> = cuts.iter().map(|(i, j)| format!("{i}-{j}")).collect();
            format!("cut {}", pairs.join(","))
        }
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.len(),
            "node {i} out of range (lab of {})",
            self.len()
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_cuts(&self, cuts: BTreeSet<(usize, usize)>) {
        let mut st = self.lock();
        st.cuts = cuts;
        self.apply(&mut st);
    }

    /// Bring every node's INPUT chain in line with the cuts and the loss,
    /// atomically per namespace (one `iptables-restore`), touching only
    /// nodes that change.
    fn apply(&self, st: &mut State) {
        for k in 0..self.len() {
            let mut rules = String::new();
            for p in (0..self.len()).filter(|&p| p != k) {
                let cut = st.cuts.contains(&(k.min(p), k.max(p))) || st.one_way.contains(&(p, k));
                if cut {
                    rules.push_str(&format!("-A INPUT -s {}/32 -j DROP\n", self.ip(p)));
                } else if st.loss_pct > 0 {
                    rules.push_str(&format!(
                        "-A INPUT -s {}/32 -m statistic --mode random --probability {:.2} -j DROP\n",
                        self.ip(p),
                        st.loss_pct as f64 / 100.0
                    ));
                }
            }
            if rules != st.applied[k] {
                st.dropped += self.counter(k);
                if let Err(e) = self.restore(k, &rules) {
                    panic!("netlab: {e}");
                }
                st.applied[k] = rules;
            }
        }
    }

    /// Replace node `k`'s filter table with `rules` in its INPUT chain.
    fn restore(&self, k: usize, rules: &str) -> Result<(), String> {
        let table = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{rules}COMMIT\n"
        );
        try_run(
            &["ip", "netns", "exec", &self.nodes[k], "iptables-restore"],
            Some(&table),
        )
        .map(drop)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Best effort, never panics. Deleting the root veth takes its hub
        // end with it; deleting the hub destroys the node veths' hub ends.
        let _ = try_run(&["ip", "link", "del", &self.root_if], None);
        let _ = try_run(&["ip", "netns", "del", &self.hub], None);
        for ns in &self.nodes {
            let _ = try_run(&["ip", "netns", "del", ns], None);
        }
    }
}

/// Run `f` on a new thread that has joined the network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            // SAFETY: a valid namespace fd; setns only changes this thread's
            // network namespace, and the thread ends after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Run a command; Ok(stdout) on success, else an error with its stderr.
fn try_run(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let shown = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{shown}`: {e}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("`{shown}`: writing stdin: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{shown}`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove namespaces and root veths left by earlier labs whose process died.
fn cleanup_stale() {
    if let Ok(list) = try_run(&["ip", "netns", "list"], None) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(NS_PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !pid_alive(pid) {
                    let _ = try_run(&["ip", "netns", "del", name], None);
                }
            }
        }
    }
    if let Ok(links) = try_run(&["ip", "-o", "link", "show", "type", "veth"], None) {
        for line in links.lines() {
            // "17: ikv1a2bx0@if16: <...>"
            let Some(name) = line
                .split(": ")
                .nth(1)
                .map(|s| s.split('@').next().unwrap_or(s))
            else {
                continue;
            };
            let Some(rest) = name.strip_prefix(IF_PREFIX) else {
                continue;
            };
            let Some((pid_hex, ctr_hex)) = rest.split_once('x') else {
                continue;
            };
            if ctr_hex.is_empty() || !ctr_hex.chars().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            if let Ok(pid) = u32::from_str_radix(pid_hex, 16) {
                if !pid_alive(pid) {
                    let _ = try_run(&["ip", "link", "del", name], None);
                }
            }
        }
    }
}

/// A /24 in 10.11.0.0 – 10.210.255.0 derived from pid and counter, skipping
/// any that overlaps an address or route (of prefix ≥ /16) already in the
/// root namespace, e.g. a concurrent lab's.
fn pick_subnet(pid: u32, ctr: u32) -> Result<[u8; 2], String> {
    const SPAN: u64 = 200 * 256;
    let addrs = try_run(&["ip", "-4", "-o", "addr", "show"], None)?;
    let routes = try_run(&["ip", "-4", "route", "show", "table", "all"], None)?;
    let mut taken: Vec<(u32, u32)> = Vec::new();
    for line in addrs.lines() {
        // "2: eth0    inet 172.17.0.2/16 brd ..."
        let mut words = line.split_whitespace();
        if words.any(|w| w == "inet") {
            if let Some(net) = words.next().and_then(parse_cidr) {
                taken.push(net);
            }
        }
    }
    for line in routes.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let first = if matches!(first, "local" | "broadcast" | "unicast") {
            line.split_whitespace().nth(1).unwrap_or("")
        } else {
            first
        };
        if let Some(net) = parse_cidr(first) {
            taken.push(net);
        }
    }
    let start = (u64::from(pid) * 7919 + u64::from(ctr) * 104_729) % SPAN;
    for k in 0..SPAN {
        let idx = (start + k) % SPAN;
        let net = [11 + (idx / 256) as u8, (idx % 256) as u8];
        let base = u32::from_be_bytes([10, net[0], net[1], 0]);
        let clash = taken.iter().any(|&(addr, len)| {
            let len = len.min(24);
            len >= 16 && {
                let mask = u32::MAX << (32 - len);
                addr & mask == base & mask
            }
        });
        if !clash {
            return Ok(net);
        }
    }
    Err("no free 10.x.y.0/24 subnet".to_string())
}

/// "10.1.2.0/24" or "10.1.2.3" (as /32) to (address, prefix length).
fn parse_cidr(s: &str) -> Option<(u32, u32)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()?),
        None => (s, 32),
    };
    let ip: std::net::Ipv4Addr = addr.parse().ok()?;
    (len <= 32).then_some((u32::from(ip), len))
}
