//! Property test: random command sequences on one key, run through
//! `record::apply_op` and through the test-side model of SPEC §1–§2
//! (`robust::model`, the same model the robustness checker replays
//! histories through). Outcomes must agree, and the invariants must hold: at most one
//! live holder, tokens strictly increase, a completed result never changes,
//! a stale token never changes anything.
mod robust;

use idemkv::record::{
    apply_op, Change, Claim, ClaimOutcome, Op, Outcome, Record, Released, RuleError,
};
use proptest::prelude::*;
use robust::model::{self, Answer, Rec};

const LEASE: u64 = 200;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
enum Step {
    Claim { owner: u8, claim_id: u8 },
    Complete { pick: u8, result: u8 },
    Renew { pick: u8 },
    Release { pick: u8 },
    Delete,
    DeleteFenced { pick: u8 },
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..3, 0u8..2).prop_map(|(owner, claim_id)| Step::Claim { owner, claim_id }),
        2 => (0u8..3, 0u8..2).prop_map(|(pick, result)| Step::Complete { pick, result }),
        1 => (0u8..3).prop_map(|pick| Step::Renew { pick }),
        1 => (0u8..3).prop_map(|pick| Step::Release { pick }),
        1 => Just(Step::Delete),
        1 => (0u8..3).prop_map(|pick| Step::DeleteFenced { pick }),
        3 => (0u64..300).prop_map(Step::Advance),
    ]
}

type M = Rec<u64, u64>;

fn claim_of(owner: u8, claim_id: u8) -> (String, String) {
    (format!("w{owner}"), format!("c{claim_id}"))
}

/// The model's answer and next state for one step at time `now`; a grant
/// takes token `next_token`.
fn model_step(m: &M, step: &Step, token: u64, now: u64, next_token: u64) -> (M, Answer<u64>) {
    match step {
        Step::Claim { owner, claim_id } => {
            let (owner, claim_id) = claim_of(*owner, *claim_id);
            let c = model::Claim {
                owner: &owner,
                claim_id: &claim_id,
                max_attempts: MAX_ATTEMPTS,
            };
            let live = matches!(m, Rec::Held { deadline, .. } if now < *deadline);
            model::claim(m, &c, live, || (next_token, now + LEASE))
        }
        Step::Complete { result, .. } => model::complete(m, token, &result.to_string()),
        Step::Renew { .. } => model::renew(m, token, |d| (now + LEASE).max(*d)),
        Step::Release { .. } => model::release(m, token, MAX_ATTEMPTS),
        Step::Delete => model::delete(m, None),
        Step::DeleteFenced { .. } => model::delete(m, Some(token)),
        Step::Advance(_) => unreachable!("time only"),
    }
}

/// The product's answer in the model's terms.
fn observe(out: &Result<Outcome, RuleError>, holder: Option<u64>) -> Answer<u64> {
    match out {
        Ok(Outcome::Claim(ClaimOutcome::Acquired { token, attempt, .. })) => Answer::Acquired {
            token: *token,
            attempt: *attempt,
            fresh: holder != Some(*token),
        },
        Ok(Outcome::Claim(ClaimOutcome::InProgress { owner, .. })) => Answer::InProgress {
            owner: owner.clone(),
        },
        Ok(Outcome::Claim(ClaimOutcome::Completed { token, result, .. })) => Answer::Completed {
            token: *token,
            result: String::from_utf8_lossy(result).into_owned(),
        },
        Ok(Outcome::Claim(ClaimOutcome::Failed { .. })) => Answer::Failed,
        Ok(Outcome::Completed { .. }) => Answer::Done,
        Ok(Outcome::Renewed { .. }) => Answer::Renewed,
        Ok(Outcome::Released { state, .. }) => Answer::Released {
            failed: *state == Released::Failed,
        },
        Ok(Outcome::Deleted { .. }) => Answer::Deleted,
        Err(RuleError::LeaseLost { .. }) => Answer::LeaseLost,
        Err(RuleError::AlreadyCompleted { .. }) => Answer::AlreadyCompleted,
        other => panic!("unexpected answer {other:?}"),
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
            // Fenced steps pick 0: the current token (if any), 1: an older
            // granted one, 2: a bogus one.
            let token = match step {
                Step::Complete { pick, .. } | Step::Renew { pick } | Step::Release { pick }
                | Step::DeleteFenced { pick } => match pick {
                    0 => current_token.or(granted.last().copied()).unwrap_or(7),
                    1 => granted.first().copied().unwrap_or(9),
                    _ => 1_000_000 + index,
                },
                _ => 0,
            };
            let op = match step {
                Step::Advance(ms) => { now += ms; continue; }
                Step::Claim { owner, claim_id } => {
                    let (owner, claim_id) = claim_of(*owner, *claim_id);
                    Op::Claim(Claim {
                        owner,
                        claim_id,
                        lease_ms: LEASE,
                        fingerprint: None,
                        max_attempts: MAX_ATTEMPTS,
                        retention_ms: 86_400_000,
                    })
                }
                Step::Delete => Op::Delete,
                Step::DeleteFenced { .. } => Op::DeleteFenced { token },
                Step::Complete { result, .. } => Op::Complete { token, result: result.to_string().into_bytes(), code: None, retention_ms: None },
                Step::Renew { .. } => Op::Renew { token, lease_ms: LEASE, checkpoint: None },
                Step::Release { .. } => Op::Release { token, error: "boom".into() },
            };
            let want_model = model_step(&model, step, token, now, last_token + 1);
            let before = rec.clone();
            let mut tokens = last_token;
            let (change, out) = apply_op(rec.as_ref(), &op, now, &mut tokens);
            last_token = tokens;
            let (next_model, want) = want_model;
            prop_assert_eq!(observe(&out, current_token), want, "step {:?} on {:?}", step, model);
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
