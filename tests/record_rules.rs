//! Unit tests of the rules in `record.rs` that the model test does not
//! reach: batches, exhausted attempts, expiry, the clock, fingerprints,
//! tokens per grant, fenced Delete, Release after being fenced out; the
//! view that reads a stored record's expiry.
use idemkv::record::*;

fn claim(owner: &str, lease_ms: u64, max_attempts: u32) -> Claim {
    Claim {
        owner: owner.into(),
        claim_id: format!("{owner}-id"),
        lease_ms,
        fingerprint: None,
        max_attempts,
        retention_ms: 10_000,
    }
}

fn put(change: Change) -> Record {
    match change {
        Change::Put(r) => r,
        other => panic!("expected a Put, got {other:?}"),
    }
}

#[test]
fn the_clock_never_goes_backwards() {
    assert_eq!(advance_clock(1_000, 900), 1_000);
    assert_eq!(advance_clock(1_000, 1_200), 1_200);
}

#[test]
fn an_expired_lease_on_the_last_attempt_becomes_failed() {
    let (c, _) = apply_op(None, &Op::Claim(claim("a", 100, 1)), 0, &mut 4);
    let held = put(c);
    let (c, out) = apply_op(Some(&held), &Op::Claim(claim("b", 100, 1)), 150, &mut 5);
    let failed = put(c);
    assert!(matches!(failed.state, State::Failed { .. }));
    match out {
        Ok(Outcome::Claim(ClaimOutcome::Failed {
            attempts,
            last_error,
        })) => {
            assert_eq!(attempts, 1);
            assert!(last_error.contains("expired"), "{last_error}");
        }
        other => panic!("{other:?}"),
    }
    // FAILED is kept for the retention, then expires.
    assert_eq!(expires_at(&failed), 150 + 10_000);
}

#[test]
fn expiry_follows_the_state() {
    let (c, _) = apply_op(None, &Op::Claim(claim("a", 100, 0)), 1_000, &mut 0);
    let held = put(c);
    assert_eq!(
        expires_at(&held),
        1_100 + 10_000,
        "idle for the retention after the lease"
    );
    assert!(lease_is_live(&held, 1_099) && !lease_is_live(&held, 1_100));
    let release = Op::Release {
        token: 1,
        error: "e".into(),
    };
    let avail = put(apply_op(Some(&held), &release, 1_050, &mut 1).0);
    assert_eq!(expires_at(&avail), 1_050 + 10_000);
    let done = Op::Complete {
        token: 3,
        result: b"r".to_vec(),
        code: Some(7),
        retention_ms: Some(2_000),
    };
    let again = put(apply_op(Some(&avail), &Op::Claim(claim("b", 100, 0)), 1_060, &mut 2).0);
    let completed = put(apply_op(Some(&again), &done, 1_070, &mut 3).0);
    assert_eq!(
        expires_at(&completed),
        1_070 + 2_000,
        "Complete can set its own retention"
    );
    assert!(!is_expired(&completed, 3_069) && is_expired(&completed, 3_070));
}

#[test]
fn fingerprints_are_checked_on_every_later_claim() {
    let mut c = claim("a", 100, 0);
    c.fingerprint = Some(b"f1".to_vec());
    let rec = put(apply_op(None, &Op::Claim(c.clone()), 0, &mut 0).0);
    let mut other = claim("b", 100, 0);
    other.fingerprint = Some(b"f2".to_vec());
    let (change, out) = apply_op(Some(&rec), &Op::Claim(other), 500, &mut 1);
    assert_eq!(change, Change::Keep);
    assert_eq!(out, Err(RuleError::FingerprintMismatch));
    // Without a fingerprint, no check.
    let (_, out) = apply_op(Some(&rec), &Op::Claim(claim("b", 100, 0)), 50, &mut 2);
    assert!(matches!(
        out,
        Ok(Outcome::Claim(ClaimOutcome::InProgress { .. }))
    ));
}

/// An all-or-nothing batch applied, its reply lost, then retried after one
/// of its keys was taken over: the retry is not applied, but the key the
/// sender still holds answers ACQUIRED with its token (its own retry,
/// which changes nothing), so the reply lost never locks it out.
#[test]
fn a_retried_all_or_nothing_batch_still_hands_back_a_claim_it_holds() {
    let (long, short) = (claim("w", 3_600_000, 0), claim("w", 200, 0));
    let mut tokens = 9;
    let (changes, _) = apply_claim_batch(&[None, None], &[&long, &short], true, 0, &mut tokens);
    let (k1, k2) = (put(changes[0].clone()), put(changes[1].clone()));
    assert_eq!(tokens, 11, "tokens 10 (K1) and 11 (K2)");
    // At +300 ms x takes K2 over.
    let (taken, _) = apply_op(
        Some(&k2),
        &Op::Claim(claim("x", 60_000, 0)),
        300,
        &mut tokens,
    );
    let k2 = put(taken);
    // w's retry, same claim ids.
    let (changes, out) = apply_claim_batch(
        &[Some(k1), Some(k2)],
        &[&long, &short],
        true,
        400,
        &mut tokens,
    );
    assert!(
        changes.iter().all(|c| *c == Change::Keep),
        "nothing changes"
    );
    assert_eq!(tokens, 12, "no token taken");
    match out {
        Outcome::Batch { items, applied } => {
            assert!(!applied);
            assert!(
                matches!(items[0], Ok(ClaimOutcome::Acquired { token: 10, .. })),
                "the claim w still holds: {:?}",
                items[0]
            );
            assert!(matches!(items[1], Ok(ClaimOutcome::InProgress { .. })));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn batches_decide_per_item_or_all_or_nothing() {
    let held = put(apply_op(None, &Op::Claim(claim("x", 1_000, 0)), 0, &mut 0).0);
    let current = vec![None, Some(held), None];
    let (a, b, c) = (claim("w", 100, 0), claim("w", 100, 0), claim("w", 100, 0));
    let claims = vec![&a, &b, &c];

    let mut tokens = 8;
    let (changes, out) = apply_claim_batch(&current, &claims, false, 10, &mut tokens);
    assert!(matches!(changes[0], Change::Put(_)));
    assert_eq!(changes[1], Change::Keep);
    match out {
        Outcome::Batch { items, applied } => {
            assert!(applied);
            // Each grant takes a token of its own (SPEC §2 Tokens).
            assert!(matches!(
                items[0],
                Ok(ClaimOutcome::Acquired { token: 9, .. })
            ));
            assert!(matches!(items[1], Ok(ClaimOutcome::InProgress { .. })));
            assert!(matches!(
                items[2],
                Ok(ClaimOutcome::Acquired { token: 10, .. })
            ));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tokens, 10, "the counter moved past both grants");

    let mut tokens = 8;
    let (changes, out) = apply_claim_batch(&current, &claims, true, 10, &mut tokens);
    assert_eq!(
        tokens, 8,
        "an all-or-nothing batch that changed nothing granted nothing"
    );
    assert!(
        changes.iter().all(|c| *c == Change::Keep),
        "nothing changes"
    );
    match out {
        Outcome::Batch { items, applied } => {
            assert!(!applied);
            assert_eq!(items[0], Err(RuleError::NotAttempted));
            assert!(matches!(items[1], Ok(ClaimOutcome::InProgress { .. })));
            assert_eq!(items[2], Err(RuleError::NotAttempted));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lease_lost_names_the_current_holder() {
    let held = put(apply_op(None, &Op::Claim(claim("alice", 1_000, 0)), 0, &mut 3).0);
    let (_, out) = apply_op(
        Some(&held),
        &Op::Renew {
            token: 3,
            lease_ms: 100,
            checkpoint: None,
        },
        10,
        &mut 4,
    );
    let err = out.unwrap_err();
    assert!(err.to_string().starts_with("LEASE_LOST"), "{err}");
    assert!(
        err.to_string().contains("alice") && err.to_string().contains("token 4"),
        "{err}"
    );
    let (_, out) = apply_op(
        None,
        &Op::Release {
            token: 4,
            error: String::new(),
        },
        10,
        &mut 5,
    );
    assert!(out.unwrap_err().to_string().contains("absent"));
}

#[test]
fn a_holder_fenced_out_by_exhausted_attempts_cannot_release() {
    // a holds the last attempt; its lease expires; b's claim turns it FAILED.
    let held = put(apply_op(None, &Op::Claim(claim("a", 100, 1)), 0, &mut 0).0);
    let failed = put(apply_op(Some(&held), &Op::Claim(claim("b", 100, 1)), 150, &mut 1).0);
    assert!(matches!(failed.state, State::Failed { .. }));
    let release = Op::Release {
        token: 1,
        error: "late".into(),
    };
    let (change, out) = apply_op(Some(&failed), &release, 160, &mut 1);
    assert_eq!(change, Change::Keep);
    let err = out.unwrap_err();
    assert!(matches!(err, RuleError::LeaseLost { .. }), "{err}");
    assert!(err.to_string().contains("FAILED"), "{err}");

    // A Release that itself turned the record FAILED is still recognised
    // when retried.
    let held = put(apply_op(None, &Op::Claim(claim("a", 100, 1)), 0, &mut 0).0);
    let by_release = put(apply_op(Some(&held), &release, 50, &mut 1).0);
    let (_, again) = apply_op(Some(&by_release), &release, 60, &mut 1);
    assert!(matches!(
        again,
        Ok(Outcome::Released {
            state: Released::Failed,
            ..
        })
    ));
}

#[test]
fn a_permanent_release_fails_the_record_whatever_attempts_remain() {
    // Unlimited attempts: a plain Release would leave it AVAILABLE.
    let held = put(apply_op(None, &Op::Claim(claim("a", 100, 0)), 0, &mut 0).0);
    let give_up = Op::ReleasePermanent {
        token: 1,
        error: "ran; result not saved".into(),
    };
    let (change, out) = apply_op(Some(&held), &give_up, 50, &mut 1);
    assert!(matches!(
        out,
        Ok(Outcome::Released {
            state: Released::Failed,
            attempts: 1
        })
    ));
    let failed = put(change);
    assert!(
        matches!(&failed.state, State::Failed { last_error, last_token: 1, .. } if last_error == "ran; result not saved"),
        "{failed:?}"
    );
    // A retry answers as the first did and changes nothing.
    let (change, again) = apply_op(Some(&failed), &give_up, 60, &mut 1);
    assert_eq!(change, Change::Keep);
    assert_eq!(again, out);
    // A later claim, even long after the lease, gets FAILED: no new grant.
    let (change, later) = apply_op(Some(&failed), &Op::Claim(claim("b", 100, 0)), 5_000, &mut 1);
    assert_eq!(change, Change::Keep);
    assert!(
        matches!(&later, Ok(Outcome::Claim(ClaimOutcome::Failed { last_error, .. })) if last_error == "ran; result not saved"),
        "{later:?}"
    );
    // Only the holder's token may give up.
    let held = put(apply_op(None, &Op::Claim(claim("a", 100, 0)), 0, &mut 0).0);
    let stranger = Op::ReleasePermanent {
        token: 9,
        error: String::new(),
    };
    let (change, out) = apply_op(Some(&held), &stranger, 50, &mut 1);
    assert_eq!(change, Change::Keep);
    assert!(matches!(out, Err(RuleError::LeaseLost { .. })), "{out:?}");
}

#[test]
fn a_fenced_delete_removes_only_what_its_token_holds() {
    let held = put(apply_op(None, &Op::Claim(claim("a", 100, 0)), 0, &mut 0).0);
    let del = |token| Op::DeleteFenced { token };
    // Its own claim, live or expired, is deleted.
    for now in [10, 500] {
        let (change, out) = apply_op(Some(&held), &del(1), now, &mut 1);
        assert_eq!(change, Change::Remove);
        assert_eq!(out, Ok(Outcome::Deleted { existed: true }));
    }
    // A retry after it succeeded finds nothing and changes nothing.
    let (change, out) = apply_op(None, &del(1), 10, &mut 1);
    assert_eq!(change, Change::Keep);
    assert_eq!(out, Ok(Outcome::Deleted { existed: false }));
    // A newer claim (token 2 took over) is never deleted by token 1.
    let newer = put(apply_op(Some(&held), &Op::Claim(claim("b", 100, 0)), 200, &mut 1).0);
    let (change, out) = apply_op(Some(&newer), &del(1), 210, &mut 2);
    assert_eq!(change, Change::Keep);
    assert!(matches!(out, Err(RuleError::LeaseLost { token: 1, .. })));
    // The token that completed a record may delete it.
    let done = Op::Complete {
        token: 2,
        result: b"r".to_vec(),
        code: None,
        retention_ms: None,
    };
    let completed = put(apply_op(Some(&newer), &done, 220, &mut 2).0);
    let (change, _) = apply_op(Some(&completed), &del(1), 230, &mut 2);
    assert_eq!(change, Change::Keep);
    let (change, _) = apply_op(Some(&completed), &del(2), 230, &mut 2);
    assert_eq!(change, Change::Remove);
}

mod retention_view {
    //! Opening a data directory reads each record's expiry through
    //! `RetentionView`, which mirrors `Record`'s encoding field by field; a
    //! field added to or moved in `Record` or `State` without it would give
    //! a wrong expiry (a record swept early, or never).
    use idemkv::codec::{decode_borrowed, encode};
    use idemkv::record::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        "[a-zé😀]{0,40}"
    }
    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..300)
    }

    fn state() -> impl Strategy<Value = State> {
        prop_oneof![
            (
                text(),
                text(),
                any::<u64>(),
                any::<u64>(),
                proptest::option::of(text()),
                proptest::option::of(bytes())
            )
                .prop_map(
                    |(owner, claim_id, token, lease_deadline_ms, previous_owner, checkpoint)| {
                        State::InProgress {
                            owner,
                            claim_id,
                            token,
                            lease_deadline_ms,
                            previous_owner,
                            checkpoint,
                        }
                    }
                ),
            (text(), any::<u64>(), text(), proptest::option::of(bytes())).prop_map(
                |(last_owner, last_token, last_error, checkpoint)| State::Available {
                    last_owner,
                    last_token,
                    last_error,
                    checkpoint,
                }
            ),
            (
                any::<u64>(),
                bytes(),
                proptest::option::of(any::<i32>()),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(token, result, code, completed_at_ms, expires_at_ms)| {
                    State::Completed {
                        token,
                        result,
                        code,
                        completed_at_ms,
                        expires_at_ms,
                    }
                }),
            (text(), any::<u64>(), text(), any::<u64>()).prop_map(
                |(last_owner, last_token, last_error, expires_at_ms)| State::Failed {
                    last_owner,
                    last_token,
                    last_error,
                    expires_at_ms,
                }
            ),
        ]
    }

    fn record() -> impl Strategy<Value = Record> {
        (
            state(),
            proptest::option::of(bytes()),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    state,
                    fingerprint,
                    created_at_ms,
                    updated_at_ms,
                    attempts,
                    max_attempts,
                    retention_ms,
                )| Record {
                    state,
                    fingerprint,
                    created_at_ms,
                    updated_at_ms,
                    attempts,
                    max_attempts,
                    retention_ms,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn the_view_reads_the_expiry_of_every_stored_record(r in record()) {
            let bytes = encode(&r).unwrap();
            let view: RetentionView = decode_borrowed(&bytes).unwrap();
            prop_assert_eq!(view.expires_at(), expires_at(&r));
        }
    }

    /// Each state's deadline comes from its own field: small, distinct
    /// values, so reading one field for another cannot pass by chance.
    #[test]
    fn each_state_ends_where_its_rule_says() {
        let base = |state| Record {
            state,
            fingerprint: Some(vec![9; 33]),
            created_at_ms: 1,
            updated_at_ms: 20,
            attempts: 3,
            max_attempts: 4,
            retention_ms: 500,
        };
        let cases = [
            (
                base(State::InProgress {
                    owner: "w".into(),
                    claim_id: "c".into(),
                    token: 7,
                    lease_deadline_ms: 1_000,
                    previous_owner: Some("v".into()),
                    checkpoint: Some(vec![1, 2]),
                }),
                1_500,
            ),
            (
                base(State::Available {
                    last_owner: "w".into(),
                    last_token: 7,
                    last_error: "boom".into(),
                    checkpoint: None,
                }),
                520,
            ),
            (
                base(State::Completed {
                    token: 7,
                    result: vec![5; 100],
                    code: Some(201),
                    completed_at_ms: 30,
                    expires_at_ms: 86_400_030,
                }),
                86_400_030,
            ),
            (
                base(State::Failed {
                    last_owner: "w".into(),
                    last_token: 7,
                    last_error: "gave up".into(),
                    expires_at_ms: 4_000,
                }),
                4_000,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(expires_at(&r), want, "{r:?}");
            let bytes = encode(&r).unwrap();
            let view: RetentionView = decode_borrowed(&bytes).unwrap();
            assert_eq!(view.expires_at(), want, "{r:?}");
        }
    }
}
