//! The rig: the cluster's processes, on loopback or in network namespaces,
//! with the hooks the nemeses need (libfaketime clock files, a tmpfs data
//! dir), and the questions every run asks of it (who leads, is it ready).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use idemkv::client::ClientOptions;
use idemkv::Client;

use crate::nemeses::{Fault, Plan};
use crate::procs::ProcCluster;
use crate::robust::netlab::NetLab;

pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

pub struct Rig {
    pub cluster: ProcCluster,
    pub lab: Option<NetLab>,
    /// Per node: libfaketime's offset file ("+0" or "+3s").
    pub clock_files: Vec<PathBuf>,
    /// The node whose data dir is a small tmpfs (disk-full nemesis).
    pub tmpfs_node: Option<usize>,
    /// Per node: its fsync ledger (power-loss nemesis).
    pub ledgers: Vec<PathBuf>,
    /// Per node: its fsync control file (slow disk, EIO), and what it holds
    /// when no disk fault is on.
    pub fsync_controls: Vec<PathBuf>,
    pub fsync_normal: &'static str,
    /// Removed when the run passes; kept (logs, data) when it panics.
    pub dir: Option<tempfile::TempDir>,
}

impl Rig {
    pub fn start(plan: &Plan) -> Rig {
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
        if plan.faults.iter().any(|f| f.moves_a_clock()) {
            for i in 0..n {
                let f = dir.path().join(format!("clock-{}", i + 1));
                std::fs::write(&f, "+0\n").unwrap();
                cluster.envs[i].extend([
                    ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
                    ("FAKETIME_TIMESTAMP_FILE".into(), f.display().to_string()),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                    ("FAKETIME_CACHE_DURATION".into(), "1".into()),
                ]);
                clock_files.push(f);
            }
        }
        // Power-loss runs: every node keeps an fsync ledger (outside its
        // data dir, which the membership nemesis wipes).
        let ledgers: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("fsync-ledger-{}", i + 1)))
            .collect();
        // Disk-fault runs: every node reads an fsync control file.
        let fsync_controls: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("fsync-control-{}", i + 1)))
            .collect();
        let disk = [
            Fault::PowerLoss,
            Fault::PowerLossSled,
            Fault::SlowDisk,
            Fault::FsyncEio,
            Fault::InstallCrash,
        ];
        if plan.faults.iter().any(|f| disk.contains(f)) {
            use idemkv::store::test_hooks::{FSYNC_CONTROL_ENV, LEDGER_ENV};
            for i in 0..n {
                let (l, c) = (&ledgers[i], &fsync_controls[i]);
                cluster.envs[i].push((LEDGER_ENV.into(), l.display().to_string()));
                cluster.envs[i].push((FSYNC_CONTROL_ENV.into(), c.display().to_string()));
                if plan.faults.contains(&Fault::PowerLoss)
                    || plan.faults.contains(&Fault::PowerLossSled)
                {
                    // A slow disk, so that a power cut finds writes in flight.
                    std::fs::write(c, "delay 25\n").unwrap();
                }
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
            ledgers,
            fsync_controls,
            fsync_normal: if plan.faults.contains(&Fault::PowerLoss) {
                "delay 25\n"
            } else {
                ""
            },
            dir: Some(dir),
        }
    }

    /// Every node running, no partition, no skew, no full disk.
    pub fn heal_all(&mut self) {
        if let Some(l) = &self.lab {
            l.heal();
        }
        for f in &self.clock_files {
            std::fs::write(f, "+0\n").unwrap();
        }
        for f in &self.fsync_controls {
            if f.exists() {
                std::fs::write(f, self.fsync_normal).unwrap();
            }
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
            self.keep_files();
        }
    }
}

impl Rig {
    /// Keep the run's node logs and data directories (a failed run).
    pub fn keep_files(&mut self) {
        if let Some(d) = self.dir.take() {
            eprintln!("kept the run's logs and data in {}", d.keep().display());
        }
    }
}

pub fn run(prog: &str, args: &[&str]) {
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

/// The node a majority of the cluster follows as leader now, if any. A
/// node that says it leads is not enough: one cut off from the others keeps
/// saying so after they elected another (a nemesis aimed at such a stale
/// leader once cut a path no packet used, and proved nothing).
pub async fn leader(api: &[String]) -> Option<usize> {
    leader_followed_by(api, api.len() / 2 + 1).await
}

/// The node that says it leads in the highest term, if at least `need`
/// nodes (itself included) answer within half a second and follow it in
/// that term.
pub async fn leader_followed_by(api: &[String], need: usize) -> Option<usize> {
    let opts = ClientOptions {
        request_timeout: Duration::from_millis(500),
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    let mut statuses = Vec::new();
    for a in api {
        let c = Client::with_options([a], opts.clone()).ok()?;
        statuses.push(c.status().await.ok());
    }
    let (i, lead) = statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
        .filter(|(_, s)| s.role == "leader")
        .max_by_key(|(_, s)| s.term)?;
    let following = statuses
        .iter()
        .flatten()
        .filter(|s| s.term == lead.term && s.leader_id == Some(lead.id))
        .count();
    (following >= need).then_some(i)
}

pub async fn wait_leader(api: &[String], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = leader(api).await {
            return l;
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_ready(rig: &Rig, within: Duration) {
    if let Err(e) = rig.cluster.client().wait_ready(within).await {
        panic!(
            "cluster not ready: {e}; logs in {}",
            rig.cluster.dir.display()
        );
    }
}
