//! The workload: clients that claim, complete, renew, release, delete and
//! read while faults strike, recording every attempt as one operation of
//! the history (`robust::history`), with its outcome or "unknown".
//!
//! Every claim (batch items too) carries a request fingerprint: mostly the
//! key's usual one, sometimes none (a client that does not send one), and
//! now and then another one (the key reused for a different request), so
//! `FINGERPRINT_MISMATCH` is answered, and checked, under every fault.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idemkv::client::{ClientError, ClientOptions};
use idemkv::pb::api::{self, claim_batch_item::Outcome as Item, claim_response::Outcome};
use idemkv::Client;
use rand::rngs::StdRng;
use rand::Rng;
use tonic::Code;

use crate::robust::history::{now_ms, Call, Op, Ret, Seen};

pub const NS: &str = "robust";
/// Short leases so that expiry and takeover happen all the time.
pub const LEASE_MS: u64 = 1_000;
pub const MAX_ATTEMPTS: u32 = 5;
/// Keys rotate to a fresh generation every so often, which keeps each
/// key's history short enough for the exhaustive search.
const GENERATION: Duration = Duration::from_secs(4);
const KEYS_PER_GENERATION: usize = 5;
/// The retention of the short-lived keys (`-s` ones): the spec's minimum
/// plus a little, so that sweeps run under every fault.
pub const SHORT_RETENTION_MS: u64 = 1_500;

/// Half the keys are short-lived: their records are swept 1.5 s after they
/// complete, fail or go idle; the others keep the default (24 h).
pub fn retention_of(key: &str) -> Option<u64> {
    key.ends_with("-s").then_some(SHORT_RETENTION_MS)
}
pub const WORKERS: usize = 6;

/// The fingerprint of the request every key normally guards.
pub const USUAL_FINGERPRINT: &str = "request-1";
/// Another request's fingerprint: a key reused by mistake.
pub const OTHER_FINGERPRINT: &str = "request-2";

/// Fingerprints a claim sends: the usual one 82 %, none 11 %, another
/// request's 7 % (enough mismatches per run without starving the keys:
/// a record created by the other request refuses the usual one until it
/// is deleted or swept).
fn pick_fingerprint(rng: &mut StdRng) -> Option<String> {
    let roll: f64 = rng.random();
    if roll < 0.82 {
        Some(USUAL_FINGERPRINT.to_string())
    } else if roll < 0.93 {
        None
    } else {
        Some(OTHER_FINGERPRINT.to_string())
    }
}

#[derive(Default)]
pub struct Recorder {
    pub ops: Mutex<Vec<Op>>,
}

impl Recorder {
    pub fn push(&self, process: usize, key: &str, call: Call, ret: Ret, invoke_ms: u64, end: u64) {
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

pub fn seen(r: &api::Record) -> Option<Seen> {
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

/// Where a failed call's status came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A server answered it (a status read off the wire).
    Server,
    /// The client's own transport gave up after the request may have
    /// left (timeout, broken connection): the outcome is unknown.
    Transport,
    /// The client never had a connection to send it on.
    NotSent,
}

/// A status made by the client's transport carries the transport error as
/// its source; one read off the wire has none. A connection refused at
/// connect time never carried the request.
pub fn origin(e: &ClientError) -> Origin {
    use std::error::Error as _;
    let ClientError::Status(s) = e else {
        return Origin::Transport;
    };
    let Some(mut cause) = s.source() else {
        return Origin::Server;
    };
    loop {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Origin::NotSent;
            }
        }
        match cause.source() {
            Some(next) => cause = next,
            None => return Origin::Transport,
        }
    }
}

/// A definite refusal the model knows, or `Unknown` (timeout, broken
/// connection, no leader: maybe applied). A refusal of valid input, and any
/// INTERNAL, UNKNOWN or DATA_LOSS a server answers, is a run error: a
/// server that fails that way has a bug, whatever the fault.
fn error_ret(e: &ClientError, errors: &Mutex<Vec<String>>) -> Ret {
    let from_server = origin(e) == Origin::Server;
    match (e.code(), e.reason()) {
        (Some(Code::FailedPrecondition), Some("LEASE_LOST")) => Ret::LeaseLost,
        (Some(Code::FailedPrecondition), Some("ALREADY_COMPLETED")) => Ret::AlreadyCompleted,
        (Some(Code::FailedPrecondition), Some("FINGERPRINT_MISMATCH")) => Ret::FingerprintMismatch,
        (Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange), _) => {
            errors
                .lock()
                .unwrap()
                .push(format!("a valid request was refused: {e}"));
            Ret::Unknown
        }
        (Some(Code::Internal | Code::Unknown | Code::DataLoss), _) if from_server => {
            errors
                .lock()
                .unwrap()
                .push(format!("the server failed a request: {e}"));
            Ret::Unknown
        }
        _ if matches!(e, ClientError::Protocol(_)) => {
            errors.lock().unwrap().push(format!("bad reply: {e}"));
            Ret::Unknown
        }
        _ => Ret::Unknown,
    }
}

pub struct Shared {
    pub rec: Recorder,
    pub errors: Mutex<Vec<String>>,
    pub stop: AtomicBool,
    pub started: Instant,
    pub batches: AtomicU64,
}

/// One client per endpoint, no retries inside the library: every attempt
/// is its own recorded operation, and a failed one moves to the next node.
pub fn worker_clients(api: &[String]) -> Vec<Client> {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(1),
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    api.iter()
        .map(|a| Client::with_options([a], opts.clone()).expect("client"))
        .collect()
}

pub struct Worker {
    pub id: usize,
    pub clients: Vec<Client>,
    pub at: usize,
    pub rng: StdRng,
    pub shared: Arc<Shared>,
    /// (key, token) of the claim this worker holds.
    pub held: Option<(String, u64)>,
    /// (key, token) of the last result this worker completed.
    pub done: Option<(String, u64)>,
    /// A claim whose outcome is unknown, to retry with the same claim_id
    /// (and the same request, so the same fingerprint).
    pub unsure: Option<(String, String, Option<String>)>,
    /// The last call failed before reaching any server.
    pub not_sent: bool,
    /// Unknown outcomes in a row: the worker backs off like a real client
    /// (without it, an outage piles dozens of unknown claims onto one key,
    /// more than the checker's exhaustive search can place).
    pub unknown_streak: u32,
    pub n: u64,
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
        let short = if j % 2 == 1 { "-s" } else { "" };
        format!("g{generation}-k{j}{short}")
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
        self.not_sent = origin(e) == Origin::NotSent;
        error_ret(e, &self.shared.errors)
    }

    pub async fn run(mut self) {
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
            } else if roll < 0.63 {
                self.renew(&key, token).await
            } else if roll < 0.78 {
                self.release(&key, token).await
            } else if roll < 0.83 {
                // The job's business row went away: forget the claim.
                self.delete(key, Some(token)).await
            } else {
                // Abandon it: the lease runs out and someone takes over.
                self.held = None;
            }
        } else if roll < 0.15 && self.unsure.is_some() {
            let (key, claim_id, fingerprint) = self.unsure.take().unwrap();
            self.claim(key, claim_id, fingerprint).await
        } else if roll < 0.6 {
            let key = self.pick_key();
            let fingerprint = pick_fingerprint(&mut self.rng);
            self.claim(key, uuid::Uuid::new_v4().to_string(), fingerprint)
                .await
        } else if roll < 0.75 {
            self.get().await
        } else if roll < 0.87 {
            self.wait().await
        } else if roll < 0.9 && self.done.is_some() {
            // Forget a completed result, fenced by the token that made it.
            let (key, token) = self.done.take().unwrap();
            self.delete(key, Some(token)).await
        } else if roll < 0.92 {
            let key = self.pick_key();
            self.delete(key, None).await
        } else {
            self.batch().await
        }
    }

    /// Delete, fenced by `token` or not. A fenced one ends the hold.
    async fn delete(&mut self, key: String, token: Option<u64>) {
        let req = api::DeleteRequest {
            namespace: NS.into(),
            key: key.clone().into_bytes(),
            token,
        };
        let t = now_ms();
        let ret = match self.client().delete(req).await {
            Ok(_) => Ret::Deleted,
            Err(e) => self.err(&e),
        };
        let held_here = self.held.as_ref().is_some_and(|(k, _)| *k == key);
        if token.is_some() && ret != Ret::Unknown && held_here {
            self.held = None;
        }
        self.record(&key, Call::Delete { token }, ret, t);
    }

    async fn claim(&mut self, key: String, claim_id: String, fingerprint: Option<String>) {
        let call = Call::Claim {
            owner: self.owner(),
            claim_id: claim_id.clone(),
            lease_ms: LEASE_MS,
            batch: None,
            all_or_nothing: false,
            retention_ms: retention_of(&key),
            fingerprint: fingerprint.clone(),
        };
        let req = api::ClaimRequest {
            namespace: NS.into(),
            key: key.clone().into_bytes(),
            owner: self.owner(),
            claim_id: claim_id.clone(),
            lease_ms: LEASE_MS,
            max_attempts: MAX_ATTEMPTS,
            retention_ms: retention_of(&key).unwrap_or(0),
            fingerprint: fingerprint.clone().map(String::into_bytes),
        };
        let t = now_ms();
        let ret = match self.client().claim(req).await {
            Ok(o) => claim_ret(o),
            Err(e) => self.err(&e),
        };
        match &ret {
            Ret::Acquired { token, .. } => self.held = Some((key.clone(), *token)),
            Ret::Unknown => self.unsure = Some((key.clone(), claim_id, fingerprint)),
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
        if ret == Ret::Done {
            self.done = Some((key.to_string(), token));
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
            permanent: false,
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
        let fingerprints: Vec<Option<String>> = keys
            .iter()
            .map(|_| pick_fingerprint(&mut self.rng))
            .collect();
        let items = keys
            .iter()
            .zip(&claim_ids)
            .zip(&fingerprints)
            .map(|((k, c), f)| api::ClaimRequest {
                namespace: NS.into(),
                key: k.clone().into_bytes(),
                owner: self.owner(),
                claim_id: c.clone(),
                lease_ms: LEASE_MS,
                max_attempts: MAX_ATTEMPTS,
                retention_ms: retention_of(k).unwrap_or(0),
                fingerprint: f.clone().map(String::into_bytes),
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
                    Some(Item::Error(e)) if e.reason == "FINGERPRINT_MISMATCH" => {
                        Ret::FingerprintMismatch
                    }
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
        let items = keys.iter().zip(claim_ids).zip(fingerprints).zip(rets);
        for (((key, claim_id), fingerprint), ret) in items {
            // Hold the first acquired key; the other lease runs out.
            if let (None, Ret::Acquired { token, .. }) = (&self.held, &ret) {
                self.held = Some((key.clone(), *token));
            }
            let call = Call::Claim {
                owner: self.owner(),
                claim_id,
                lease_ms: LEASE_MS,
                batch: Some(id),
                all_or_nothing,
                retention_ms: retention_of(key),
                fingerprint,
            };
            self.record(key, call, ret, t);
        }
    }
}

/// A linearizable Get of every key, recorded like any other read.
pub async fn final_reads(api: &[String], keys: &BTreeSet<String>, shared: &Shared, process: usize) {
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

/// With every node up and healed: each node's own copy (a serializable
/// Get) of every key, read while every node stood at one applied index,
/// must be the same record; the state machine is deterministic, so any
/// difference is a replica that diverged (a token minted differently, a
/// sweep applied on one node only), even where no client saw it. Returns
/// the disagreements, or why the nodes could not be compared.
pub async fn replicas_disagree(api: &[String], keys: &BTreeSet<String>) -> Vec<String> {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    let clients: Vec<Client> = api
        .iter()
        .map(|a| Client::with_options([a.as_str()], opts.clone()).expect("client"))
        .collect();
    let applied = || async {
        let mut out = Vec::new();
        for c in &clients {
            out.push(c.status().await.ok().map(|s| s.applied_index));
        }
        out
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let before = applied().await;
        let at = before[0];
        if at.is_none() || before.iter().any(|a| *a != at) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let mut copies: Vec<Vec<Option<api::Record>>> = Vec::new();
        for c in &clients {
            let mut recs = Vec::new();
            for key in keys {
                let r = c
                    .get(api::GetRequest {
                        namespace: NS.into(),
                        key: key.clone().into_bytes(),
                        consistency: api::Consistency::Serializable as i32,
                    })
                    .await;
                recs.push(r.ok().flatten());
            }
            copies.push(recs);
        }
        if applied().await != before {
            continue;
        }
        let mut out = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            for (n, copy) in copies.iter().enumerate().skip(1) {
                if copy[k] != copies[0][k] {
                    out.push(format!(
                        "replicas disagree on {key} at applied index {}: node 1 has {:?}, node {} has {:?}",
                        at.unwrap_or(0),
                        copies[0][k],
                        n + 1,
                        copy[k]
                    ));
                }
            }
        }
        return out;
    }
    vec!["replicas could not be compared: the nodes never stood at one applied index".into()]
}
