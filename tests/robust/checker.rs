//! The history checker.
//!
//! 1. Per-key linearizability against an independent model of one record
//!    (written from SPEC §1–2, not from `src/record.rs`): a depth-first
//!    search in the style of Wing & Gong / Lowe / porcupine over the orders
//!    the operations' time windows allow, memoised on (linearized set, model
//!    state). Keys are independent (P-compositionality), so each is searched
//!    alone. An operation whose outcome is unknown may take effect at any
//!    point after its invocation, or never. The model state includes the
//!    stored request fingerprint, so a `FINGERPRINT_MISMATCH` is placed
//!    only where the stored one differs from the claim's (and changes
//!    nothing), and a grant or replay where it differs cannot be placed.
//! 2. Direct checks with plain messages: tokens strictly increase per key;
//!    a completed result never changes or disappears; no two tokens both
//!    complete one key; an all-or-nothing batch is applied whole or not at
//!    all.
//!
//! Time. The servers decide leases with the leader's stamping clock; the
//! checker only knows each operation's window on the test's clock. Every
//! reply that carries a lease deadline shows how far that clock strayed
//! from the test's: the stamp (deadline minus lease) must fall inside the
//! operation's window. The checker measures the largest such distance over
//! the whole history (`stamp_drift`), fails the run when it exceeds
//! `Config::drift_ms`, and otherwise allows exactly that much (plus
//! rounding): a lease may be taken over only if the taking claim could have
//! happened at or after the deadline, `complete + drift >= deadline`, and a
//! claim may be refused for a live lease only if `invoke - drift <
//! deadline`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::history::{Call, Op, Ret, Seen};
use super::model::{self, Rec};

#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// The most the servers' stamps may stray from the test's clock; a
    /// history whose stamps stray further fails ("clock"). Within it, the
    /// search allows what the history measured, not this bound.
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
            drift_ms: 100,
            max_attempts: 0,
            max_states: 2_000_000,
        }
    }
}

/// Milliseconds on both clocks are whole; a stamp and a window edge read
/// in the same millisecond may differ by one each way.
const ROUNDING_MS: u64 = 2;

/// How far the servers' stamps strayed from the test's clock: for every
/// grant and renewal whose reply came, the distance of its stamp (deadline
/// minus lease) outside the operation's window. A claim retried with the
/// same claim_id may get an earlier grant back, so only a stamp later than
/// its window counts for it.
pub fn stamp_drift(history: &[Op]) -> u64 {
    let mut ops: Vec<&Op> = history.iter().collect();
    ops.sort_by_key(|o| o.invoke_ms);
    let mut claimed: HashSet<(&str, &str, &str)> = HashSet::new();
    let mut drift = 0;
    for o in ops {
        let (lease_ms, deadline_ms, retry) = match (&o.call, &o.ret) {
            (
                Call::Claim {
                    owner,
                    claim_id,
                    lease_ms,
                    ..
                },
                ret,
            ) => {
                let first = claimed.insert((&o.key, owner, claim_id));
                match ret {
                    Ret::Acquired { deadline_ms, .. } => (*lease_ms, *deadline_ms, !first),
                    _ => continue,
                }
            }
            (Call::Renew { lease_ms, .. }, Ret::Renewed { deadline_ms }) => {
                (*lease_ms, *deadline_ms, false)
            }
            _ => continue,
        };
        let Some(end) = o.complete_ms else { continue };
        let stamp = deadline_ms.saturating_sub(lease_ms);
        let late = stamp.saturating_sub(end);
        let early = if retry {
            0
        } else {
            o.invoke_ms.saturating_sub(stamp)
        };
        drift = drift.max(late).max(early);
    }
    drift
}

/// A token the model knows, or one granted by an operation whose reply was
/// lost: only known to be greater than every token granted before it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Tok {
    Known(u64),
    Above(u64),
}

impl model::Token for Tok {
    /// A worker only knows tokens it was granted, and an unknown grant on
    /// the same key is a different log entry, so `Above` never matches.
    fn is(&self, t: u64) -> bool {
        *self == Tok::Known(t)
    }
}

impl Tok {
    /// Narrow to an observed value, if it can be this token.
    fn observe(&self, t: u64) -> Option<Tok> {
        match self {
            Tok::Known(k) => (*k == t).then_some(Tok::Known(t)),
            Tok::Above(f) => (t > *f).then_some(Tok::Known(t)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    rec: ModelRec,
    /// The greatest token known to have been granted on this key.
    floor: u64,
    /// The earliest server time the record can have reached its present
    /// state (the invocation of the operation that changed it, less the
    /// drift): retention of a completed, failed or available record runs
    /// from there (SPEC §2 Retention).
    since: u64,
}

/// The retention the key's records were given (every claim on a key asks
/// for the same); `None`: the default 24 h, longer than any run.
fn retention(ops: &[&Op]) -> Option<u64> {
    ops.iter()
        .filter_map(|o| match &o.call {
            Call::Claim { retention_ms, .. } => *retention_ms,
            _ => None,
        })
        .min()
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
    /// Claims and batch items answered `FINGERPRINT_MISMATCH`.
    pub mismatches: usize,
    pub states_explored: usize,
    /// The stamps' measured distance from the test's clock, ms.
    pub drift_ms: u64,
    pub anomalies: Vec<Anomaly>,
}

/// Check a whole history.
pub fn check(history: &[Op], cfg: &Config) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let measured = stamp_drift(history);
    let mut report = Report {
        ops: history.len(),
        unknown: history.iter().filter(|o| o.is_unknown()).count(),
        keys: by_key.len(),
        mismatches: history
            .iter()
            .filter(|o| o.ret == Ret::FingerprintMismatch)
            .count(),
        drift_ms: measured,
        ..Report::default()
    };
    if measured > cfg.drift_ms {
        report.anomalies.push(anomaly(
            "*",
            "clock",
            format!(
                "a lease stamp strayed {measured} ms from the operation's window (at most {} allowed)",
                cfg.drift_ms
            ),
        ));
    }
    let cfg = &Config {
        drift_ms: measured.min(cfg.drift_ms) + ROUNDING_MS,
        ..*cfg
    };
    report.anomalies.extend(check_batches(history));
    for (key, ops) in &by_key {
        report.anomalies.extend(direct_checks(key, ops, cfg));
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

fn direct_checks(key: &str, ops: &[&Op], cfg: &Config) -> Vec<Anomaly> {
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
    // One completion per key, never replaced, never lost: until a Delete
    // may have forgotten it (the search checks what follows).
    // Or until retention may have removed it: from the first Complete's
    // invocation (less the drift) plus the retention.
    let first_delete = ops
        .iter()
        .filter(|o| matches!(o.call, Call::Delete { .. }))
        .map(|o| o.invoke_ms)
        .min()
        .unwrap_or(u64::MAX);
    let swept = match retention(ops) {
        Some(r) => ops
            .iter()
            .filter(|o| matches!(o.call, Call::Complete { .. }))
            .map(|o| o.invoke_ms.saturating_sub(cfg.drift_ms).saturating_add(r))
            .min()
            .unwrap_or(u64::MAX),
        None => u64::MAX,
    };
    let ops: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.end() < first_delete.min(swept))
        .collect();
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
        for o in &ops {
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
        let all_or_nothing = items.iter().any(|o| {
            matches!(
                o.call,
                Call::Claim {
                    all_or_nothing: true,
                    ..
                }
            )
        });
        let not_attempted = items.iter().any(|o| o.ret == Ret::NotAttempted);
        // Under all_or_nothing, an item answered with a definite "not
        // acquired" next to an acquired one means the batch was split.
        let refused = items.iter().any(|o| {
            matches!(
                o.ret,
                Ret::InProgress { .. }
                    | Ret::Completed { .. }
                    | Ret::Failed
                    | Ret::NotAttempted
                    | Ret::FingerprintMismatch
            )
        });
        if (not_attempted || all_or_nothing && refused) && !tokens.is_empty() {
            out.push(anomaly(
                &items[0].key,
                "batch half applied",
                format!(
                    "batch {b} (all_or_nothing: {all_or_nothing}) acquired some items and not others: {:?}",
                    items.iter().map(|o| &o.ret).collect::<Vec<_>>()
                ),
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
        retention: retention(&ops),
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
        since: 0,
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
    retention: Option<u64>,
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
            let nexts = step(state, self.ops[i], self.cfg, self.retention);
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

/// Does a recorded answer match the model's (grants and renewals, which
/// carry values to pin, are matched where they are handled)?
fn fits(answer: &model::Answer<Tok>, ret: &Ret) -> bool {
    use model::Answer as A;
    match (answer, ret) {
        (A::Released { failed }, Ret::Released { failed: f }) => failed == f,
        _ => matches!(
            (answer, ret),
            (_, Ret::Unknown)
                | (A::Done, Ret::Done)
                | (A::AlreadyCompleted, Ret::AlreadyCompleted)
                | (A::LeaseLost, Ret::LeaseLost)
                | (A::Deleted, Ret::Deleted)
        ),
    }
}

/// The model's view of the record at one point of a search.
type ModelRec = model::Rec<Tok, Window>;

/// A lease deadline known to lie in `[lo, hi]` (server clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Window {
    lo: u64,
    hi: u64,
}

impl Window {
    fn exact(t: u64) -> Window {
        Window { lo: t, hi: t }
    }

    fn contains(&self, t: u64) -> bool {
        (self.lo..=self.hi).contains(&t)
    }
}

/// The held record with its token and deadline now known exactly (a reply
/// showed them).
fn pin_holder(s: &State, tok: Tok, t: u64, deadline_ms: u64) -> State {
    let mut rec = s.rec.clone();
    if let Rec::Held {
        token, deadline, ..
    } = &mut rec
    {
        *token = tok;
        *deadline = Window::exact(deadline_ms);
    }
    State {
        rec,
        floor: s.floor.max(t),
        since: s.since,
    }
}

/// Every state the model can be in after `op` takes effect in `s` with the
/// recorded outcome (any outcome when it is unknown). Empty: impossible.
///
/// Retention first: when the record's retention may have run out by the
/// latest moment `op` can take effect, it may be gone (swept, or treated
/// as absent), or not yet. It runs from `since` for a completed, failed or
/// available record, and from the lease deadline for an expired holder. A
/// record removed earlier than that is what the check catches.
fn step(s: &State, op: &Op, cfg: &Config, retention: Option<u64>) -> Vec<State> {
    let mut starts = vec![s.clone()];
    if let Some(r) = retention {
        let from = match &s.rec {
            Rec::Absent => None,
            Rec::Held { deadline, .. } => Some(deadline.lo),
            _ => Some(s.since),
        };
        if from.is_some_and(|f| op.end().saturating_add(cfg.drift_ms) >= f.saturating_add(r)) {
            starts.push(State {
                rec: Rec::Absent,
                floor: s.floor,
                since: 0,
            });
        }
    }
    let mut out = Vec::new();
    for start in &starts {
        for mut next in step_in(start, op, cfg) {
            if next.rec != start.rec {
                next.since = op.invoke_ms.saturating_sub(cfg.drift_ms);
            }
            out.push(next);
        }
    }
    out
}

/// [`step`] without retention.
fn step_in(s: &State, op: &Op, cfg: &Config) -> Vec<State> {
    let inv = op.invoke_ms;
    let end = op.end();
    let drift = cfg.drift_ms;
    // The earliest server time the operation can have taken effect at.
    let behind = drift;
    let unknown = op.is_unknown();
    let mut out = Vec::new();
    let put = |out: &mut Vec<State>, rec: ModelRec| {
        out.push(State {
            rec,
            floor: s.floor,
            since: s.since,
        })
    };
    // The deadline a grant or renewal stamped within this operation.
    let stamped = |lease_ms: u64| Window {
        lo: inv.saturating_add(lease_ms).saturating_sub(behind),
        hi: end.saturating_add(lease_ms).saturating_add(drift),
    };
    match &op.call {
        Call::Claim {
            owner,
            claim_id,
            lease_ms,
            all_or_nothing,
            fingerprint,
            ..
        } => {
            let c = model::Claim {
                owner,
                claim_id,
                max_attempts: cfg.max_attempts,
                fingerprint: fingerprint.as_deref(),
            };
            // Was another claim's lease live at this moment? Both, where
            // the clocks cannot tell.
            let mut lives = Vec::new();
            match &s.rec {
                Rec::Held {
                    owner: o,
                    claim_id: id,
                    deadline,
                    ..
                } if (o, id) != (owner, claim_id) => {
                    if inv.saturating_sub(behind) < deadline.hi {
                        lives.push(true);
                    }
                    if end.saturating_add(drift) >= deadline.lo {
                        lives.push(false);
                    }
                }
                _ => lives.push(false),
            }
            for live in lives {
                let grant = || match &op.ret {
                    Ret::Acquired {
                        token, deadline_ms, ..
                    } => (Tok::Known(*token), Window::exact(*deadline_ms)),
                    _ => {
                        let lo = stamped(*lease_ms).lo;
                        (Tok::Above(s.floor), Window { lo, hi: u64::MAX })
                    }
                };
                let mut step = model::claim(&s.rec, &c, live, grant);
                if *all_or_nothing {
                    step = model::all_or_nothing_item(&s.rec, step);
                }
                let (rec, answer) = step;
                match (&answer, &op.ret) {
                    (_, Ret::Unknown) => put(&mut out, rec),
                    // An all-or-nothing batch not applied: this item would
                    // have been acquired, and nothing changed.
                    (model::Answer::Acquired { .. }, Ret::NotAttempted) => out.push(s.clone()),
                    (
                        model::Answer::Acquired {
                            fresh: true,
                            attempt,
                            ..
                        },
                        Ret::Acquired {
                            token,
                            deadline_ms,
                            attempt: a,
                        },
                    ) if *token > s.floor
                        && a == attempt
                        && stamped(*lease_ms).contains(*deadline_ms) =>
                    {
                        out.push(State {
                            rec,
                            floor: *token,
                            since: s.since,
                        });
                    }
                    (
                        model::Answer::Acquired {
                            fresh: false,
                            token: held,
                            attempt,
                        },
                        Ret::Acquired {
                            token,
                            deadline_ms,
                            attempt: a,
                        },
                    ) => {
                        let window = match &s.rec {
                            Rec::Held { deadline, .. } => *deadline,
                            _ => unreachable!("a retry finds its own grant"),
                        };
                        if let Some(tok) = held.observe(*token) {
                            if a == attempt && window.contains(*deadline_ms) {
                                out.push(pin_holder(s, tok, *token, *deadline_ms));
                            }
                        }
                    }
                    (model::Answer::InProgress { owner: o }, Ret::InProgress { owner: r })
                        if o == r =>
                    {
                        put(&mut out, rec)
                    }
                    (
                        model::Answer::Completed { token, result },
                        Ret::Completed {
                            token: t,
                            result: r,
                        },
                    ) if token == t && result == r => put(&mut out, rec),
                    (model::Answer::Failed, Ret::Failed) => put(&mut out, rec),
                    // Placed only where the stored fingerprint differs; an
                    // acquisition or a replay there cannot be placed.
                    (model::Answer::FingerprintMismatch, Ret::FingerprintMismatch) => {
                        put(&mut out, rec)
                    }
                    _ => {}
                }
            }
        }
        Call::Renew { token, lease_ms } => {
            let window = stamped(*lease_ms);
            // A renewal never shortens the lease.
            let (rec, answer) = model::renew(&s.rec, *token, |d| Window {
                lo: d.lo.max(window.lo),
                hi: if unknown {
                    u64::MAX
                } else {
                    d.hi.max(window.hi)
                },
            });
            match (&answer, &op.ret) {
                (_, Ret::Unknown) => put(&mut out, rec),
                (model::Answer::Renewed, Ret::Renewed { deadline_ms }) => {
                    if let Rec::Held { deadline, .. } = &rec {
                        if deadline.contains(*deadline_ms) {
                            let mut rec = rec.clone();
                            if let Rec::Held { deadline: d, .. } = &mut rec {
                                *d = Window::exact(*deadline_ms);
                            }
                            put(&mut out, rec);
                        }
                    }
                }
                (model::Answer::LeaseLost, Ret::LeaseLost) => put(&mut out, rec),
                _ => {}
            }
        }
        Call::Complete { token, result } => {
            let (rec, answer) = model::complete(&s.rec, *token, result);
            if fits(&answer, &op.ret) {
                put(&mut out, rec);
            }
        }
        Call::Release { token } => {
            let (rec, answer) = model::release(&s.rec, *token, cfg.max_attempts);
            if fits(&answer, &op.ret) {
                put(&mut out, rec);
            }
        }
        Call::Delete { token } => {
            let (rec, answer) = model::delete(&s.rec, *token);
            if fits(&answer, &op.ret) {
                put(&mut out, rec);
            }
        }
        Call::Read => {
            let Ret::Record(seen) = &op.ret else {
                return out;
            };
            match (&s.rec, seen) {
                (Rec::Absent, None) => out.push(s.clone()),
                (
                    Rec::Held {
                        owner,
                        token,
                        deadline,
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
                        if o == owner && a == attempts && deadline.contains(*deadline_ms) {
                            out.push(pin_holder(s, tok, *t, *deadline_ms));
                        }
                    }
                }
                (Rec::Available { attempts, .. }, Some(Seen::Available { attempts: a }))
                | (Rec::Failed { attempts, .. }, Some(Seen::Failed { attempts: a }))
                    if a == attempts =>
                {
                    out.push(s.clone())
                }
                (
                    Rec::Completed { token, result, .. },
                    Some(Seen::Completed {
                        token: t,
                        result: r,
                    }),
                ) if t == token && r == result => out.push(s.clone()),
                _ => {}
            }
        }
    }
    out
}
