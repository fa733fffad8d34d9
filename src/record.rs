//! The idempotency rules of SPEC §1–§2, in one place.
//!
//! Everything here is pure and deterministic: a decision depends only on the
//! record as stored, the command, the state machine's clock (`now`, taken from
//! the leader's stamp in the log entry) and the replicated token counter
//! (each grant takes its next value: the fencing token). No I/O, no local
//! clock, no randomness: every replica that applies the same entry reaches
//! the same state.
//!
//! The storage layer reads the current record, calls [`apply_op`] or
//! [`apply_claim_batch`], and writes back the [`Change`]s; the gRPC layer only
//! carries commands in and outcomes out. A rule that appears anywhere else is
//! in the wrong room.

use serde::{Deserialize, Serialize};

use crate::wire::Reason;

/// A stored idempotency record. Absent records are simply not stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub state: State,
    /// Hash of the request payload given by the first claim; a later claim
    /// with a different one is a reuse of the key for another request.
    pub fingerprint: Option<Vec<u8>>,
    pub created_at_ms: u64,
    /// State machine time of the last change; drives idle retention of
    /// `AVAILABLE` records.
    pub updated_at_ms: u64,
    /// Claims granted so far (the current one included).
    pub attempts: u32,
    /// 0 = unlimited.
    pub max_attempts: u32,
    pub retention_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    InProgress {
        owner: String,
        claim_id: String,
        token: u64,
        lease_deadline_ms: u64,
        /// Who held the claim before this one took it over.
        previous_owner: Option<String>,
        /// The holder's last progress marker; inherited on takeover.
        checkpoint: Option<Vec<u8>>,
    },
    Available {
        last_owner: String,
        /// The token that released it, so a retried Release is recognised.
        last_token: u64,
        last_error: String,
        checkpoint: Option<Vec<u8>>,
    },
    Completed {
        token: u64,
        result: Vec<u8>,
        code: Option<i32>,
        completed_at_ms: u64,
        expires_at_ms: u64,
    },
    Failed {
        last_owner: String,
        last_token: u64,
        last_error: String,
        expires_at_ms: u64,
    },
}

/// The parameters of one claim, as validated by the API edge (defaults
/// already filled in, so the state machine never consults configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub owner: String,
    pub claim_id: String,
    pub lease_ms: u64,
    pub fingerprint: Option<Vec<u8>>,
    pub max_attempts: u32,
    pub retention_ms: u64,
}

/// An operation on one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Claim(Claim),
    Complete {
        token: u64,
        result: Vec<u8>,
        code: Option<i32>,
        /// `None` keeps the retention chosen at claim time.
        retention_ms: Option<u64>,
    },
    Renew {
        token: u64,
        lease_ms: u64,
        checkpoint: Option<Vec<u8>>,
    },
    Release {
        token: u64,
        error: String,
    },
    /// Unfenced: forget the record whatever its state.
    Delete,
    /// Fenced: forget the record only if `token` holds or completed it.
    /// (A variant of its own, so log entries written before it still decode.)
    DeleteFenced {
        token: u64,
    },
    /// A Release that gives up for good (`permanent`): the record becomes
    /// `FAILED` at once, whatever attempts remain, so no later claim runs
    /// the work again. (A variant of its own, so older entries decode.)
    ReleasePermanent {
        token: u64,
        error: String,
    },
}

/// `(namespace, key)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordKey {
    pub namespace: String,
    pub key: Vec<u8>,
}

/// What a log entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Op {
        key: RecordKey,
        op: Op,
    },
    ClaimBatch {
        items: Vec<(RecordKey, Claim)>,
        all_or_nothing: bool,
    },
    /// Remove up to `limit` records whose retention has passed (proposed by
    /// the leader, found through the expiry index).
    Sweep {
        limit: u32,
    },
    /// Commands the leader coalesced into one entry (never from a client or
    /// a peer): applied in order, at one stamp, each with its own outcome
    /// and its own tokens, as if each were an entry of its own. Never holds
    /// a `Sweep` or another `Many`. (Added last, so older entries decode.)
    Many(#[serde(deserialize_with = "one_level")] Vec<Command>),
    /// Hash the records and the token counter as of this entry, on every
    /// node that applies it (`ctl check` compares them, like etcd's
    /// hashkv). Changes nothing. Always an entry of its own. (Added after
    /// `Many`, so older entries decode.)
    Hash,
}

thread_local! {
    /// How many `Many`s the command being decoded on this thread is in.
    static MANY_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decode a `Many`'s commands, refusing a `Many` inside one (never written:
/// the leader coalesces plain commands only). Refused as the bytes are
/// read, at the second level: a peer message nested a million deep would
/// otherwise overflow the stack of the thread decoding it, which aborts
/// the node.
fn one_level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Command>, D::Error> {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            MANY_DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    let depth = MANY_DEPTH.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let _leave = Leave;
    if depth > 1 {
        return Err(serde::de::Error::custom(
            "a coalesced command inside another",
        ));
    }
    Vec::<Command>::deserialize(d)
}

impl Command {
    /// About how many bytes the command takes in a log entry (its
    /// variable-length fields), to bound a coalesced entry.
    pub fn weight(&self) -> usize {
        const FIXED: usize = 48;
        let key = |k: &RecordKey| k.namespace.len() + k.key.len();
        let claim = |c: &Claim| {
            c.owner.len() + c.claim_id.len() + c.fingerprint.as_ref().map_or(0, Vec::len)
        };
        FIXED
            + match self {
                Command::Op { key: k, op } => {
                    key(k)
                        + match op {
                            Op::Claim(c) => claim(c),
                            Op::Complete { result, .. } => result.len(),
                            Op::Renew { checkpoint, .. } => checkpoint.as_ref().map_or(0, Vec::len),
                            Op::Release { error, .. } | Op::ReleasePermanent { error, .. } => {
                                error.len()
                            }
                            Op::Delete | Op::DeleteFenced { .. } => 0,
                        }
                }
                Command::ClaimBatch { items, .. } => {
                    items.iter().map(|(k, c)| FIXED + key(k) + claim(c)).sum()
                }
                Command::Sweep { .. } | Command::Hash => 0,
                Command::Many(cs) => cs.iter().map(Command::weight).sum(),
            }
    }
}

/// A command with the leader's wall-clock stamp taken when it proposed it.
///
/// The command is shared: the leader's log keeps an entry, and Raft hands a
/// copy of it to each follower's replication and to apply; with an `Arc`
/// those copies cost a count, not a deep copy of every key and value. Its
/// encoding is the command's own (serde encodes an `Arc` as what it holds),
/// so entries written before it decode unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub stamped_ms: u64,
    pub command: std::sync::Arc<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimOutcome {
    Acquired {
        token: u64,
        lease_deadline_ms: u64,
        attempt: u32,
        previous_owner: Option<String>,
        checkpoint: Option<Vec<u8>>,
        /// This grant took the claim from a holder whose lease had
        /// expired (not a Release, not the holder's own retry).
        takeover: bool,
    },
    InProgress {
        owner: String,
        lease_remaining_ms: u64,
        attempt: u32,
    },
    Completed {
        result: Vec<u8>,
        code: Option<i32>,
        completed_at_ms: u64,
        token: u64,
    },
    Failed {
        attempts: u32,
        last_error: String,
    },
}

/// The state a Release left the record in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Released {
    Available,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Claim(ClaimOutcome),
    Completed {
        completed_at_ms: u64,
        expires_at_ms: u64,
    },
    Renewed {
        lease_deadline_ms: u64,
    },
    Released {
        state: Released,
        attempts: u32,
    },
    Deleted {
        existed: bool,
    },
    Batch {
        items: Vec<Result<ClaimOutcome, RuleError>>,
        applied: bool,
    },
    Swept {
        removed: u32,
    },
    /// The outcomes of a [`Command::Many`], in its order.
    Many(Vec<Result<Outcome, RuleError>>),
    /// A blank or membership entry.
    Nothing,
    /// The state's hash as of a [`Command::Hash`] entry at `index`.
    Hashed {
        index: u64,
        hash: Vec<u8>,
        records: u64,
    },
}

/// A rule refused the operation; the record is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RuleError {
    #[error(
        "{}: token {token} does not hold the claim ({current})",
        Reason::LeaseLost
    )]
    LeaseLost { token: u64, current: Holder },
    #[error(
        "{}: the key was first used with a different request fingerprint",
        Reason::FingerprintMismatch
    )]
    FingerprintMismatch,
    #[error(
        "{}: token {token} already completed this record with a different result",
        Reason::AlreadyCompleted
    )]
    AlreadyCompleted { token: u64 },
    /// In an all-or-nothing batch, an item that would have been acquired but
    /// was not because another item could not be.
    #[error(
        "{}: the batch was all-or-nothing and another item was not acquired",
        Reason::NotAttempted
    )]
    NotAttempted,
}

impl RuleError {
    /// The reason this refusal carries on the wire (and at the start of its
    /// message).
    pub fn reason(&self) -> Reason {
        match self {
            RuleError::LeaseLost { .. } => Reason::LeaseLost,
            RuleError::FingerprintMismatch => Reason::FingerprintMismatch,
            RuleError::AlreadyCompleted { .. } => Reason::AlreadyCompleted,
            RuleError::NotAttempted => Reason::NotAttempted,
        }
    }
}

/// Who holds a record now, for LEASE_LOST messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Holder {
    Absent,
    Claimed { owner: String, token: u64 },
    Available,
    Completed { token: u64 },
    Failed,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Absent => write!(f, "the record is absent: deleted or swept"),
            Holder::Claimed { owner, token } => {
                write!(f, "current holder is owner {owner:?} with token {token}")
            }
            Holder::Available => write!(f, "the record was released and is AVAILABLE"),
            Holder::Completed { token } => write!(f, "the record was COMPLETED by token {token}"),
            Holder::Failed => write!(f, "the record is FAILED"),
        }
    }
}

/// What to do with the stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Keep,
    Put(Record),
    Remove,
}

pub type Decision = (Change, Result<Outcome, RuleError>);

/// The state machine clock: never goes backwards.
pub fn advance_clock(previous_ms: u64, stamped_ms: u64) -> u64 {
    previous_ms.max(stamped_ms)
}

/// When retention removes this record: COMPLETED and FAILED at their
/// deadline, AVAILABLE after being idle for the retention, IN_PROGRESS once
/// its lease has been expired for the retention.
pub fn expires_at(r: &Record) -> u64 {
    let ends = match &r.state {
        State::InProgress {
            lease_deadline_ms, ..
        } => RetentionEnds::AfterLease(*lease_deadline_ms),
        State::Available { .. } => RetentionEnds::AfterIdle,
        State::Completed { expires_at_ms, .. } | State::Failed { expires_at_ms, .. } => {
            RetentionEnds::At(*expires_at_ms)
        }
    };
    ends.time(r.updated_at_ms, r.retention_ms)
}

/// How a record's state sets the end of its retention ([`expires_at`]).
enum RetentionEnds {
    /// IN_PROGRESS: the retention after the lease deadline.
    AfterLease(u64),
    /// AVAILABLE: the retention after the last change.
    AfterIdle,
    /// COMPLETED, FAILED: the deadline fixed when it ended.
    At(u64),
}

impl RetentionEnds {
    fn time(self, updated_at_ms: u64, retention_ms: u64) -> u64 {
        match self {
            RetentionEnds::AfterLease(deadline) => deadline.saturating_add(retention_ms),
            RetentionEnds::AfterIdle => updated_at_ms.saturating_add(retention_ms),
            RetentionEnds::At(t) => t,
        }
    }
}

/// A stored [`Record`] read only as far as [`expires_at`] needs, borrowing
/// its strings and bytes from the encoding instead of copying them: opening
/// a data directory reads the expiry of every record this way (a million
/// records: about half the time of decoding each whole). Its fields are
/// [`Record`]'s, in the same order, so it reads the same encoding; the
/// tests decode every state both ways.
#[derive(Deserialize)]
pub struct RetentionView<'a> {
    #[serde(borrow)]
    state: StateView<'a>,
    #[serde(borrow)]
    _fingerprint: Option<&'a [u8]>,
    _created_at_ms: u64,
    updated_at_ms: u64,
    _attempts: u32,
    _max_attempts: u32,
    retention_ms: u64,
}

/// [`State`], field for field; strings are read as their bytes.
#[derive(Deserialize)]
#[allow(dead_code)] // the skipped fields are there to be read past
enum StateView<'a> {
    InProgress {
        owner: &'a [u8],
        claim_id: &'a [u8],
        token: u64,
        lease_deadline_ms: u64,
        #[serde(borrow)]
        previous_owner: Option<&'a [u8]>,
        #[serde(borrow)]
        checkpoint: Option<&'a [u8]>,
    },
    Available {
        last_owner: &'a [u8],
        last_token: u64,
        last_error: &'a [u8],
        #[serde(borrow)]
        checkpoint: Option<&'a [u8]>,
    },
    Completed {
        token: u64,
        result: &'a [u8],
        code: Option<i32>,
        completed_at_ms: u64,
        expires_at_ms: u64,
    },
    Failed {
        last_owner: &'a [u8],
        last_token: u64,
        last_error: &'a [u8],
        expires_at_ms: u64,
    },
}

impl RetentionView<'_> {
    /// [`expires_at`] of the record this was read from.
    pub fn expires_at(&self) -> u64 {
        let ends = match self.state {
            StateView::InProgress {
                lease_deadline_ms, ..
            } => RetentionEnds::AfterLease(lease_deadline_ms),
            StateView::Available { .. } => RetentionEnds::AfterIdle,
            StateView::Completed { expires_at_ms, .. }
            | StateView::Failed { expires_at_ms, .. } => RetentionEnds::At(expires_at_ms),
        };
        ends.time(self.updated_at_ms, self.retention_ms)
    }
}

pub fn is_expired(r: &Record, now: u64) -> bool {
    now >= expires_at(r)
}

/// True while a worker holds a live lease at time `now`.
pub fn lease_is_live(r: &Record, now: u64) -> bool {
    live_lease_left(r, now).is_some()
}

/// How long the live lease on `r` still runs at `now` (ms, at least 1);
/// `None` when no worker holds a live lease.
pub fn live_lease_left(r: &Record, now: u64) -> Option<u64> {
    match &r.state {
        State::InProgress {
            lease_deadline_ms, ..
        } if now < *lease_deadline_ms => Some(lease_deadline_ms - now),
        _ => None,
    }
}

fn holder(cur: Option<&Record>) -> Holder {
    match cur.map(|r| &r.state) {
        None => Holder::Absent,
        Some(State::InProgress { owner, token, .. }) => Holder::Claimed {
            owner: owner.clone(),
            token: *token,
        },
        Some(State::Available { .. }) => Holder::Available,
        Some(State::Completed { token, .. }) => Holder::Completed { token: *token },
        Some(State::Failed { .. }) => Holder::Failed,
    }
}

fn lease_lost(token: u64, cur: Option<&Record>) -> Decision {
    (
        Change::Keep,
        Err(RuleError::LeaseLost {
            token,
            current: holder(cur),
        }),
    )
}

/// Decide one operation on one record. `last_token` is the replicated token
/// counter: a grant takes `last_token + 1` as its fencing token and leaves
/// the counter there (SPEC §2 Tokens).
pub fn apply_op(cur: Option<&Record>, op: &Op, now: u64, last_token: &mut u64) -> Decision {
    match op {
        Op::Claim(c) => {
            let (change, out) = claim(cur, c, now, last_token);
            (change, out.map(Outcome::Claim))
        }
        Op::Complete {
            token,
            result,
            code,
            retention_ms,
        } => complete(cur, *token, result, *code, *retention_ms, now),
        Op::Renew {
            token,
            lease_ms,
            checkpoint,
        } => renew(cur, *token, *lease_ms, checkpoint, now),
        Op::Release { token, error } => release(cur, *token, error, now, false),
        Op::ReleasePermanent { token, error } => release(cur, *token, error, now, true),
        Op::Delete => match cur {
            Some(_) => (Change::Remove, Ok(Outcome::Deleted { existed: true })),
            None => (Change::Keep, Ok(Outcome::Deleted { existed: false })),
        },
        Op::DeleteFenced { token } => delete_fenced(cur, *token),
    }
}

/// A fenced Delete removes the record its token holds (live or expired,
/// until taken over) or completed; a retry after it succeeded finds the key
/// absent and changes nothing. Anything else is a newer claim or another
/// state the token never held: `LEASE_LOST`.
fn delete_fenced(cur: Option<&Record>, token: u64) -> Decision {
    match cur.map(|r| &r.state) {
        None => (Change::Keep, Ok(Outcome::Deleted { existed: false })),
        Some(State::InProgress { token: held, .. })
        | Some(State::Completed { token: held, .. })
            if *held == token =>
        {
            (Change::Remove, Ok(Outcome::Deleted { existed: true }))
        }
        _ => lease_lost(token, cur),
    }
}

type ClaimDecision = (Change, Result<ClaimOutcome, RuleError>);

fn claim(cur: Option<&Record>, c: &Claim, now: u64, last_token: &mut u64) -> ClaimDecision {
    let Some(r) = cur else {
        let fresh = Record {
            state: State::Available {
                last_owner: String::new(),
                last_token: 0,
                last_error: String::new(),
                checkpoint: None,
            },
            fingerprint: c.fingerprint.clone(),
            created_at_ms: now,
            updated_at_ms: now,
            attempts: 0,
            max_attempts: c.max_attempts,
            retention_ms: c.retention_ms,
        };
        return acquire(fresh, c, Grant::default(), now, last_token);
    };
    if let (Some(stored), Some(given)) = (&r.fingerprint, &c.fingerprint) {
        if stored != given {
            return (Change::Keep, Err(RuleError::FingerprintMismatch));
        }
    }
    match &r.state {
        State::InProgress {
            owner,
            claim_id,
            token,
            lease_deadline_ms,
            previous_owner,
            checkpoint,
        } => {
            if *owner == c.owner && *claim_id == c.claim_id {
                // A retry of the claim that holds the record: same answer.
                let out = ClaimOutcome::Acquired {
                    token: *token,
                    lease_deadline_ms: *lease_deadline_ms,
                    attempt: r.attempts,
                    previous_owner: previous_owner.clone(),
                    checkpoint: checkpoint.clone(),
                    takeover: false,
                };
                return (Change::Keep, Ok(out));
            }
            if now < *lease_deadline_ms {
                let out = ClaimOutcome::InProgress {
                    owner: owner.clone(),
                    lease_remaining_ms: lease_deadline_ms - now,
                    attempt: r.attempts,
                };
                return (Change::Keep, Ok(out));
            }
            // The lease expired: that attempt failed; take over if allowed.
            if attempts_exhausted(r) {
                let error = format!("lease of owner {owner:?} (token {token}) expired");
                // Token 0 is never granted: no Release matches it, so the
                // fenced-out holder's late Release gets LEASE_LOST.
                let failed = fail(r, owner, 0, &error, now);
                let out = ClaimOutcome::Failed {
                    attempts: r.attempts,
                    last_error: error,
                };
                return (Change::Put(failed), Ok(out));
            }
            acquire(
                r.clone(),
                c,
                Grant {
                    previous_owner: Some(owner.clone()),
                    checkpoint: checkpoint.clone(),
                    takeover: true,
                },
                now,
                last_token,
            )
        }
        State::Available {
            last_owner,
            checkpoint,
            ..
        } => {
            let grant = Grant {
                previous_owner: (!last_owner.is_empty()).then(|| last_owner.clone()),
                checkpoint: checkpoint.clone(),
                takeover: false,
            };
            acquire(r.clone(), c, grant, now, last_token)
        }
        State::Completed {
            token,
            result,
            code,
            completed_at_ms,
            ..
        } => {
            let out = ClaimOutcome::Completed {
                result: result.clone(),
                code: *code,
                completed_at_ms: *completed_at_ms,
                token: *token,
            };
            (Change::Keep, Ok(out))
        }
        State::Failed { last_error, .. } => {
            let out = ClaimOutcome::Failed {
                attempts: r.attempts,
                last_error: last_error.clone(),
            };
            (Change::Keep, Ok(out))
        }
    }
}

fn attempts_exhausted(r: &Record) -> bool {
    r.max_attempts > 0 && r.attempts >= r.max_attempts
}

/// What a new grant inherits from the state it replaces.
#[derive(Default)]
struct Grant {
    previous_owner: Option<String>,
    checkpoint: Option<Vec<u8>>,
    takeover: bool,
}

fn acquire(
    mut r: Record,
    c: &Claim,
    grant: Grant,
    now: u64,
    last_token: &mut u64,
) -> ClaimDecision {
    let Grant {
        previous_owner,
        checkpoint,
        takeover,
    } = grant;
    *last_token += 1;
    let token = *last_token;
    let lease_deadline_ms = now.saturating_add(c.lease_ms);
    r.attempts += 1;
    r.updated_at_ms = now;
    if r.fingerprint.is_none() {
        r.fingerprint = c.fingerprint.clone();
    }
    r.state = State::InProgress {
        owner: c.owner.clone(),
        claim_id: c.claim_id.clone(),
        token,
        lease_deadline_ms,
        previous_owner: previous_owner.clone(),
        checkpoint: checkpoint.clone(),
    };
    let out = ClaimOutcome::Acquired {
        token,
        lease_deadline_ms,
        attempt: r.attempts,
        previous_owner,
        checkpoint,
        takeover,
    };
    (Change::Put(r), Ok(out))
}

fn fail(r: &Record, owner: &str, token: u64, error: &str, now: u64) -> Record {
    let mut f = r.clone();
    f.updated_at_ms = now;
    f.state = State::Failed {
        last_owner: owner.to_string(),
        last_token: token,
        last_error: error.to_string(),
        expires_at_ms: now.saturating_add(r.retention_ms),
    };
    f
}

fn complete(
    cur: Option<&Record>,
    token: u64,
    result: &[u8],
    code: Option<i32>,
    retention_ms: Option<u64>,
    now: u64,
) -> Decision {
    match cur.map(|r| (r, &r.state)) {
        Some((r, State::InProgress { token: held, .. })) if *held == token => {
            let expires_at_ms = now.saturating_add(retention_ms.unwrap_or(r.retention_ms));
            let mut done = r.clone();
            done.updated_at_ms = now;
            if let Some(ms) = retention_ms {
                done.retention_ms = ms;
            }
            done.state = State::Completed {
                token,
                result: result.to_vec(),
                code,
                completed_at_ms: now,
                expires_at_ms,
            };
            let out = Outcome::Completed {
                completed_at_ms: now,
                expires_at_ms,
            };
            (Change::Put(done), Ok(out))
        }
        Some((
            _,
            State::Completed {
                token: by,
                result: saved,
                code: saved_code,
                completed_at_ms,
                expires_at_ms,
            },
        )) if *by == token => {
            if saved.as_slice() == result && *saved_code == code {
                let out = Outcome::Completed {
                    completed_at_ms: *completed_at_ms,
                    expires_at_ms: *expires_at_ms,
                };
                (Change::Keep, Ok(out))
            } else {
                (Change::Keep, Err(RuleError::AlreadyCompleted { token }))
            }
        }
        _ => lease_lost(token, cur),
    }
}

fn renew(
    cur: Option<&Record>,
    token: u64,
    lease_ms: u64,
    checkpoint: &Option<Vec<u8>>,
    now: u64,
) -> Decision {
    let Some(r) = cur else {
        return lease_lost(token, cur);
    };
    let State::InProgress {
        token: held,
        checkpoint: stored,
        lease_deadline_ms,
        ..
    } = &r.state
    else {
        return lease_lost(token, cur);
    };
    if *held != token {
        return lease_lost(token, cur);
    }
    // A renewal never shortens a lease: a delayed duplicate heartbeat must
    // not take away time a later one granted.
    let deadline = now.saturating_add(lease_ms).max(*lease_deadline_ms);
    let mut next = r.clone();
    next.updated_at_ms = now;
    if let State::InProgress {
        lease_deadline_ms,
        checkpoint: cp,
        ..
    } = &mut next.state
    {
        *lease_deadline_ms = deadline;
        if checkpoint.is_some() {
            *cp = checkpoint.clone();
        } else {
            *cp = stored.clone();
        }
    }
    (
        Change::Put(next),
        Ok(Outcome::Renewed {
            lease_deadline_ms: deadline,
        }),
    )
}

/// Give the claim back: the record becomes `AVAILABLE` for the next
/// attempt, or `FAILED` when attempts are used up or the release is
/// `permanent`.
fn release(cur: Option<&Record>, token: u64, error: &str, now: u64, permanent: bool) -> Decision {
    let Some(r) = cur else {
        return lease_lost(token, cur);
    };
    match &r.state {
        State::InProgress {
            owner,
            token: held,
            checkpoint,
            ..
        } if *held == token => {
            if permanent || attempts_exhausted(r) {
                let failed = fail(r, owner, token, error, now);
                let out = Outcome::Released {
                    state: Released::Failed,
                    attempts: r.attempts,
                };
                return (Change::Put(failed), Ok(out));
            }
            let mut next = r.clone();
            next.updated_at_ms = now;
            next.state = State::Available {
                last_owner: owner.clone(),
                last_token: token,
                last_error: error.to_string(),
                checkpoint: checkpoint.clone(),
            };
            let out = Outcome::Released {
                state: Released::Available,
                attempts: r.attempts,
            };
            (Change::Put(next), Ok(out))
        }
        // A retried Release of the claim that already released it.
        State::Available { last_token, .. } if *last_token == token => {
            let out = Outcome::Released {
                state: Released::Available,
                attempts: r.attempts,
            };
            (Change::Keep, Ok(out))
        }
        State::Failed { last_token, .. } if *last_token == token => {
            let out = Outcome::Released {
                state: Released::Failed,
                attempts: r.attempts,
            };
            (Change::Keep, Ok(out))
        }
        _ => lease_lost(token, cur),
    }
}

/// A claim's answer when the claim changes nothing: a replay of a completed
/// result, a live lease held by another, the holder's own retry, a
/// fingerprint mismatch, a failed record. Such an answer may be given
/// without a log entry (the leader's no-write fast path, after a read
/// barrier). `None`: the claim would change the record and must go
/// through the log. The token counter is only read: an answer given
/// without an entry must never grant, so it never mints a token (a token
/// no entry records would be handed out again by the next grant).
pub fn claim_without_write(
    cur: Option<&Record>,
    op: &Op,
    now: u64,
    last_token: u64,
) -> Option<Result<Outcome, RuleError>> {
    if !matches!(op, Op::Claim(_)) {
        return None;
    }
    let mut tokens = last_token;
    match apply_op(cur, op, now, &mut tokens) {
        (Change::Keep, out) if tokens == last_token => Some(out),
        _ => None,
    }
}

/// The first item of a batch whose key an earlier item already names: a
/// batch claims each key at most once, so such a batch is refused before
/// it is proposed.
pub fn repeated_key<K: std::hash::Hash + Eq>(keys: impl IntoIterator<Item = K>) -> Option<usize> {
    let mut seen = std::collections::HashSet::new();
    keys.into_iter().position(|k| !seen.insert(k))
}

/// Decide a batch of claims carried by one entry. `current[i]` is the stored
/// record of `claims[i]`'s key; keys are distinct ([`repeated_key`] finds
/// none: the API edge and the peer port refuse such a batch). With
/// `all_or_nothing`, either every item is acquired or no change is made
/// and the items that would have been granted report
/// [`RuleError::NotAttempted`] (an item that is the holder's own retry
/// still reports its ACQUIRED, which changes nothing), and the token
/// counter is left untouched.
/// Each item acquired takes a token of its own.
pub fn apply_claim_batch(
    current: &[Option<Record>],
    claims: &[&Claim],
    all_or_nothing: bool,
    now: u64,
    last_token: &mut u64,
) -> (Vec<Change>, Outcome) {
    let mut counter = *last_token;
    let decisions: Vec<ClaimDecision> = current
        .iter()
        .zip(claims)
        .map(|(cur, c)| claim(cur.as_ref(), c, now, &mut counter))
        .collect();
    let all_acquired = decisions
        .iter()
        .all(|(_, out)| matches!(out, Ok(ClaimOutcome::Acquired { .. })));
    if !all_or_nothing || all_acquired {
        *last_token = counter;
    }
    if all_or_nothing && !all_acquired {
        // A grant not made is NotAttempted; the holder's own retry (an
        // ACQUIRED that changes nothing) stands, so a sender whose reply
        // was lost still learns the claim it holds.
        let items = decisions
            .into_iter()
            .map(|(change, out)| match out {
                Ok(ClaimOutcome::Acquired { .. }) if change != Change::Keep => {
                    Err(RuleError::NotAttempted)
                }
                other => other,
            })
            .collect();
        let changes = vec![Change::Keep; current.len()];
        return (
            changes,
            Outcome::Batch {
                items,
                applied: false,
            },
        );
    }
    let (changes, items) = decisions.into_iter().unzip();
    (
        changes,
        Outcome::Batch {
            items,
            applied: true,
        },
    )
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &*self.command {
            Command::Op { op, .. } => match op {
                Op::Claim(_) => "claim",
                Op::Complete { .. } => "complete",
                Op::Renew { .. } => "renew",
                Op::Release { .. } => "release",
                Op::ReleasePermanent { .. } => "release-permanent",
                Op::Delete => "delete",
                Op::DeleteFenced { .. } => "delete-fenced",
            },
            Command::ClaimBatch { .. } => "claim-batch",
            Command::Sweep { .. } => "sweep",
            Command::Many(_) => "coalesced",
            Command::Hash => "hash",
        };
        write!(f, "{what}@{}", self.stamped_ms)
    }
}
