//! `idemkv bench`: the bundled load tool. N client tasks run one workload
//! against idemkv, etcd, Redis or the gRPC floor (`floor.rs`) for a duration or a number of operations,
//! after a warm-up that is not measured. Latencies go into HDR histograms;
//! the end prints ops/s and p50/p90/p99/p99.9/max (or one JSON object), and
//! the exit code says whether every correctness check held.

pub mod floor;
pub mod plot;
pub mod replicate;
pub mod target;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::client::ClientTls;
pub use target::{Target, TargetKind};
use workload::{Checks, Task};
pub use workload::{Plan, Workload};

/// Exit code when a correctness check failed.
pub const EXIT_CHECK_FAILED: i32 = 3;
/// Exit code when operations failed with errors (checks held).
pub const EXIT_ERRORS: i32 = 4;

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Exit status: 0 when every check held and no operation failed, \
3 when a correctness check failed, 4 when operations returned errors."
)]
pub struct BenchArgs {
    /// The system to load.
    #[arg(long, value_enum, default_value = "idemkv")]
    pub target: TargetKind,
    /// What each operation does.
    #[arg(long, value_enum, default_value = "claim")]
    pub workload: Workload,
    /// Concurrent clients, each with one operation in flight.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Connections the clients share (0: one per client).
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// How long to measure (default 10s unless --ops is given).
    #[arg(long, value_parser = parse_duration_ms, conflicts_with = "ops")]
    pub duration: Option<u64>,
    /// Measure this many operations instead of a duration.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Load run before measuring starts.
    #[arg(long, value_parser = parse_duration_ms, default_value = "2s")]
    pub warmup: u64,
    /// Keys: raced per storm generation, or preloaded for `get`.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Result bytes stored by complete.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// `mixed`: share of operations that repeat a completed key.
    #[arg(long, default_value_t = 0.2)]
    pub dup_rate: f64,
    /// `batch`: keys claimed per call (the report counts calls as ops and
    /// keys as items).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Lease of each claim (long enough that none expires during the run).
    #[arg(long, value_parser = parse_duration_ms, default_value = "60s")]
    pub lease: u64,
    /// Target endpoints, comma-separated (default: the local `idemkv up`
    /// cluster, etcd on 2379, Redis on 6379).
    #[arg(long, env = "IDEMKV_BENCH_ENDPOINTS")]
    pub endpoints: Option<String>,
    /// idemkv: send every call to the endpoints as given, as a client that
    /// does not look for the leader does (grpcurl, a generated stub); a
    /// follower then forwards each write. Without it the load tool finds
    /// the leader and talks to it.
    #[arg(long)]
    pub no_leader_discovery: bool,
    /// The `idemkv` program whose `floor-follower` the replicated floor
    /// starts twice (default: this program; a test's harness is not it).
    #[arg(long, hide = true, env = "IDEMKV_FLOOR_FOLLOWER")]
    pub floor_follower: Option<std::path::PathBuf>,
    /// Print one JSON object instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// TLS to an idemkv cluster.
    #[command(flatten)]
    pub conn: ClientConnArgs,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub target: &'static str,
    pub workload: &'static str,
    pub clients: usize,
    pub connections: usize,
    pub value_size: usize,
    pub elapsed_s: f64,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub ops_per_sec: f64,
    /// Keys per operation (`batch`: `--batch`; otherwise 1).
    pub items_per_op: usize,
    /// `ops_per_sec × items_per_op`: claims per second for `batch`.
    pub items_per_sec: f64,
    pub latency_us: Latency,
    pub check: Check,
    /// `replicated-floor` only: what its copies did in the whole run
    /// (warm-up and set-up included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
}

/// What the replicated floor's leader and followers did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replication {
    /// Writes made durable on a majority (the leader and one follower).
    pub writes: u64,
    /// Batches the leader wrote, fdatasynced and sent to both followers.
    pub batches: u64,
    /// fdatasyncs on each follower.
    pub follower_syncs: [u64; 2],
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub passed: bool,
    pub detail: String,
}

impl Report {
    pub fn exit_code(&self) -> i32 {
        if !self.check.passed {
            EXIT_CHECK_FAILED
        } else if self.errors > 0 {
            EXIT_ERRORS
        } else {
            0
        }
    }

    fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let l = &self.latency_us;
        format!(
            "idemkv bench: target {}, workload {}, {} clients over {} connections, {}-byte results\n\
             ops         {} in {:.1} s ({} errors{})\n\
             throughput  {:.0} ops/s{}\n\
             latency     p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms\n\
             check       {}: {}",
            self.target,
            self.workload,
            self.clients,
            self.connections,
            self.value_size,
            self.ops,
            self.elapsed_s,
            self.errors,
            self.first_error
                .as_ref()
                .map(|e| format!("; first: {e}"))
                .unwrap_or_default(),
            self.ops_per_sec,
            if self.items_per_op > 1 {
                format!(
                    " ({:.0} keys/s, {} keys per op)",
                    self.items_per_sec, self.items_per_op
                )
            } else {
                String::new()
            },
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            if self.check.passed { "passed" } else { "FAILED" },
            self.check.detail,
        ) + &self
            .replication
            .as_ref()
            .map(|r| {
                format!(
                    "\ncopies      {} writes durable on a majority in {} batches; \
                     follower fdatasyncs {} and {} (warm-up included)",
                    r.writes, r.batches, r.follower_syncs[0], r.follower_syncs[1]
                )
            })
            .unwrap_or_default()
    }
}

/// Counters the client tasks share with the driver.
#[derive(Default)]
struct Progress {
    measured: AtomicU64,
    /// Operations started after warm-up (bounds `--ops`).
    started: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    stop: AtomicBool,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn check_args(a: &BenchArgs) -> anyhow::Result<()> {
    if a.clients == 0 {
        bail!("clients: must be at least 1");
    }
    if a.keys == 0 {
        bail!("keys: must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.dup_rate) {
        bail!("dup-rate: must be between 0 and 1, got {}", a.dup_rate);
    }
    if a.ops == Some(0) {
        bail!("ops: must be at least 1");
    }
    if a.duration == Some(0) {
        bail!("duration: must be more than 0");
    }
    let max = crate::Limits::default().result_max;
    if a.value_size > max {
        bail!(
            "value-size: {} bytes is over the result limit of {max}",
            a.value_size
        );
    }
    if a.lease == 0 {
        bail!("lease: must be more than 0");
    }
    let batch_max = crate::Limits::default().batch_max;
    if a.batch == 0 || a.batch > batch_max {
        bail!(
            "batch: must be between 1 and {batch_max} (the server's batch limit), got {}",
            a.batch
        );
    }
    Ok(())
}

/// Run the benchmark `a` describes and return its report.
pub async fn bench(a: &BenchArgs) -> anyhow::Result<Report> {
    check_args(a)?;
    let conn = a.conn.options()?;
    let floor = match a.target {
        TargetKind::Floor | TargetKind::ReplicatedFloor => {
            if a.endpoints.is_some() {
                bail!(
                    "endpoints: the {} target runs its own servers in this process; give none",
                    a.target.name()
                );
            }
            let followers = match (&a.target, &a.floor_follower) {
                (TargetKind::ReplicatedFloor, Some(program)) => Some(program.clone()),
                (TargetKind::ReplicatedFloor, None) => {
                    Some(std::env::current_exe().context("replicated floor: this program's path")?)
                }
                _ => None,
            };
            Some(floor::start(followers.as_deref())?)
        }
        _ => None,
    };
    let given = match &floor {
        Some(f) => f.addr.as_str(),
        None => a
            .endpoints
            .as_deref()
            .unwrap_or(a.target.default_endpoints()),
    };
    let endpoints: Vec<String> = given
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if endpoints.is_empty() {
        bail!("endpoints: none given");
    }
    let measure = a.duration.map(Duration::from_millis);
    let measure = if a.ops.is_none() && measure.is_none() {
        Some(Duration::from_secs(10))
    } else {
        measure
    };
    let warmup = Duration::from_millis(a.warmup);
    let plan = Arc::new(Plan {
        workload: a.workload,
        run_id: format!("{:08x}", rand::random::<u32>()),
        keys: a.keys,
        value_size: a.value_size,
        dup_rate: a.dup_rate,
        lease: Duration::from_millis(a.lease),
        retention: Duration::from_secs(24 * 3600),
        batch: if a.workload == Workload::Batch {
            a.batch
        } else {
            1
        },
    });
    // etcd's per-connection lease must outlive every claim of the run.
    let lease_for = warmup + measure.unwrap_or(Duration::from_secs(3600)) + plan.lease * 2;
    let n_conn = if a.connections == 0 {
        a.clients
    } else {
        a.connections.min(a.clients)
    };
    let mut conns = Vec::with_capacity(n_conn);
    for _ in 0..n_conn {
        conns.push(
            Target::connect(
                a.target,
                &endpoints,
                lease_for,
                conn.clone(),
                !a.no_leader_discovery,
            )
            .await
            .with_context(|| format!("endpoints {}", endpoints.join(",")))?,
        );
    }
    let checks = Arc::new(Checks::default());
    if a.workload == Workload::Get {
        preload(&conns, &plan, a.clients).await?;
    }

    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure.map(|d| measure_from + d);
    let bar = progress_bar(a, warmup, measure);
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        let ops = a.ops;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = Instant::now();
                let done = progress.measured.load(Ordering::Relaxed);
                if now < measure_from {
                    bar.set_message(format!(
                        "warming up, {:.1} s left",
                        (measure_from - now).as_secs_f64()
                    ));
                    continue;
                }
                let secs = (now - measure_from).as_secs_f64().max(1e-3);
                bar.set_message(format!("{done} ops, {:.0} ops/s", done as f64 / secs));
                bar.set_position(match ops {
                    Some(_) => done,
                    None => (now - measure_from).as_millis() as u64,
                });
            }
        })
    };

    let mut handles = Vec::with_capacity(a.clients);
    for id in 0..a.clients {
        let mut target = conns[id % n_conn].clone();
        let (plan, checks, progress) = (plan.clone(), checks.clone(), progress.clone());
        let ops = a.ops;
        handles.push(tokio::spawn(async move {
            let mut task = Task::new(id, &plan);
            let mut hist = new_histogram();
            loop {
                let t0 = Instant::now();
                if progress.stop.load(Ordering::Relaxed) || end.is_some_and(|e| t0 >= e) {
                    break;
                }
                let measured = t0 >= measure_from;
                if let (true, Some(limit)) = (measured, ops) {
                    if progress.started.fetch_add(1, Ordering::Relaxed) >= limit {
                        break;
                    }
                }
                let r = task.op(&mut target, &plan, &checks).await;
                if let Err(e) = r {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    progress
                        .first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert_with(|| format!("{e:#}"));
                    // Do not spin on a target that is down.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                if measured {
                    let us = t0.elapsed().as_micros().max(1) as u64;
                    hist.saturating_record(us);
                    progress.measured.fetch_add(1, Ordering::Relaxed);
                }
            }
            hist
        }));
    }
    let mut hist = new_histogram();
    for h in handles {
        hist.add(h.await.context("a client task panicked")?)
            .context("merging histograms")?;
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    progress.stop.store(true, Ordering::Relaxed);
    ticker.abort();
    bar.finish_and_clear();

    let (passed, detail) = checks.verdict(&plan);
    let ops = hist.len();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let first_error = progress
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(Report {
        target: a.target.name(),
        workload: a.workload.name(),
        clients: a.clients,
        connections: n_conn,
        value_size: a.value_size,
        elapsed_s: secs,
        ops,
        errors: progress.errors.load(Ordering::Relaxed),
        first_error,
        ops_per_sec: ops as f64 / secs,
        items_per_op: plan.batch,
        items_per_sec: (ops * plan.batch as u64) as f64 / secs,
        latency_us: Latency {
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            mean: hist.mean(),
        },
        check: Check { passed, detail },
        replication: floor
            .as_ref()
            .and_then(|f| f.replication.as_ref())
            .map(|c| Replication {
                writes: c.writes.load(Ordering::Relaxed),
                batches: c.batches.load(Ordering::Relaxed),
                follower_syncs: [0, 1].map(|i| c.follower_syncs[i].load(Ordering::Relaxed)),
            }),
    })
}

/// `get`: complete `plan.keys` records first, spread over the connections.
async fn preload(conns: &[Target], plan: &Arc<Plan>, clients: usize) -> anyhow::Result<()> {
    let workers = clients.min(plan.keys as usize).max(1);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut t = conns[w % conns.len()].clone();
        let plan = plan.clone();
        set.spawn(async move {
            let mut task = Task::new(w, &plan);
            let mut k = w as u64;
            while k < plan.keys {
                task.preload(&mut t, &plan, k).await?;
                k += workers as u64;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a preload task panicked")??;
    }
    Ok(())
}

fn progress_bar(
    a: &BenchArgs,
    warmup: Duration,
    measure: Option<Duration>,
) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let len = match (a.ops, measure) {
        (Some(n), _) => n,
        (None, Some(d)) => d.as_millis() as u64,
        (None, None) => 0,
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let unit = if a.ops.is_some() { "ops" } else { "ms" };
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} {} {} [{{bar:32}}] {{pos}}/{{len}} {unit}  {{msg}}",
        a.target.name(),
        a.workload.name()
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    if warmup.is_zero() {
        bar.set_message("starting");
    }
    bar
}

/// The `idemkv bench` subcommand.
pub async fn run(a: BenchArgs) -> anyhow::Result<i32> {
    let report = bench(&a).await?;
    if a.json {
        crate::out::print_line(format_args!("{}", serde_json::to_string(&report)?));
    } else {
        crate::out::print_line(format_args!("{}", report.human()));
    }
    Ok(report.exit_code())
}

/// A client's connection flags (`ctl`, `bench`): TLS (none given means
/// plaintext) and the bearer token.
#[derive(Debug, Args, Default, Clone)]
pub struct ClientConnArgs {
    /// Connect over TLS, trusting this CA (PEM).
    #[arg(long, env = "IDEMKV_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a cluster run with --client-auth.
    #[arg(long, env = "IDEMKV_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "IDEMKV_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Bearer token, for a cluster run with --auth-tokens (not to be
    /// confused with a claim's fencing token).
    #[arg(long, env = "IDEMKV_AUTH_TOKEN", global = true, hide_env_values = true)]
    pub auth_token: Option<String>,
}

impl ClientConnArgs {
    /// Client options with these TLS settings and token.
    pub fn options(&self) -> anyhow::Result<crate::client::ClientOptions> {
        Ok(crate::client::ClientOptions {
            tls: self.load()?,
            token: self.auth_token.clone().filter(|t| !t.is_empty()),
            ..Default::default()
        })
    }

    /// The client TLS setting (none without --tls-ca).
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        ClientTls::from_options(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}

/// Parse a duration such as `30s`, `250ms`, `24h`, or a bare number of ms.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| format!("{s:?} is not a duration (try 30s, 250ms, 24h): {e}"))
}
