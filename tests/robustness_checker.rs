//! The robustness checker is itself tested: hand-made histories that a
//! correct store could produce pass, and hand-made bad ones (double grant,
//! lost completion, stale read, token going backwards, early takeover,
//! half-applied batch) are flagged with the right kind of anomaly.
mod robust;

use robust::checker::{check, Config};
use robust::history::{Call, Op, Ret, Seen};

const LEASE: u64 = 1_000;

/// Builds a history on one key; times are milliseconds from 1,000,000.
struct H {
    ops: Vec<Op>,
}

const T0: u64 = 1_000_000;

impl H {
    fn new() -> H {
        H { ops: Vec::new() }
    }

    fn op(&mut self, p: usize, call: Call, ret: Ret, inv: u64, end: Option<u64>) -> &mut H {
        self.op_on("k", p, call, ret, inv, end)
    }

    fn op_on(
        &mut self,
        key: &str,
        p: usize,
        call: Call,
        ret: Ret,
        inv: u64,
        end: Option<u64>,
    ) -> &mut H {
        let id = self.ops.len();
        self.ops.push(Op {
            id,
            process: p,
            key: key.to_string(),
            call,
            ret,
            invoke_ms: T0 + inv,
            complete_ms: end.map(|e| T0 + e),
        });
        self
    }

    fn check(&self) -> Vec<String> {
        let cfg = Config {
            drift_ms: 100,
            max_attempts: 3,
            ..Config::default()
        };
        let r = check(&self.ops, &cfg);
        r.anomalies.iter().map(|a| a.to_string()).collect()
    }
}

fn claim(p: usize) -> Call {
    Call::Claim {
        owner: format!("w{p}"),
        claim_id: format!("c{p}"),
        lease_ms: LEASE,
        batch: None,
        all_or_nothing: false,
        retention_ms: None,
        fingerprint: None,
    }
}

fn claim_id(p: usize, id: &str) -> Call {
    Call::Claim {
        owner: format!("w{p}"),
        claim_id: id.to_string(),
        lease_ms: LEASE,
        batch: None,
        all_or_nothing: false,
        retention_ms: None,
        fingerprint: None,
    }
}

/// Acquired at (test-clock) time `at` with token `t`: deadline at + LEASE.
fn acq(t: u64, at: u64, attempt: u32) -> Ret {
    Ret::Acquired {
        token: t,
        deadline_ms: T0 + at + LEASE,
        attempt,
    }
}

fn complete(t: u64, r: &str) -> Call {
    Call::Complete {
        token: t,
        result: r.to_string(),
    }
}

fn completed(t: u64, r: &str) -> Ret {
    Ret::Completed {
        token: t,
        result: r.to_string(),
    }
}

fn read_completed(t: u64, r: &str) -> Ret {
    Ret::Record(Some(Seen::Completed {
        token: t,
        result: r.to_string(),
    }))
}

fn assert_flags(h: &H, kind: &str) {
    let found = h.check();
    assert!(
        found.iter().any(|a| a.contains(kind)),
        "expected a [{kind}] anomaly, found {found:#?}"
    );
}

fn assert_clean(h: &H) {
    let found = h.check();
    assert!(found.is_empty(), "expected no anomaly, found {found:#?}");
}

#[test]
fn a_plain_claim_complete_replay_history_passes() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(
            2,
            claim(2),
            Ret::InProgress { owner: "w1".into() },
            20,
            Some(30),
        )
        .op(1, complete(5, "ok"), Ret::Done, 40, Some(50))
        .op(2, claim(2), completed(5, "ok"), 60, Some(70))
        .op(3, Call::Read, read_completed(5, "ok"), 80, Some(90));
    assert_clean(&h);
}

#[test]
fn concurrent_operations_may_take_effect_in_either_order() {
    // The claim by w2 overlaps w1's completion: replaying the result is
    // fine (completion first) and so is seeing w1 in progress.
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(1, complete(5, "ok"), Ret::Done, 40, Some(80))
        .op(2, claim(2), completed(5, "ok"), 50, Some(60))
        .op(
            3,
            claim(3),
            Ret::InProgress { owner: "w1".into() },
            45,
            Some(90),
        );
    assert_clean(&h);
}

#[test]
fn double_grant_of_a_live_lease_is_flagged() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(2, claim(2), acq(7, 100, 2), 100, Some(110));
    assert_flags(&h, "not linearizable");
}

#[test]
fn takeover_after_the_deadline_passes_and_before_it_is_flagged() {
    // w2 takes over after w1's lease (deadline 1000) expired: allowed.
    let mut ok = H::new();
    ok.op(1, claim(1), acq(5, 0, 1), 0, Some(10)).op(
        2,
        claim(2),
        acq(9, 1_050, 2),
        1_050,
        Some(1_060),
    );
    assert_clean(&ok);
    // The same takeover 300 ms before the deadline, beyond the 100 ms
    // drift bound: a double grant.
    let mut early = H::new();
    early.op(1, claim(1), acq(5, 0, 1), 0, Some(10)).op(
        2,
        claim(2),
        acq(9, 700, 2),
        700,
        Some(710),
    );
    assert_flags(&early, "not linearizable");
}

#[test]
fn lost_completion_is_flagged() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(1, complete(5, "ok"), Ret::Done, 20, Some(30))
        // After the acknowledged completion (and after the lease), a new
        // claim is granted: the completion was lost.
        .op(2, claim(2), acq(9, 2_000, 2), 2_000, Some(2_010));
    assert_flags(&h, "lost completion");
    assert_flags(&h, "not linearizable");
}

#[test]
fn completion_by_two_holders_is_flagged() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(2, claim(2), acq(9, 1_500, 2), 1_500, Some(1_510))
        .op(1, complete(5, "one"), Ret::Done, 1_520, Some(1_530))
        .op(2, complete(9, "two"), Ret::Done, 1_540, Some(1_550));
    assert_flags(&h, "two holders completed");
}

#[test]
fn changed_result_is_flagged() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(1, complete(5, "one"), Ret::Done, 20, Some(30))
        .op(2, claim(2), completed(5, "two"), 40, Some(50));
    assert_flags(&h, "completed result changed");
}

#[test]
fn stale_read_is_flagged() {
    // The completion was acknowledged at 30; a read invoked at 40 still
    // sees the claim in progress.
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(1, complete(5, "ok"), Ret::Done, 20, Some(30))
        .op(
            2,
            Call::Read,
            Ret::Record(Some(Seen::InProgress {
                owner: "w1".into(),
                token: 5,
                deadline_ms: T0 + LEASE,
                attempts: 1,
            })),
            40,
            Some(50),
        );
    assert_flags(&h, "not linearizable");
    assert_flags(&h, "lost completion");
}

#[test]
fn a_read_of_absent_after_an_acknowledged_claim_is_flagged() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(2, Call::Read, Ret::Record(None), 20, Some(30));
    assert_flags(&h, "not linearizable");
}

#[test]
fn tokens_going_backwards_are_flagged() {
    let mut h = H::new();
    h.op(1, claim(1), acq(9, 0, 1), 0, Some(10))
        .op(
            1,
            Call::Release { token: 9 },
            Ret::Released { failed: false },
            20,
            Some(30),
        )
        .op(2, claim(2), acq(7, 40, 2), 40, Some(50));
    assert_flags(&h, "token not increasing");
    assert_flags(&h, "not linearizable");
}

#[test]
fn an_unknown_claim_may_have_taken_effect_or_not() {
    // w1's claim timed out; a later read shows it took effect with a
    // token no one was told: consistent.
    let mut took = H::new();
    took.op(1, claim(1), Ret::Unknown, 0, None).op(
        2,
        Call::Read,
        Ret::Record(Some(Seen::InProgress {
            owner: "w1".into(),
            token: 4,
            deadline_ms: T0 + 30 + LEASE,
            attempts: 1,
        })),
        500,
        Some(510),
    );
    assert_clean(&took);
    // Or it never took effect: w2 acquires the absent key.
    let mut never = H::new();
    never
        .op(1, claim(1), Ret::Unknown, 0, None)
        .op(2, claim(2), acq(6, 500, 1), 500, Some(510))
        .op(2, complete(6, "ok"), Ret::Done, 520, Some(530));
    assert_clean(&never);
    // But it cannot make a read see a holder nobody claimed as.
    let mut ghost = H::new();
    ghost.op(1, claim(1), Ret::Unknown, 0, None).op(
        2,
        Call::Read,
        Ret::Record(Some(Seen::InProgress {
            owner: "w9".into(),
            token: 4,
            deadline_ms: T0 + LEASE,
            attempts: 1,
        })),
        500,
        Some(510),
    );
    assert_flags(&ghost, "not linearizable");
}

#[test]
fn a_retried_claim_gets_its_own_grant_back() {
    let mut h = H::new();
    h.op(1, claim_id(1, "a"), acq(5, 0, 1), 0, Some(10)).op(
        1,
        claim_id(1, "a"),
        acq(5, 0, 1),
        20,
        Some(30),
    );
    assert_clean(&h);
    // A different token for the same claim is a second grant.
    let mut bad = H::new();
    bad.op(1, claim_id(1, "a"), acq(5, 0, 1), 0, Some(10)).op(
        1,
        claim_id(1, "a"),
        acq(8, 20, 2),
        20,
        Some(30),
    );
    assert_flags(&bad, "not linearizable");
}

#[test]
fn fenced_writes_of_a_replaced_holder_must_fail() {
    // w2 took over after expiry; w1's late Complete must get LEASE_LOST.
    let mut ok = H::new();
    ok.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(2, claim(2), acq(9, 1_200, 2), 1_200, Some(1_210))
        .op(1, complete(5, "late"), Ret::LeaseLost, 1_300, Some(1_310));
    assert_clean(&ok);
    let mut bad = H::new();
    bad.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(2, claim(2), acq(9, 1_200, 2), 1_200, Some(1_210))
        .op(1, complete(5, "late"), Ret::Done, 1_300, Some(1_310));
    assert_flags(&bad, "not linearizable");
}

#[test]
fn release_then_attempts_exhausted_is_failed() {
    // max_attempts = 3 in these tests.
    let mut h = H::new();
    let mut at = 0;
    for (attempt, token) in [(1u32, 5u64), (2, 6), (3, 7)] {
        h.op(
            1,
            claim_id(1, &format!("c{token}")),
            acq(token, at, attempt),
            at,
            Some(at + 5),
        );
        let failed = attempt == 3;
        h.op(
            1,
            Call::Release { token },
            Ret::Released { failed },
            at + 10,
            Some(at + 15),
        );
        at += 20;
    }
    h.op(2, claim(2), Ret::Failed, at, Some(at + 5));
    assert_clean(&h);
    // A fourth grant after the attempts ran out is wrong.
    h.op(3, claim(3), acq(8, at + 10, 4), at + 10, Some(at + 15));
    assert_flags(&h, "not linearizable");
}

#[test]
fn an_all_or_nothing_batch_applied_by_halves_is_flagged() {
    let item = |p: usize, key: &str| Call::Claim {
        owner: format!("w{p}"),
        claim_id: format!("b-{key}"),
        lease_ms: LEASE,
        batch: Some(1),
        all_or_nothing: true,
        retention_ms: None,
        fingerprint: None,
    };
    let mut h = H::new();
    h.op_on("a", 1, item(1, "a"), acq(5, 0, 1), 0, Some(10))
        .op_on("b", 1, item(1, "b"), Ret::NotAttempted, 0, Some(10));
    assert_flags(&h, "batch half applied");
    // One entry grants each item a token of its own, consecutive ones.
    let mut whole = H::new();
    whole
        .op_on("a", 1, item(1, "a"), acq(5, 0, 1), 0, Some(10))
        .op_on("b", 1, item(1, "b"), acq(6, 0, 1), 0, Some(10));
    assert_clean(&whole);
    // Two items with one token, or tokens with a gap (two entries): split.
    let mut shared = H::new();
    shared
        .op_on("a", 1, item(1, "a"), acq(5, 0, 1), 0, Some(10))
        .op_on("b", 1, item(1, "b"), acq(5, 0, 1), 0, Some(10));
    assert_flags(&shared, "batch split");
    let mut gap = H::new();
    gap.op_on("a", 1, item(1, "a"), acq(5, 0, 1), 0, Some(10))
        .op_on("b", 1, item(1, "b"), acq(9, 0, 1), 0, Some(10));
    assert_flags(&gap, "batch split");
}

#[test]
fn histories_round_trip_through_the_history_file() {
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 0, 1), 0, Some(10))
        .op(2, claim(2), Ret::Unknown, 5, None);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    robust::history::save(&h.ops, &path).unwrap();
    assert_eq!(robust::history::load(&path).unwrap(), h.ops);
}

/// Re-check a history a failed run kept:
/// `IDEMKV_HISTORY=target/tmp/robustness/NAME.jsonl IDEMKV_DRIFT_MS=500
/// cargo test --release --test robustness_checker -- --ignored recheck`.
#[test]
#[ignore = "needs IDEMKV_HISTORY"]
fn recheck_a_kept_history() {
    let path = std::env::var("IDEMKV_HISTORY").expect("IDEMKV_HISTORY");
    let ops = robust::history::load(std::path::Path::new(&path)).expect("history");
    let drift_ms = std::env::var("IDEMKV_DRIFT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let r = check(
        &ops,
        &Config {
            drift_ms,
            max_attempts: 5,
            ..Config::default()
        },
    );
    for a in &r.anomalies {
        eprintln!("{a}");
    }
    eprintln!(
        "{} ops, {} unknown, {} keys, {} states searched, {} anomalies",
        r.ops,
        r.unknown,
        r.keys,
        r.states_explored,
        r.anomalies.len()
    );
    assert!(r.anomalies.is_empty());
}

#[test]
fn an_all_or_nothing_batch_with_a_refused_item_is_flagged() {
    // w2 holds b; an all_or_nothing batch of {a, b} must acquire neither.
    let item = |key: &str, all_or_nothing: bool| Call::Claim {
        owner: "w1".into(),
        claim_id: format!("b-{key}"),
        lease_ms: LEASE,
        batch: Some(1),
        all_or_nothing,
        retention_ms: None,
        fingerprint: None,
    };
    let busy = Ret::InProgress { owner: "w2".into() };
    let history = |all_or_nothing: bool| {
        let mut h = H::new();
        h.op_on("b", 2, claim(2), acq(3, 0, 1), 0, Some(10))
            .op_on(
                "a",
                1,
                item("a", all_or_nothing),
                acq(5, 20, 1),
                20,
                Some(30),
            )
            .op_on(
                "b",
                1,
                item("b", all_or_nothing),
                busy.clone(),
                20,
                Some(30),
            );
        h
    };
    assert_flags(&history(true), "batch half applied");
    // Without all_or_nothing each item is decided on its own.
    assert_clean(&history(false));
}

#[test]
fn a_lease_stamp_far_from_the_clock_is_flagged() {
    // Granted within [0, 10] but stamped 300 ms later: the leader's clock
    // ran ahead, and every lease decision with it.
    let mut h = H::new();
    h.op(1, claim(1), acq(5, 310, 1), 0, Some(10));
    assert_flags(&h, "clock");
    let mut near = H::new();
    near.op(1, claim(1), acq(5, 8, 1), 0, Some(10));
    assert_clean(&near);
}

/// A simulated store that decides with the shared model, its lease rule
/// optionally mutated to take over `early_ms` before the deadline, driven
/// by workers that claim, complete, renew, abandon and read. Stamps are
/// exact, as on one host.
fn simulate(early_ms: u64, seed: u64) -> Vec<Op> {
    use rand::{Rng, SeedableRng};
    use robust::model::{self, Answer, Rec};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut recs: std::collections::HashMap<String, Rec<u64, u64>> = Default::default();
    let mut tokens = 0u64;
    let workers = 4;
    let mut free = vec![0u64; workers];
    let mut held: Vec<Option<(String, u64)>> = vec![None; workers];
    let mut h = H::new();
    let mut t = 0u64;
    let mut n = 0;
    while t < 30_000 {
        t += rng.random_range(1..15);
        let w = rng.random_range(0..workers);
        if free[w] > t {
            continue;
        }
        n += 1;
        let inv = t - rng.random_range(0..3).min(t - free[w].min(t));
        let end = t + rng.random_range(1..4);
        free[w] = end + rng.random_range(5..30);
        let key = format!("g{}-k{}", t / 3_000, rng.random_range(0..2));
        let (key, call, ret) = match held[w].clone() {
            Some((key, token)) => {
                let roll: f64 = rng.random();
                let rec = recs.get(&key).cloned().unwrap_or(Rec::Absent);
                if roll < 0.3 {
                    let result = format!("r{n}");
                    let (next, a) = model::complete(&rec, token, &result);
                    recs.insert(key.clone(), next);
                    held[w] = None;
                    let ret = match a {
                        Answer::Done => Ret::Done,
                        _ => Ret::LeaseLost,
                    };
                    (key, complete(token, &result), ret)
                } else if roll < 0.5 {
                    let (next, a) = model::renew(&rec, token, |d| (t + LEASE).max(*d));
                    let ret = match (&a, &next) {
                        (Answer::Renewed, Rec::Held { deadline, .. }) => Ret::Renewed {
                            deadline_ms: T0 + deadline,
                        },
                        _ => {
                            held[w] = None;
                            Ret::LeaseLost
                        }
                    };
                    recs.insert(key.clone(), next);
                    (
                        key,
                        Call::Renew {
                            token,
                            lease_ms: LEASE,
                        },
                        ret,
                    )
                } else {
                    // Abandoned: the lease runs out.
                    held[w] = None;
                    continue;
                }
            }
            None if rng.random_bool(0.2) => {
                let seen = match recs.get(&key) {
                    None | Some(Rec::Absent) => None,
                    Some(Rec::Held {
                        owner,
                        token,
                        deadline,
                        attempts,
                        ..
                    }) => Some(Seen::InProgress {
                        owner: owner.clone(),
                        token: *token,
                        deadline_ms: T0 + deadline,
                        attempts: *attempts,
                    }),
                    Some(Rec::Available { attempts, .. }) => Some(Seen::Available {
                        attempts: *attempts,
                    }),
                    Some(Rec::Completed { token, result, .. }) => Some(Seen::Completed {
                        token: *token,
                        result: result.clone(),
                    }),
                    Some(Rec::Failed { attempts, .. }) => Some(Seen::Failed {
                        attempts: *attempts,
                    }),
                };
                (key, Call::Read, Ret::Record(seen))
            }
            None => {
                let rec = recs.get(&key).cloned().unwrap_or(Rec::Absent);
                let (owner, claim_id) = (format!("w{w}"), format!("c{n}"));
                // Mostly the key's request, sometimes none, now and then
                // another one (as the real workload sends).
                let fingerprint = match rng.random_range(0..20) {
                    0..=1 => None,
                    2 => Some("b".to_string()),
                    _ => Some("a".to_string()),
                };
                let c = model::Claim {
                    owner: &owner,
                    claim_id: &claim_id,
                    max_attempts: 3,
                    fingerprint: fingerprint.as_deref(),
                };
                // The mutation: a lease counts as expired early_ms early.
                let live = matches!(rec, Rec::Held { deadline, .. } if t + early_ms < deadline);
                let (next, a) = model::claim(&rec, &c, live, || (tokens + 1, t + LEASE));
                let ret = match a {
                    Answer::Acquired { token, attempt, .. } => {
                        tokens = token;
                        held[w] = Some((key.clone(), token));
                        Ret::Acquired {
                            token,
                            deadline_ms: T0 + t + LEASE,
                            attempt,
                        }
                    }
                    Answer::InProgress { owner } => Ret::InProgress { owner },
                    Answer::Completed { token, result } => Ret::Completed { token, result },
                    Answer::FingerprintMismatch => Ret::FingerprintMismatch,
                    _ => Ret::Failed,
                };
                recs.insert(key.clone(), next);
                let call = Call::Claim {
                    owner,
                    claim_id,
                    lease_ms: LEASE,
                    batch: None,
                    all_or_nothing: false,
                    retention_ms: None,
                    fingerprint,
                };
                (key, call, ret)
            }
        };
        h.op_on(&key, w, call, ret, inv, Some(end));
    }
    h.ops
}

#[test]
fn a_store_taking_over_100_ms_early_is_flagged() {
    for seed in 1..=3 {
        let fine = simulate(0, seed);
        let r = check(
            &fine,
            &Config {
                drift_ms: 100,
                max_attempts: 3,
                ..Config::default()
            },
        );
        assert!(
            r.anomalies.is_empty(),
            "seed {seed}: the correct store failed: {:?}",
            r.anomalies
        );
        let takeovers = fine
            .iter()
            .filter(|o| matches!(o.ret, Ret::Acquired { attempt: 2.., .. }))
            .count();
        assert!(
            takeovers > 5,
            "seed {seed}: the workload took over only {takeovers} leases"
        );
        assert!(
            r.mismatches > 5,
            "seed {seed}: only {} fingerprint mismatches",
            r.mismatches
        );
        let early = simulate(100, seed);
        let r = check(
            &early,
            &Config {
                drift_ms: 100,
                max_attempts: 3,
                ..Config::default()
            },
        );
        assert!(
            r.anomalies.iter().any(|a| a.kind == "not linearizable"),
            "seed {seed}: a takeover 100 ms early passed ({} ops)",
            early.len()
        );
    }
}

#[test]
fn an_all_or_nothing_item_that_fails_changes_nothing() {
    // The last attempt's lease ran out. A plain claim then fails the
    // record; an item of an all-or-nothing batch answers FAILED too, but the
    // batch is not applied, so the record still reads IN_PROGRESS.
    let item = |all_or_nothing: bool| Call::Claim {
        owner: "w2".into(),
        claim_id: "late".into(),
        lease_ms: LEASE,
        batch: all_or_nothing.then_some(7),
        all_or_nothing,
        retention_ms: None,
        fingerprint: None,
    };
    let history = |all_or_nothing: bool| {
        let mut h = H::new();
        let mut at = 0;
        for attempt in 1..=3 {
            h.op(
                1,
                claim_id(1, &format!("a{attempt}")),
                acq(attempt as u64, at, attempt),
                at,
                Some(at + 5),
            );
            if attempt < 3 {
                h.op(
                    1,
                    Call::Release {
                        token: attempt as u64,
                    },
                    Ret::Released { failed: false },
                    at + 10,
                    Some(at + 15),
                );
            }
            at += 20;
        }
        let held = Seen::InProgress {
            owner: "w1".into(),
            token: 3,
            deadline_ms: T0 + 40 + LEASE,
            attempts: 3,
        };
        h.op(2, item(all_or_nothing), Ret::Failed, 1_100, Some(1_110))
            .op(3, Call::Read, Ret::Record(Some(held)), 1_200, Some(1_210));
        h
    };
    assert_clean(&history(true));
    assert_flags(&history(false), "not linearizable");
}

const RETENTION: u64 = 1_500;

fn short_claim(p: usize) -> Call {
    match claim(p) {
        Call::Claim {
            owner,
            claim_id,
            lease_ms,
            batch,
            all_or_nothing,
            fingerprint,
            ..
        } => Call::Claim {
            owner,
            claim_id,
            lease_ms,
            batch,
            all_or_nothing,
            retention_ms: Some(RETENTION),
            fingerprint,
        },
        _ => unreachable!(),
    }
}

/// A completed record of a key with 1.5 s retention, completed at 40–50 ms.
fn completed_short() -> H {
    let mut h = H::new();
    h.op(1, short_claim(1), acq(5, 0, 1), 0, Some(10)).op(
        1,
        complete(5, "ok"),
        Ret::Done,
        40,
        Some(50),
    );
    h
}

#[test]
fn a_record_swept_after_its_retention_passes_and_the_key_is_claimed_afresh() {
    let mut h = completed_short();
    h.op(2, Call::Read, read_completed(5, "ok"), 1_000, Some(1_010))
        .op(3, Call::Read, Ret::Record(None), 1_600, Some(1_610))
        .op(2, short_claim(2), acq(6, 1_700, 1), 1_700, Some(1_710))
        .op(2, complete(6, "again"), Ret::Done, 1_720, Some(1_730))
        .op(3, short_claim(3), completed(6, "again"), 1_740, Some(1_750));
    assert_clean(&h);
}

#[test]
fn a_completed_record_removed_before_its_retention_is_flagged() {
    // 500 ms early: the retention runs from the Complete (40 ms) to 1,540.
    let mut h = completed_short();
    h.op(3, Call::Read, Ret::Record(None), 1_030, Some(1_040));
    assert_flags(&h, "lost completion");
    assert_flags(&h, "not linearizable");
    // Claimed afresh too early: a second execution of the job.
    let mut h = completed_short();
    h.op(2, short_claim(2), acq(6, 1_000, 1), 1_000, Some(1_010));
    assert_flags(&h, "not linearizable");
}

#[test]
fn an_available_record_removed_before_it_was_idle_for_its_retention_is_flagged() {
    let released = || {
        let mut h = H::new();
        h.op(1, short_claim(1), acq(5, 0, 1), 0, Some(10)).op(
            1,
            Call::Release { token: 5 },
            Ret::Released { failed: false },
            40,
            Some(50),
        );
        h
    };
    let available = Ret::Record(Some(Seen::Available { attempts: 1 }));
    let mut h = released();
    h.op(2, Call::Read, available.clone(), 1_000, Some(1_010))
        .op(2, Call::Read, Ret::Record(None), 1_700, Some(1_710));
    assert_clean(&h);
    let mut h = released();
    h.op(2, Call::Read, Ret::Record(None), 1_000, Some(1_010));
    assert_flags(&h, "not linearizable");
}

fn check_drift_100(h: &H) -> Vec<String> {
    let cfg = Config {
        drift_ms: 100,
        max_attempts: 3,
        ..Config::default()
    };
    check(&h.ops, &cfg)
        .anomalies
        .iter()
        .map(|a| a.to_string())
        .collect()
}

#[test]
fn a_server_clock_behind_or_ahead_of_the_window_is_flagged() {
    // A grant stamped `off` ms from its claim's window: the server's clock
    // lags (as it did when a whole-cluster outage lost its anchors) or
    // runs ahead.
    let stamped = |off: i64| {
        let mut h = H::new();
        let at = (10_000 + off) as u64;
        h.op(1, claim(1), acq(5, at, 1), 10_000, Some(10_010));
        h
    };
    for off in [-618, -2_000, 700, 2_000] {
        assert!(
            check_drift_100(&stamped(off))
                .iter()
                .any(|a| a.contains("clock")),
            "a stamp {off} ms off must fail the run"
        );
    }
    assert!(check_drift_100(&stamped(5)).is_empty());
}

/// A claim by worker `p` with claim_id `id`, sending `fingerprint`.
fn fp_claim(p: usize, id: &str, fingerprint: Option<&str>) -> Call {
    match claim_id(p, id) {
        Call::Claim {
            owner,
            claim_id,
            lease_ms,
            batch,
            all_or_nothing,
            retention_ms,
            ..
        } => Call::Claim {
            owner,
            claim_id,
            lease_ms,
            batch,
            all_or_nothing,
            retention_ms,
            fingerprint: fingerprint.map(str::to_string),
        },
        _ => unreachable!(),
    }
}

/// w1 claims with fingerprint "a" (token 5) and releases it: the record is
/// available and bound to request "a".
fn released_with_a() -> H {
    let mut h = H::new();
    h.op(1, fp_claim(1, "c1", Some("a")), acq(5, 0, 1), 0, Some(10))
        .op(
            1,
            Call::Release { token: 5 },
            Ret::Released { failed: false },
            20,
            Some(30),
        );
    h
}

#[test]
fn a_claim_granted_or_replayed_despite_another_fingerprint_is_flagged() {
    // Available, bound to "a": a claim for request "b" is acquired.
    let mut h = released_with_a();
    h.op(2, fp_claim(2, "c2", Some("b")), acq(6, 40, 2), 40, Some(50));
    assert_flags(&h, "not linearizable");
    // The same claim answered FINGERPRINT_MISMATCH is right.
    let mut ok = released_with_a();
    ok.op(
        2,
        fp_claim(2, "c2", Some("b")),
        Ret::FingerprintMismatch,
        40,
        Some(50),
    );
    assert_clean(&ok);
    // Completed under "a": request "b" is replayed the result.
    let mut replay = released_with_a();
    replay
        .op(3, fp_claim(3, "c3", Some("a")), acq(6, 40, 2), 40, Some(50))
        .op(3, complete(6, "r"), Ret::Done, 60, Some(70))
        .op(
            2,
            fp_claim(2, "c2", Some("b")),
            completed(6, "r"),
            80,
            Some(90),
        );
    assert_flags(&replay, "not linearizable");
    // The holder's own retry (same owner and claim_id) with another
    // fingerprint is another request: its grant back is wrong too.
    let mut retry = H::new();
    retry
        .op(1, fp_claim(1, "c1", Some("a")), acq(5, 0, 1), 0, Some(10))
        .op(1, fp_claim(1, "c1", Some("b")), acq(5, 0, 1), 20, Some(30));
    assert_flags(&retry, "not linearizable");
}

#[test]
fn a_fingerprint_mismatch_answered_to_a_matching_or_missing_fingerprint_is_flagged() {
    let mismatch = |h: &mut H, fingerprint: Option<&str>| {
        h.op(
            2,
            fp_claim(2, "c2", fingerprint),
            Ret::FingerprintMismatch,
            40,
            Some(50),
        );
    };
    // Stored "a": a claim for "a", and one without a fingerprint, match.
    for fingerprint in [Some("a"), None] {
        let mut h = released_with_a();
        mismatch(&mut h, fingerprint);
        assert_flags(&h, "not linearizable");
    }
    // Nothing stored (the first claim sent none): nothing mismatches.
    let mut none_stored = H::new();
    none_stored
        .op(1, fp_claim(1, "c1", None), acq(5, 0, 1), 0, Some(10))
        .op(
            1,
            Call::Release { token: 5 },
            Ret::Released { failed: false },
            20,
            Some(30),
        );
    mismatch(&mut none_stored, Some("b"));
    assert_flags(&none_stored, "not linearizable");
    // Absent: nothing to differ from.
    let mut absent = H::new();
    mismatch(&mut absent, Some("b"));
    assert_flags(&absent, "not linearizable");
    // Deleted: the binding went with the record.
    let mut deleted = released_with_a();
    deleted.op(3, Call::Delete { token: None }, Ret::Deleted, 32, Some(38));
    mismatch(&mut deleted, Some("b"));
    assert_flags(&deleted, "not linearizable");
}

#[test]
fn a_correct_history_with_fingerprint_mismatches_passes() {
    let batch_item = |key: &str, fingerprint: Option<&str>| Call::Claim {
        owner: "w4".into(),
        claim_id: format!("b-{key}"),
        lease_ms: LEASE,
        batch: Some(1),
        all_or_nothing: true,
        retention_ms: None,
        fingerprint: fingerprint.map(str::to_string),
    };
    let mut h = H::new();
    // w1 claims without a fingerprint: the record stays unbound, and a
    // claim for "b" meets w1's live lease, not a mismatch.
    h.op(1, fp_claim(1, "c1", None), acq(5, 0, 1), 0, Some(10))
        .op(
            2,
            fp_claim(2, "c2", Some("b")),
            Ret::InProgress { owner: "w1".into() },
            20,
            Some(30),
        )
        .op(
            1,
            Call::Release { token: 5 },
            Ret::Released { failed: false },
            40,
            Some(50),
        )
        // The next grant binds the key to "b".
        .op(2, fp_claim(2, "c2", Some("b")), acq(6, 60, 2), 60, Some(70))
        .op(
            3,
            fp_claim(3, "c3", Some("a")),
            Ret::FingerprintMismatch,
            80,
            Some(90),
        )
        // The holder's own retry with another fingerprint mismatches.
        .op(
            2,
            fp_claim(2, "c2", Some("a")),
            Ret::FingerprintMismatch,
            100,
            Some(110),
        )
        // An unknown claim for "a" changed nothing either way.
        .op(5, fp_claim(5, "c5", Some("a")), Ret::Unknown, 105, None)
        .op(2, complete(6, "r"), Ret::Done, 120, Some(130))
        .op(
            3,
            fp_claim(3, "c3", Some("a")),
            Ret::FingerprintMismatch,
            140,
            Some(150),
        )
        // Without a fingerprint, or with "b": the replay.
        .op(
            1,
            fp_claim(1, "c6", None),
            completed(6, "r"),
            160,
            Some(170),
        )
        .op(
            1,
            fp_claim(1, "c7", Some("b")),
            completed(6, "r"),
            175,
            Some(178),
        )
        // An all-or-nothing batch whose item on k mismatches is not
        // applied: its item on k2 is NOT_ATTEMPTED and k2 stays absent.
        .op_on(
            "k",
            4,
            batch_item("k", Some("a")),
            Ret::FingerprintMismatch,
            180,
            Some(190),
        )
        .op_on(
            "k2",
            4,
            batch_item("k2", Some("a")),
            Ret::NotAttempted,
            180,
            Some(190),
        )
        .op_on("k2", 4, Call::Read, Ret::Record(None), 195, Some(198))
        // Deleted, the key may serve request "a".
        .op(
            3,
            Call::Delete { token: None },
            Ret::Deleted,
            200,
            Some(210),
        )
        .op(
            3,
            fp_claim(3, "c8", Some("a")),
            acq(7, 220, 1),
            220,
            Some(230),
        )
        .op(
            2,
            fp_claim(2, "c9", Some("b")),
            Ret::FingerprintMismatch,
            240,
            Some(250),
        );
    assert_clean(&h);
    let report = check(
        &h.ops,
        &Config {
            drift_ms: 100,
            max_attempts: 3,
            ..Config::default()
        },
    );
    assert_eq!(report.mismatches, 5);
}

#[test]
fn an_all_or_nothing_batch_acquired_next_to_a_mismatch_is_flagged() {
    let item = |key: &str, fingerprint: &str| Call::Claim {
        owner: "w4".into(),
        claim_id: format!("b-{key}"),
        lease_ms: LEASE,
        batch: Some(1),
        all_or_nothing: true,
        retention_ms: None,
        fingerprint: Some(fingerprint.to_string()),
    };
    let mut h = released_with_a();
    h.op_on(
        "k",
        4,
        item("k", "b"),
        Ret::FingerprintMismatch,
        40,
        Some(50),
    )
    .op_on("k2", 4, item("k2", "b"), acq(6, 40, 1), 40, Some(50));
    assert_flags(&h, "batch half applied");
}

#[test]
fn a_history_recorded_before_fingerprints_loads_as_sending_none() {
    let line = r#"{"id":0,"process":1,"key":"k","call":{"Claim":{"owner":"w1","claim_id":"c1","lease_ms":1000,"batch":null}},"ret":"Unknown","invoke_ms":5,"complete_ms":null}"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.jsonl");
    std::fs::write(&path, line).unwrap();
    let ops = robust::history::load(&path).unwrap();
    assert!(matches!(
        &ops[0].call,
        Call::Claim {
            fingerprint: None,
            ..
        }
    ));
}
