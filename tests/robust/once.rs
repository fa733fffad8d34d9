//! Workers that use `Client::run_once` as a user would, and the check of
//! what a user would notice (issue 15).
//!
//! Each worker has one `Client` over all endpoints with the library's own
//! retries on, and runs works on its own keys (`once-g{generation}-k{j}`,
//! two per 3 s generation, so the two workers contend; a worker that finds
//! its key busy retries it, as a user would). A work records
//! the checkpoint it was handed, takes 2–8 steps of 150–500 ms saving a
//! checkpoint after each, and at the end, if its lease is not lost, applies
//! its effect to a test-side ledger (the downstream system). Some works
//! "crash": the `run_once` future is dropped mid-work, nothing completes or
//! releases, the lease runs out and someone takes over.
//!
//! These keys stay out of the linearizability history (its model knows
//! nothing of the helper's internal calls); [`check`] is a pure function
//! over what the workers recorded, the ledger and a final read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemkv::client::{Claimed, ClientError, ClientOptions, RunError, RunOptions, RunOutcome};
use idemkv::pb::api;
use idemkv::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::robust::history::now_ms;

pub const NS: &str = "robust-once";
pub const WORKERS: usize = 2;
pub const LEASE: Duration = Duration::from_secs(1);
const GENERATION_MS: u128 = 3_000;
const KEYS_PER_GENERATION: usize = 2;
/// The crash rate once a takeover has received a checkpoint; until then
/// crashes are likelier, so that every run shows the crash path.
const CRASH_P: f64 = 0.2;
const CRASH_P_UNTIL_SEEN: f64 = 0.5;
/// A work's steps, and how long each takes: long enough that a work often
/// outlives an election after its leader stops (a lease it could not renew
/// must stop it).
const STEPS: std::ops::RangeInclusive<usize> = 2..=8;
const STEP_MS: std::ops::RangeInclusive<u64> = 150..=500;
/// Everything runs on one host's clock: only rounding to whole ms.
pub const ROUNDING_MS: u64 = 3;

/// How one `run_once` call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ran {
        token: u64,
        result: String,
    },
    Replayed {
        token: u64,
        result: String,
    },
    Busy,
    Failed,
    LeaseLost {
        token: u64,
        fenced: bool,
    },
    GrantExpired {
        token: u64,
    },
    /// The client gave up (timeouts, no leader): the outcome is unknown.
    /// `fault`: why this error fails the run (a server's INTERNAL, UNKNOWN
    /// or DATA_LOSS, a refusal of valid input, a bad reply).
    Error {
        message: String,
        fault: Option<String>,
    },
    /// The caller dropped the run mid-work.
    Crashed,
}

#[derive(Debug, Clone)]
pub struct CallRec {
    pub id: usize,
    pub worker: usize,
    pub key: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
}

/// One execution of a work (a grant that reached the closure).
#[derive(Debug, Clone)]
pub struct Exec {
    /// The `CallRec::id` of the call that ran it.
    pub call: usize,
    pub key: String,
    pub token: u64,
    pub previous_owner: Option<String>,
    /// When the work started (the grant was received), test clock.
    pub grant_ms: u64,
    /// The checkpoint it was handed.
    pub checkpoint: Option<String>,
    /// Checkpoints it saved, with the time each was saved.
    pub saved: Vec<(String, u64)>,
}

/// One effect in the downstream ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    pub token: u64,
    /// When the execution got its grant.
    pub grant_ms: u64,
    /// When the effect was applied.
    pub at_ms: u64,
}

/// The record as the final linearizable read found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    Absent,
    Completed {
        token: u64,
        result: String,
    },
    /// Any other state (in progress, available, failed).
    Other(String),
}

#[derive(Debug, Clone, Default)]
pub struct Records {
    pub calls: Vec<CallRec>,
    pub execs: Vec<Exec>,
    pub ledger: BTreeMap<String, Vec<Effect>>,
    pub finals: BTreeMap<String, Final>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub calls: usize,
    pub ran: usize,
    pub replayed: usize,
    pub busy: usize,
    pub crashed: usize,
    pub lease_lost: usize,
    pub grant_expired: usize,
    pub errors: usize,
    pub takeovers: usize,
    pub takeovers_with_checkpoint: usize,
    pub effects: usize,
    pub keys: usize,
}

impl Report {
    pub fn summary(&self) -> String {
        format!(
            "run_once: {} calls ({} ran, {} replayed, {} busy, {} crashed, {} lease lost, \
             {} grant expired, {} client errors), {} takeovers ({} with a checkpoint), \
             {} effects on {} keys, {} problems",
            self.calls,
            self.ran,
            self.replayed,
            self.busy,
            self.crashed,
            self.lease_lost,
            self.grant_expired,
            self.errors,
            self.takeovers,
            self.takeovers_with_checkpoint,
            self.effects,
            self.keys,
            self.problems.len()
        )
    }
}

fn result_of(key: &str, token: u64) -> String {
    format!("{key}|{token}")
}

/// The checks (ROBUSTNESS.md, Workload): one saved result per key, that
/// belongs to an execution that did its effect; no two executions' windows
/// [grant, effect] overlap on a key; a handed checkpoint was saved on the
/// key by an earlier token before the grant; no server fault.
pub fn check(r: &Records) -> Report {
    let mut rep = Report {
        calls: r.calls.len(),
        ..Report::default()
    };
    let mut p = Vec::new();
    let call_of: BTreeMap<usize, &CallRec> = r.calls.iter().map(|c| (c.id, c)).collect();
    let effect_of = |key: &str, token: u64| {
        r.ledger
            .get(key)
            .is_some_and(|es| es.iter().any(|e| e.token == token))
    };
    // A saved result must be the one its token's execution would save, and
    // that execution must have done its effect and not been told its lease
    // was lost (then its result is never saved).
    let saved_ok = |p: &mut Vec<String>, key: &str, token: u64, result: &str, what: &str| {
        if result != result_of(key, token) {
            p.push(format!(
                "{key}: {what} result {result:?} with token {token} is not that execution's result"
            ));
        }
        if !effect_of(key, token) {
            p.push(format!(
                "{key}: {what} result of token {token}, whose execution never applied its effect"
            ));
        }
        let told_lost = r
            .execs
            .iter()
            .filter(|e| e.key == key && e.token == token)
            .filter_map(|e| call_of.get(&e.call))
            .find(|c| {
                matches!(
                    c.outcome,
                    Outcome::LeaseLost { .. } | Outcome::GrantExpired { .. } | Outcome::Crashed
                )
            });
        if let Some(c) = told_lost {
            p.push(format!(
                "{key}: {what} result of token {token}, whose call ended {:?} (a result never saved)",
                c.outcome
            ));
        }
    };

    // 1, 2 and 5: outcomes.
    let mut results: BTreeMap<&str, BTreeSet<(u64, &str)>> = BTreeMap::new();
    for c in &r.calls {
        match &c.outcome {
            Outcome::Ran { token, result } => {
                rep.ran += 1;
                results.entry(&c.key).or_default().insert((*token, result));
                saved_ok(&mut p, &c.key, *token, result, "a Ran");
            }
            Outcome::Replayed { token, result } => {
                rep.replayed += 1;
                results.entry(&c.key).or_default().insert((*token, result));
                saved_ok(&mut p, &c.key, *token, result, "a replayed");
            }
            Outcome::Busy => rep.busy += 1,
            Outcome::Failed => {}
            Outcome::LeaseLost { .. } => rep.lease_lost += 1,
            Outcome::GrantExpired { .. } => rep.grant_expired += 1,
            Outcome::Crashed => rep.crashed += 1,
            Outcome::Error { message, fault } => {
                rep.errors += 1;
                if let Some(f) = fault {
                    p.push(format!("{}: run_once failed: {f}: {message}", c.key));
                }
            }
        }
    }
    let keys: BTreeSet<&str> = r.calls.iter().map(|c| c.key.as_str()).collect();
    rep.keys = keys.len();
    for key in &keys {
        let fin = r.finals.get(*key);
        match results.get(key) {
            Some(set) if set.len() > 1 => {
                p.push(format!("{key}: more than one saved result: {set:?}"));
            }
            Some(set) => {
                let (token, result) = set.iter().next().copied().unwrap_or_default();
                let want = Final::Completed {
                    token,
                    result: result.to_string(),
                };
                if fin != Some(&want) {
                    p.push(format!(
                        "{key}: the final read shows {fin:?}, calls saw {want:?}"
                    ));
                }
            }
            None => match fin {
                None => p.push(format!("{key}: no final read")),
                Some(Final::Completed { token, result }) => {
                    saved_ok(&mut p, key, *token, result, "the final read's")
                }
                Some(_) => {}
            },
        }
    }

    // 3: exclusivity as the user sees it.
    for (key, effects) in &r.ledger {
        rep.effects += effects.len();
        for (i, a) in effects.iter().enumerate() {
            for b in &effects[i + 1..] {
                if a.token == b.token {
                    p.push(format!("{key}: token {} applied its effect twice", a.token));
                    continue;
                }
                let start = a.grant_ms.max(b.grant_ms);
                let end = a.at_ms.min(b.at_ms);
                if start + ROUNDING_MS < end {
                    p.push(format!(
                        "{key}: executions overlap: token {} held [{}, {}], token {} held [{}, {}] \
                         (effect applied {} ms into the other's hold)",
                        a.token,
                        a.grant_ms,
                        a.at_ms,
                        b.token,
                        b.grant_ms,
                        b.at_ms,
                        end - start
                    ));
                }
            }
        }
    }

    // 4: checkpoints.
    for e in &r.execs {
        if e.previous_owner.is_some() {
            rep.takeovers += 1;
        }
        let Some(cp) = &e.checkpoint else { continue };
        rep.takeovers_with_checkpoint += 1;
        let saver = r
            .execs
            .iter()
            .find(|s| s.key == e.key && s.saved.iter().any(|(c, _)| c == cp));
        let Some(s) = saver else {
            let other = r
                .execs
                .iter()
                .find(|s| s.saved.iter().any(|(c, _)| c == cp));
            match other {
                Some(o) => p.push(format!(
                    "{}: token {} was handed checkpoint {cp:?}, saved on another key ({})",
                    e.key, e.token, o.key
                )),
                None => p.push(format!(
                    "{}: token {} was handed checkpoint {cp:?}, which no execution saved",
                    e.key, e.token
                )),
            }
            continue;
        };
        if s.token >= e.token {
            p.push(format!(
                "{}: token {} was handed checkpoint {cp:?}, saved by token {} (not an earlier holder)",
                e.key, e.token, s.token
            ));
        }
        let at = s
            .saved
            .iter()
            .filter(|(c, _)| c == cp)
            .map(|(_, t)| *t)
            .min()
            .unwrap_or(0);
        if at > e.grant_ms + ROUNDING_MS {
            p.push(format!(
                "{}: token {} was handed checkpoint {cp:?} at {}, saved only at {at} (from the future)",
                e.key, e.token, e.grant_ms
            ));
        }
    }
    rep.problems = p;
    rep
}

/// The run's `run_once` workers: what they recorded so far.
pub struct OnceRun {
    pub stop: AtomicBool,
    started: Instant,
    /// Whether a failed call's error was answered by a server (see
    /// `workload::origin`).
    from_server: fn(&ClientError) -> bool,
    next_call: AtomicUsize,
    calls: Mutex<Vec<CallRec>>,
    execs: Mutex<Vec<Exec>>,
    ledger: Mutex<BTreeMap<String, Vec<Effect>>>,
    checkpoint_seen: AtomicBool,
}

/// A client over every endpoint with the library's retries on.
fn client(api: &[String], request_timeout: Duration, retry_for: Duration) -> Client {
    let opts = ClientOptions {
        request_timeout,
        retry_for,
        ..ClientOptions::default()
    };
    Client::with_options(api, opts).expect("client")
}

impl OnceRun {
    pub fn new(started: Instant, from_server: fn(&ClientError) -> bool) -> Arc<OnceRun> {
        Arc::new(OnceRun {
            stop: AtomicBool::new(false),
            started,
            from_server,
            next_call: AtomicUsize::new(0),
            calls: Mutex::default(),
            execs: Mutex::default(),
            ledger: Mutex::default(),
            checkpoint_seen: AtomicBool::new(false),
        })
    }

    /// Start the workers, one client each over every endpoint.
    pub fn spawn(self: &Arc<Self>, api: &[String], seed: u64) -> Vec<tokio::task::JoinHandle<()>> {
        (0..WORKERS)
            .map(|id| {
                let client = client(api, Duration::from_secs(1), Duration::from_secs(3));
                let rng = StdRng::seed_from_u64(seed ^ (0x0ce0 + id as u64));
                tokio::spawn(self.clone().worker(id, client, rng))
            })
            .collect()
    }

    /// The keys used, and what was recorded (the final reads to add).
    pub fn records(&self) -> Records {
        Records {
            calls: self.calls.lock().unwrap().clone(),
            execs: self.execs.lock().unwrap().clone(),
            ledger: self.ledger.lock().unwrap().clone(),
            finals: BTreeMap::new(),
        }
    }

    async fn worker(self: Arc<Self>, id: usize, client: Client, mut rng: StdRng) {
        let mut busy: Option<String> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let generation = self.started.elapsed().as_millis() / GENERATION_MS;
            let j = rng.random_range(0..KEYS_PER_GENERATION);
            // A user retries a request that found its key busy, so a key
            // whose holder is gone is taken over as soon as its lease ends.
            let key = match busy.take() {
                Some(k) if rng.random_bool(0.7) => k,
                _ => format!("once-g{generation}-k{j}"),
            };
            if self.call(id, &client, key.clone(), &mut rng).await == Outcome::Busy {
                busy = Some(key);
            }
            let pause = rng.random_range(20..150);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    async fn call(
        self: &Arc<Self>,
        worker: usize,
        client: &Client,
        key: String,
        rng: &mut StdRng,
    ) -> Outcome {
        let steps: Vec<u64> = (0..rng.random_range(STEPS))
            .map(|_| rng.random_range(STEP_MS))
            .collect();
        let p = if self.checkpoint_seen.load(Ordering::Relaxed) {
            CRASH_P
        } else {
            CRASH_P_UNTIL_SEEN
        };
        // Crash after the 2nd step or later (so a renewal has likely
        // carried a checkpoint), some way into the next one.
        let crash = rng
            .random_bool(p)
            .then(|| (rng.random_range(2..=steps.len()), rng.random_range(0..=400)));
        self.call_with(worker, client, key, steps, crash).await
    }

    /// Whether some work under the faults was handed a checkpoint.
    pub fn checkpoint_seen(&self) -> bool {
        self.checkpoint_seen.load(Ordering::Relaxed)
    }

    /// On the healed cluster: a work saves two checkpoints and crashes,
    /// and another caller retries the key until it takes it over, which
    /// must hand it the last checkpoint. For runs whose faults left no
    /// takeover with a checkpoint (few calls ran), so that every run checks
    /// one; the calls are recorded and checked like the others.
    pub async fn scripted_takeover(self: &Arc<Self>, api: &[String]) {
        let client = client(api, Duration::from_secs(2), Duration::from_secs(10));
        let key = "once-scripted".to_string();
        let first = self
            .call_with(0, &client, key.clone(), vec![400, 400, 400], Some((2, 0)))
            .await;
        assert_eq!(first, Outcome::Crashed, "the scripted work did not run");
        let deadline = Instant::now() + Duration::from_secs(15);
        while self
            .call_with(1, &client, key.clone(), vec![50], None)
            .await
            == Outcome::Busy
        {
            assert!(
                Instant::now() < deadline,
                "no takeover of {key} within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call_with(
        self: &Arc<Self>,
        worker: usize,
        client: &Client,
        key: String,
        steps: Vec<u64>,
        crash: Option<(usize, u64)>,
    ) -> Outcome {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut opts = RunOptions::new(format!("o{worker}"), LEASE);
        opts.retention = Some(Duration::from_secs(24 * 3600));
        let (crash_tx, crash_rx) = tokio::sync::oneshot::channel::<()>();
        let run = self.clone();
        let k = key.clone();
        let work = move |claimed: Claimed| async move {
            let grant_ms = now_ms();
            let token = claimed.token;
            let checkpoint = claimed
                .checkpoint
                .as_ref()
                .map(|c| String::from_utf8_lossy(c).into_owned());
            if checkpoint.is_some() {
                run.checkpoint_seen.store(true, Ordering::Relaxed);
            }
            let x = {
                let mut execs = run.execs.lock().unwrap();
                execs.push(Exec {
                    call: id,
                    key: k.clone(),
                    token,
                    previous_owner: claimed.previous_owner.clone(),
                    grant_ms,
                    checkpoint,
                    saved: Vec::new(),
                });
                execs.len() - 1
            };
            for i in 0..=steps.len() {
                if let Some((_, cut)) = crash.filter(|(after, _)| *after == i) {
                    // Crash: the caller drops the run from here.
                    tokio::time::sleep(Duration::from_millis(cut)).await;
                    let _ = crash_tx.send(());
                    match std::future::pending::<std::convert::Infallible>().await {}
                }
                let Some(ms) = steps.get(i) else { break };
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                if claimed.is_lost() {
                    // Stop: the result will not be saved anyway.
                    return Ok::<_, String>(String::new());
                }
                let cp = format!("{k}|{token}|{}", i + 1);
                claimed.save_checkpoint(cp.clone());
                run.execs.lock().unwrap()[x].saved.push((cp, now_ms()));
            }
            {
                // The downstream applies the effect only while the lease
                // holds; the check and the effect are one step.
                let mut ledger = run.ledger.lock().unwrap();
                if !claimed.is_lost() {
                    ledger.entry(k.clone()).or_default().push(Effect {
                        token,
                        grant_ms,
                        at_ms: now_ms(),
                    });
                }
            }
            Ok(result_of(&k, token))
        };
        let start_ms = now_ms();
        let outcome = tokio::select! {
            r = client.run_once(NS, key.as_bytes(), &opts, work) => self.outcome(r),
            Ok(()) = crash_rx => Outcome::Crashed,
        };
        let rec = CallRec {
            id,
            worker,
            key,
            start_ms,
            end_ms: now_ms(),
            outcome: outcome.clone(),
        };
        if std::env::var_os("IDEMKV_ONCE_TRACE").is_some() {
            let t0 = now_ms() as f64 - self.started.elapsed().as_millis() as f64;
            eprintln!(
                "  once o{worker} {} {:.1}s..{:.1}s {:?}",
                rec.key,
                (rec.start_ms as f64 - t0) / 1e3,
                (rec.end_ms as f64 - t0) / 1e3,
                rec.outcome
            );
        }
        self.calls.lock().unwrap().push(rec);
        outcome
    }

    fn outcome(&self, r: Result<RunOutcome, RunError<String>>) -> Outcome {
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        match r {
            Ok(RunOutcome::Ran { completion, token }) => Outcome::Ran {
                token,
                result: text(completion.result),
            },
            Ok(RunOutcome::Replayed { completion, token }) => Outcome::Replayed {
                token,
                result: text(completion.result),
            },
            Ok(RunOutcome::Busy { .. }) => Outcome::Busy,
            Ok(RunOutcome::Failed { .. }) => Outcome::Failed,
            Err(RunError::LeaseLost { token, why }) => Outcome::LeaseLost {
                token,
                fenced: why == idemkv::client::LeaseLoss::Fenced,
            },
            Err(RunError::GrantExpired { token, .. }) => Outcome::GrantExpired { token },
            Err(e @ RunError::ResultTooLarge { .. }) => Outcome::Error {
                fault: Some("the results here are small, yet the store refused one".into()),
                message: e.to_string(),
            },
            Err(RunError::Work(e)) => Outcome::Error {
                fault: Some("the work never fails, yet run_once said it did".into()),
                message: e,
            },
            Err(RunError::Client(e)) => Outcome::Error {
                fault: self.fault(&e),
                message: e.to_string(),
            },
            // The work ran; only its result was not saved.
            Err(RunError::CompleteFailed { error, .. }) => Outcome::Error {
                fault: self.fault(&error),
                message: error.to_string(),
            },
            Err(e) => Outcome::Error {
                fault: Some("an error this checker does not know".into()),
                message: e.to_string(),
            },
        }
    }

    /// Why a client error fails the run, if it does.
    fn fault(&self, e: &ClientError) -> Option<String> {
        match e.code() {
            Some(Code::Internal | Code::Unknown | Code::DataLoss) if (self.from_server)(e) => {
                Some("the server failed a request".into())
            }
            Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange) => {
                Some("a valid request was refused".into())
            }
            _ if matches!(e, ClientError::Protocol(_) | ClientError::Config(_)) => {
                Some("bad reply or configuration".into())
            }
            _ => None,
        }
    }
}

/// A linearizable Get of every key through a fresh client (after healing).
pub async fn final_reads(api: &[String], r: &mut Records) {
    let client = client(api, Duration::from_secs(2), Duration::from_secs(20));
    let keys: BTreeSet<String> = r.calls.iter().map(|c| c.key.clone()).collect();
    for key in keys {
        let rec = client
            .get(api::GetRequest {
                namespace: NS.into(),
                key: key.clone().into_bytes(),
                consistency: api::Consistency::Linearizable as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("final read of {key}: {e}"));
        let fin = match rec {
            None => Final::Absent,
            Some(rec) if rec.state == api::RecordState::Completed as i32 => Final::Completed {
                token: rec.token,
                result: String::from_utf8_lossy(&rec.result).into_owned(),
            },
            Some(rec) => Final::Other(format!(
                "{:?} token {}",
                api::RecordState::try_from(rec.state),
                rec.token
            )),
        };
        r.finals.insert(key, fin);
    }
}
