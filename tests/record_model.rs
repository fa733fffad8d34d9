//! Property test: random command sequences on one key, run through
//! `record::apply_op` and through the test-side model of SPEC §1–§2
//! (`robust::model`, the same model the robustness checker replays
//! histories through). Outcomes must agree, and the invariants must hold: at most one
//! live holder, tokens strictly increase, a completed result never changes,
//! a stale token never changes anything, the stored fingerprint is the
//! model's.
//!
//! Claims carry no fingerprint, "a" or "b", so keys get reused for another
//! request (FINGERPRINT_MISMATCH) in every state, by holders' own retries
//! too. A ClaimBatch step claims the key together with a second, always
//! absent key, so an all-or-nothing batch is applied exactly when the key's
//! item is acquired: its other answers (a mismatch among them) must leave
//! everything unchanged and the fresh item NOT_ATTEMPTED.
mod robust;

use idemkv::record::{
    apply_claim_batch, apply_op, Change, Claim, ClaimOutcome, Op, Outcome, Record, Released,
    RuleError,
};
use proptest::prelude::*;
use robust::model::{self, Answer, Rec};

const LEASE: u64 = 200;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
enum Step {
    Claim {
        owner: u8,
        claim_id: u8,
        fp: u8,
    },
    /// A ClaimBatch of this key's claim and one on a fresh key.
    Batch {
        owner: u8,
        claim_id: u8,
        fp: u8,
        all_or_nothing: bool,
    },
    Complete {
        pick: u8,
        result: u8,
    },
    Renew {
        pick: u8,
    },
    Release {
        pick: u8,
    },
    Delete,
    DeleteFenced {
        pick: u8,
    },
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..3, 0u8..2, 0u8..3)
            .prop_map(|(owner, claim_id, fp)| Step::Claim { owner, claim_id, fp }),
        1 => (0u8..3, 0u8..2, 0u8..3, any::<bool>()).prop_map(|(owner, claim_id, fp, all_or_nothing)| {
            Step::Batch { owner, claim_id, fp, all_or_nothing }
        }),
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

/// None, "a" or "b": the key's request, or another one.
fn fingerprint_of(fp: u8) -> Option<&'static str> {
    [None, Some("a"), Some("b")][usize::from(fp % 3)]
}

fn product_claim(owner: u8, claim_id: u8, fp: u8) -> Claim {
    let (owner, claim_id) = claim_of(owner, claim_id);
    Claim {
        owner,
        claim_id,
        lease_ms: LEASE,
        fingerprint: fingerprint_of(fp).map(|f| f.as_bytes().to_vec()),
        max_attempts: MAX_ATTEMPTS,
        retention_ms: 86_400_000,
    }
}

/// The model's answer and next state for one step at time `now`; a grant
/// takes token `next_token`.
fn model_step(m: &M, step: &Step, token: u64, now: u64, next_token: u64) -> (M, Answer<u64>) {
    match step {
        Step::Claim {
            owner,
            claim_id,
            fp,
        }
        | Step::Batch {
            owner,
            claim_id,
            fp,
            ..
        } => {
            let (owner, claim_id) = claim_of(*owner, *claim_id);
            let c = model::Claim {
                owner: &owner,
                claim_id: &claim_id,
                max_attempts: MAX_ATTEMPTS,
                fingerprint: fingerprint_of(*fp),
            };
            let live = matches!(m, Rec::Held { deadline, .. } if now < *deadline);
            let decided = model::claim(m, &c, live, || (next_token, now + LEASE));
            match step {
                Step::Batch {
                    all_or_nothing: true,
                    ..
                } => model::all_or_nothing_item(m, decided),
                _ => decided,
            }
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
        Err(RuleError::FingerprintMismatch) => Answer::FingerprintMismatch,
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
            if let Step::Advance(ms) = step {
                now += ms;
                continue;
            }
            let before = rec.clone();
            let want_model = model_step(&model, step, token, now, last_token + 1);
            let (change, out) = match step {
                Step::Batch { owner, claim_id, fp, all_or_nothing } => {
                    // The key's item first, so it takes the next token, as
                    // the model's grant says.
                    let mine = product_claim(*owner, *claim_id, *fp);
                    let fresh = product_claim(*owner, *claim_id, *fp);
                    let tokens_before = last_token;
                    let (mut changes, out) = apply_claim_batch(
                        &[rec.clone(), None], &[&mine, &fresh], *all_or_nothing, now, &mut last_token);
                    let Outcome::Batch { mut items, applied } = out else {
                        panic!("a batch answered {out:?}");
                    };
                    let acquired = matches!(items[0], Ok(ClaimOutcome::Acquired { .. }));
                    if *all_or_nothing && !acquired {
                        prop_assert!(!applied && changes.iter().all(|c| *c == Change::Keep),
                            "an all-or-nothing batch with an item not acquired changes nothing");
                        prop_assert_eq!(&items[1], &Err(RuleError::NotAttempted));
                        prop_assert_eq!(last_token, tokens_before, "and takes no token");
                    } else {
                        prop_assert!(matches!(items[1], Ok(ClaimOutcome::Acquired { token, .. }) if token == last_token),
                            "the fresh item takes the batch's last token: {:?}", items[1]);
                    }
                    (changes.swap_remove(0), items.swap_remove(0).map(Outcome::Claim))
                }
                _ => {
                    let op = match step {
                        Step::Claim { owner, claim_id, fp } => Op::Claim(product_claim(*owner, *claim_id, *fp)),
                        Step::Delete => Op::Delete,
                        Step::DeleteFenced { .. } => Op::DeleteFenced { token },
                        Step::Complete { result, .. } => Op::Complete { token, result: result.to_string().into_bytes(), code: None, retention_ms: None },
                        Step::Renew { .. } => Op::Renew { token, lease_ms: LEASE, checkpoint: None },
                        Step::Release { .. } => Op::Release { token, error: "boom".into() },
                        Step::Advance(_) | Step::Batch { .. } => unreachable!("handled above"),
                    };
                    apply_op(rec.as_ref(), &op, now, &mut last_token)
                }
            };
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
            if matches!(step, Step::Delete) && before.is_none() {
                prop_assert!(rec.is_none());
            }
            prop_assert_eq!(rec.as_ref().and_then(|r| r.fingerprint.as_deref()),
                model.fingerprint().map(str::as_bytes), "the stored fingerprint is the model's");
            let live = rec.as_ref().is_some_and(|r| idemkv::record::lease_is_live(r, now));
            let model_live = matches!(model, M::Held { deadline, .. } if now < deadline);
            prop_assert_eq!(live, model_live, "exactly one live holder, as the model says");
        }
    }
}
