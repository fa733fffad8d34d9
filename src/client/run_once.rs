//! The run-once helper: the one call most users need.
//!
//! [`Client::run_once`] claims a key, runs the work while renewing the lease
//! in the background, and completes with the work's result — or replays the
//! result a previous run saved. If the lease is lost (another worker took
//! over after it expired), the work's [`Claimed::lost`] future fires so it
//! can stop, and nothing is completed with the stale token.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use super::{Client, ClientError};
use crate::pb::api::{self, claim_response::Outcome};

/// How to run a piece of work once.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub owner: String,
    pub lease: Duration,
    /// Renew every `lease / renew_divisor` (default 3).
    pub renew_divisor: u32,
    pub fingerprint: Option<Vec<u8>>,
    /// 0 = unlimited.
    pub max_attempts: u32,
    /// `None` = the server default (24 h).
    pub retention: Option<Duration>,
    /// When another worker holds the key, wait up to this long for its
    /// result (Await) instead of returning [`RunOutcome::Busy`].
    pub wait_for_duplicate: Option<Duration>,
}

impl RunOptions {
    pub fn new(owner: impl Into<String>, lease: Duration) -> Self {
        RunOptions {
            owner: owner.into(),
            lease,
            renew_divisor: 3,
            fingerprint: None,
            max_attempts: 0,
            retention: None,
            wait_for_duplicate: None,
        }
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

/// What the work gets: its fencing token, the previous holder's checkpoint,
/// a way to save its own, and a signal for a lost lease.
pub struct Claimed {
    pub token: u64,
    pub attempt: u32,
    pub previous_owner: Option<String>,
    /// The last checkpoint saved by whoever held the claim before.
    pub checkpoint: Option<Vec<u8>>,
    checkpoint_tx: watch::Sender<Option<Vec<u8>>>,
    lost_rx: watch::Receiver<bool>,
}

impl Claimed {
    /// Store a progress marker; it rides on the next lease renewal and is
    /// handed to whoever takes over if this worker dies.
    pub fn save_checkpoint(&self, checkpoint: impl Into<Vec<u8>>) {
        self.checkpoint_tx.send_replace(Some(checkpoint.into()));
    }

    /// Resolves when the lease is lost: stop, the result would be refused.
    pub async fn lost(&self) {
        let mut rx = self.lost_rx.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    pub fn is_lost(&self) -> bool {
        *self.lost_rx.borrow()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// This call ran the work and saved its result.
    Ran { completion: Completion, token: u64 },
    /// An earlier run's saved result.
    Replayed { completion: Completion, token: u64 },
    /// Attempts are exhausted for this key.
    Failed { attempts: u32, last_error: String },
    /// Another worker holds a live claim (and we did not wait, or it did not
    /// finish in time).
    Busy { owner: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The work failed; the claim was released so another attempt can run.
    #[error("the work failed: {0}")]
    Work(E),
    /// The lease was lost while the work ran; its result was not saved.
    #[error("lease lost while running (token {token}); the result was not saved")]
    LeaseLost { token: u64 },
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl Client {
    /// Run `work` at most once per `(namespace, key)` with exactly-once
    /// effect: claim, renew while it runs, complete with its result; replay
    /// the saved result to every later call.
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
        let claim = api::ClaimRequest {
            namespace: namespace.into(),
            key: key.to_vec(),
            owner: opts.owner.clone(),
            lease_ms: opts.lease.as_millis() as u64,
            fingerprint: opts.fingerprint.clone(),
            max_attempts: opts.max_attempts,
            retention_ms: opts.retention.map_or(0, |d| d.as_millis() as u64),
            ..Default::default()
        };
        let acquired = match self.claim(claim.clone()).await? {
            Outcome::Acquired(a) => a,
            Outcome::Completed(c) => return Ok(replayed(c)),
            Outcome::Failed(f) => {
                return Ok(RunOutcome::Failed {
                    attempts: f.attempts,
                    last_error: f.last_error,
                })
            }
            Outcome::InProgress(p) => {
                return self.wait_duplicate(namespace, key, opts, p.owner).await
            }
        };
        let token = acquired.token;
        let (checkpoint_tx, checkpoint_rx) = watch::channel(None);
        let (lost_tx, lost_rx) = watch::channel(false);
        let claimed = Claimed {
            token,
            attempt: acquired.attempt,
            previous_owner: acquired.previous_owner,
            checkpoint: acquired.checkpoint,
            checkpoint_tx,
            lost_rx,
        };
        let mut renewer = AbortOnDrop(tokio::spawn(renew_loop(
            self.clone(),
            namespace.to_string(),
            key.to_vec(),
            token,
            opts.clone(),
            checkpoint_rx,
            lost_tx,
        )));
        let res = work(claimed).await;
        renewer.0.abort();
        let lost = matches!((&mut renewer.0).await, Ok(true));
        if lost {
            return Err(RunError::LeaseLost { token });
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
                    retention_ms: claim.retention_ms,
                };
                match self.complete(req).await {
                    Ok(_) => Ok(RunOutcome::Ran { completion, token }),
                    Err(e) if e.reason() == Some("LEASE_LOST") => {
                        Err(RunError::LeaseLost { token })
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => {
                let release = api::ReleaseRequest {
                    namespace: namespace.into(),
                    key: key.to_vec(),
                    token,
                    error: e.to_string(),
                };
                // A release that fails leaves the lease to expire: same end.
                if let Err(re) = self.release(release).await {
                    tracing::warn!(error = %re, "release after a failed run");
                }
                Err(RunError::Work(e))
            }
        }
    }

    async fn wait_duplicate<E>(
        &self,
        namespace: &str,
        key: &[u8],
        opts: &RunOptions,
        owner: String,
    ) -> Result<RunOutcome, RunError<E>> {
        let Some(wait) = opts.wait_for_duplicate else {
            return Ok(RunOutcome::Busy { owner });
        };
        let r = self
            .r#await(api::AwaitRequest {
                namespace: namespace.into(),
                key: key.to_vec(),
                timeout_ms: wait.as_millis().max(1) as u64,
            })
            .await?;
        let rec = r.record.unwrap_or_default();
        Ok(match api::RecordState::try_from(rec.state) {
            Ok(api::RecordState::Completed) => RunOutcome::Replayed {
                completion: Completion {
                    result: rec.result,
                    code: rec.code,
                },
                token: rec.token,
            },
            Ok(api::RecordState::Failed) => RunOutcome::Failed {
                attempts: rec.attempts,
                last_error: rec.last_error,
            },
            _ => RunOutcome::Busy { owner: rec.owner },
        })
    }
}

/// Stops the renewals if the caller drops the run (cancellation).
struct AbortOnDrop(tokio::task::JoinHandle<bool>);

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

/// Renew until aborted; returns `true` (and signals) if the lease was lost.
async fn renew_loop(
    client: Client,
    namespace: String,
    key: Vec<u8>,
    token: u64,
    opts: RunOptions,
    checkpoint: watch::Receiver<Option<Vec<u8>>>,
    lost: watch::Sender<bool>,
) -> bool {
    let every = opts.lease / opts.renew_divisor.max(2);
    loop {
        tokio::time::sleep(every).await;
        let req = api::RenewRequest {
            namespace: namespace.clone(),
            key: key.clone(),
            token,
            lease_ms: opts.lease.as_millis() as u64,
            checkpoint: checkpoint.borrow().clone(),
        };
        match client.renew(req).await {
            Ok(_) => {}
            Err(e) if e.reason() == Some("LEASE_LOST") => {
                lost.send_replace(true);
                return true;
            }
            // Unavailable for longer than the client's retries: keep trying;
            // the token stays valid until someone else takes over.
            Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
        }
    }
}
