//! The history checker.
//!
//! 1. Per-key linearizability against an independent model of one record
//!    (written from SPEC §1–2, not from `src/record.rs`): a depth-first
//!    search in the style of Wing & Gong / Lowe / porcupine over the orders
//!    the operations' time windows allow, memoised on (linearized set, model
//!    state). Keys are independent (P-compositionality), so each is searched
//!    alone. An operation whose outcome is unknown may take effect at any
//!    point after its invocation, or never.
//! 2. Direct checks with plain messages: tokens strictly increase per key;
//!    a completed result never changes or disappears; no two tokens both
//!    complete one key; an all-or-nothing batch is applied whole or not at
//!    all.
//!
//! Time. The servers decide leases with their wall clock; the checker only
//! knows each operation's window on the test's clock. A lease may be taken
//! over only if the taking claim could have happened at or after the lease
//! deadline, allowing `drift_ms` between the clocks: `complete + drift >=
//! deadline`. Symmetrically a claim may be refused for a live lease only if
//! `invoke - drift < deadline`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::history::{Call, Op, Ret, Seen};

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// The largest difference allowed between a server's clock and the
    /// test's (clock-skew nemesis: the skew plus scheduling slack).
    pub drift_ms: u64,
    /// `max_attempts` every claim of the workload uses (0 = unlimited).
    pub max_attempts: u32,
    /// Give up on a key after exploring this many states (reported as
    /// undecided, which fails the run: shorten per-key histories).
    pub max_states: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            drift_ms: 500,
            max_attempts: 0,
            max_states: 2_000_000,
        }
    }
}

/// A token the model knows, or one granted by an operation whose reply was
/// lost: only known to be greater than every token granted before it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Tok {
    Known(u64),
    Above(u64),
}

impl Tok {
    /// Does the holder of token `t` hold this one? A worker only knows tokens
    /// it was granted, and an unknown grant on the same key is a different
    /// log entry, so `Above` never matches.
    fn is(&self, t: u64) -> bool {
        *self == Tok::Known(t)
    }

    /// Narrow to an observed value, if it can be this token.
    fn observe(&self, t: u64) -> Option<Tok> {
        match self {
            Tok::Known(k) => (*k == t).then_some(Tok::Known(t)),
            Tok::Above(f) => (t > *f).then_some(Tok::Known(t)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Rec {
    Absent,
    Held {
        owner: String,
        claim_id: String,
        token: Tok,
        /// The lease deadline lies in `[lo, hi]` (server clock).
        lo: u64,
        hi: u64,
        attempts: u32,
    },
    Available {
        attempts: u32,
        last: Tok,
    },
    Completed {
        token: u64,
        result: String,
    },
    Failed {
        attempts: u32,
        last: Tok,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    rec: Rec,
    /// The greatest token known to have been granted on this key.
    floor: u64,
}

/// One anomaly, in words a user would understand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    pub key: String,
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] key {}: {}", self.kind, self.key, self.detail)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub ops: usize,
    pub unknown: usize,
    pub keys: usize,
    pub states_explored: usize,
    pub anomalies: Vec<Anomaly>,
}

/// Check a whole history.
pub fn check(history: &[Op], cfg: &Config) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut report = Report {
        ops: history.len(),
        unknown: history.iter().filter(|o| o.is_unknown()).count(),
        keys: by_key.len(),
        ..Report::default()
    };
    report.anomalies.extend(check_batches(history));
    for (key, ops) in &by_key {
        report.anomalies.extend(direct_checks(key, ops));
        let (explored, anomaly) = linearizable(key, ops, cfg);
        report.states_explored += explored;
        report.anomalies.extend(anomaly);
    }
    report
}

fn anomaly(key: &str, kind: &'static str, detail: String) -> Anomaly {
    Anomaly {
        key: key.to_string(),
        kind,
        detail,
    }
}

/// What an operation observed about the key's token and completion.
fn granted(op: &Op) -> Option<u64> {
    match op.ret {
        Ret::Acquired { token, .. } => Some(token),
        _ => None,
    }
}

fn completion_seen(op: &Op) -> Option<(u64, &str)> {
    match (&op.call, &op.ret) {
        (_, Ret::Completed { token, result }) => Some((*token, result)),
        (_, Ret::Record(Some(Seen::Completed { token, result }))) => Some((*token, result)),
        (Call::Complete { token, result }, Ret::Done) => Some((*token, result)),
        _ => None,
    }
}

fn direct_checks(key: &str, ops: &[&Op]) -> Vec<Anomaly> {
    let mut out = Vec::new();
    // Tokens strictly increase: a grant that finished before another
    // began has the smaller token; distinct claims never share one.
    let mut grants: Vec<(&Op, u64)> = ops
        .iter()
        .filter_map(|o| granted(o).map(|t| (*o, t)))
        .collect();
    grants.sort_by_key(|(o, _)| o.invoke_ms);
    let mut by_token: HashMap<u64, (&str, &str)> = HashMap::new();
    for (o, t) in &grants {
        if let Call::Claim {
            owner, claim_id, ..
        } = &o.call
        {
            if let Some((ow, cid)) = by_token.insert(*t, (owner, claim_id)) {
                if (ow, cid) != (owner.as_str(), claim_id.as_str()) {
                    out.push(anomaly(
                        key,
                        "duplicate token",
                        format!(
                            "token {t} granted to two claims ({ow}/{cid} and op {})",
                            o.id
                        ),
                    ));
                }
            }
        }
    }
    for (a, ta) in &grants {
        for (b, tb) in &grants {
            if b.invoke_ms > a.end() && tb <= ta && !same_claim(a, b) {
                out.push(anomaly(
                    key,
                    "token not increasing",
                    format!(
                        "op {} was granted token {ta}, then op {} (invoked after it returned) got {tb}",
                        a.id, b.id
                    ),
                ));
            }
        }
    }
    // One completion per key, never replaced, never lost.
    let mut completions: Vec<(&Op, u64, &str)> = ops
        .iter()
        .filter_map(|o| completion_seen(o).map(|(t, r)| (*o, t, r)))
        .collect();
    completions.sort_by_key(|(o, ..)| o.end());
    if let Some((first, t0, r0)) = completions.first() {
        for (o, t, r) in &completions[1..] {
            if (t, r) != (t0, r0) {
                let kind = if t != t0 {
                    "two holders completed"
                } else {
                    "completed result changed"
                };
                out.push(anomaly(
                    key,
                    kind,
                    format!(
                        "op {} saw completion by token {t0} with {r0:?}; op {} saw token {t} with {r:?}",
                        first.id, o.id
                    ),
                ));
            }
        }
        // After a completion was acknowledged, every later answer shows it.
        let acked = first.end();
        for o in ops {
            if o.invoke_ms <= acked || o.is_unknown() {
                continue;
            }
            let lost = match &o.ret {
                Ret::Acquired { .. } | Ret::InProgress { .. } | Ret::NotAttempted | Ret::Failed => {
                    true
                }
                Ret::Record(seen) => !matches!(seen, Some(Seen::Completed { .. })),
                Ret::Renewed { .. } | Ret::Released { .. } => true,
                _ => false,
            };
            if lost {
                out.push(anomaly(
                    key,
                    "lost completion",
                    format!(
                        "op {} saw the completion by token {t0} (done by {acked}); op {} invoked at {} answered {:?}",
                        first.id, o.id, o.invoke_ms, o.ret
                    ),
                ));
            }
        }
    }
    out
}

fn same_claim(a: &Op, b: &Op) -> bool {
    match (&a.call, &b.call) {
        (
            Call::Claim {
                owner: oa,
                claim_id: ca,
                ..
            },
            Call::Claim {
                owner: ob,
                claim_id: cb,
                ..
            },
        ) => oa == ob && ca == cb,
        _ => false,
    }
}

/// A batch is one entry, so the items it granted took consecutive values
/// of the token counter (a token per grant, SPEC §2 Tokens): distinct and
/// without gaps. An all-or-nothing batch is applied whole or not at all.
fn check_batches(history: &[Op]) -> Vec<Anomaly> {
    let mut batches: HashMap<u64, Vec<&Op>> = HashMap::new();
    for op in history {
        if let Call::Claim { batch: Some(b), .. } = op.call {
            batches.entry(b).or_default().push(op);
        }
    }
    let mut out = Vec::new();
    for (b, items) in batches {
        let grants: Vec<u64> = items.iter().filter_map(|o| granted(o)).collect();
        let tokens: HashSet<u64> = grants.iter().copied().collect();
        let (lo, hi) = (tokens.iter().min(), tokens.iter().max());
        let consecutive = match (lo, hi) {
            (Some(lo), Some(hi)) => hi - lo + 1 == grants.len() as u64,
            _ => true,
        };
        if tokens.len() != grants.len() || !consecutive {
            out.push(anomaly(
                &items[0].key,
                "batch split",
                format!(
                    "batch {b} granted tokens {grants:?}; one entry grants distinct, consecutive ones"
                ),
            ));
        }
        let not_attempted = items.iter().any(|o| o.ret == Ret::NotAttempted);
        if not_attempted && !tokens.is_empty() {
            out.push(anomaly(
                &items[0].key,
                "batch half applied",
                format!("batch {b} both acquired items and reported others NOT_ATTEMPTED"),
            ));
        }
    }
    out
}

/// The search. Returns the states explored and the anomaly, if any.
fn linearizable(key: &str, ops: &[&Op], cfg: &Config) -> (usize, Option<Anomaly>) {
    // A read whose answer never came constrains nothing.
    let mut ops: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| !(o.call == Call::Read && o.is_unknown()))
        .collect();
    ops.sort_by_key(|o| o.invoke_ms);
    let mut search = Search {
        ops: &ops,
        cfg,
        seen: HashSet::new(),
        explored: 0,
        deepest: (0, None),
        gave_up: false,
    };
    let start = State {
        rec: Rec::Absent,
        floor: 0,
    };
    let done = vec![0u64; ops.len().div_ceil(64)];
    if search.dfs(&done, 0, &start) {
        return (search.explored, None);
    }
    let detail = if search.gave_up {
        format!(
            "undecided: gave up after {} states over {} operations (shorten the per-key history)",
            search.explored,
            ops.len()
        )
    } else {
        let (depth, stuck) = search.deepest;
        let stuck = stuck
            .map(|i| format!("op {} {:?} -> {:?}", ops[i].id, ops[i].call, ops[i].ret))
            .unwrap_or_default();
        format!(
            "not linearizable: at most {depth} of {} operations could be ordered; \
             cannot place {stuck}",
            ops.len()
        )
    };
    let kind = if search.gave_up {
        "undecided"
    } else {
        "not linearizable"
    };
    (search.explored, Some(anomaly(key, kind, detail)))
}

struct Search<'a> {
    ops: &'a [&'a Op],
    cfg: &'a Config,
    seen: HashSet<(Vec<u64>, State)>,
    explored: usize,
    /// The most operations ordered on any path, and an operation that
    /// could not follow them (for the report).
    deepest: (usize, Option<usize>),
    gave_up: bool,
}

impl Search<'_> {
    fn dfs(&mut self, done: &[u64], count: usize, state: &State) -> bool {
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // Everything left has an unknown outcome: each can take effect
        // last, or never.
        if (0..self.ops.len()).all(|i| is_done(i) || self.ops[i].is_unknown()) {
            return true;
        }
        if self.explored >= self.cfg.max_states {
            self.gave_up = true;
            return false;
        }
        if !self.seen.insert((done.to_vec(), state.clone())) {
            return false;
        }
        self.explored += 1;
        // An operation can come next only if it was invoked before every
        // pending operation returned.
        let horizon = (0..self.ops.len())
            .filter(|&i| !is_done(i))
            .map(|i| self.ops[i].end())
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            if is_done(i) || self.ops[i].invoke_ms > horizon {
                continue;
            }
            let nexts = step(state, self.ops[i], self.cfg);
            if nexts.is_empty() && count >= self.deepest.0 {
                self.deepest = (count, Some(i));
            }
            for next in nexts {
                // An unknown operation that changes nothing here is better
                // left pending: it may still take effect later, or never.
                if self.ops[i].is_unknown() && next == *state {
                    continue;
                }
                let mut d = done.to_vec();
                d[i / 64] |= 1 << (i % 64);
                if self.dfs(&d, count + 1, &next) {
                    return true;
                }
                if self.gave_up {
                    return false;
                }
            }
        }
        false
    }
}

/// The held record `s` with its token and deadline now known exactly (a
/// reply showed them).
fn pin_holder(s: &State, tok: Tok, t: u64, deadline_ms: u64) -> State {
    let mut rec = s.rec.clone();
    if let Rec::Held { token, lo, hi, .. } = &mut rec {
        *token = tok;
        *lo = deadline_ms;
        *hi = deadline_ms;
    }
    State {
        rec,
        floor: s.floor.max(t),
    }
}

/// Every state the model can be in after `op` takes effect in `s` with the
/// recorded outcome (all outcomes when it is unknown). Empty: impossible.
fn step(s: &State, op: &Op, cfg: &Config) -> Vec<State> {
    let inv = op.invoke_ms;
    let end = op.end();
    let drift = cfg.drift_ms;
    let unknown = op.is_unknown();
    let mut out = Vec::new();
    let keep = |out: &mut Vec<State>| out.push(s.clone());
    let put = |out: &mut Vec<State>, rec: Rec| {
        out.push(State {
            rec,
            floor: s.floor,
        })
    };
    match &op.call {
        Call::Claim {
            owner,
            claim_id,
            lease_ms,
            ..
        } => {
            // A grant by this claim, after `attempts` earlier attempts.
            let acquire = |out: &mut Vec<State>, attempts: u32| {
                let attempt = attempts + 1;
                match &op.ret {
                    Ret::Acquired {
                        token,
                        deadline_ms,
                        attempt: a,
                    } => {
                        let earliest = inv.saturating_add(*lease_ms).saturating_sub(drift);
                        let latest = end.saturating_add(*lease_ms).saturating_add(drift);
                        if *token > s.floor
                            && *a == attempt
                            && (earliest..=latest).contains(deadline_ms)
                        {
                            out.push(State {
                                rec: Rec::Held {
                                    owner: owner.clone(),
                                    claim_id: claim_id.clone(),
                                    token: Tok::Known(*token),
                                    lo: *deadline_ms,
                                    hi: *deadline_ms,
                                    attempts: attempt,
                                },
                                floor: *token,
                            });
                        }
                    }
                    Ret::NotAttempted => keep(out),
                    Ret::Unknown => out.push(State {
                        rec: Rec::Held {
                            owner: owner.clone(),
                            claim_id: claim_id.clone(),
                            token: Tok::Above(s.floor),
                            lo: inv.saturating_add(*lease_ms).saturating_sub(drift),
                            hi: u64::MAX,
                            attempts: attempt,
                        },
                        floor: s.floor,
                    }),
                    _ => {}
                }
            };
            match &s.rec {
                Rec::Absent => acquire(&mut out, 0),
                Rec::Held {
                    owner: holder,
                    claim_id: held_id,
                    token,
                    lo,
                    hi,
                    attempts,
                } => {
                    if holder == owner && held_id == claim_id {
                        // A retry of the claim that holds the key.
                        match &op.ret {
                            Ret::Acquired {
                                token: t,
                                deadline_ms,
                                attempt,
                            } => {
                                if let Some(tok) = token.observe(*t) {
                                    if attempt == attempts && (*lo..=*hi).contains(deadline_ms) {
                                        out.push(pin_holder(s, tok, *t, *deadline_ms));
                                    }
                                }
                            }
                            Ret::Unknown | Ret::NotAttempted => keep(&mut out),
                            _ => {}
                        }
                    } else {
                        let may_be_live = inv.saturating_sub(drift) < *hi;
                        let may_be_expired = end.saturating_add(drift) >= *lo;
                        if may_be_live {
                            match &op.ret {
                                Ret::InProgress { owner: o } if o == holder => keep(&mut out),
                                Ret::Unknown => keep(&mut out),
                                _ => {}
                            }
                        }
                        if may_be_expired {
                            let exhausted = cfg.max_attempts > 0 && *attempts >= cfg.max_attempts;
                            if exhausted {
                                if matches!(op.ret, Ret::Failed | Ret::Unknown) {
                                    put(
                                        &mut out,
                                        Rec::Failed {
                                            attempts: *attempts,
                                            last: token.clone(),
                                        },
                                    );
                                }
                            } else {
                                acquire(&mut out, *attempts);
                            }
                        }
                    }
                }
                Rec::Available { attempts, .. } => acquire(&mut out, *attempts),
                Rec::Completed { token, result } => match &op.ret {
                    Ret::Completed {
                        token: t,
                        result: r,
                    } if t == token && r == result => keep(&mut out),
                    Ret::Unknown => keep(&mut out),
                    _ => {}
                },
                Rec::Failed { .. } => {
                    if matches!(op.ret, Ret::Failed | Ret::Unknown) {
                        keep(&mut out)
                    }
                }
            }
        }
        Call::Renew { token, lease_ms } => match &s.rec {
            Rec::Held {
                token: held,
                lo,
                hi,
                ..
            } if held.is(*token) => {
                // A renewal never shortens the lease.
                let earliest = (*lo).max(inv.saturating_add(*lease_ms).saturating_sub(drift));
                let latest = (*hi).max(end.saturating_add(*lease_ms).saturating_add(drift));
                let (nlo, nhi) = match &op.ret {
                    Ret::Renewed { deadline_ms } if (earliest..=latest).contains(deadline_ms) => {
                        (*deadline_ms, *deadline_ms)
                    }
                    Ret::Unknown => {
                        // Applied (later deadline) or never.
                        keep(&mut out);
                        (earliest, u64::MAX)
                    }
                    _ => return out,
                };
                let mut rec = s.rec.clone();
                if let Rec::Held { lo: l, hi: h, .. } = &mut rec {
                    *l = nlo;
                    *h = nhi;
                }
                put(&mut out, rec);
            }
            _ => {
                if matches!(op.ret, Ret::LeaseLost | Ret::Unknown) {
                    keep(&mut out)
                }
            }
        },
        Call::Complete { token, result } => match &s.rec {
            Rec::Held { token: held, .. } if held.is(*token) => {
                if matches!(op.ret, Ret::Done | Ret::Unknown) {
                    put(
                        &mut out,
                        Rec::Completed {
                            token: *token,
                            result: result.clone(),
                        },
                    );
                }
                if unknown {
                    keep(&mut out);
                }
            }
            Rec::Completed {
                token: by,
                result: saved,
            } if by == token => {
                let want = if saved == result {
                    Ret::Done
                } else {
                    Ret::AlreadyCompleted
                };
                if op.ret == want || unknown {
                    keep(&mut out)
                }
            }
            _ => {
                if matches!(op.ret, Ret::LeaseLost | Ret::Unknown) {
                    keep(&mut out)
                }
            }
        },
        Call::Release { token } => {
            let (attempts, holds, released_as) = match &s.rec {
                Rec::Held {
                    token: held,
                    attempts,
                    ..
                } => (*attempts, held.is(*token), None),
                Rec::Available { attempts, last } => (*attempts, false, Some((last, false))),
                Rec::Failed { attempts, last } => (*attempts, false, Some((last, true))),
                _ => (0, false, None),
            };
            if holds {
                let failed = cfg.max_attempts > 0 && attempts >= cfg.max_attempts;
                if op.ret == (Ret::Released { failed }) || unknown {
                    let last = Tok::Known(*token);
                    put(
                        &mut out,
                        if failed {
                            Rec::Failed { attempts, last }
                        } else {
                            Rec::Available { attempts, last }
                        },
                    );
                }
                if unknown {
                    keep(&mut out);
                }
            } else if let Some((last, failed)) = released_as.filter(|(l, _)| l.is(*token)) {
                // A retried Release of the claim that already released it.
                let _ = last;
                if op.ret == (Ret::Released { failed }) || unknown {
                    keep(&mut out)
                }
            } else if matches!(op.ret, Ret::LeaseLost | Ret::Unknown) {
                keep(&mut out)
            }
        }
        Call::Read => {
            let Ret::Record(seen) = &op.ret else {
                return out;
            };
            match (&s.rec, seen) {
                (Rec::Absent, None) => keep(&mut out),
                (
                    Rec::Held {
                        owner,
                        token,
                        lo,
                        hi,
                        attempts,
                        ..
                    },
                    Some(Seen::InProgress {
                        owner: o,
                        token: t,
                        deadline_ms,
                        attempts: a,
                    }),
                ) => {
                    if let Some(tok) = token.observe(*t) {
                        if o == owner && a == attempts && (*lo..=*hi).contains(deadline_ms) {
                            out.push(pin_holder(s, tok, *t, *deadline_ms));
                        }
                    }
                }
                (Rec::Available { attempts, .. }, Some(Seen::Available { attempts: a }))
                | (Rec::Failed { attempts, .. }, Some(Seen::Failed { attempts: a }))
                    if a == attempts =>
                {
                    keep(&mut out)
                }
                (
                    Rec::Completed { token, result },
                    Some(Seen::Completed {
                        token: t,
                        result: r,
                    }),
                ) if t == token && r == result => keep(&mut out),
                _ => {}
            }
        }
    }
    out
}
