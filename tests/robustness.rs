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
mod support;
use support::procs;
#[path = "robust/nemeses.rs"]
mod nemeses;
#[path = "robust/rig.rs"]
mod rig;
mod robust;
#[path = "robust/workload.rs"]
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nemeses::{is_root, missing, Fault, Nemesis, Plan};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rig::{wait_ready, Rig, FAKETIME_LIB};
use robust::checker::{check, Config};
use robust::history::{save, Op, Ret};
use robust::once::{self, OnceRun};
use workload::{
    final_reads, replicas_disagree, worker_clients, Recorder, Shared, Worker, LEASE_MS,
    MAX_ATTEMPTS, WORKERS,
};

/// The most a lease stamp may stray from the test's clock (tens of ms are
/// seen), plus 1 % of the time a wall clock was skewed (the slew).
const DRIFT_MS: u64 = 100;

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
    // The cluster's clock starts from the wall clock now: the history is
    // shifted to it (see `history::now_ms`).
    let step_at_start = robust::history::wall_step_ms();
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
                done: None,
                unsure: None,
                not_sent: false,
                unknown_streak: 0,
                n: 0,
            };
            tokio::spawn(w.run())
        })
        .collect();
    // Two more workers through `Client::run_once`, on keys of their own.
    let once_run = OnceRun::new(shared.started, |e| {
        workload::origin(e) == workload::Origin::Server
    });
    let once_workers = once_run.spawn(&api, seed);

    let mut nemesis = Nemesis {
        rng: StdRng::seed_from_u64(seed),
        counts: BTreeMap::new(),
        seen: BTreeMap::new(),
        unproven: Vec::new(),
        skewed_ms: 0,
    };
    let started = Instant::now();
    let mut injected = 0;
    // Every fault of the plan once, in a random order, then at random; a
    // timed run lasts until each has had its turn.
    let mut first_round = plan.faults.clone();
    first_round.shuffle(&mut nemesis.rng);
    while match plan.cycles {
        Some(c) => injected < c,
        None => started.elapsed() < plan.duration || injected < plan.faults.len(),
    } {
        injected += 1;
        tokio::time::sleep(plan.quiet).await;
        let fault = match first_round.get(injected - 1) {
            Some(f) => *f,
            None => plan.faults[nemesis.rng.random_range(0..plan.faults.len())],
        };
        eprintln!("  {:>5.1}s {fault:?}", started.elapsed().as_secs_f64());
        nemesis.inject(&rig, fault).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    once_run.stop.store(true, Ordering::Relaxed);
    for w in workers.into_iter().chain(once_workers) {
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
    if !once_run.checkpoint_seen() {
        eprintln!("  run_once: no takeover with a checkpoint under the faults; one scripted after healing");
        once_run.scripted_takeover(&r.cluster.api).await;
    }
    let mut once_records = once_run.records();
    once::final_reads(&r.cluster.api, &mut once_records).await;
    let once_report = once::check(&once_records);
    let mut diverged = replicas_disagree(&r.cluster.api, &keys).await;
    r.cluster.kill9_all();
    r.cluster.start_all();
    wait_ready(&r, Duration::from_secs(30)).await;
    final_reads(&r.cluster.api, &keys, &shared, 1_001).await;
    diverged.extend(replicas_disagree(&r.cluster.api, &keys).await);
    shared.errors.lock().unwrap().extend(diverged);
    let mut ops = std::mem::take(&mut *shared.rec.ops.lock().unwrap());
    for o in &mut ops {
        o.invoke_ms = o.invoke_ms.saturating_add_signed(step_at_start);
        o.complete_ms = o
            .complete_ms
            .map(|c| c.saturating_add_signed(step_at_start));
    }
    // A wall clock that stepped during the run is followed by the stamps at
    // the slew (1 % of the time since), as a skewed one is.
    let stepped_ms = robust::history::wall_step_ms().abs_diff(step_at_start);
    let steered_ms = stepped_ms.min(started.elapsed().as_millis() as u64 / 100);
    if stepped_ms > 5 {
        eprintln!(
            "  the host's wall clock stepped {stepped_ms} ms from its monotonic clock during the run"
        );
    }
    let errors = std::mem::take(&mut *shared.errors.lock().unwrap());
    let logs = r.cluster.dir.clone();

    // One host: every node and the test read one clock, and the stamps
    // follow the leader's monotonic clock (SPEC §2 Time), even while the
    // skew nemesis moves a wall clock. The checker allows the distance
    // the run measured, and fails it beyond DRIFT_MS.
    let report = check(
        &ops,
        &Config {
            // Stamps are steered toward a wrong wall clock by at most 1 %
            // of the time it was wrong (SPEC §2 Time), and never set back.
            drift_ms: DRIFT_MS + nemesis.skewed_ms / 100 + steered_ms,
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
    // Lease deadlines stamped by a clock seconds ahead of the test's, or
    // behind it.
    let skewed = ops
        .iter()
        .filter(|o| match (&o.ret, o.complete_ms) {
            (Ret::Acquired { deadline_ms, .. } | Ret::Renewed { deadline_ms }, Some(end)) => {
                *deadline_ms > end + LEASE_MS + 2_000
                    || *deadline_ms + 2_000 < o.invoke_ms + LEASE_MS
            }
            _ => false,
        })
        .count();
    if plan.faults.iter().any(|f| f.moves_a_clock()) {
        nemesis.seen.insert("deadlines from a skewed clock", skewed);
    }
    nemesis
        .seen
        .insert("fingerprint mismatches answered", report.mismatches);
    let swept = swept_keys(&ops);
    nemesis
        .seen
        .insert("short-retention records seen swept", swept);
    let seen: Vec<String> = nemesis
        .seen
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "SUMMARY {}: {} ops ({} unknown, {acquired} acquired, {completed} completed) on {} keys; \
         faults {} ({}); stamps within {} ms; {} states searched; {}; anomalies {}; errors {}",
        plan.name,
        report.ops,
        report.unknown,
        report.keys,
        faults.join(" "),
        seen.join(", "),
        report.drift_ms,
        report.states_explored,
        once_report.summary(),
        report.anomalies.len(),
        errors.len()
    );
    for u in &nemesis.unproven {
        eprintln!("UNPROVEN {u}");
    }
    if !report.anomalies.is_empty()
        || !errors.is_empty()
        || !nemesis.unproven.is_empty()
        || acquired == 0
        || completed == 0
        || swept == 0
        || !once_report.problems.is_empty()
        || once_report.takeovers_with_checkpoint == 0
    {
        r.keep_files();
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
        for p in once_report.problems.iter().take(10) {
            eprintln!("RUN_ONCE {p}");
        }
        panic!(
            "{}: {} anomalies, {} errors, {} faults not shown to take effect, \
             {acquired} acquired, {completed} completed, {swept} records seen swept, \
             {} run_once problems, {} takeovers with a checkpoint; history kept in {} (seed {seed}); node logs were in {}",
            plan.name,
            report.anomalies.len(),
            errors.len(),
            nemesis.unproven.len(),
            once_report.problems.len(),
            once_report.takeovers_with_checkpoint,
            file.display(),
            logs.display()
        );
    }
    Some(Done {
        faults: nemesis.counts,
        seen: nemesis.seen,
    })
}

fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

/// Keys with short retention whose record, after an acknowledged
/// Complete, was later seen gone (a read of nothing, or a fresh grant):
/// evidence that sweeps ran during the run.
fn swept_keys(ops: &[Op]) -> usize {
    let mut done: BTreeMap<&str, u64> = BTreeMap::new();
    for o in ops {
        if o.ret == Ret::Done && workload::retention_of(&o.key).is_some() {
            let e = done.entry(o.key.as_str()).or_insert(u64::MAX);
            *e = (*e).min(o.end());
        }
    }
    let gone: BTreeSet<&str> = ops
        .iter()
        .filter(|o| done.get(o.key.as_str()).is_some_and(|d| o.invoke_ms > *d))
        .filter(|o| matches!(o.ret, Ret::Record(None) | Ret::Acquired { attempt: 1, .. }))
        .map(|o| o.key.as_str())
        .collect();
    gone.len()
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
//
// Every injection proves it took effect (`Nemesis::prove`); a run with a
// fault it could not show fails.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_random_node_leader_and_new_leader() {
    let faults = [Fault::KillRandom, Fault::KillLeader, Fault::KillNewLeader];
    run_plan(plan("kill", 3, &faults, 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_the_leader_or_a_follower_longer_than_election_and_lease() {
    let faults = [Fault::PauseLeader, Fault::PauseFollower];
    if let Some(d) = run_plan(plan("pause", 3, &faults, 20)).await {
        assert!(d.saw("process stopped") > 0, "nothing was paused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_isolate_leader_majority_minority_one_way() {
    let faults = [Fault::IsolateLeader, Fault::MajorityMinority, Fault::OneWay];
    run_plan(plan("partition", 3, &faults, 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_partitions_packet_loss_and_bridge() {
    let faults = [Fault::Flapping, Fault::PacketLoss, Fault::Bridge];
    run_plan(plan("network", 3, &faults, 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_of_seconds_and_jumps_of_hours() {
    let faults = [Fault::ClockSkew, Fault::ClockJump];
    if let Some(d) = run_plan(plan("clock", 3, &faults, 20)).await {
        let hit = d.saw("deadlines from a skewed clock");
        assert_eq!(hit, 0, "lease deadlines followed a skewed wall clock");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_one_node() {
    run_plan(plan("disk-full", 3, &[Fault::DiskFull], 20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_change_remove_wipe_readd_and_crash_during_it() {
    let faults = [
        Fault::Membership,
        Fault::MembershipCrash,
        Fault::InstallCrash,
    ];
    if let Some(d) = run_plan(plan("membership", 3, &faults, 20)).await {
        if d.faults.get(&Fault::MembershipCrash).copied().unwrap_or(0) > 0 {
            let hit = d.saw("leader killed during the change");
            assert!(hit > 0, "no leader kill landed during a membership change");
        }
    }
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
            Fault::PauseFollower,
            Fault::MajorityMinority,
            Fault::OneWay,
            Fault::KillRandom,
        ],
        30,
    );
    run_plan(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_faults_slow_fsync_eio_and_log_damage() {
    let faults = [
        Fault::SlowDisk,
        Fault::FsyncEio,
        Fault::LogCorruptTail,
        Fault::LogCorruptMid,
        Fault::LogDamagedTail,
        Fault::SnapshotCorrupt,
        Fault::SledCorrupt,
    ];
    run_plan(plan("disk", 3, &faults, 20)).await;
}

/// Power loss: the whole cluster is SIGKILLed and every log segment loses
/// what was written after its last fsync, cycle after cycle under load; no
/// acknowledged write may be lost (an acknowledgement given before its
/// fsync would be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_drops_unsynced_log_writes() {
    let mut p = plan("power-loss", 3, &[Fault::PowerLoss], 0);
    p.quiet = Duration::ZERO;
    p.cycles = Some(12);
    let d = run_plan(p).await.expect("power loss needs nothing special");
    assert_eq!(d.faults.get(&Fault::PowerLoss), Some(&12));
    assert!(
        d.saw("un-fsynced bytes dropped") > 0,
        "no cycle found anything written and not yet fsynced to drop"
    );
}

/// Power loss that takes sled's unsynced writes too: every node's sled
/// directory goes back to its state at its last sled fsync (the state
/// machine re-applies from the log, which keeps every entry past the last
/// durable apply). No acknowledged write may be lost, and the replicas must
/// agree. The lease clock keeps counting through each outage (its anchor
/// is not in sled, see ROBUSTNESS.md): no clock lag is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_takes_sled_back_to_its_last_fsync() {
    let mut p = plan("power-loss-sled", 3, &[Fault::PowerLossSled], 0);
    p.quiet = Duration::ZERO;
    p.cycles = Some(8);
    let d = run_plan(p).await.expect("power loss needs nothing special");
    assert_eq!(d.faults.get(&Fault::PowerLossSled), Some(&8));
    assert_eq!(d.saw("sled rolled back to its last fsync"), 8);
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
        Fault::KillNewLeader,
        Fault::PauseLeader,
        Fault::PauseFollower,
        Fault::Membership,
        Fault::MembershipCrash,
        Fault::InstallCrash,
        Fault::PowerLoss,
        Fault::PowerLossSled,
        Fault::SlowDisk,
        Fault::FsyncEio,
        Fault::LogCorruptTail,
        Fault::LogCorruptMid,
        Fault::LogDamagedTail,
        Fault::SnapshotCorrupt,
        Fault::SledCorrupt,
    ];
    if is_root() {
        faults.extend([
            Fault::IsolateLeader,
            Fault::MajorityMinority,
            Fault::Bridge,
            Fault::OneWay,
            Fault::Flapping,
            Fault::PacketLoss,
            Fault::DiskFull,
        ]);
    }
    if std::path::Path::new(FAKETIME_LIB).exists() {
        faults.extend([Fault::ClockSkew, Fault::ClockJump]);
    }
    let mut p = plan("soak", 3, &faults, 600);
    p.duration = secs("IDEMKV_SOAK_SECS", 600);
    run_plan(p).await.expect("soak");
}
