//! The one test-side model of a record (SPEC §1–2), written from the spec
//! and not from `src/record.rs`. Two users share it:
//!
//! - `tests/record_model.rs` runs random operations through the product's
//!   rules and through this model, with every token and deadline known;
//! - the history checker (`checker.rs`) replays recorded histories through
//!   it, where a token may be known only as "above n" (its grant's reply was
//!   lost) and a deadline only as a range.
//!
//! So the rules are generic over how well a token (`T`) and a deadline
//! (`D`) are known; the caller decides whether a lease is live (the checker
//! tries both where its clocks cannot tell) and supplies the new holder's
//! token and deadline. A rule change is made in `record.rs` and here.
//!
//! Every present state carries the request fingerprint the key is bound to
//! (SPEC §2: a claim whose fingerprint differs is `FINGERPRINT_MISMATCH` and
//! changes nothing); the checker always knows it exactly, since it follows
//! from which claims the search placed, so it is not generic.

/// A fencing token as the caller knows it.
pub trait Token: Clone + PartialEq {
    /// Does a request carrying token `t` hold this one?
    fn is(&self, t: u64) -> bool;
}

impl Token for u64 {
    fn is(&self, t: u64) -> bool {
        *self == t
    }
}

/// One record: the states of SPEC §1. `fingerprint` is the request the
/// key is bound to, `None` while no claim that was granted it gave one; it
/// lives as long as the record and is forgotten only with it (Delete,
/// retention), so a key deleted or swept may serve another request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rec<T, D> {
    Absent,
    Held {
        owner: String,
        claim_id: String,
        token: T,
        deadline: D,
        attempts: u32,
        fingerprint: Option<String>,
    },
    Available {
        attempts: u32,
        /// The token whose Release made it available (a retried Release
        /// of that token succeeds again).
        last: u64,
        fingerprint: Option<String>,
    },
    Completed {
        token: u64,
        result: String,
        fingerprint: Option<String>,
    },
    Failed {
        attempts: u32,
        /// The token whose Release made it fail; `None` when the last
        /// attempt's lease ran out (no Release matches).
        last: Option<u64>,
        fingerprint: Option<String>,
    },
}

impl<T, D> Rec<T, D> {
    /// The stored fingerprint; none for an absent record.
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Rec::Absent => None,
            Rec::Held { fingerprint, .. }
            | Rec::Available { fingerprint, .. }
            | Rec::Completed { fingerprint, .. }
            | Rec::Failed { fingerprint, .. } => fingerprint.as_deref(),
        }
    }

    /// The stored fingerprint, for the record's next state.
    fn kept(&self) -> Option<String> {
        self.fingerprint().map(str::to_string)
    }
}

/// What the spec says an operation answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    /// A grant: a new one (`fresh`), or the holder's own retry getting its
    /// grant back.
    Acquired {
        token: T,
        attempt: u32,
        fresh: bool,
    },
    InProgress {
        owner: String,
    },
    Completed {
        token: u64,
        result: String,
    },
    Failed,
    Renewed,
    Done,
    Released {
        failed: bool,
    },
    Deleted,
    LeaseLost,
    AlreadyCompleted,
    /// The claim's fingerprint differs from the stored one: the key was
    /// reused for another request. Nothing changes.
    FingerprintMismatch,
}

/// A Claim's identity and limits.
pub struct Claim<'a> {
    pub owner: &'a str,
    pub claim_id: &'a str,
    /// 0: unlimited.
    pub max_attempts: u32,
    /// The request's fingerprint, if the claim gave one.
    pub fingerprint: Option<&'a str>,
}

type Step<T, D> = (Rec<T, D>, Answer<T>);

/// Claim. `live`: the current holder's lease is live at this moment (only
/// read when another claim holds the record). `grant` gives the new
/// holder's token and deadline.
///
/// The fingerprint comes first, in every state: a claim for another
/// request must not be told a result, a holder or a failure that belong to
/// a different one, and the holder's own retry (same owner and claim_id)
/// with another fingerprint is another request too. A claim without a
/// fingerprint, or a record without one, never mismatches.
pub fn claim<T: Token, D: Clone>(
    rec: &Rec<T, D>,
    c: &Claim,
    live: bool,
    grant: impl FnOnce() -> (T, D),
) -> Step<T, D> {
    if let (Some(stored), Some(given)) = (rec.fingerprint(), c.fingerprint) {
        if stored != given {
            return (rec.clone(), Answer::FingerprintMismatch);
        }
    }
    let attempts = match rec {
        Rec::Absent => 0,
        Rec::Held {
            owner,
            claim_id,
            token,
            attempts,
            ..
        } => {
            if owner == c.owner && claim_id == c.claim_id {
                let again = Answer::Acquired {
                    token: token.clone(),
                    attempt: *attempts,
                    fresh: false,
                };
                return (rec.clone(), again);
            }
            if live {
                let owner = owner.clone();
                return (rec.clone(), Answer::InProgress { owner });
            }
            if c.max_attempts > 0 && *attempts >= c.max_attempts {
                // The last attempt's lease ran out: the record fails, and
                // the fenced-out holder's late Release matches nothing.
                let failed = Rec::Failed {
                    attempts: *attempts,
                    last: None,
                    fingerprint: rec.kept(),
                };
                return (failed, Answer::Failed);
            }
            *attempts
        }
        Rec::Available { attempts, .. } => *attempts,
        Rec::Completed { token, result, .. } => {
            let (token, result) = (*token, result.clone());
            return (rec.clone(), Answer::Completed { token, result });
        }
        Rec::Failed { .. } => return (rec.clone(), Answer::Failed),
    };
    let (token, deadline) = grant();
    let attempt = attempts + 1;
    // The first fingerprint a grant sees binds the key: a record created
    // or last granted without one takes this claim's.
    let fingerprint = rec.kept().or(c.fingerprint.map(str::to_string));
    let held = Rec::Held {
        owner: c.owner.to_string(),
        claim_id: c.claim_id.to_string(),
        token: token.clone(),
        deadline,
        attempts: attempt,
        fingerprint,
    };
    let answer = Answer::Acquired {
        token,
        attempt,
        fresh: true,
    };
    (held, answer)
}

/// An item of an all-or-nothing ClaimBatch: the batch is applied only if
/// every item is acquired, so an item that is not acquired leaves its
/// record as it was (its answer stands: FAILED, IN_PROGRESS, the replay,
/// FINGERPRINT_MISMATCH).
pub fn all_or_nothing_item<T: Token, D: Clone>(rec: &Rec<T, D>, step: Step<T, D>) -> Step<T, D> {
    match step.1 {
        Answer::Acquired { .. } => step,
        answer => (rec.clone(), answer),
    }
}

/// Renew: the holder's token extends its lease (`extend` gives the new
/// deadline, never earlier); any other token has lost it.
pub fn renew<T: Token, D: Clone>(
    rec: &Rec<T, D>,
    token: u64,
    extend: impl FnOnce(&D) -> D,
) -> Step<T, D> {
    match rec {
        Rec::Held {
            token: held,
            deadline,
            ..
        } if held.is(token) => {
            let mut next = rec.clone();
            if let Rec::Held { deadline: d, .. } = &mut next {
                *d = extend(deadline);
            }
            (next, Answer::Renewed)
        }
        _ => (rec.clone(), Answer::LeaseLost),
    }
}

/// Complete: the holder's token saves the result, live lease or not (until
/// taken over); a retry with the same result succeeds again, another
/// result is ALREADY_COMPLETED.
pub fn complete<T: Token, D: Clone>(rec: &Rec<T, D>, token: u64, result: &str) -> Step<T, D> {
    match rec {
        Rec::Held { token: held, .. } if held.is(token) => {
            let done = Rec::Completed {
                token,
                result: result.to_string(),
                fingerprint: rec.kept(),
            };
            (done, Answer::Done)
        }
        Rec::Completed {
            token: by,
            result: saved,
            ..
        } if *by == token => {
            let answer = if saved == result {
                Answer::Done
            } else {
                Answer::AlreadyCompleted
            };
            (rec.clone(), answer)
        }
        _ => (rec.clone(), Answer::LeaseLost),
    }
}

/// Release: the holder gives the attempt up; the record is available again,
/// or failed once `max_attempts` attempts were made. A retry of that
/// Release answers the same.
pub fn release<T: Token, D: Clone>(rec: &Rec<T, D>, token: u64, max_attempts: u32) -> Step<T, D> {
    match rec {
        Rec::Held {
            token: held,
            attempts,
            ..
        } if held.is(token) => {
            let attempts = *attempts;
            if max_attempts > 0 && attempts >= max_attempts {
                let last = Some(token);
                let fingerprint = rec.kept();
                (
                    Rec::Failed {
                        attempts,
                        last,
                        fingerprint,
                    },
                    Answer::Released { failed: true },
                )
            } else {
                let last = token;
                let fingerprint = rec.kept();
                (
                    Rec::Available {
                        attempts,
                        last,
                        fingerprint,
                    },
                    Answer::Released { failed: false },
                )
            }
        }
        Rec::Available { last, .. } if *last == token => {
            (rec.clone(), Answer::Released { failed: false })
        }
        Rec::Failed { last: Some(l), .. } if *l == token => {
            (rec.clone(), Answer::Released { failed: true })
        }
        _ => (rec.clone(), Answer::LeaseLost),
    }
}

/// Delete. Unfenced: forget the record (and the request its fingerprint
/// bound the key to). Fenced: only the record the token
/// holds (live or expired) or completed; absent stays absent (a retry after
/// success); anything else is LEASE_LOST.
pub fn delete<T: Token, D: Clone>(rec: &Rec<T, D>, token: Option<u64>) -> Step<T, D> {
    let Some(t) = token else {
        return (Rec::Absent, Answer::Deleted);
    };
    match rec {
        Rec::Absent => (Rec::Absent, Answer::Deleted),
        Rec::Held { token: held, .. } if held.is(t) => (Rec::Absent, Answer::Deleted),
        Rec::Completed { token: by, .. } if *by == t => (Rec::Absent, Answer::Deleted),
        _ => (rec.clone(), Answer::LeaseLost),
    }
}
