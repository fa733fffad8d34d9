//! The `run_once` check's own tests (`robust::once::check`): hand-made
//! records, one good, and one per thing the check must flag.
mod robust;

use robust::once::{check, CallRec, Effect, Exec, Final, Outcome, Records};

const K: &str = "once-g0-k0";

fn call(id: usize, key: &str, outcome: Outcome) -> CallRec {
    CallRec {
        id,
        worker: id % 2,
        key: key.into(),
        start_ms: 1_000 * id as u64,
        end_ms: 1_000 * id as u64 + 900,
        outcome,
    }
}

fn exec(call: usize, key: &str, token: u64, grant_ms: u64, checkpoint: Option<&str>) -> Exec {
    Exec {
        call,
        key: key.into(),
        token,
        previous_owner: checkpoint.map(|_| "o0".into()),
        grant_ms,
        checkpoint: checkpoint.map(Into::into),
        saved: Vec::new(),
    }
}

/// Token 5 crashes after saving two checkpoints; token 7 takes over with
/// the second, does its effect, and saves its result; another call replays
/// it; the final read shows it.
fn good() -> Records {
    let mut crashed = exec(0, K, 5, 100, None);
    crashed.saved = vec![(format!("{K}|5|1"), 300), (format!("{K}|5|2"), 600)];
    let mut ran = exec(1, K, 7, 2_200, Some(&format!("{K}|5|2")));
    ran.saved = vec![(format!("{K}|7|1"), 2_400), (format!("{K}|7|2"), 2_700)];
    let result = format!("{K}|7");
    Records {
        calls: vec![
            call(0, K, Outcome::Crashed),
            call(
                1,
                K,
                Outcome::Ran {
                    token: 7,
                    result: result.clone(),
                },
            ),
            call(
                2,
                K,
                Outcome::Replayed {
                    token: 7,
                    result: result.clone(),
                },
            ),
            call(3, K, Outcome::Busy),
        ],
        execs: vec![crashed, ran],
        ledger: [(
            K.to_string(),
            vec![Effect {
                token: 7,
                grant_ms: 2_200,
                at_ms: 2_800,
            }],
        )]
        .into(),
        finals: [(K.to_string(), Final::Completed { token: 7, result })].into(),
    }
}

fn problems(r: &Records) -> Vec<String> {
    check(r).problems
}

#[test]
fn a_good_record_passes() {
    let rep = check(&good());
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!((rep.ran, rep.replayed, rep.crashed, rep.busy), (1, 1, 1, 1));
    assert_eq!((rep.takeovers, rep.takeovers_with_checkpoint), (1, 1));
    assert_eq!(rep.effects, 1);
}

#[test]
fn overlapping_windows_are_flagged() {
    let mut r = good();
    // Token 5 did not crash: it went on past its lease and applied its
    // effect 50 ms after token 7 got its grant.
    r.calls[0].outcome = Outcome::LeaseLost {
        token: 5,
        fenced: true,
    };
    r.ledger.get_mut(K).unwrap().insert(
        0,
        Effect {
            token: 5,
            grant_ms: 100,
            at_ms: 2_250,
        },
    );
    let p = problems(&r);
    assert!(p.iter().any(|m| m.contains("overlap")), "{p:?}");
    // Back-to-back windows (within rounding) are fine.
    r.ledger.get_mut(K).unwrap()[0].at_ms = 2_202;
    assert!(problems(&r).is_empty(), "{:?}", problems(&r));
}

#[test]
fn two_different_saved_results_are_flagged() {
    let mut r = good();
    r.calls[2].outcome = Outcome::Replayed {
        token: 5,
        result: format!("{K}|5"),
    };
    let p = problems(&r);
    assert!(
        p.iter().any(|m| m.contains("more than one saved result")),
        "{p:?}"
    );
}

#[test]
fn a_final_read_that_differs_from_the_saved_result_is_flagged() {
    let mut r = good();
    r.finals.insert(K.into(), Final::Other("Available".into()));
    assert!(problems(&r).iter().any(|m| m.contains("final read")));
    // With no result seen by any call, a completion by an execution that
    // did its effect (its caller's reply lost) is fine; one by an
    // execution told it lost its lease is not.
    let mut r = good();
    r.calls.truncate(1);
    r.calls.push(call(
        1,
        K,
        Outcome::Error {
            message: "deadline".into(),
            fault: None,
        },
    ));
    assert!(problems(&r).is_empty(), "{:?}", problems(&r));
    r.calls[1].outcome = Outcome::LeaseLost {
        token: 7,
        fenced: false,
    };
    let p = problems(&r);
    assert!(p.iter().any(|m| m.contains("never saved")), "{p:?}");
}

#[test]
fn a_saved_result_without_its_effect_is_flagged() {
    let mut r = good();
    r.ledger.clear();
    let p = problems(&r);
    assert!(
        p.iter().any(|m| m.contains("never applied its effect")),
        "{p:?}"
    );
}

#[test]
fn a_foreign_own_or_future_checkpoint_is_flagged() {
    // Another key's.
    let mut r = good();
    let other = "once-g0-k1";
    r.execs[0].key = other.into();
    r.calls[0].key = other.into();
    r.finals.insert(other.into(), Final::Absent);
    let p = problems(&r);
    assert!(p.iter().any(|m| m.contains("another key")), "{p:?}");

    // Its own.
    let mut r = good();
    r.execs[1].checkpoint = Some(format!("{K}|7|1"));
    let p = problems(&r);
    assert!(
        p.iter().any(|m| m.contains("not an earlier holder")),
        "{p:?}"
    );

    // Saved after the grant it was handed with.
    let mut r = good();
    r.execs[0].saved[1].1 = 2_300;
    let p = problems(&r);
    assert!(p.iter().any(|m| m.contains("from the future")), "{p:?}");

    // Never saved by anyone.
    let mut r = good();
    r.execs[1].checkpoint = Some(format!("{K}|5|9"));
    let p = problems(&r);
    assert!(p.iter().any(|m| m.contains("no execution saved")), "{p:?}");
}

#[test]
fn a_server_fault_fails_the_run() {
    let mut r = good();
    r.calls.push(call(
        4,
        K,
        Outcome::Error {
            message: "internal: boom".into(),
            fault: Some("the server failed a request".into()),
        },
    ));
    let p = problems(&r);
    assert!(p.iter().any(|m| m.contains("server failed")), "{p:?}");
}
