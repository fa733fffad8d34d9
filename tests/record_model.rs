//! Property test: random command sequences on one key, run through
//! `record::apply_op` and through a deliberately simple model written from
//! SPEC §1–§2. Outcomes must agree, and the invariants must hold: at most one
//! live holder, tokens strictly increase, a completed result never changes,
//! a stale token never changes anything.
use idemkv::record::{apply_op, Change, Claim, ClaimOutcome, Op, Outcome, Record, RuleError};
use proptest::prelude::*;

const LEASE: u64 = 200;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
enum Step {
    Claim { owner: u8, claim_id: u8 },
    Complete { pick: u8, result: u8 },
    Renew { pick: u8 },
    Release { pick: u8 },
    Delete,
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..3, 0u8..2).prop_map(|(owner, claim_id)| Step::Claim { owner, claim_id }),
        2 => (0u8..3, 0u8..2).prop_map(|(pick, result)| Step::Complete { pick, result }),
        1 => (0u8..3).prop_map(|pick| Step::Renew { pick }),
        1 => (0u8..3).prop_map(|pick| Step::Release { pick }),
        1 => Just(Step::Delete),
        3 => (0u64..300).prop_map(Step::Advance),
    ]
}

/// The model: what SPEC says a record is.
#[derive(Debug, Clone, PartialEq)]
enum M {
    Absent,
    Held {
        owner: u8,
        claim_id: u8,
        token: u64,
        deadline: u64,
        attempts: u32,
    },
    Avail {
        attempts: u32,
        last_token: u64,
    },
    Done {
        token: u64,
        result: u8,
    },
    Failed {
        attempts: u32,
        last_token: u64,
    },
}

/// What the model expects an operation to answer.
#[derive(Debug, PartialEq)]
enum Want {
    Acquired { token: u64, attempt: u32 },
    InProgress { owner: u8 },
    Completed { token: u64, result: u8 },
    Failed,
    Ok,
    LeaseLost,
    AlreadyCompleted,
}

fn model_claim(m: &M, owner: u8, claim_id: u8, now: u64, index: u64) -> (M, Want) {
    let grant = |attempts: u32| {
        (
            M::Held {
                owner,
                claim_id,
                token: index,
                deadline: now + LEASE,
                attempts,
            },
            Want::Acquired {
                token: index,
                attempt: attempts,
            },
        )
    };
    match *m {
        M::Absent => grant(1),
        M::Held {
            owner: o,
            claim_id: c,
            token,
            attempts,
            ..
        } if o == owner && c == claim_id => (
            m.clone(),
            Want::Acquired {
                token,
                attempt: attempts,
            },
        ),
        M::Held {
            owner: o, deadline, ..
        } if now < deadline => (m.clone(), Want::InProgress { owner: o }),
        // The expired holder's attempt ends in FAILED; no Release made it
        // so, so its late Release must get LEASE_LOST (last_token 0).
        M::Held { attempts, .. } if attempts >= MAX_ATTEMPTS => (
            M::Failed {
                attempts,
                last_token: 0,
            },
            Want::Failed,
        ),
        M::Held { attempts, .. } | M::Avail { attempts, .. } => grant(attempts + 1),
        M::Done { token, result } => (m.clone(), Want::Completed { token, result }),
        M::Failed { .. } => (m.clone(), Want::Failed),
    }
}

fn model_fenced(m: &M, step: &Step, token: u64, now: u64) -> (M, Want) {
    match (step, m) {
        (Step::Complete { result, .. }, M::Held { token: t, .. }) if *t == token => (
            M::Done {
                token,
                result: *result,
            },
            Want::Ok,
        ),
        (
            Step::Complete { result, .. },
            M::Done {
                token: t,
                result: r,
            },
        ) if *t == token => {
            if r == result {
                (m.clone(), Want::Ok)
            } else {
                (m.clone(), Want::AlreadyCompleted)
            }
        }
        (
            Step::Renew { .. },
            M::Held {
                owner,
                claim_id,
                token: t,
                deadline,
                attempts,
            },
        ) if *t == token => (
            M::Held {
                owner: *owner,
                claim_id: *claim_id,
                token,
                deadline: (now + LEASE).max(*deadline),
                attempts: *attempts,
            },
            Want::Ok,
        ),
        (
            Step::Release { .. },
            M::Held {
                token: t, attempts, ..
            },
        ) if *t == token => {
            if *attempts >= MAX_ATTEMPTS {
                (
                    M::Failed {
                        attempts: *attempts,
                        last_token: token,
                    },
                    Want::Ok,
                )
            } else {
                (
                    M::Avail {
                        attempts: *attempts,
                        last_token: token,
                    },
                    Want::Ok,
                )
            }
        }
        (Step::Release { .. }, M::Avail { last_token, .. } | M::Failed { last_token, .. })
            if *last_token == token =>
        {
            (m.clone(), Want::Ok)
        }
        _ => (m.clone(), Want::LeaseLost),
    }
}

fn observe(out: &Result<Outcome, RuleError>) -> Want {
    match out {
        Ok(Outcome::Claim(ClaimOutcome::Acquired { token, attempt, .. })) => Want::Acquired {
            token: *token,
            attempt: *attempt,
        },
        Ok(Outcome::Claim(ClaimOutcome::InProgress { owner, .. })) => Want::InProgress {
            owner: owner.as_bytes()[1] - b'0',
        },
        Ok(Outcome::Claim(ClaimOutcome::Completed { token, result, .. })) => Want::Completed {
            token: *token,
            result: result[0],
        },
        Ok(Outcome::Claim(ClaimOutcome::Failed { .. })) => Want::Failed,
        Ok(_) => Want::Ok,
        Err(RuleError::LeaseLost { .. }) => Want::LeaseLost,
        Err(RuleError::AlreadyCompleted { .. }) => Want::AlreadyCompleted,
        Err(e) => panic!("unexpected rule error {e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn record_rules_match_the_model(steps in proptest::collection::vec(step(), 1..60)) {
        let mut rec: Option<Record> = None;
        let mut model = M::Absent;
        let mut now = 1_000u64;
        let mut index = 0u64;
        // The replicated token counter: each grant takes the next value.
        let mut last_token = 0u64;
        let mut granted: Vec<u64> = Vec::new();
        let mut completed: Option<(u64, Vec<u8>)> = None;
        for step in &steps {
            index += 1;
            let current_token = match &model { M::Held { token, .. } => Some(*token), _ => None };
            let (op, want_model) = match step {
                Step::Advance(ms) => { now += ms; continue; }
                Step::Claim { owner, claim_id } => {
                    let op = Op::Claim(Claim {
                        owner: format!("w{owner}"),
                        claim_id: format!("c{claim_id}"),
                        lease_ms: LEASE,
                        fingerprint: None,
                        max_attempts: MAX_ATTEMPTS,
                        retention_ms: 86_400_000,
                    });
                    (op, model_claim(&model, *owner, *claim_id, now, last_token + 1))
                }
                Step::Delete => (Op::Delete, (M::Absent, Want::Ok)),
                Step::Complete { pick, .. } | Step::Renew { pick } | Step::Release { pick } => {
                    // 0: the current token (if any), 1: an older granted one, 2: a bogus one.
                    let token = match pick {
                        0 => current_token.or(granted.last().copied()).unwrap_or(7),
                        1 => granted.first().copied().unwrap_or(9),
                        _ => 1_000_000 + index,
                    };
                    let op = match step {
                        Step::Complete { result, .. } => Op::Complete { token, result: vec![*result], code: None, retention_ms: None },
                        Step::Renew { .. } => Op::Renew { token, lease_ms: LEASE, checkpoint: None },
                        _ => Op::Release { token, error: "boom".into() },
                    };
                    (op, model_fenced(&model, step, token, now))
                }
            };
            let before = rec.clone();
            let mut tokens = last_token;
            let (change, out) = apply_op(rec.as_ref(), &op, now, &mut tokens);
            last_token = tokens;
            let (next_model, want) = want_model;
            prop_assert_eq!(observe(&out), want, "step {:?} on {:?}", step, model);
            if out.is_err() {
                prop_assert_eq!(&change, &Change::Keep, "a refused op must not change the record");
            }
            match change {
                Change::Keep => {}
                Change::Put(r) => rec = Some(r),
                Change::Remove => rec = None,
            }
            model = next_model;
            // Invariants.
            if let Ok(Outcome::Claim(ClaimOutcome::Acquired { token, .. })) = &out {
                if Some(*token) != current_token {
                    prop_assert!(granted.last().is_none_or(|last| token > last), "tokens strictly increase");
                    granted.push(*token);
                }
            }
            if let (Some((t, r)), Some(Record { state: idemkv::record::State::Completed { token, result, .. }, .. })) = (&completed, &rec) {
                prop_assert_eq!((t, r), (token, result), "a completed result never changes");
            }
            completed = match &rec {
                Some(Record { state: idemkv::record::State::Completed { token, result, .. }, .. }) => Some((*token, result.clone())),
                _ => None,
            };
            if matches!(op, Op::Delete) && before.is_none() {
                prop_assert!(rec.is_none());
            }
            let live = rec.as_ref().is_some_and(|r| idemkv::record::lease_is_live(r, now));
            let model_live = matches!(model, M::Held { deadline, .. } if now < deadline);
            prop_assert_eq!(live, model_live, "exactly one live holder, as the model says");
        }
    }
}
