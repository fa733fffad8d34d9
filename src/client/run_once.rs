//! The run-once helper: the one call most users need.
//!
//! [`Client::run_once`] claims a key, runs the work while renewing the lease
//! in the background, and completes with the work's result — or replays the
//! result a previous run saved.
//!
//! It times its own lease (SPEC §2, Time): the lease is valid until the
//! client's monotonic instant *before the claim was sent* plus the lease,
//! minus a safety margin ([`RunOptions::safety_margin`]); each successful
//! renewal moves that deadline to its own send instant plus the lease minus
//! the margin. When no renewal has succeeded by the deadline — the cluster is
//! unreachable, or refused the token — [`Claimed::lost`] fires and the
//! work's result is never saved. This module must not trust the server's
//! lease deadline (another clock) for that decision, nor wait for a reply
//! past the deadline before telling the work to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Client, ClientError};
use crate::pb::api::{self, claim_response::Outcome};
use crate::wire::Reason;

/// How to run a piece of work once.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub owner: String,
    pub lease: Duration,
    /// Renew every `lease / renew_divisor` (default 3), and at least twice
    /// per `lease − margin`.
    pub renew_divisor: u32,
    /// How much earlier than the server the client gives its lease up.
    /// `None`: `max(lease / 10, min(100 ms, lease / 2))`; see
    /// [`RunOptions::margin`]. Must be shorter than the lease.
    pub safety_margin: Option<Duration>,
    pub fingerprint: Option<Vec<u8>>,
    /// 0 = unlimited.
    pub max_attempts: u32,
    /// `None` = the server default (24 h).
    pub retention: Option<Duration>,
    /// When another worker holds the key, wait up to this long for its
    /// result (Await) instead of returning [`RunOutcome::Busy`]; if the key
    /// is freed meanwhile (released, or the holder's lease ran out), claim
    /// it and run the work.
    pub wait_for_duplicate: Option<Duration>,
}

impl RunOptions {
    pub fn new(owner: impl Into<String>, lease: Duration) -> Self {
        RunOptions {
            owner: owner.into(),
            lease,
            renew_divisor: 3,
            safety_margin: None,
            fingerprint: None,
            max_attempts: 0,
            retention: None,
            wait_for_duplicate: None,
        }
    }

    /// The safety margin in force. The default assumes the client's and the
    /// leader's monotonic clocks run at the same rate within 1 % (the leader
    /// steers its clock toward wall time by at most 1 %, so it may run that
    /// much fast): `lease / 10` covers that drift ten times over, and the
    /// 100 ms floor covers scheduling and network slack on short leases —
    /// capped at half the lease so the shortest leases stay usable.
    pub fn margin(&self) -> Duration {
        self.safety_margin.unwrap_or_else(|| {
            (self.lease / 10).max(Duration::from_millis(100).min(self.lease / 2))
        })
    }

    /// How long after a send the client may rely on the lease it asked for.
    fn validity(&self) -> Result<Duration, ClientError> {
        let margin = self.margin();
        if margin >= self.lease {
            return Err(ClientError::Config(format!(
                "safety_margin ({margin:?}) must be shorter than the lease ({:?})",
                self.lease
            )));
        }
        Ok(self.lease - margin)
    }
}

/// What the work hands back: the bytes to save and replay, and an optional
/// user code (an HTTP status, say) replayed with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    pub result: Vec<u8>,
    pub code: Option<i32>,
}

impl From<Vec<u8>> for Completion {
    fn from(result: Vec<u8>) -> Self {
        Completion { result, code: None }
    }
}

impl From<String> for Completion {
    fn from(s: String) -> Self {
        Completion {
            result: s.into_bytes(),
            code: None,
        }
    }
}

impl From<&str> for Completion {
    fn from(s: &str) -> Self {
        Completion {
            result: s.as_bytes().to_vec(),
            code: None,
        }
    }
}

/// Why a run lost its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLoss {
    /// The server refused the token (`LEASE_LOST`): another claim took the
    /// record over, or it was deleted.
    Fenced,
    /// No renewal succeeded before the client-side deadline (the cluster was
    /// unreachable or slow); another worker may take over at any moment.
    Expired,
}

impl std::fmt::Display for LeaseLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeaseLoss::Fenced => "the server fenced the token out",
            LeaseLoss::Expired => "no renewal succeeded before the client-side lease deadline",
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseState {
    deadline: Instant,
    lost: Option<LeaseLoss>,
}

impl LeaseState {
    /// Mark the lease expired if its deadline has passed at `now`; true if
    /// this call did.
    fn expire_at(&mut self, now: Instant) -> bool {
        let expire = self.lost.is_none() && now >= self.deadline;
        if expire {
            self.lost = Some(LeaseLoss::Expired);
        }
        expire
    }
}

/// The client's own view of one lease, shared by the renewer, the work and
/// `run_once`. Once lost it stays lost, even if a renewal sent in time
/// answers late: every reader decides under the channel's lock.
#[derive(Clone)]
struct LeaseClock(Arc<watch::Sender<LeaseState>>);

impl LeaseClock {
    fn new(deadline: Instant) -> Self {
        LeaseClock(Arc::new(watch::Sender::new(LeaseState {
            deadline,
            lost: None,
        })))
    }

    /// The state at `now`, marking the lease expired if its deadline passed.
    fn check(&self, now: Instant) -> LeaseState {
        let mut seen = None;
        self.0.send_if_modified(|s| {
            let expired = s.expire_at(now);
            seen = Some(*s);
            expired
        });
        // Invariant: send_if_modified always runs the closure.
        seen.unwrap_or_else(|| *self.0.borrow())
    }

    /// A renewal sent at `sent` succeeded: the lease now runs to
    /// `sent + validity`, unless it was already lost. False if it was.
    fn renewed(&self, sent: Instant, validity: Duration) -> bool {
        let now = Instant::now();
        let mut live = false;
        self.0.send_if_modified(|s| {
            if s.expire_at(now) {
                return true;
            }
            if s.lost.is_some() {
                return false;
            }
            live = true;
            s.deadline = s.deadline.max(sent + validity);
            true
        });
        live
    }

    /// Mark the lease lost; the first reason recorded stays.
    fn lose(&self, why: LeaseLoss) {
        self.0.send_if_modified(|s| {
            let first = s.lost.is_none();
            if first {
                s.lost = Some(why);
            }
            first
        });
    }

    async fn lost(&self) {
        let mut rx = self.0.subscribe();
        loop {
            let s = self.check(Instant::now());
            if s.lost.is_some() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(s.deadline) => {}
                // The sender lives as long as `self`: this never errors.
                _ = rx.changed() => {}
            }
        }
    }
}

/// What the work gets: its fencing token, the previous holder's checkpoint,
/// a way to save its own, its lease deadline, and a signal for a lost lease.
pub struct Claimed {
    pub token: u64,
    pub attempt: u32,
    pub previous_owner: Option<String>,
    /// The last checkpoint saved by whoever held the claim before.
    pub checkpoint: Option<Vec<u8>>,
    checkpoint_tx: watch::Sender<Option<Vec<u8>>>,
    lease: LeaseClock,
}

impl Claimed {
    /// Store a progress marker; it rides on the next lease renewal and is
    /// handed to whoever takes over if this worker dies.
    pub fn save_checkpoint(&self, checkpoint: impl Into<Vec<u8>>) {
        self.checkpoint_tx.send_replace(Some(checkpoint.into()));
    }

    /// Until when, on this client's monotonic clock, the lease is known to
    /// be held (if no renewal moves it later). Past it, the work must stop.
    pub fn deadline(&self) -> Instant {
        self.lease.check(Instant::now()).deadline
    }

    /// Time left before [`Claimed::deadline`]; zero once the lease is lost.
    pub fn remaining(&self) -> Duration {
        let now = Instant::now();
        let s = self.lease.check(now);
        match s.lost {
            Some(_) => Duration::ZERO,
            None => s.deadline.saturating_duration_since(now),
        }
    }

    /// Resolves when the lease is lost — the server refused the token, or
    /// the deadline passed without a successful renewal: stop, the result
    /// will not be saved.
    pub async fn lost(&self) {
        self.lease.lost().await
    }

    pub fn is_lost(&self) -> bool {
        self.lease.check(Instant::now()).lost.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// This call ran the work and saved its result.
    Ran { completion: Completion, token: u64 },
    /// An earlier run's saved result.
    Replayed { completion: Completion, token: u64 },
    /// The key is FAILED: its attempts are used up, or a run gave up for
    /// good (a permanent Release; `last_error` says why).
    Failed { attempts: u32, last_error: String },
    /// Another worker holds a live claim (and we did not wait, or it did not
    /// finish in time).
    Busy { owner: String },
}

/// New variants may come in later versions (as `CompleteFailed` and
/// `ResultTooLarge` did), so a `match` needs a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError<E> {
    /// The work failed; the claim was released so another attempt can run.
    #[error("the work failed: {0}")]
    Work(E),
    /// The lease was lost while the work ran; its result was not saved.
    #[error("lease lost while running (token {token}): {why}; the result was not saved")]
    LeaseLost { token: u64, why: LeaseLoss },
    /// The claim's reply came back after the client-side lease deadline
    /// (the claim was retried or delayed for longer than `lease − margin`):
    /// the work was not started, and the claim was released (best effort).
    #[error("the grant (token {token}) arrived {waited:?} after the claim was sent, past its lease deadline; the work was not started")]
    GrantExpired { token: u64, waited: Duration },
    /// The work ran, but the store refused its result as over its result
    /// limit, so nothing can be replayed. The key was marked FAILED (a
    /// permanent Release) so that later calls return
    /// [`RunOutcome::Failed`] and never run the work again; if that mark
    /// failed too (`marked_failed` false), the key stays held until its
    /// lease runs out and a later call may run the work again.
    #[error(
        "the work ran (token {token}) but its result of {bytes} bytes is over the store's result limit and was not saved; {}",
        if *.marked_failed {
            "the key is marked FAILED so the work does not run again"
        } else {
            "marking the key FAILED failed too: a call after the lease may run the work again"
        }
    )]
    ResultTooLarge {
        token: u64,
        bytes: usize,
        marked_failed: bool,
    },
    /// The work ran and returned, but saving its result failed (the
    /// cluster unreachable past the client's retries, say): its effect has
    /// happened, nothing was saved, and once the lease runs out a later call
    /// may run the work again. `completion` is the result, to save with
    /// [`Client::complete`] and `token` when the cluster is back (fenced:
    /// it is refused if another worker took the key over meanwhile).
    #[error("the work ran (token {token}) but its result was not saved: {error}")]
    CompleteFailed {
        token: u64,
        completion: Completion,
        error: ClientError,
    },
    /// A call to the cluster failed before the work ran (the claim, or a
    /// wait for another worker's result).
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl Client {
    /// Run `work` at most once per `(namespace, key)` with exactly-once
    /// effect: claim, renew while it runs, complete with its result; replay
    /// the saved result to every later call.
    ///
    /// The work is told (through [`Claimed::lost`]) when the lease is lost,
    /// but not cancelled: `run_once` waits for it to return, then saves
    /// nothing and returns [`RunError::LeaseLost`]. A Complete is sent only
    /// while the client-side deadline has not passed; if it is retried past
    /// the deadline, its token still fences it (saved only if no other
    /// claim took the record over).
    pub async fn run_once<F, Fut, T, E>(
        &self,
        namespace: &str,
        key: &[u8],
        opts: &RunOptions,
        work: F,
    ) -> Result<RunOutcome, RunError<E>>
    where
        F: FnOnce(Claimed) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Into<Completion>,
        E: std::fmt::Display,
    {
        let validity = opts.validity()?;
        let retention_ms = opts.retention.map_or(0, |d| d.as_millis() as u64);
        let wait_until = opts.wait_for_duplicate.map(|w| Instant::now() + w);
        // A duplicate that waits and sees the key freed (released, or its
        // holder's lease ran out) claims again while its wait lasts, rather
        // than report a holder that is gone.
        let (sent, acquired) = loop {
            let claim = api::ClaimRequest {
                namespace: namespace.into(),
                key: key.to_vec(),
                owner: opts.owner.clone(),
                // Fixed here, so every retry of this claim is the same claim
                // (and grant) and the instant taken next precedes all of
                // them. A new one for each claim: the server answers a
                // claim_id with the grant it made to it, which a retry of
                // an earlier claim, delayed on its way, may have won before
                // this `sent`; timing that grant from here would be late.
                claim_id: uuid::Uuid::new_v4().to_string(),
                lease_ms: opts.lease.as_millis() as u64,
                fingerprint: opts.fingerprint.clone(),
                max_attempts: opts.max_attempts,
                retention_ms,
            };
            let sent = Instant::now();
            match self.claim(claim).await? {
                Outcome::Acquired(a) => break (sent, a),
                Outcome::Completed(c) => return Ok(replayed(c)),
                Outcome::Failed(f) => {
                    return Ok(RunOutcome::Failed {
                        attempts: f.attempts,
                        last_error: f.last_error,
                    })
                }
                Outcome::InProgress(p) => {
                    let left = wait_until.map(|u| u.saturating_duration_since(Instant::now()));
                    let Some(left) = left.filter(|l| !l.is_zero()) else {
                        return Ok(RunOutcome::Busy { owner: p.owner });
                    };
                    if let Waited::Ended(outcome) =
                        self.wait_duplicate(namespace, key, left).await?
                    {
                        return Ok(outcome);
                    }
                }
            }
        };
        let token = acquired.token;
        let lease = LeaseClock::new(sent + validity);
        if lease.check(Instant::now()).lost.is_some() {
            let waited = sent.elapsed();
            self.release_late_grant(namespace, key, token, waited, opts.lease)
                .await;
            return Err(RunError::GrantExpired { token, waited });
        }
        let (checkpoint_tx, checkpoint_rx) = watch::channel(None);
        let claimed = Claimed {
            token,
            attempt: acquired.attempt,
            previous_owner: acquired.previous_owner,
            checkpoint: acquired.checkpoint,
            checkpoint_tx,
            lease: lease.clone(),
        };
        let renewer = AbortOnDrop(tokio::spawn(
            Renewer {
                client: self.clone(),
                namespace: namespace.to_string(),
                key: key.to_vec(),
                token,
                opts: opts.clone(),
                validity,
                checkpoint: checkpoint_rx,
                lease: lease.clone(),
            }
            .run(sent),
        ));
        let res = work(claimed).await;
        drop(renewer);
        if let Some(why) = lease.check(Instant::now()).lost {
            return Err(RunError::LeaseLost { token, why });
        }
        match res {
            Ok(done) => {
                let completion: Completion = done.into();
                let req = api::CompleteRequest {
                    namespace: namespace.into(),
                    key: key.to_vec(),
                    token,
                    result: completion.result.clone(),
                    code: completion.code,
                    retention_ms,
                };
                match self.complete(req).await {
                    Ok(_) => Ok(RunOutcome::Ran { completion, token }),
                    Err(e) if e.is(Reason::LeaseLost) => Err(RunError::LeaseLost {
                        token,
                        why: LeaseLoss::Fenced,
                    }),
                    Err(e) if e.is_too_large() => {
                        let bytes = completion.result.len();
                        let marked_failed = self.give_up(namespace, key, token, bytes, &e).await;
                        Err(RunError::ResultTooLarge {
                            token,
                            bytes,
                            marked_failed,
                        })
                    }
                    Err(error) => Err(RunError::CompleteFailed {
                        token,
                        completion,
                        error,
                    }),
                }
            }
            Err(e) => {
                let release = api::ReleaseRequest {
                    namespace: namespace.into(),
                    key: key.to_vec(),
                    token,
                    error: error_text(&e),
                    permanent: false,
                };
                // A release that fails leaves the lease to expire: same end.
                if let Err(re) = self.release(release).await {
                    tracing::warn!(error = %re, "release after a failed run");
                }
                Err(RunError::Work(e))
            }
        }
    }

    /// The work ran and had its effect, but the store refused its result as
    /// too large: mark the key FAILED for good (a permanent Release) so that
    /// no later delivery runs the work again; they get
    /// [`RunOutcome::Failed`] with this reason. True if the mark was made.
    async fn give_up(
        &self,
        namespace: &str,
        key: &[u8],
        token: u64,
        bytes: usize,
        refusal: &ClientError,
    ) -> bool {
        let req = api::ReleaseRequest {
            namespace: namespace.into(),
            key: key.to_vec(),
            token,
            error: error_text(&format!(
                "the work ran, but its result of {bytes} bytes was not saved ({}); \
                 marked failed so that it does not run again",
                refusal.message()
            )),
            permanent: true,
        };
        match self.release(req).await {
            // A store older than `permanent` ignores it and frees the key:
            // marked only when the answer says FAILED.
            Ok(r) if r.state == api::RecordState::Failed as i32 => true,
            Ok(r) => {
                tracing::warn!(
                    token,
                    state = r.state,
                    "the store did not mark the key FAILED (older than permanent releases?)"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, token, "marking a run whose result was too large failed");
                false
            }
        }
    }

    /// Give back a grant that came too late to be used, so the key is
    /// claimable at once rather than after the server's lease. The token
    /// fences it, so it can only release this grant. Bounded by one lease:
    /// by then the server's lease has run out anyway, and waiting longer
    /// would only delay the caller.
    async fn release_late_grant(
        &self,
        namespace: &str,
        key: &[u8],
        token: u64,
        waited: Duration,
        lease: Duration,
    ) {
        let req = api::ReleaseRequest {
            namespace: namespace.into(),
            key: key.to_vec(),
            token,
            error: format!("grant arrived {waited:?} after the claim was sent; not started"),
            permanent: false,
        };
        match tokio::time::timeout(lease, self.release(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, token, "release of a late grant"),
            Err(_) => tracing::warn!(token, "release of a late grant: no answer within the lease"),
        }
    }

    /// Wait up to `wait` for the key's holder to finish.
    async fn wait_duplicate<E>(
        &self,
        namespace: &str,
        key: &[u8],
        wait: Duration,
    ) -> Result<Waited, RunError<E>> {
        let r = match self
            .r#await(api::AwaitRequest {
                namespace: namespace.into(),
                key: key.to_vec(),
                timeout_ms: wait.as_millis().max(1) as u64,
            })
            .await
        {
            Ok(r) => r,
            // Deleted (or swept) while we waited: the key is free.
            Err(e) if e.code() == Some(tonic::Code::NotFound) => return Ok(Waited::Freed),
            Err(e) => return Err(e.into()),
        };
        let rec = r.record.unwrap_or_default();
        Ok(match api::RecordState::try_from(rec.state) {
            Ok(api::RecordState::Completed) => Waited::Ended(RunOutcome::Replayed {
                completion: Completion {
                    result: rec.result,
                    code: rec.code,
                },
                token: rec.token,
            }),
            Ok(api::RecordState::Failed) => Waited::Ended(RunOutcome::Failed {
                attempts: rec.attempts,
                last_error: rec.last_error,
            }),
            _ if r.timed_out => Waited::Ended(RunOutcome::Busy { owner: rec.owner }),
            // Released, or the holder's lease ran out.
            _ => Waited::Freed,
        })
    }
}

/// How a wait for another holder of the key ended.
enum Waited {
    /// With what to report: its result, its failure, or still held.
    Ended(RunOutcome),
    /// The key is free: claim it.
    Freed,
}

/// Stops the renewals when the work returns or the caller drops the run.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn replayed(c: api::Completed) -> RunOutcome {
    RunOutcome::Replayed {
        completion: Completion {
            result: c.result,
            code: c.code,
        },
        token: c.token,
    }
}

/// The background heartbeat of one run.
struct Renewer {
    client: Client,
    namespace: String,
    key: Vec<u8>,
    token: u64,
    opts: RunOptions,
    /// `lease − margin`: how far a successful renewal moves the deadline
    /// past its own send instant.
    validity: Duration,
    checkpoint: watch::Receiver<Option<Vec<u8>>>,
    lease: LeaseClock,
}

impl Renewer {
    /// Renew every `every` after the last successful send; after a failure,
    /// try again shortly. Gives up (lease lost) on `LEASE_LOST`, or when the
    /// deadline passes with no renewal through — a renewal still in flight
    /// then is abandoned, because its answer would come too late.
    async fn run(self, claim_sent: Instant) {
        let every = (self.opts.lease / self.opts.renew_divisor.max(2))
            .min(self.validity / 2)
            .max(Duration::from_millis(1));
        let pause = (every / 4).max(Duration::from_millis(10));
        let mut next = claim_sent + every;
        loop {
            let deadline = self.lease.check(Instant::now()).deadline;
            tokio::time::sleep_until(next.min(deadline)).await;
            if self.lease.check(Instant::now()).lost.is_some() {
                return;
            }
            let req = api::RenewRequest {
                namespace: self.namespace.clone(),
                key: self.key.clone(),
                token: self.token,
                lease_ms: self.opts.lease.as_millis() as u64,
                checkpoint: self.checkpoint.borrow().clone(),
            };
            let sent = Instant::now();
            match tokio::time::timeout_at(deadline, self.client.renew(req)).await {
                Ok(Ok(_)) => {
                    if !self.lease.renewed(sent, self.validity) {
                        return;
                    }
                    next = sent + every;
                }
                Ok(Err(e)) if e.is(Reason::LeaseLost) => {
                    self.lease.lose(LeaseLoss::Fenced);
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, left = ?deadline.saturating_duration_since(Instant::now()),
                        "lease renewal failed; retrying until the lease deadline");
                    next = Instant::now() + pause;
                }
                Err(_) => {
                    tracing::warn!(
                        token = self.token,
                        "no lease renewal got through before the deadline; the lease is lost"
                    );
                    self.lease.lose(LeaseLoss::Expired);
                    return;
                }
            }
        }
    }
}

/// Most bytes of a failed run's error kept in its Release: the server
/// refuses a longer one (SPEC §4, `error` ≤ 4096 bytes by default), and a
/// refused Release would leave the key held until the lease ran out.
const RELEASE_ERROR_MAX: usize = 1024;

/// The work's error as its Release carries it: cut at a character
/// boundary to [`RELEASE_ERROR_MAX`] bytes, marked when cut.
fn error_text(e: &impl std::fmt::Display) -> String {
    let mut text = e.to_string();
    if text.len() > RELEASE_ERROR_MAX {
        let mut end = RELEASE_ERROR_MAX - " [cut]".len();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [cut]");
    }
    text
}
