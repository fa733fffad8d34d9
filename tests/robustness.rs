//! The robustness suite: real `idemkv serve` processes, concurrent clients
//! recording every operation, faults injected while they run, and the whole
//! history checked afterwards (`robust::checker`).
//!
//! Each `#[test]` is one run with one nemesis (or several mixed). A run
//! prints a summary line (operations, unknown outcomes, faults by kind,
//! anomalies) and, when it fails, keeps its history under
//! `target/tmp/robustness/`. Faults that need root (network partitions, a
//! tmpfs for disk full) or Debian's `faketime` (clock skew) say so and skip
//! where those are missing; `.ci/run` runs as root and installs `faketime`.
//!
//! Longer runs: `IDEMKV_SOAK_SECS=600 cargo test --release --test robustness
//! -- --ignored soak`, and `IDEMKV_CRASH_CYCLES=300` for the crash loop.
mod procs;
mod robust;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemkv::client::{ClientError, ClientOptions};
use idemkv::pb::api::{self, claim_batch_item::Outcome as Item, claim_response::Outcome};
use idemkv::Client;
use procs::ProcCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use robust::checker::{check, Config};
use robust::history::{now_ms, save, Call, Op, Ret, Seen};
use robust::netlab::NetLab;
use tonic::Code;

const NS: &str = "robust";
/// Short leases so that expiry and takeover happen all the time.
const LEASE_MS: u64 = 1_000;
const MAX_ATTEMPTS: u32 = 5;
/// Keys rotate to a fresh generation every so often, which keeps each
/// key's history short enough for the exhaustive search.
const GENERATION: Duration = Duration::from_secs(4);
const KEYS_PER_GENERATION: usize = 5;
const WORKERS: usize = 6;
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
/// How far the clock-skew nemesis moves one node's wall clock.
const SKEW_SECS: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRandom,
    KillLeader,
    PauseLeader,
    IsolateLeader,
    MajorityMinority,
    Bridge,
    ClockSkew,
    DiskFull,
    Membership,
    KillAll,
}

impl Fault {
    fn needs_root(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader | Fault::MajorityMinority | Fault::Bridge | Fault::DiskFull
        )
    }

    fn partitions(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader | Fault::MajorityMinority | Fault::Bridge
        )
    }
}

struct Plan {
    name: &'static str,
    nodes: usize,
    faults: Vec<Fault>,
    duration: Duration,
    /// Quiet time between faults.
    quiet: Duration,
    /// Stop after this many faults instead of after `duration`.
    cycles: Option<usize>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why this plan cannot run here, if it cannot.
fn missing(plan: &Plan) -> Option<String> {
    if plan.faults.iter().any(|f| f.needs_root()) && !is_root() {
        return Some("needs root (network namespaces, iptables, tmpfs)".into());
    }
    if plan.faults.contains(&Fault::ClockSkew) && !std::path::Path::new(FAKETIME_LIB).exists() {
        return Some(format!("needs Debian's faketime ({FAKETIME_LIB})"));
    }
    None
}

// ------------------------------------------------------------------ history

#[derive(Default)]
struct Recorder {
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn push(&self, process: usize, key: &str, call: Call, ret: Ret, invoke_ms: u64, end: u64) {
        let mut ops = self.ops.lock().unwrap();
        let id = ops.len();
        let complete_ms = (ret != Ret::Unknown).then_some(end);
        ops.push(Op {
            id,
            process,
            key: key.to_string(),
            call,
            ret,
            invoke_ms,
            complete_ms,
        });
    }
}

fn seen(r: &api::Record) -> Option<Seen> {
    use api::RecordState as S;
    Some(match S::try_from(r.state).ok()? {
        S::InProgress => Seen::InProgress {
            owner: r.owner.clone(),
            token: r.token,
            deadline_ms: r.lease_deadline_ms,
            attempts: r.attempts,
        },
        S::Available => Seen::Available {
            attempts: r.attempts,
        },
        S::Completed => Seen::Completed {
            token: r.token,
            result: String::from_utf8_lossy(&r.result).into_owned(),
        },
        S::Failed => Seen::Failed {
            attempts: r.attempts,
        },
        S::Unspecified => return None,
    })
}

fn claim_ret(o: Outcome) -> Ret {
    match o {
        Outcome::Acquired(a) => Ret::Acquired {
            token: a.token,
            deadline_ms: a.lease_deadline_ms,
            attempt: a.attempt,
        },
        Outcome::InProgress(p) => Ret::InProgress { owner: p.owner },
        Outcome::Completed(c) => Ret::Completed {
            token: c.token,
            result: String::from_utf8_lossy(&c.result).into_owned(),
        },
        Outcome::Failed(_) => Ret::Failed,
    }
}

/// A definite refusal the model knows, or `Unknown` (timeout, broken
/// connection, no leader: maybe applied). Refusals of valid input are
/// reported as run errors.
fn error_ret(e: &ClientError, errors: &Mutex<Vec<String>>) -> Ret {
    match (e.code(), e.reason()) {
        (Some(Code::FailedPrecondition), Some("LEASE_LOST")) => Ret::LeaseLost,
        (Some(Code::FailedPrecondition), Some("ALREADY_COMPLETED")) => Ret::AlreadyCompleted,
        (Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange), _) => {
            errors
                .lock()
                .unwrap()
                .push(format!("a valid request was refused: {e}"));
            Ret::Unknown
        }
        _ => Ret::Unknown,
    }
}

// ------------------------------------------------------------------ workload

struct Shared {
    rec: Recorder,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
    started: Instant,
    batches: AtomicU64,
}

/// One client per endpoint, no retries inside the library: every attempt
/// is its own recorded operation, and a failed one moves to the next node.
fn worker_clients(api: &[String]) -> Vec<Client> {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(1),
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    api.iter()
        .map(|a| Client::with_options([a], opts.clone()).expect("client"))
        .collect()
}

struct Worker {
    id: usize,
    clients: Vec<Client>,
    at: usize,
    rng: StdRng,
    shared: Arc<Shared>,
    /// (key, token) of the claim this worker holds.
    held: Option<(String, u64)>,
    /// A claim whose outcome is unknown, to retry with the same claim_id.
    unsure: Option<(String, String)>,
    /// The last call failed before reaching any server.
    not_sent: bool,
    /// Unknown outcomes in a row: the worker backs off like a real client
    /// (without it, an outage piles dozens of unknown claims onto one key,
    /// more than the checker's exhaustive search can place).
    unknown_streak: u32,
    n: u64,
}

impl Worker {
    fn owner(&self) -> String {
        format!("w{}", self.id)
    }

    fn client(&self) -> Client {
        self.clients[self.at % self.clients.len()].clone()
    }

    fn pick_key(&mut self) -> String {
        let generation = self.shared.started.elapsed().as_millis() / GENERATION.as_millis();
        let j = self.rng.random_range(0..KEYS_PER_GENERATION);
        format!("g{generation}-k{j}")
    }

    /// Record an outcome; an unknown one sends the next call elsewhere.
    /// A call that never reached a server (no connection) is not recorded:
    /// it cannot have taken effect.
    fn record(&mut self, key: &str, call: Call, ret: Ret, invoke: u64) {
        if ret == Ret::Unknown {
            self.at += 1;
            self.unknown_streak += 1;
        } else {
            self.unknown_streak = 0;
        }
        if std::mem::take(&mut self.not_sent) {
            return;
        }
        self.shared
            .rec
            .push(self.id, key, call, ret, invoke, now_ms());
    }

    fn err(&mut self, e: &ClientError) -> Ret {
        // tonic's words for a connection that could not be made.
        let m = e.message();
        self.not_sent = e.code() == Some(Code::Unavailable)
            && (m.contains("tcp connect error") || m.contains("Connection refused"));
        error_ret(e, &self.shared.errors)
    }

    async fn run(mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.step().await;
            let backoff = match self.unknown_streak {
                0 => 0,
                n => (100u64 << n.min(4)).min(1500),
            };
            let pause = self.rng.random_range(10..120) + backoff;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    async fn step(&mut self) {
        self.n += 1;
        let roll: f64 = self.rng.random();
        if let Some((key, token)) = self.held.clone() {
            if roll < 0.45 {
                self.complete(&key, token).await
            } else if roll < 0.65 {
                self.renew(&key, token).await
            } else if roll < 0.8 {
                self.release(&key, token).await
            } else {
                // Abandon it: the lease runs out and someone takes over.
                self.held = None;
            }
        } else if roll < 0.15 && self.unsure.is_some() {
            let (key, claim_id) = self.unsure.take().unwrap();
            self.claim(key, claim_id).await
        } else if roll < 0.6 {
            let key = self.pick_key();
            self.claim(key, uuid::Uuid::new_v4().to_string()).await
        } else if roll < 0.75 {
            self.get().await
        } else if roll < 0.87 {
            self.wait().await
        } else {
            self.batch().await
        }
    }

    async fn claim(&mut self, key: String, claim_id: String) {
        let call = Call::Claim {
            owner: self.owner(),
            claim_id: claim_id.clone(),
            lease_ms: LEASE_MS,
            batch: None,
        };
        let req = api::ClaimRequest {
            namespace: NS.into(),
            key: key.clone().into_bytes(),
            owner: self.owner(),
            claim_id: claim_id.clone(),
            lease_ms: LEASE_MS,
            max_attempts: MAX_ATTEMPTS,
            ..Default::default()
        };
        let t = now_ms();
        let ret = match self.client().claim(req).await {
            Ok(o) => claim_ret(o),
            Err(e) => self.err(&e),
        };
        match &ret {
            Ret::Acquired { token, .. } => self.held = Some((key.clone(), *token)),
            Ret::Unknown => self.unsure = Some((key.clone(), claim_id)),
            _ => {}
        }
        self.record(&key, call, ret, t);
    }

    async fn complete(&mut self, key: &str, token: u64) {
        let result = format!("w{}-{}", self.id, self.n);
        let call = Call::Complete {
            token,
            result: result.clone(),
        };
        let req = api::CompleteRequest {
            namespace: NS.into(),
            key: key.as_bytes().to_vec(),
            token,
            result: result.into_bytes(),
            ..Default::default()
        };
        let t = now_ms();
        let ret = match self.client().complete(req).await {
            Ok(_) => Ret::Done,
            Err(e) => self.err(&e),
        };
        // After an unknown outcome the holder tries again (another result:
        // the model accepts either ALREADY_COMPLETED or success).
        if ret != Ret::Unknown {
            self.held = None;
        }
        self.record(key, call, ret, t);
    }

    async fn renew(&mut self, key: &str, token: u64) {
        let call = Call::Renew {
            token,
            lease_ms: LEASE_MS,
        };
        let req = api::RenewRequest {
            namespace: NS.into(),
            key: key.as_bytes().to_vec(),
            token,
            lease_ms: LEASE_MS,
            ..Default::default()
        };
        let t = now_ms();
        let ret = match self.client().renew(req).await {
            Ok(r) => Ret::Renewed {
                deadline_ms: r.lease_deadline_ms,
            },
            Err(e) => self.err(&e),
        };
        if ret == Ret::LeaseLost {
            self.held = None;
        }
        self.record(key, call, ret, t);
    }

    async fn release(&mut self, key: &str, token: u64) {
        let call = Call::Release { token };
        let req = api::ReleaseRequest {
            namespace: NS.into(),
            key: key.as_bytes().to_vec(),
            token,
            error: "worker failed".into(),
        };
        let t = now_ms();
        let ret = match self.client().release(req).await {
            Ok(r) => Ret::Released {
                failed: r.state == api::RecordState::Failed as i32,
            },
            Err(e) => self.err(&e),
        };
        if ret != Ret::Unknown {
            self.held = None;
        }
        self.record(key, call, ret, t);
    }

    async fn get(&mut self) {
        let key = self.pick_key();
        let req = api::GetRequest {
            namespace: NS.into(),
            key: key.clone().into_bytes(),
            consistency: api::Consistency::Linearizable as i32,
        };
        let t = now_ms();
        let ret = match self.client().get(req).await {
            Ok(r) => Ret::Record(r.as_ref().and_then(seen)),
            Err(e) => self.err(&e),
        };
        self.record(&key, Call::Read, ret, t);
    }

    async fn wait(&mut self) {
        let key = self.pick_key();
        let req = api::AwaitRequest {
            namespace: NS.into(),
            key: key.clone().into_bytes(),
            timeout_ms: 300,
        };
        let t = now_ms();
        let ret = match self.client().r#await(req).await {
            Ok(r) => Ret::Record(r.record.as_ref().and_then(seen)),
            Err(e) if e.code() == Some(Code::NotFound) => Ret::Record(None),
            Err(e) => self.err(&e),
        };
        self.record(&key, Call::Read, ret, t);
    }

    async fn batch(&mut self) {
        let a = self.pick_key();
        let mut b = self.pick_key();
        while b == a {
            b = self.pick_key();
        }
        let all_or_nothing = self.rng.random_bool(0.5);
        let id = self.shared.batches.fetch_add(1, Ordering::Relaxed);
        let keys = [a, b];
        let claim_ids: Vec<String> = keys
            .iter()
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        let items = keys
            .iter()
            .zip(&claim_ids)
            .map(|(k, c)| api::ClaimRequest {
                namespace: NS.into(),
                key: k.clone().into_bytes(),
                owner: self.owner(),
                claim_id: c.clone(),
                lease_ms: LEASE_MS,
                max_attempts: MAX_ATTEMPTS,
                ..Default::default()
            })
            .collect();
        let t = now_ms();
        let res = self
            .client()
            .claim_batch(api::ClaimBatchRequest {
                items,
                all_or_nothing,
            })
            .await;
        let rets: Vec<Ret> = match res {
            Ok(r) if r.items.len() == keys.len() => r
                .items
                .into_iter()
                .map(|i| match i.outcome {
                    Some(Item::Acquired(a)) => claim_ret(Outcome::Acquired(a)),
                    Some(Item::InProgress(p)) => claim_ret(Outcome::InProgress(p)),
                    Some(Item::Completed(c)) => claim_ret(Outcome::Completed(c)),
                    Some(Item::Failed(f)) => claim_ret(Outcome::Failed(f)),
                    Some(Item::Error(e)) if e.reason == "NOT_ATTEMPTED" => Ret::NotAttempted,
                    other => {
                        self.shared
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("unexpected batch item {other:?}"));
                        Ret::Unknown
                    }
                })
                .collect(),
            Ok(r) => {
                self.shared
                    .errors
                    .lock()
                    .unwrap()
                    .push(format!("batch of 2 answered {} items", r.items.len()));
                vec![Ret::Unknown, Ret::Unknown]
            }
            Err(e) => {
                let ret = self.err(&e);
                vec![ret.clone(), ret]
            }
        };
        for ((key, claim_id), ret) in keys.iter().zip(claim_ids).zip(rets) {
            // Hold the first acquired key; the other lease runs out.
            if let (None, Ret::Acquired { token, .. }) = (&self.held, &ret) {
                self.held = Some((key.clone(), *token));
            }
            let call = Call::Claim {
                owner: self.owner(),
                claim_id,
                lease_ms: LEASE_MS,
                batch: Some(id),
            };
            self.record(key, call, ret, t);
        }
    }
}

// ------------------------------------------------------------------ cluster

struct Rig {
    cluster: ProcCluster,
    lab: Option<NetLab>,
    /// Per node: libfaketime's offset file ("+0" or "+3s").
    clock_files: Vec<PathBuf>,
    /// The node whose data dir is a small tmpfs (disk-full nemesis).
    tmpfs_node: Option<usize>,
    /// Removed when the run passes; kept (logs, data) when it panics.
    dir: Option<tempfile::TempDir>,
}

impl Rig {
    fn start(plan: &Plan) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = plan.nodes;
        let lab = if plan.faults.iter().any(|f| f.partitions()) {
            Some(NetLab::new(n).expect("network lab (root)"))
        } else {
            None
        };
        let hosts: Vec<String> = match &lab {
            Some(l) => (0..n).map(|i| l.ip(i)).collect(),
            None => vec!["127.0.0.1".to_string(); n],
        };
        let config = "heartbeat_ms = 100\nsnapshot_every = 300\nsnapshot_keep_logs = 100\n";
        let mut cluster = ProcCluster::on_hosts(dir.path(), &hosts, config);
        if let Some(l) = &lab {
            for i in 0..n {
                cluster.wrap[i] = l.exec_prefix(i);
            }
        }
        let mut clock_files = Vec::new();
        if plan.faults.contains(&Fault::ClockSkew) {
            for i in 0..n {
                let f = dir.path().join(format!("clock-{}", i + 1));
                std::fs::write(&f, "+0\n").unwrap();
                cluster.envs[i] = vec![
                    ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
                    ("FAKETIME_TIMESTAMP_FILE".into(), f.display().to_string()),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                    ("FAKETIME_CACHE_DURATION".into(), "1".into()),
                ];
                clock_files.push(f);
            }
        }
        let tmpfs_node = plan.faults.contains(&Fault::DiskFull).then(|| {
            let i = n - 1;
            let d = cluster.data_dir(i);
            std::fs::create_dir_all(&d).unwrap();
            run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=96m",
                    "tmpfs",
                    &d.display().to_string(),
                ],
            );
            i
        });
        cluster.start_all();
        Rig {
            cluster,
            lab,
            clock_files,
            tmpfs_node,
            dir: Some(dir),
        }
    }

    /// Every node running, no partition, no skew, no full disk.
    fn heal_all(&mut self) {
        if let Some(l) = &self.lab {
            l.heal();
        }
        for f in &self.clock_files {
            std::fs::write(f, "+0\n").unwrap();
        }
        if let Some(i) = self.tmpfs_node {
            let _ = std::fs::remove_file(self.cluster.data_dir(i).join("filler"));
        }
        for i in 0..self.cluster.api.len() {
            self.cluster.signal(i, "-CONT");
            if self.cluster.exited(i) || self.cluster.pid(i).is_none() {
                self.cluster.start_node(i);
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cluster.kill9_all();
        if let Some(i) = self.tmpfs_node {
            let d = self.cluster.data_dir(i).display().to_string();
            let _ = std::process::Command::new("umount")
                .args(["-l", &d])
                .status();
        }
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                eprintln!("kept the run's logs and data in {}", d.keep().display());
            }
        }
    }
}

fn run(prog: &str, args: &[&str]) {
    let out = std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node that says it leads, if one answers within half a second.
async fn leader(api: &[String]) -> Option<usize> {
    let opts = ClientOptions {
        request_timeout: Duration::from_millis(500),
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    for (i, a) in api.iter().enumerate() {
        let c = Client::with_options([a], opts.clone()).ok()?;
        if let Ok(s) = c.status().await {
            if s.role == "leader" {
                return Some(i);
            }
        }
    }
    None
}

async fn wait_leader(api: &[String], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = leader(api).await {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ready(rig: &Rig, within: Duration) {
    if let Err(e) = rig.cluster.client().wait_ready(within).await {
        panic!(
            "cluster not ready: {e}; logs in {}",
            rig.cluster.dir.display()
        );
    }
}

// ------------------------------------------------------------------ nemeses

struct Nemesis {
    rng: StdRng,
    counts: BTreeMap<Fault, usize>,
    /// Evidence that faults took effect (printed in the summary).
    seen: BTreeMap<&'static str, usize>,
}

impl Nemesis {
    async fn inject(&mut self, rig: &Arc<tokio::sync::Mutex<Rig>>, fault: Fault) {
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
                rig.lock().await.cluster.kill9(i);
                tokio::time::sleep(hold / 2).await;
                rig.lock().await.cluster.start_node(i);
            }
            Fault::KillAll => {
                wait_ready(&*rig.lock().await, Duration::from_secs(30)).await;
                tokio::time::sleep(Duration::from_millis(self.rng.random_range(300..1_200))).await;
                let mut r = rig.lock().await;
                r.cluster.kill9_all();
                r.cluster.start_all();
            }
            Fault::PauseLeader => {
                // Longer than the election timeout (800 ms) and the lease.
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                rig.lock().await.cluster.signal(l, "-STOP");
                tokio::time::sleep(hold.max(Duration::from_millis(2_500))).await;
                self.note_new_leader(&api, l).await;
                rig.lock().await.cluster.signal(l, "-CONT");
            }
            Fault::IsolateLeader | Fault::MajorityMinority | Fault::Bridge => {
                let l = wait_leader(&api, Duration::from_secs(10)).await;
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, self.rng.random_range(0..=i));
                }
                {
                    let r = rig.lock().await;
                    let lab = r.lab.as_ref().expect("lab");
                    match fault {
                        Fault::IsolateLeader => lab.isolate(l),
                        Fault::MajorityMinority => {
                            let (minority, majority) = order.split_at(n / 2);
                            lab.partition(&[minority.to_vec(), majority.to_vec()]);
                        }
                        _ => {
                            let (a, rest) = order.split_at(n / 2);
                            let (bridge, b) = rest.split_first().unwrap();
                            lab.bridge(a, *bridge, b);
                        }
                    }
                    eprintln!("  partition: {}", lab.describe());
                }
                tokio::time::sleep(hold).await;
                if fault == Fault::IsolateLeader {
                    self.note_new_leader(&api, l).await;
                }
                rig.lock().await.lab.as_ref().unwrap().heal();
            }
            Fault::ClockSkew => {
                // Mostly the leader's clock: it stamps every command.
                let i = if self.rng.random_bool(0.7) {
                    wait_leader(&api, Duration::from_secs(10)).await
                } else {
                    self.rng.random_range(0..n)
                };
                let r = rig.lock().await;
                std::fs::write(&r.clock_files[i], format!("+{SKEW_SECS}s\n")).unwrap();
                drop(r);
                let until = tokio::time::Instant::now() + hold * 2;
                // Evidence: the node's wall clock (Status) reads ahead.
                if let Ok(c) = idemkv::Client::new([api[i].clone()]) {
                    while tokio::time::Instant::now() < until {
                        let ahead = c
                            .status()
                            .await
                            .ok()
                            .map(|s| s.wall_clock_ms as i64 - robust::history::now_ms() as i64);
                        if ahead.is_some_and(|a| a > SKEW_SECS as i64 * 1_000 - 500) {
                            *self.seen.entry("wall clock skewed").or_default() += 1;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                tokio::time::sleep_until(until).await;
                let r = rig.lock().await;
                std::fs::write(&r.clock_files[i], "+0\n").unwrap();
            }
            Fault::DiskFull => {
                let i = rig.lock().await.tmpfs_node.unwrap();
                let filler = rig.lock().await.cluster.data_dir(i).join("filler");
                fill(&filler);
                tokio::time::sleep(hold).await;
                let _ = std::fs::remove_file(&filler);
                let mut r = rig.lock().await;
                let log =
                    std::fs::read_to_string(r.cluster.dir.join(format!("node-{}.log", i + 1)))
                        .unwrap_or_default();
                if log.contains("No space left") {
                    *self.seen.entry("disk refused writes").or_default() += 1;
                }
                if r.cluster.exited(i) {
                    // The node exits when its storage fails (crash-only);
                    // with space again it restarts from what is durable.
                    *self.seen.entry("node exited on full disk").or_default() += 1;
                    r.cluster.start_node(i);
                }
            }
            Fault::Membership => self.membership(rig).await,
        }
        *self.counts.entry(fault).or_default() += 1;
    }

    /// Did a node other than `old` take over? (The old leader, paused or
    /// cut off, may still believe it leads; ask the others.)
    async fn note_new_leader(&mut self, api: &[String], old: usize) {
        let others: Vec<String> = (0..api.len())
            .filter(|i| *i != old)
            .map(|i| api[i].clone())
            .collect();
        if leader(&others).await.is_some() {
            *self.seen.entry("leader replaced").or_default() += 1;
        }
    }

    /// Remove a follower, wipe it, start it empty, add it back as a learner
    /// and make it a voter again; all while the workload runs.
    async fn membership(&mut self, rig: &Arc<tokio::sync::Mutex<Rig>>) {
        let (api, peer) = {
            let r = rig.lock().await;
            (r.cluster.api.clone(), r.cluster.peer.clone())
        };
        let n = api.len();
        let all: Vec<u64> = (1..=n as u64).collect();
        let l = wait_leader(&api, Duration::from_secs(10)).await;
        let r = (l + 1 + self.rng.random_range(0..n - 1)) % n;
        let id = r as u64 + 1;
        let others: Vec<u64> = all.iter().copied().filter(|x| *x != id).collect();
        set_voters(&api, &others).await;
        {
            let mut g = rig.lock().await;
            g.cluster.kill9(r);
            let d = g.cluster.data_dir(r);
            let _ = std::fs::remove_dir_all(&d);
            g.cluster.init = false;
            g.cluster.start_node(r);
        }
        let (a, p) = (api[r].clone(), peer[r].clone());
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
        .await;
        set_voters(&api, &all).await;
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

/// Fill the file system holding `path` until it refuses to take more.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

// ------------------------------------------------------------------ a run

/// What a run did: faults injected by kind, evidence they took effect.
struct Done {
    faults: BTreeMap<Fault, usize>,
    seen: BTreeMap<&'static str, usize>,
}

impl Done {
    fn saw(&self, what: &str) -> usize {
        self.seen.get(what).copied().unwrap_or(0)
    }
}

/// Run a plan; None when this machine cannot (it says why).
async fn run_plan(plan: Plan) -> Option<Done> {
    if let Some(why) = missing(&plan) {
        eprintln!("skipping {}: {why}", plan.name);
        return None;
    }
    let seed: u64 = std::env::var("IDEMKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "== {}: {} nodes, faults {:?}, {:?}, seed {seed}",
        plan.name, plan.nodes, plan.faults, plan.duration
    );
    let rig = Rig::start(&plan);
    wait_ready(&rig, Duration::from_secs(30)).await;
    let api = rig.cluster.api.clone();
    let rig = Arc::new(tokio::sync::Mutex::new(rig));
    let shared = Arc::new(Shared {
        rec: Recorder::default(),
        errors: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        started: Instant::now(),
        batches: AtomicU64::new(0),
    });
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            let w = Worker {
                id,
                clients: worker_clients(&api),
                at: id,
                rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1)),
                shared: shared.clone(),
                held: None,
                unsure: None,
                not_sent: false,
                unknown_streak: 0,
                n: 0,
            };
            tokio::spawn(w.run())
        })
        .collect();

    let mut nemesis = Nemesis {
        rng: StdRng::seed_from_u64(seed),
        counts: BTreeMap::new(),
        seen: BTreeMap::new(),
    };
    let started = Instant::now();
    let mut injected = 0;
    while match plan.cycles {
        Some(c) => injected < c,
        None => started.elapsed() < plan.duration,
    } {
        injected += 1;
        tokio::time::sleep(plan.quiet).await;
        let fault = plan.faults[nemesis.rng.random_range(0..plan.faults.len())];
        eprintln!("  {:>5.1}s {fault:?}", started.elapsed().as_secs_f64());
        nemesis.inject(&rig, fault).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }

    // Heal everything; every acknowledged write must still be there, and
    // still there after the whole cluster restarts.
    let mut r = rig.lock().await;
    r.heal_all();
    wait_ready(&r, Duration::from_secs(30)).await;
    let keys: BTreeSet<String> = shared
        .rec
        .ops
        .lock()
        .unwrap()
        .iter()
        .map(|o| o.key.clone())
        .collect();
    final_reads(&r.cluster.api, &keys, &shared, 1_000).await;
    r.cluster.kill9_all();
    r.cluster.start_all();
    wait_ready(&r, Duration::from_secs(30)).await;
    final_reads(&r.cluster.api, &keys, &shared, 1_001).await;
    let ops = std::mem::take(&mut *shared.rec.ops.lock().unwrap());
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap());
    let logs = r.cluster.dir.clone();
    drop(r);

    let report = check(
        &ops,
        &Config {
            // A skewed wall clock no longer moves lease deadlines (SPEC §2
            // Time: stamps follow the leader's monotonic clock), so skew
            // runs are held to the same bound as every other run.
            drift_ms: 500,
            max_attempts: MAX_ATTEMPTS,
            ..Config::default()
        },
    );
    let faults: Vec<String> = nemesis
        .counts
        .iter()
        .map(|(f, c)| format!("{f:?}={c}"))
        .collect();
    let acquired = ops
        .iter()
        .filter(|o| matches!(o.ret, Ret::Acquired { .. }))
        .count();
    let completed = ops.iter().filter(|o| o.ret == Ret::Done).count();
    // Lease deadlines stamped by a clock running ahead of the test's.
    let skewed = ops
        .iter()
        .filter(|o| match (&o.ret, o.complete_ms) {
            (Ret::Acquired { deadline_ms, .. } | Ret::Renewed { deadline_ms }, Some(end)) => {
                *deadline_ms > end + LEASE_MS + 2_000
            }
            _ => false,
        })
        .count();
    nemesis.seen.insert("deadlines from a skewed clock", skewed);
    let seen: Vec<String> = nemesis
        .seen
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "SUMMARY {}: {} ops ({} unknown, {acquired} acquired, {completed} completed) on {} keys; \
         faults {} ({}); {} states searched; anomalies {}; errors {}",
        plan.name,
        report.ops,
        report.unknown,
        report.keys,
        faults.join(" "),
        seen.join(", "),
        report.states_explored,
        report.anomalies.len(),
        errors.len()
    );
    if !report.anomalies.is_empty() || !errors.is_empty() || acquired == 0 || completed == 0 {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("robustness");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}-{seed}.jsonl", plan.name));
        save(&ops, &file).expect("save history");
        for a in report.anomalies.iter().take(10) {
            eprintln!("ANOMALY {a}");
        }
        for e in errors.iter().take(10) {
            eprintln!("ERROR {e}");
        }
        panic!(
            "{}: {} anomalies, {} errors, {acquired} acquired, {completed} completed; \
             history kept in {} (seed {seed}); node logs were in {}",
            plan.name,
            report.anomalies.len(),
            errors.len(),
            file.display(),
            logs.display()
        );
    }
    Some(Done {
        faults: nemesis.counts,
        seen: nemesis.seen,
    })
}

/// A linearizable Get of every key, recorded like any other read.
async fn final_reads(api: &[String], keys: &BTreeSet<String>, shared: &Shared, process: usize) {
    let client = Client::with_options(
        api,
        ClientOptions {
            request_timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(20),
            ..ClientOptions::default()
        },
    )
    .expect("client");
    for key in keys {
        let t = now_ms();
        let r = client
            .get(api::GetRequest {
                namespace: NS.into(),
                key: key.clone().into_bytes(),
                consistency: api::Consistency::Linearizable as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("final read of {key}: {e}"));
        let ret = Ret::Record(r.as_ref().and_then(seen));
        shared.rec.push(process, key, Call::Read, ret, t, now_ms());
    }
}

fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

fn plan(name: &'static str, nodes: usize, faults: &[Fault], default_secs: u64) -> Plan {
    Plan {
        name,
        nodes,
        faults: faults.to_vec(),
        duration: secs("IDEMKV_ROBUST_SECS", default_secs),
        quiet: Duration::from_millis(1_500),
        cycles: None,
    }
}

// ------------------------------------------------------------------ runs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_random_node_and_leader() {
    run_plan(plan("kill", 3, &[Fault::KillRandom, Fault::KillLeader], 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_the_leader_longer_than_election_and_lease() {
    if let Some(d) = run_plan(plan("pause", 3, &[Fault::PauseLeader], 20)).await {
        assert!(
            d.saw("leader replaced") > 0,
            "no pause outlasted the leader"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_isolate_leader_and_majority_minority() {
    let p = plan(
        "partition",
        3,
        &[Fault::IsolateLeader, Fault::MajorityMinority],
        20,
    );
    run_plan(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_of_seconds_on_one_node() {
    if let Some(d) = run_plan(plan("clock-skew", 3, &[Fault::ClockSkew], 20)).await {
        assert!(
            d.saw("wall clock skewed") > 0,
            "the fault never took effect: no node's wall clock read ahead"
        );
        let hit = d.saw("deadlines from a skewed clock");
        assert_eq!(hit, 0, "lease deadlines followed a skewed wall clock");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_one_node() {
    if let Some(d) = run_plan(plan("disk-full", 3, &[Fault::DiskFull], 20)).await {
        assert!(d.saw("disk refused writes") > 0, "the disk never filled");
        assert!(d.saw("node exited on full disk") > 0, "the node lingered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_change_remove_wipe_readd() {
    run_plan(plan("membership", 3, &[Fault::Membership], 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_mixed_faults_with_bridge() {
    let p = plan(
        "mixed-5",
        5,
        &[
            Fault::Bridge,
            Fault::KillLeader,
            Fault::PauseLeader,
            Fault::MajorityMinority,
            Fault::KillRandom,
        ],
        30,
    );
    run_plan(p).await;
}

/// The durability crash loop: the whole cluster is SIGKILLed and restarted
/// under load, cycle after cycle (each waits until the cluster serves again
/// and lets the load run a moment); no acknowledged write may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_whole_cluster_kill_9() {
    let cycles: usize = std::env::var("IDEMKV_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut p = plan("crash-loop", 3, &[Fault::KillAll], 0);
    p.quiet = Duration::ZERO;
    p.cycles = Some(cycles);
    let s = run_plan(p)
        .await
        .expect("the crash loop needs nothing special");
    assert_eq!(s.faults.get(&Fault::KillAll), Some(&cycles));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: IDEMKV_SOAK_SECS (default 600) of every nemesis this machine allows"]
async fn soak() {
    let mut faults = vec![
        Fault::KillRandom,
        Fault::KillLeader,
        Fault::PauseLeader,
        Fault::Membership,
    ];
    if is_root() {
        faults.extend([
            Fault::IsolateLeader,
            Fault::MajorityMinority,
            Fault::DiskFull,
        ]);
    }
    if std::path::Path::new(FAKETIME_LIB).exists() {
        faults.push(Fault::ClockSkew);
    }
    let mut p = plan("soak", 3, &faults, 600);
    p.duration = secs("IDEMKV_SOAK_SECS", 600);
    run_plan(p).await.expect("soak");
}
