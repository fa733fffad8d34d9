//! The network lab used by the robustness suite: namespaces, cuts,
//! partitions, bridges, heal, and clean-up, checked with plain TCP.
//! Needs root (`ip netns`, `iptables`); skips otherwise.

mod robust;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use robust::netlab::NetLab;

/// How long a blocked connect waits before it counts as blocked.
const PROBE: Duration = Duration::from_millis(300);

macro_rules! lab {
    ($n:expr) => {
        match NetLab::new($n) {
            Some(lab) => lab,
            None => {
                eprintln!("skipping: needs root");
                return;
            }
        }
    };
}

/// Who connects: the root namespace (the test process) or a node.
#[derive(Clone, Copy, Debug)]
enum From {
    Root,
    Node(usize),
}

fn listen(lab: &NetLab, to: usize) -> TcpListener {
    let ip = lab.ip(to);
    lab.in_node(to, || TcpListener::bind((ip.as_str(), 0)))
        .expect("bind in node namespace")
}

fn connect(lab: &NetLab, from: From, addr: SocketAddr) -> std::io::Result<TcpStream> {
    match from {
        From::Root => TcpStream::connect_timeout(&addr, PROBE),
        From::Node(i) => lab.in_node(i, || TcpStream::connect_timeout(&addr, PROBE)),
    }
}

/// Accept one connection within `within`.
fn accept(l: &TcpListener, within: Duration) -> Option<TcpStream> {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => return None,
        }
    }
}

/// Can `from` open a TCP connection to node `to` and send it a byte? A
/// blocked attempt must hang (time out), never be refused or reset.
fn reach(lab: &NetLab, from: From, to: usize) -> bool {
    let l = listen(lab, to);
    let addr = l.local_addr().unwrap();
    match connect(lab, from, addr) {
        Ok(mut c) => {
            c.write_all(b"x").unwrap();
            let mut s = accept(&l, PROBE).expect("connected but not accepted");
            s.set_read_timeout(Some(PROBE)).unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("read the probe byte");
            assert_eq!(&b, b"x");
            true
        }
        Err(e) => {
            assert_eq!(
                e.kind(),
                ErrorKind::TimedOut,
                "{from:?} -> node {to}: a cut must look like a partition (DROP), got {e}"
            );
            false
        }
    }
}

/// Probe root -> every node and every ordered node pair, concurrently, and
/// compare with `can(i, j)` (whether node i should reach node j). The root
/// namespace must always reach every node.
fn expect(lab: &NetLab, can: impl Fn(usize, usize) -> bool) {
    let n = lab.len();
    let mut probes = Vec::new();
    for to in 0..n {
        probes.push((From::Root, to, true));
        for from in (0..n).filter(|&f| f != to) {
            probes.push((From::Node(from), to, can(from, to)));
        }
    }
    let got: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|&(from, to, _)| s.spawn(move || reach(lab, from, to)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wrong: Vec<String> = probes
        .iter()
        .zip(&got)
        .filter(|((_, _, want), got)| want != *got)
        .map(|((from, to, want), _)| format!("{from:?} -> node {to}: want reachable={want}"))
        .collect();
    assert!(wrong.is_empty(), "[{}] {wrong:#?}", lab.describe());
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn reachability_and_cut() {
    let lab = lab!(3);
    assert_eq!(lab.len(), 3);
    let ips: Vec<String> = (0..3).map(|i| lab.ip(i)).collect();
    assert!(ips.iter().all(|ip| ip.starts_with("10.")), "{ips:?}");
    assert_eq!(
        ips.iter().collect::<std::collections::BTreeSet<_>>().len(),
        3
    );
    // exec_prefix runs in the node's namespace: it sees its own address.
    for (i, ip) in ips.iter().enumerate() {
        let argv = lab.exec_prefix(i);
        assert_eq!(&argv[..3], ["ip", "netns", "exec"]);
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .args(["ip", "-4", "-o", "addr", "show"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.contains(&format!("{ip}/24")), "{text}");
        assert!(text.contains("127.0.0.1/8"), "loopback up: {text}");
        // Loopback works inside the namespace.
        lab.in_node(i, || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            TcpStream::connect_timeout(&l.local_addr().unwrap(), PROBE).unwrap();
        });
    }
    assert_eq!(lab.describe(), "healed");
    expect(&lab, |_, _| true);

    lab.cut(0, 1);
    assert_eq!(lab.cuts(), vec![(0, 1)]);
    eprintln!("cut(0,1): {}", lab.describe());
    expect(&lab, |i, j| !matches!((i, j), (0, 1) | (1, 0)));

    // Cutting again (either order) is idempotent.
    lab.cut(1, 0);
    assert_eq!(lab.cuts(), vec![(0, 1)]);
}

#[test]
fn partition_heal_and_recut() {
    let lab = lab!(3);
    lab.partition(&[vec![0], vec![1, 2]]);
    assert_eq!(lab.describe(), "0|1,2");
    expect(&lab, |i, j| (i == 0) == (j == 0));

    lab.heal();
    assert_eq!(lab.describe(), "healed");
    expect(&lab, |_, _| true);

    // heal() then cut() works: state is tracked, not leftover rules.
    lab.cut(0, 2);
    assert_eq!(lab.describe(), "cut 0-2");
    expect(&lab, |i, j| !matches!((i, j), (0, 2) | (2, 0)));

    // Unlisted nodes are isolated; partition replaces earlier cuts.
    lab.partition(&[vec![0, 2]]);
    assert_eq!(lab.describe(), "0,2|1");
    expect(&lab, |i, j| i != 1 && j != 1);

    lab.heal();
    lab.isolate(2);
    assert_eq!(lab.describe(), "0,1|2");
    expect(&lab, |i, j| i != 2 && j != 2);
}

#[test]
fn bridge_topology() {
    let lab = lab!(3);
    lab.cut(0, 1); // replaced by bridge()
    lab.bridge(&[0], 1, &[2]);
    eprintln!("bridge: {}", lab.describe());
    assert_eq!(lab.cuts(), vec![(0, 2)]);
    expect(&lab, |i, j| !matches!((i, j), (0, 2) | (2, 0)));
    lab.heal();
    expect(&lab, |_, _| true);
}

/// A cut is a blackhole: an open connection neither delivers nor resets,
/// and after heal() the retransmitted data arrives on the same connection.
#[test]
fn cut_hangs_open_connections() {
    let lab = lab!(2);
    let l = listen(&lab, 1);
    let mut c = connect(&lab, From::Node(0), l.local_addr().unwrap()).expect("connect");
    let mut s = accept(&l, PROBE).expect("accept");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    lab.cut(0, 1);
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    let e = s.read(&mut buf).expect_err("nothing crosses a cut");
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "want a hang, got {e}"
    );
    // A new connection across the cut hangs too (no RST).
    assert!(!reach(&lab, From::Node(1), 0));

    lab.heal();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut buf).expect("retransmitted after heal");
    assert_eq!(&buf, b"ping");
}

#[test]
fn drop_removes_everything() {
    // A stale namespace from a "crashed" run (pid beyond pid_max: dead) is
    // cleaned up by the next NetLab::new.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304);
    let stale = format!("ikvlab-{}-0-hub", pid_max + 1);
    let made_stale = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);

    let lab = lab!(3);
    if made_stale {
        assert!(!netns_list().contains(&stale), "stale namespace kept");
    }
    let names = lab.namespaces();
    let root_if = lab.root_if().to_string();
    let list = netns_list();
    assert!(names.iter().all(|n| list.contains(n.as_str())), "{list}");
    assert!(link_exists(&root_if));
    lab.partition(&[vec![0], vec![1], vec![2]]);
    drop(lab);
    let list = netns_list();
    assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");
    assert!(!link_exists(&root_if), "{root_if} left behind");

    // Also when a test panics while holding a lab.
    let mut names = Vec::new();
    let mut root_if = String::new();
    eprintln!("(an expected panic \"boom\" follows)");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = NetLab::new(2).expect("root already checked");
        names = lab.namespaces();
        root_if = lab.root_if().to_string();
        lab.cut(0, 1);
        panic!("boom");
    }));
    assert!(r.is_err());
    let list = netns_list();
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");
    assert!(!link_exists(&root_if), "{root_if} left behind");
}
