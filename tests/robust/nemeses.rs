//! The nemeses: the faults a run injects, and the evidence each leaves
//! that it took effect.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemkv::pb::api;
use idemkv::Client;
use rand::rngs::StdRng;
use rand::Rng;

use crate::rig::{wait_leader, wait_ready, Rig, FAKETIME_LIB};
use crate::support::procs;

/// How far the clock-skew nemesis moves one node's wall clock.
pub const SKEW_SECS: u64 = 3;
/// How far the clock-jump nemesis moves a wall clock.
pub const JUMP_SECS: i64 = 2 * 3_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillRandom,
    KillLeader,
    /// Kill the leader, then the one elected after it, at once.
    KillNewLeader,
    PauseLeader,
    /// Pause a follower: the workload's clients talk to it too, so their
    /// writes it forwards hang with it.
    PauseFollower,
    IsolateLeader,
    /// The leader stops hearing one follower, or that follower the leader.
    OneWay,
    /// Partitions that come and go every few hundred ms.
    Flapping,
    /// Random loss of a share of every node-to-node packet.
    PacketLoss,
    MajorityMinority,
    Bridge,
    ClockSkew,
    /// A node's wall clock jumps two hours forward or back (the leader or
    /// a follower), for a few seconds, then back: leases and retention
    /// (1.5 s on half the keys) must not follow it.
    ClockJump,
    DiskFull,
    Membership,
    /// Kill the leader while a membership change is under way.
    MembershipCrash,
    /// Wipe a follower and add it back, and kill it while it installs the
    /// snapshot the leader sends (its snapshot fsync is slowed so the
    /// install is surely under way); restarted, it must catch up.
    InstallCrash,
    KillAll,
    /// Power loss on every node at once: kill -9, then every log segment
    /// loses what was written after its last fsync.
    PowerLoss,
    /// As `PowerLoss`, and every node's sled directory goes back to its
    /// state at its last sled fsync (the state machine loses its applies
    /// since, and the clock anchor with them).
    PowerLossSled,
    /// One node's log fsyncs stall for seconds.
    SlowDisk,
    /// One node's log fsync fails with EIO.
    FsyncEio,
    /// Half a record after the last one in a stopped node's log: a torn
    /// write, cut at restart.
    LogCorruptTail,
    /// A flipped byte mid-segment in a stopped node's log: the node must
    /// refuse to start; the operator wipes it and adds it back.
    LogCorruptMid,
    /// A flipped byte in the last (acknowledged) record of a stopped
    /// node's log: it cuts the record, says so, keeps out of elections
    /// until it holds the entry again, then votes again.
    LogDamagedTail,
    /// A flipped byte in a stopped node's newest snapshot file: at restart
    /// it is checked, refused and set aside (`*.bin.refused`), never served;
    /// the node runs on (its state is in sled).
    SnapshotCorrupt,
    /// A flipped byte in a stopped follower's sled database (half the time
    /// in its newest 64 KiB): sled may read the bad message as the end of
    /// its log and go back silently, or panic. The node must either start
    /// and catch up (having lost nothing it made durable) or refuse,
    /// naming the remedy; then it is wiped and re-added.
    SledCorrupt,
}

impl Fault {
    /// Moves a wall clock (libfaketime).
    pub fn moves_a_clock(self) -> bool {
        matches!(self, Fault::ClockSkew | Fault::ClockJump)
    }

    pub fn needs_root(self) -> bool {
        self.partitions() || self == Fault::DiskFull
    }

    pub fn partitions(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader
                | Fault::MajorityMinority
                | Fault::Bridge
                | Fault::OneWay
                | Fault::Flapping
                | Fault::PacketLoss
        )
    }
}

pub struct Plan {
    pub name: &'static str,
    pub nodes: usize,
    pub faults: Vec<Fault>,
    pub duration: Duration,
    /// Quiet time between faults.
    pub quiet: Duration,
    /// Stop after this many faults instead of after `duration`.
    pub cycles: Option<usize>,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why this plan cannot run here, if it cannot.
pub fn missing(plan: &Plan) -> Option<String> {
    if plan.faults.iter().any(|f| f.needs_root()) && !is_root() {
        return Some("needs root (network namespaces, iptables, tmpfs)".into());
    }
    let clock = plan.faults.iter().any(|f| f.moves_a_clock());
    if clock && !std::path::Path::new(FAKETIME_LIB).exists() {
        return Some(format!("needs Debian's faketime ({FAKETIME_LIB})"));
    }
    None
}

pub struct Nemesis {
    pub rng: StdRng,
    pub counts: BTreeMap<Fault, usize>,
    /// Evidence that faults took effect (printed in the summary).
    pub seen: BTreeMap<&'static str, usize>,
    /// Faults whose effect could not be shown: the run fails with these.
    pub unproven: Vec<String>,
    /// Total time some wall clock was skewed, ms.
    pub skewed_ms: u64,
}

/// Is process `pid` still there (not reaped)?
/// Is process `pid` stopped (SIGSTOP)?
fn stopped(pid: u32) -> bool {
    procs::process_state(pid) == Some('T')
}

/// Node `i`'s Status, if it answers within half a second.
async fn status(api: &str) -> Option<api::StatusResponse> {
    let opts = idemkv::client::ClientOptions {
        request_timeout: Duration::from_millis(500),
        retry_for: Duration::ZERO,
        ..Default::default()
    };
    Client::with_options([api], opts).ok()?.status().await.ok()
}

/// Move node `i`'s wall clock by `secs` (libfaketime's offset file), then
/// watch its `Status.wall_clock_ms` until `until` for an offset from the
/// test's clock (ms) that `shows` accepts.
async fn set_clock(
    rig: &Arc<tokio::sync::Mutex<Rig>>,
    api: &str,
    i: usize,
    secs: i64,
    until: tokio::time::Instant,
    shows: impl Fn(i64) -> bool,
) -> bool {
    let file = rig.lock().await.clock_files[i].clone();
    std::fs::write(&file, format!("{secs:+}s\n")).unwrap();
    while tokio::time::Instant::now() < until {
        let off = status(api)
            .await
            .map(|s| s.wall_clock_ms as i64 - crate::robust::history::wall_ms() as i64);
        if off.is_some_and(&shows) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

impl Nemesis {
    /// Record evidence `what` of `fault`, or that it is missing.
    fn prove(&mut self, fault: Fault, ok: bool, what: &'static str) {
        if ok {
            *self.seen.entry(what).or_default() += 1;
        } else {
            self.unproven.push(format!("{fault:?}: not shown: {what}"));
        }
    }

    /// Kill node `i` and prove it died.
    fn kill(&mut self, r: &mut Rig, fault: Fault, i: usize) {
        let pid = r.cluster.pid(i);
        r.cluster.kill9(i);
        let dead = pid.is_some_and(|p| !procs::running(p));
        self.prove(fault, dead, "process killed");
    }

    pub async fn inject(&mut self, rig: &Arc<tokio::sync::Mutex<Rig>>, fault: Fault) {
        let api = rig.lock().await.cluster.api.clone();
        let n = api.len();
        let hold = Duration::from_millis(self.rng.random_range(2_000..3_500));
        match fault {
            Fault::KillRandom | Fault::KillLeader => {
                let i = if fault == Fault::KillLeader {
                    wait_leader(&api, Duration::from_secs(10)).await
                } else {
                    self.rng.random_range(0..n)
                };
                self.kill(&mut *rig.lock().await, fault, i);
                if fault == Fault::KillLeader {
                    let replaced = new_leader(&api, i, Duration::from_secs(10)).await;
                    self.prove(fault, replaced.is_some(), "leader replaced");
                }
                tokio::time::sleep(hold / 2).await;
                rig.lock().await.cluster.start_node(i);
            }
            Fault::KillNewLeader => {
                let first = wait_leader(&api, Duration::from_secs(10)).await;
                self.kill(&mut *rig.lock().await, fault, first);
                let second = new_leader(&api, first, Duration::from_secs(10)).await;
                self.prove(fault, second.is_some(), "leader replaced");
                if let Some(second) = second {
                    // Right after its election: its first entries (the
                    // blank entry, a clock stamp) may not be committed.
                    self.kill(&mut *rig.lock().await, fault, second);
                    tokio::time::sleep(hold / 2).await;
                    rig.lock().await.cluster.start_node(second);
                }
                rig.lock().await.cluster.start_node(first);
            }
            Fault::KillAll | Fault::PowerLoss | Fault::PowerLossSled => {
                wait_ready(&*rig.lock().await, Duration::from_secs(30)).await;
                tokio::time::sleep(Duration::from_millis(self.rng.random_range(300..1_200))).await;
                let mut r = rig.lock().await;
                let pids: Vec<u32> = (0..n).filter_map(|i| r.cluster.pid(i)).collect();
                r.cluster.kill9_all();
                let dead = pids.len() == n && pids.iter().all(|p| !procs::running(*p));
                self.prove(fault, dead, "every process killed");
                if fault != Fault::KillAll {
                    let mut lost = 0;
                    let mut hooked = true;
                    let mut sled_back = true;
                    for i in 0..n {
                        match lose_unsynced(&r.cluster.data_dir(i), &r.ledgers[i]) {
                            Some(bytes) => lost += bytes,
                            None => hooked = false,
                        }
                        if fault == Fault::PowerLossSled {
                            sled_back &= roll_sled_back(&r.cluster.data_dir(i), &r.ledgers[i]);
                        }
                    }
                    self.prove(fault, hooked, "fsync ledger kept by every node");
                    if fault == Fault::PowerLossSled {
                        self.prove(fault, sled_back, "sled rolled back to its last fsync");
                    }
                    *self.seen.entry("un-fsynced bytes dropped").or_default() += lost as usize;
                }
                // The clock's anchor file is left as it is: it counts only
                // within the boot that wrote it, and a real power cut starts
                // another one (store/boot_clock.rs).
                r.cluster.start_all();
            }
            Fault::PauseLeader | Fault::PauseFollower => {
                // Longer than the election timeout (800 ms) and the lease.
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                let i = if fault == Fault::PauseLeader {
                    l
                } else {
                    (l + 1 + self.rng.random_range(0..n - 1)) % n
                };
                let pid = rig.lock().await.cluster.pid(i);
                rig.lock().await.cluster.signal(i, "-STOP");
                // The signal is delivered asynchronously: allow it a moment.
                let deadline = Instant::now() + Duration::from_secs(1);
                while !pid.is_some_and(stopped) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                self.prove(fault, pid.is_some_and(stopped), "process stopped");
                tokio::time::sleep(hold.max(Duration::from_millis(2_500))).await;
                if fault == Fault::PauseLeader {
                    let replaced = new_leader(&api, l, Duration::ZERO).await;
                    self.prove(fault, replaced.is_some(), "leader replaced");
                }
                let still = pid.is_some_and(stopped);
                self.prove(fault, still, "no progress while paused");
                rig.lock().await.cluster.signal(i, "-CONT");
            }
            Fault::IsolateLeader
            | Fault::MajorityMinority
            | Fault::Bridge
            | Fault::OneWay
            | Fault::PacketLoss => {
                // A one-way cut only shows if the leader stays the leader
                // while it holds: followers send each other nothing. A node
                // healed from the previous fault's minority can still force
                // the leader down with its higher term just as the cut goes
                // in (a CI run cut between two followers that way and proved
                // nothing), so the cut waits for every node to follow one
                // leader, and is aimed again at the new leader if the old one
                // fell during it.
                let attempts = if fault == Fault::OneWay { 3 } else { 1 };
                for attempt in 1..=attempts {
                    let l = if fault == Fault::OneWay {
                        settled_leader(&api, Duration::from_secs(10)).await
                    } else {
                        wait_leader(&api, Duration::from_secs(10)).await
                    };
                    let mut order: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        order.swap(i, self.rng.random_range(0..=i));
                    }
                    let before = {
                        let r = rig.lock().await;
                        let lab = r.lab.as_ref().expect("lab");
                        let before = lab.dropped();
                        match fault {
                            Fault::IsolateLeader => lab.isolate(l),
                            Fault::MajorityMinority => {
                                let (minority, majority) = order.split_at(n / 2);
                                lab.partition(&[minority.to_vec(), majority.to_vec()]);
                            }
                            Fault::OneWay => {
                                let f = (l + 1 + self.rng.random_range(0..n - 1)) % n;
                                if self.rng.random_bool(0.5) {
                                    lab.cut_one_way(l, f);
                                } else {
                                    lab.cut_one_way(f, l);
                                }
                            }
                            Fault::PacketLoss => lab.lossy(self.rng.random_range(20..45)),
                            _ => {
                                // The leader on one side, so that its traffic to
                                // the other side is cut (and counted).
                                if order[n / 2] == l {
                                    order.swap(n / 2, 0);
                                }
                                let (a, rest) = order.split_at(n / 2);
                                let (bridge, b) = rest.split_first().unwrap();
                                lab.bridge(a, *bridge, b);
                            }
                        }
                        eprintln!("  partition: {}", lab.describe());
                        before
                    };
                    tokio::time::sleep(hold).await;
                    if fault == Fault::IsolateLeader {
                        // Still cut off: the others may need a few more election
                        // rounds (a CI run had none elected at the hold's end,
                        // its vote calls timing out while TCP backed off).
                        let replaced = new_leader(&api, l, Duration::from_secs(5)).await;
                        self.prove(fault, replaced.is_some(), "leader replaced");
                    }
                    let r = rig.lock().await;
                    let lab = r.lab.as_ref().unwrap();
                    let dropped = lab.dropped() > before;
                    lab.heal();
                    drop(r);
                    if !dropped && attempt < attempts {
                        let now = crate::rig::leader(&api).await;
                        if now.is_some_and(|now| now != l) {
                            eprintln!("  the leader moved from {l} during the cut: aimed again");
                            *self.seen.entry("one-way re-aimed").or_default() += 1;
                            continue;
                        }
                    }
                    self.prove(fault, dropped, "packets dropped");
                    break;
                }
            }
            Fault::Flapping => {
                let until = tokio::time::Instant::now() + hold * 2;
                let before = rig.lock().await.lab.as_ref().unwrap().dropped();
                while tokio::time::Instant::now() < until {
                    let i = self.rng.random_range(0..n);
                    {
                        let r = rig.lock().await;
                        let lab = r.lab.as_ref().unwrap();
                        lab.isolate(i);
                    }
                    let on = self.rng.random_range(150..700);
                    tokio::time::sleep(Duration::from_millis(on)).await;
                    rig.lock().await.lab.as_ref().unwrap().heal();
                    let off = self.rng.random_range(100..500);
                    tokio::time::sleep(Duration::from_millis(off)).await;
                    *self.seen.entry("flaps").or_default() += 1;
                }
                let dropped = rig.lock().await.lab.as_ref().unwrap().dropped() > before;
                self.prove(fault, dropped, "packets dropped");
            }
            Fault::ClockSkew => {
                // Mostly the leader's clock: it stamps every command.
                let i = if self.rng.random_bool(0.7) {
                    wait_leader(&api, Duration::from_secs(10)).await
                } else {
                    self.rng.random_range(0..n)
                };
                let until = tokio::time::Instant::now() + hold * 2;
                // Evidence: the node's wall clock (Status) reads ahead.
                let skewed = set_clock(rig, &api[i], i, SKEW_SECS as i64, until, |a| {
                    a > SKEW_SECS as i64 * 1_000 - 500
                })
                .await;
                self.prove(fault, skewed, "wall clock skewed");
                tokio::time::sleep_until(until).await;
                let r = rig.lock().await;
                std::fs::write(&r.clock_files[i], "+0\n").unwrap();
                self.skewed_ms += (hold * 2).as_millis() as u64 + 1_000;
            }
            Fault::ClockJump => {
                let leader = wait_leader(&api, Duration::from_secs(10)).await;
                let i = if self.rng.random_bool(0.5) {
                    leader
                } else {
                    (leader + 1 + self.rng.random_range(0..n - 1)) % n
                };
                let secs: i64 = if self.rng.random_bool(0.5) {
                    JUMP_SECS
                } else {
                    -JUMP_SECS
                };
                let until = tokio::time::Instant::now() + hold * 2;
                // Evidence: the node's wall clock (Status) reads hours off.
                let jumped = set_clock(rig, &api[i], i, secs, until, |o| {
                    o.signum() == secs.signum() && o.abs() > 3_600_000
                })
                .await;
                let what = match (i == leader, secs > 0) {
                    (true, true) => "leader's clock jumped forward",
                    (true, false) => "leader's clock jumped back",
                    (false, true) => "follower's clock jumped forward",
                    (false, false) => "follower's clock jumped back",
                };
                self.prove(fault, jumped, what);
                tokio::time::sleep_until(until).await;
                let r = rig.lock().await;
                std::fs::write(&r.clock_files[i], "+0\n").unwrap();
                self.skewed_ms += (hold * 2).as_millis() as u64 + 1_000;
            }
            Fault::DiskFull => {
                let (i, filler, log_before) = {
                    let r = rig.lock().await;
                    let i = r.tmpfs_node.unwrap();
                    (
                        i,
                        r.cluster.data_dir(i).join("filler"),
                        r.cluster.log_len(i),
                    )
                };
                fill(&filler);
                let until = tokio::time::Instant::now() + hold;
                outgrow_log_room(rig, &api, i, until).await;
                tokio::time::sleep_until(until).await;
                let _ = std::fs::remove_file(&filler);
                let mut r = rig.lock().await;
                // Only what the node logged during this fault counts.
                let refused = r
                    .cluster
                    .logged_since(i, log_before)
                    .contains("No space left");
                let exited = r.cluster.exited(i);
                if exited {
                    // The node exits when its storage fails (crash-only);
                    // with space again it restarts from what is durable.
                    r.cluster.start_node(i);
                }
                drop(r);
                self.prove(fault, refused, "disk refused writes");
                self.prove(fault, exited, "node exited on full disk");
            }
            Fault::SlowDisk | Fault::FsyncEio => {
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                let i = if self.rng.random_bool(0.5) {
                    l
                } else {
                    self.rng.random_range(0..n)
                };
                let (control, normal) = {
                    let r = rig.lock().await;
                    (r.fsync_controls[i].clone(), r.fsync_normal)
                };
                let mut taken = control.clone().into_os_string();
                taken.push(".taken");
                let _ = std::fs::remove_file(&taken);
                let order = if fault == Fault::SlowDisk {
                    format!("delay {}\n", self.rng.random_range(1_000..2_500))
                } else {
                    "eio\n".to_string()
                };
                std::fs::write(&control, order).unwrap();
                tokio::time::sleep(hold).await;
                // A node installing a snapshot fsyncs no log for a while:
                // keep the fault on until it strikes (or 10 s more).
                let struck = || std::fs::metadata(&taken).is_ok_and(|m| m.len() > 0);
                let deadline = Instant::now() + Duration::from_secs(10);
                while !struck() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                std::fs::write(&control, normal).unwrap();
                let struck = struck();
                self.prove(fault, struck, "fsync stalled or failed");
                if fault == Fault::FsyncEio {
                    // Crash-only: a node whose fsync failed must stop, not
                    // carry on over pages the kernel may have dropped.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut exited = false;
                    while !exited && Instant::now() < deadline {
                        exited = rig.lock().await.cluster.exited(i);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    self.prove(fault, exited, "node exited on EIO");
                    let mut r = rig.lock().await;
                    if r.cluster.pid(i).is_none() {
                        r.cluster.start_node(i);
                    }
                }
            }
            Fault::SnapshotCorrupt => {
                // A node with a snapshot: one is built every 300 entries.
                let deadline = Instant::now() + Duration::from_secs(30);
                let i = loop {
                    let with: Vec<usize> = {
                        let r = rig.lock().await;
                        (0..n)
                            .filter(|i| newest_snapshot(&r.cluster.data_dir(*i)).is_some())
                            .collect()
                    };
                    if !with.is_empty() || Instant::now() > deadline {
                        break with
                            .get(self.rng.random_range(0..with.len().max(1)))
                            .copied();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                };
                let Some(i) = i else {
                    self.prove(fault, false, "snapshot byte flipped");
                    return;
                };
                let mut r = rig.lock().await;
                self.kill(&mut r, fault, i);
                let data = r.cluster.data_dir(i);
                let flipped = newest_snapshot(&data).is_some_and(|p| {
                    std::fs::read(&p).is_ok_and(|mut b| {
                        let at = b.len() / 2;
                        b[at] ^= 0x10;
                        std::fs::write(&p, b).is_ok()
                    })
                });
                self.prove(fault, flipped, "snapshot byte flipped");
                r.cluster.start_node(i);
                drop(r);
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut refused = false;
                while !refused && Instant::now() < deadline {
                    refused = std::fs::read_dir(data.join("snapshots"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(".refused"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let up = !rig.lock().await.cluster.exited(i);
                self.prove(fault, refused && up, "damaged snapshot set aside, node up");
            }
            Fault::SledCorrupt => {
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                let i = (l + 1 + self.rng.random_range(0..n - 1)) % n;
                let mut r = rig.lock().await;
                self.kill(&mut r, fault, i);
                let db = r.cluster.data_dir(i).join("sled").join("db");
                let log_before = r.cluster.log_len(i);
                let tail = self.rng.random_bool(0.5);
                let flipped = std::fs::read(&db).is_ok_and(|mut b| {
                    let len = b.len();
                    let at = match (tail, len) {
                        (_, 0) => return false,
                        (true, _) => len - 1 - self.rng.random_range(0..len.min(64 * 1024)),
                        (false, _) => self.rng.random_range(0..len),
                    };
                    b[at] ^= 1 << self.rng.random_range(0..8);
                    std::fs::write(&db, b).is_ok()
                });
                self.prove(fault, flipped, "sled byte flipped");
                r.cluster.start_node(i);
                drop(r);
                // Up and serving, or gone with the remedy in its log.
                let deadline = Instant::now() + Duration::from_secs(15);
                let (mut exited, mut serving) = (false, false);
                while !exited && !serving && Instant::now() < deadline {
                    exited = rig.lock().await.cluster.exited(i);
                    serving = status(&api[i]).await.is_some();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if serving {
                    *self
                        .seen
                        .entry("node started over a damaged sled")
                        .or_default() += 1;
                    return self.count(fault);
                }
                let said = rig
                    .lock()
                    .await
                    .cluster
                    .logged_since(i, log_before)
                    .contains("add the node back as a new member");
                self.prove(
                    fault,
                    exited && said,
                    "node refused a damaged sled, naming the remedy",
                );
                let id = i as u64 + 1;
                let others: Vec<u64> = (1..=n as u64).filter(|x| *x != id).collect();
                set_voters(&api, &others).await;
                self.readd(rig, fault, i).await;
            }
            Fault::LogCorruptTail | Fault::LogCorruptMid | Fault::LogDamagedTail => {
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                let i = (l + 1 + self.rng.random_range(0..n - 1)) % n;
                let mut r = rig.lock().await;
                self.kill(&mut r, fault, i);
                let mid = fault == Fault::LogCorruptMid;
                let damage = match fault {
                    Fault::LogCorruptMid => Damage::Mid,
                    Fault::LogDamagedTail => Damage::LastRecord,
                    _ => Damage::TornTail,
                };
                let flipped = flip_log_byte(&r.cluster.data_dir(i), damage);
                self.prove(fault, flipped, "log byte flipped");
                r.cluster.start_node(i);
                drop(r);
                if fault == Fault::LogDamagedTail {
                    // It says it cut a record it may have acknowledged, and
                    // votes again once it holds the entry (at once, if its
                    // state machine had applied it before the kill).
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let (mut said, mut rejoined) = (false, false);
                    while !(said && rejoined) && Instant::now() < deadline {
                        let log = rig.lock().await.cluster.logged_since(i, 0);
                        said = log.contains("cutting a damaged log record");
                        rejoined = status(&api[i])
                            .await
                            .is_some_and(|s| s.rejoin_until.is_none());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    self.prove(fault, said, "node cut a damaged acknowledged record");
                    self.prove(fault, rejoined, "node votes again after regaining it");
                } else if !mid {
                    tokio::time::sleep(hold / 2).await;
                    let up = !rig.lock().await.cluster.exited(i);
                    self.prove(fault, up, "node restarted over a torn tail");
                } else {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut refused = false;
                    while !refused && Instant::now() < deadline {
                        refused = rig.lock().await.cluster.exited(i);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let log = rig.lock().await.cluster.logged_since(i, 0);
                    let said = log.contains("add the node back as a new member");
                    self.prove(fault, refused && said, "node refused a damaged log");
                    // The remedy the message names: wipe it, add it back.
                    let id = i as u64 + 1;
                    let others: Vec<u64> = (1..=n as u64).filter(|x| *x != id).collect();
                    set_voters(&api, &others).await;
                    self.readd(rig, fault, i).await;
                }
            }
            Fault::Membership | Fault::MembershipCrash | Fault::InstallCrash => {
                self.membership(rig, fault).await
            }
        }
        self.count(fault);
    }

    fn count(&mut self, fault: Fault) {
        *self.counts.entry(fault).or_default() += 1;
    }

    /// Wipe node `r` (no longer a voter), start it empty, add it back as a
    /// learner and make every node a voter again. With `MembershipCrash`
    /// the leader is killed while the voters change.
    async fn readd(&mut self, rig: &Arc<tokio::sync::Mutex<Rig>>, fault: Fault, r: usize) {
        let (api, peer) = {
            let g = rig.lock().await;
            (g.cluster.api.clone(), g.cluster.peer.clone())
        };
        let n = api.len();
        let all: Vec<u64> = (1..=n as u64).collect();
        let id = r as u64 + 1;
        {
            let mut g = rig.lock().await;
            g.cluster.kill9(r);
            let d = g.cluster.data_dir(r);
            let _ = std::fs::remove_dir_all(&d);
            g.cluster.init = false;
            g.cluster.start_node(r);
        }
        let (a, p) = (api[r].clone(), peer[r].clone());
        let control = rig.lock().await.fsync_controls[r].clone();
        if fault == Fault::InstallCrash {
            // Each fsync of the node's received snapshot takes 1.5 s.
            std::fs::write(&control, "delay 1500\n").unwrap();
        }
        let add = {
            let api = api.clone();
            tokio::spawn(async move {
                cluster_call(&api, |mut c| {
                    let (a, p) = (a.clone(), p.clone());
                    async move {
                        c.add_learner(api::AddLearnerRequest {
                            id,
                            api_addr: a,
                            raft_addr: p,
                        })
                        .await
                    }
                })
                .await
            })
        };
        if fault == Fault::InstallCrash {
            let snapshots = rig.lock().await.cluster.data_dir(r).join("snapshots");
            let installing = || {
                std::fs::read_dir(&snapshots)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while !installing() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut g = rig.lock().await;
            g.cluster.kill9(r);
            // Dead, with the install's file still there: it was cut short.
            self.prove(fault, installing(), "node killed during a snapshot install");
            let _ = std::fs::write(&control, "");
            tokio::time::sleep(Duration::from_millis(300)).await;
            g.cluster.start_node(r);
        }
        add.await.expect("add learner");
        if fault == Fault::MembershipCrash {
            // Kill the leader a moment into the change (joint consensus
            // under way), then bring it back; the change must still finish.
            // The leader is found first: the change takes only a few ms,
            // and a status round between starting it and the kill could
            // outlast it.
            let l = wait_leader(&api, Duration::from_secs(10)).await;
            let change = {
                let api = api.clone();
                let all = all.clone();
                tokio::spawn(async move { set_voters(&api, &all).await })
            };
            // Let the change's first call go out, then kill at once.
            tokio::task::yield_now().await;
            let during = !change.is_finished();
            self.kill(&mut *rig.lock().await, fault, l);
            // Counted, and asserted over the run: one kill may come late.
            if during {
                *self
                    .seen
                    .entry("leader killed during the change")
                    .or_default() += 1;
            }
            // With two voters left before the change, none can be elected
            // without it: it comes back soon, as an operator would bring it.
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(200..1_000))).await;
            rig.lock().await.cluster.start_node(l);
            change.await.expect("membership change");
        } else {
            set_voters(&api, &all).await;
        }
        let back = voters(&api).await.is_some_and(|v| v == all);
        self.prove(fault, back, "node added back");
        // The wiped node learnt the state: from a snapshot when the
        // leader's log no longer starts at 1 (it keeps 100 entries behind
        // a snapshot taken every 300); after an install cut short, from the
        // one sent again.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut sent = false;
        while !sent && Instant::now() < deadline {
            sent = status(&api[r]).await.is_some_and(|s| s.snapshot_index > 0);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if sent {
            *self
                .seen
                .entry("snapshot sent to the wiped node")
                .or_default() += 1;
        }
    }

    /// Remove a follower, wipe it, start it empty, add it back as a learner
    /// and make it a voter again; all while the workload runs. With
    /// `MembershipCrash` the leader is killed while the voters change.
    async fn membership(&mut self, rig: &Arc<tokio::sync::Mutex<Rig>>, fault: Fault) {
        let api = rig.lock().await.cluster.api.clone();
        let n = api.len();
        let all: Vec<u64> = (1..=n as u64).collect();
        let l = wait_leader(&api, Duration::from_secs(10)).await;
        let r = (l + 1 + self.rng.random_range(0..n - 1)) % n;
        let id = r as u64 + 1;
        let others: Vec<u64> = all.iter().copied().filter(|x| *x != id).collect();
        set_voters(&api, &others).await;
        let out = voters(&api).await.is_some_and(|v| v == others);
        self.prove(fault, out, "node removed");
        if fault == Fault::InstallCrash {
            // A snapshot far enough on that the leader's log no longer
            // starts at 1 (it keeps 100 entries behind one): the wiped
            // node can only get the state from a snapshot.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                let c = Client::new([&api[l]]).expect("client");
                let _ = c
                    .cluster()
                    .trigger_snapshot(api::TriggerSnapshotRequest {})
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let far = status(&api[l])
                    .await
                    .is_some_and(|s| s.snapshot_index > 150);
                if far || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        }
        self.readd(rig, fault, r).await;
    }
}

/// What a power cut leaves of a dead node's log: each segment cut back to
/// the length its last fsync covered (the node's fsync ledger, see
/// `idemkv::store::test_hooks`), a segment never fsynced removed. Returns
/// the bytes dropped, or None when the node kept no ledger.
fn lose_unsynced(data: &std::path::Path, ledger: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(ledger).ok()?;
    let mut synced: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        if let Some((path, len)) = line.rsplit_once('\t') {
            if let Ok(len) = len.parse() {
                synced.insert(path.to_string(), len);
            }
        }
    }
    if synced.is_empty() {
        return None;
    }
    let mut dropped = 0;
    for entry in std::fs::read_dir(data.join("log")).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "seg") {
            continue;
        }
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        // Records' bytes, not the zero-filled room after them.
        let records = std::fs::read(&path)
            .map(|b| {
                idemkv::store::log_record_spans(&b)
                    .last()
                    .map_or(0, |(at, l)| at + l)
            })
            .unwrap_or(0) as u64;
        match synced.get(&path.display().to_string()) {
            Some(&keep) if keep < len => {
                let f = std::fs::OpenOptions::new().write(true).open(&path).ok()?;
                f.set_len(keep).ok()?;
                dropped += records.saturating_sub(keep);
            }
            Some(_) => {}
            None => {
                std::fs::remove_file(&path).ok()?;
                dropped += records;
            }
        }
    }
    Some(dropped)
}

/// Put the copy of a killed node's sled directory taken at its last sled
/// fsync (named by `<ledger>.sled`, see `src/store/test_hooks.rs`) in place
/// of the directory: what sled wrote since may all be lost in a power cut.
/// Copies no longer named are removed. False if there is no copy.
fn roll_sled_back(data: &std::path::Path, ledger: &std::path::Path) -> bool {
    let with = |suffix: &str| {
        let mut p = ledger.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let Ok(named) = std::fs::read_to_string(with(".sled")) else {
        return false;
    };
    let copy = std::path::PathBuf::from(named);
    if !copy.is_dir() {
        return false;
    }
    let sled = data.join("sled");
    if std::fs::remove_dir_all(&sled).is_err()
        || idemkv::store::test_hooks::copy_dir(&copy, &sled).is_err()
    {
        return false;
    }
    let prefix = with(".sled-");
    let (dir, stem) = (prefix.parent().unwrap(), prefix.file_name().unwrap());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let ours = e
            .file_name()
            .to_string_lossy()
            .starts_with(&*stem.to_string_lossy());
        if ours && p != copy {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    true
}

/// The newest snapshot file in a node's data directory.
fn newest_snapshot(data: &std::path::Path) -> Option<std::path::PathBuf> {
    let mut snaps: Vec<std::path::PathBuf> = std::fs::read_dir(data.join("snapshots"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    snaps.sort();
    snaps.pop()
}

#[derive(Clone, Copy, PartialEq)]
enum Damage {
    /// Half a record appended after the last one: a torn write.
    TornTail,
    /// A payload byte flipped in the last record, which was acknowledged.
    LastRecord,
    /// A payload byte flipped in a record with valid records after it.
    Mid,
}

/// Damage a stopped node's newest log segment. Records are `[len u32][crc
/// u32][payload][end byte]` (`idemkv::store::log_record_spans` finds them).
fn flip_log_byte(data: &std::path::Path, damage: Damage) -> bool {
    let Ok(dir) = std::fs::read_dir(data.join("log")) else {
        return false;
    };
    let mut segs: Vec<std::path::PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let Some(last) = segs.last() else {
        return false;
    };
    let Ok(mut bytes) = std::fs::read(last) else {
        return false;
    };
    // (offset, whole record length)
    let records = idemkv::store::log_record_spans(&bytes);
    let Some(&(last_at, last_len)) = records.last() else {
        return false;
    };
    if damage == Damage::TornTail {
        // As a crash during an (unacknowledged) append leaves it, in a
        // segment without zero-filled room after its records.
        let torn = bytes[last_at..last_at + last_len / 2].to_vec();
        bytes.truncate(last_at + last_len);
        bytes.extend_from_slice(&torn);
        return std::fs::write(last, bytes).is_ok();
    }
    let (at, len) = match (damage, records.len()) {
        (Damage::LastRecord, _) => (last_at, last_len),
        (_, k) if k >= 3 => records[k / 2],
        _ => return false,
    };
    bytes[at + 8 + (len - 9) / 2] ^= 0x40;
    std::fs::write(last, bytes).is_ok()
}

/// The voters the leader reports, sorted.
async fn voters(api: &[String]) -> Option<Vec<u64>> {
    let l = wait_leader(api, Duration::from_secs(20)).await;
    let s = status(&api[l]).await?;
    let mut v: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    v.sort();
    Some(v)
}

/// A node other than `old` that says it leads, waiting up to `within`.
/// The leader once every node answers and follows it in its term (no node
/// is still campaigning with a higher one); after `within`, the leader a
/// majority follows.
async fn settled_leader(api: &[String], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(l) = crate::rig::leader_followed_by(api, api.len()).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_leader(api, Duration::from_secs(10)).await
}

async fn new_leader(api: &[String], old: usize, within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    loop {
        for (i, a) in api.iter().enumerate() {
            if i != old && status(a).await.is_some_and(|s| s.role == "leader") {
                return Some(i);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Make exactly `voters` the voting members.
async fn set_voters(api: &[String], voters: &[u64]) {
    cluster_call(api, |mut c| {
        let voters = voters.to_vec();
        async move {
            c.change_membership(api::ChangeMembershipRequest {
                voters,
                retain: false,
            })
            .await
        }
    })
    .await;
}

/// A Cluster RPC on the current leader, retried across leader changes.
async fn cluster_call<F, Fut>(api: &[String], call: F)
where
    F: Fn(api::cluster_client::ClusterClient<idemkv::client::Transport>) -> Fut,
    Fut: std::future::Future<
        Output = Result<tonic::Response<api::MembershipResponse>, tonic::Status>,
    >,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = wait_leader(api, Duration::from_secs(20)).await;
        let c = Client::new([&api[l]]).expect("client");
        match tokio::time::timeout(Duration::from_secs(20), call(c.cluster())).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => eprintln!("  membership call: {e}; retrying"),
            Err(_) => eprintln!("  membership call timed out; retrying"),
        }
        assert!(
            Instant::now() < deadline,
            "membership change did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Make node `i`, whose disk is full, need more disk than it has.
///
/// A full disk alone may not stop a node at once: its Raft log keeps a
/// zero-filled room (`ZEROED_AHEAD` bytes) ahead of its appends, already
/// allocated, so small writes still land. A result of the largest size the
/// spec allows (1 MiB) is bigger than that room, so such a Complete makes
/// the log grow its file. They go to keys of their own namespace, outside
/// the checked history, kept the shortest retention, and at most a few per
/// fault so the records do not outgrow the small disk. Returns once the
/// node's process has ended, or at `until`.
async fn outgrow_log_room(
    rig: &Arc<tokio::sync::Mutex<Rig>>,
    api: &[String],
    i: usize,
    until: tokio::time::Instant,
) {
    const NS: &str = "robust-disk-full";
    let Some(pid) = rig.lock().await.cluster.pid(i) else {
        return;
    };
    let ended = || !procs::running(pid);
    let opts = idemkv::client::ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry_for: Duration::from_secs(2),
        ..Default::default()
    };
    let client = Client::with_options(api, opts).expect("client");
    let result = vec![b'r'; idemkv::store::ZEROED_AHEAD as usize];
    for _ in 0..3 {
        if ended() || tokio::time::Instant::now() >= until {
            return;
        }
        let key = format!("filler-{}", uuid::Uuid::new_v4()).into_bytes();
        let claim = api::ClaimRequest {
            namespace: NS.into(),
            key: key.clone(),
            owner: "nemesis".into(),
            lease_ms: 10_000,
            retention_ms: 1_000,
            ..Default::default()
        };
        if let Ok(api::claim_response::Outcome::Acquired(a)) = client.claim(claim).await {
            let complete = api::CompleteRequest {
                namespace: NS.into(),
                key,
                token: a.token,
                result: result.clone(),
                retention_ms: 1_000,
                ..Default::default()
            };
            let _ = client.complete(complete).await;
        }
        // The node fails when the entry reaches it, a moment after.
        let settle = tokio::time::Instant::now() + Duration::from_millis(500);
        while !ended() && tokio::time::Instant::now() < settle.min(until) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Fill the file system holding `path` until it refuses to take more.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}
