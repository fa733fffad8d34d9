//! The workloads of `idemkv bench`: what one operation does, and what it
//! checks. A check that fails is a correctness violation, counted and
//! reported; the run then exits non-zero.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use super::target::{Claim, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Claim distinct keys; every claim must be ACQUIRED.
    Claim,
    /// All clients race on the same keys, in the same order; exactly one
    /// claim per key may be ACQUIRED.
    Storm,
    /// Claim, complete, then a duplicate claim that must replay the result.
    Lifecycle,
    /// New keys (claim + complete) mixed with duplicates of completed keys
    /// (`--dup-rate`), which must replay their result.
    Mixed,
    /// Linearizable reads of `--keys` completed records.
    Get,
    /// `--batch` fresh keys claimed in one call (idemkv: ClaimBatch; etcd:
    /// one Txn; Redis: one pipeline); every item must be ACQUIRED.
    Batch,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Claim => "claim",
            Workload::Storm => "storm",
            Workload::Lifecycle => "lifecycle",
            Workload::Mixed => "mixed",
            Workload::Get => "get",
            Workload::Batch => "batch",
        }
    }
}

/// Settings every client task shares.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workload: Workload,
    pub run_id: String,
    pub keys: u64,
    pub value_size: usize,
    pub dup_rate: f64,
    pub lease: Duration,
    pub retention: Duration,
    /// Keys per call of the `batch` workload (1 for the others).
    pub batch: usize,
}

impl Plan {
    /// The result stored for `key`: the key's bytes repeated to the size.
    pub fn result_for(&self, key: &str) -> Vec<u8> {
        key.bytes().cycle().take(self.value_size).collect()
    }

    pub fn get_key(&self, k: u64) -> String {
        format!("{}/get/{k}", self.run_id)
    }
}

/// Violations and the storm tally, shared by all tasks.
#[derive(Default)]
pub struct Checks {
    violations: AtomicU64,
    first: Mutex<Option<String>>,
    /// Storm: ACQUIRED answers per key.
    acquired: Mutex<HashMap<String, u32>>,
    /// What passed, for the report (e.g. replays verified).
    verified: AtomicU64,
}

impl Checks {
    fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(what);
    }

    fn verified(&self) {
        self.verified.fetch_add(1, Ordering::Relaxed);
    }

    /// Finish: the storm tally, then the verdict and a one-line detail.
    pub fn verdict(&self, plan: &Plan) -> (bool, String) {
        if plan.workload == Workload::Storm {
            let tally = self.acquired.lock().unwrap_or_else(|p| p.into_inner());
            for (key, n) in tally.iter() {
                if *n != 1 {
                    self.violation(format!("storm key {key} was ACQUIRED {n} times"));
                }
            }
            if self.violations.load(Ordering::Relaxed) == 0 {
                return (
                    true,
                    format!(
                        "exactly one ACQUIRED for each of {} raced keys",
                        tally.len()
                    ),
                );
            }
        }
        let v = self.violations.load(Ordering::Relaxed);
        if v > 0 {
            let first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            return (
                false,
                format!("{v} violations; first: {}", first.as_deref().unwrap_or("?")),
            );
        }
        let n = self.verified.load(Ordering::Relaxed);
        let what = match plan.workload {
            Workload::Claim => "fresh claims ACQUIRED (warm-up included)",
            Workload::Lifecycle => "lifecycles completed and replayed (warm-up included)",
            Workload::Mixed => {
                "operations verified: acquired and completed, or replayed (warm-up included)"
            }
            Workload::Get => "reads returned the stored result (warm-up included)",
            Workload::Batch => "fresh keys ACQUIRED in batches (warm-up included)",
            Workload::Storm => unreachable!(),
        };
        (true, format!("{n} {what}"))
    }
}

/// One client task's own state.
pub struct Task {
    pub id: usize,
    owner: String,
    seq: u64,
    completed: Vec<String>,
    rng: rand::rngs::SmallRng,
}

impl Task {
    pub fn new(id: usize, plan: &Plan) -> Task {
        use rand::SeedableRng;
        Task {
            id,
            owner: format!("bench-{}-{id}", plan.run_id),
            seq: 0,
            completed: Vec::new(),
            rng: rand::rngs::SmallRng::seed_from_u64(id as u64),
        }
    }

    fn fresh_key(&mut self, plan: &Plan) -> String {
        self.seq += 1;
        format!("{}/{}/{}", plan.run_id, self.id, self.seq)
    }

    /// Claim a fresh key and complete it; `Some(key)` once both held.
    async fn claim_and_complete(
        &mut self,
        t: &mut Target,
        plan: &Plan,
        checks: &Checks,
    ) -> anyhow::Result<Option<String>> {
        let key = self.fresh_key(plan);
        let token = match t.claim(&key, &self.owner, plan.lease).await? {
            Claim::Acquired { token } => token,
            other => {
                checks.violation(format!("fresh key {key} was not acquired: {other:?}"));
                return Ok(None);
            }
        };
        let result = plan.result_for(&key);
        if !t
            .complete(&key, &self.owner, token, &result, plan.retention)
            .await?
        {
            checks.violation(format!("complete of {key} by its holder was refused"));
            return Ok(None);
        }
        Ok(Some(key))
    }

    /// A second claim of a completed key must replay its result.
    async fn replay(
        &mut self,
        t: &mut Target,
        plan: &Plan,
        checks: &Checks,
        key: &str,
    ) -> anyhow::Result<()> {
        let dup_owner = format!("{}-dup", self.owner);
        match t.claim(key, &dup_owner, plan.lease).await? {
            Claim::Completed { result } if result == plan.result_for(key) => checks.verified(),
            other => checks.violation(format!(
                "duplicate claim of completed {key} did not replay its result: {other:?}"
            )),
        }
        Ok(())
    }

    /// Run one operation of the plan's workload.
    pub async fn op(&mut self, t: &mut Target, plan: &Plan, checks: &Checks) -> anyhow::Result<()> {
        match plan.workload {
            Workload::Claim => {
                let key = self.fresh_key(plan);
                match t.claim(&key, &self.owner, plan.lease).await? {
                    Claim::Acquired { .. } => checks.verified(),
                    other => {
                        checks.violation(format!("fresh key {key} was not acquired: {other:?}"))
                    }
                }
            }
            Workload::Storm => {
                // Every task walks the same keys in the same order, so they
                // collide; `keys` keys make one generation.
                let step = self.seq;
                self.seq += 1;
                let key = format!(
                    "{}/storm/{}/{}",
                    plan.run_id,
                    step / plan.keys,
                    step % plan.keys
                );
                let won = matches!(
                    t.claim(&key, &self.owner, plan.lease).await?,
                    Claim::Acquired { .. }
                );
                let mut tally = checks.acquired.lock().unwrap_or_else(|p| p.into_inner());
                *tally.entry(key).or_insert(0) += u32::from(won);
            }
            Workload::Lifecycle => {
                if let Some(key) = self.claim_and_complete(t, plan, checks).await? {
                    self.replay(t, plan, checks, &key).await?;
                }
            }
            Workload::Mixed => {
                if !self.completed.is_empty() && self.rng.random_bool(plan.dup_rate) {
                    let i = self.rng.random_range(0..self.completed.len());
                    let key = self.completed[i].clone();
                    self.replay(t, plan, checks, &key).await?;
                } else if let Some(key) = self.claim_and_complete(t, plan, checks).await? {
                    checks.verified();
                    if self.completed.len() < 10_000 {
                        self.completed.push(key);
                    } else {
                        let i = self.rng.random_range(0..self.completed.len());
                        self.completed[i] = key;
                    }
                }
            }
            Workload::Batch => {
                let keys: Vec<String> = (0..plan.batch).map(|_| self.fresh_key(plan)).collect();
                let outs = t.claim_batch(&keys, &self.owner, plan.lease).await?;
                if outs.len() != keys.len() {
                    checks.violation(format!(
                        "a batch of {} keys got {} answers",
                        keys.len(),
                        outs.len()
                    ));
                }
                for (key, out) in keys.iter().zip(outs) {
                    match out {
                        Claim::Acquired { .. } => checks.verified(),
                        other => {
                            checks.violation(format!("fresh key {key} was not acquired: {other:?}"))
                        }
                    }
                }
            }
            Workload::Get => {
                let k = self.rng.random_range(0..plan.keys);
                let key = plan.get_key(k);
                match t.get(&key).await? {
                    Some(r) if r == plan.result_for(&key) => checks.verified(),
                    other => checks.violation(format!(
                        "read of completed {key} returned {:?}",
                        other.map(|r| r.len())
                    )),
                }
            }
        }
        Ok(())
    }

    /// `get` workload set-up: complete key `k` (claim + complete).
    pub async fn preload(&mut self, t: &mut Target, plan: &Plan, k: u64) -> anyhow::Result<()> {
        let key = plan.get_key(k);
        match t.claim(&key, &self.owner, plan.lease).await? {
            Claim::Acquired { token } => {
                let result = plan.result_for(&key);
                if !t
                    .complete(&key, &self.owner, token, &result, plan.retention)
                    .await?
                {
                    anyhow::bail!("preload: complete of {key} refused");
                }
                Ok(())
            }
            other => anyhow::bail!("preload: fresh key {key} not acquired: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storm_plan() -> Plan {
        Plan {
            workload: Workload::Storm,
            run_id: "t".into(),
            keys: 2,
            value_size: 10,
            dup_rate: 0.0,
            lease: Duration::from_secs(60),
            retention: Duration::from_secs(60),
            batch: 1,
        }
    }

    fn tally(counts: &[(&str, u32)]) -> Checks {
        let c = Checks::default();
        let mut t = c.acquired.lock().unwrap();
        for (k, n) in counts {
            t.insert(k.to_string(), *n);
        }
        drop(t);
        c
    }

    #[test]
    fn a_storm_key_granted_twice_fails_the_run() {
        let (ok, detail) = tally(&[("a", 1), ("b", 2)]).verdict(&storm_plan());
        assert!(!ok);
        assert!(detail.contains("b was ACQUIRED 2 times"), "{detail}");
    }

    #[test]
    fn a_storm_key_nobody_got_fails_the_run() {
        let (ok, detail) = tally(&[("a", 0), ("b", 1)]).verdict(&storm_plan());
        assert!(!ok);
        assert!(detail.contains("a was ACQUIRED 0 times"), "{detail}");
    }

    #[test]
    fn a_clean_storm_passes() {
        let (ok, detail) = tally(&[("a", 1), ("b", 1)]).verdict(&storm_plan());
        assert!(ok, "{detail}");
        assert!(detail.contains("each of 2 raced keys"), "{detail}");
    }

    #[test]
    fn results_are_the_key_repeated_to_the_size() {
        let p = Plan {
            value_size: 7,
            ..storm_plan()
        };
        assert_eq!(p.result_for("abc"), b"abcabca");
    }
}
