//! The `idemkv.v1.Idempotency` service: validate, carry the command to the
//! Raft group, turn the outcome into a reply. No rule of the record model
//! lives here.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{convert, validate};
use crate::auth::{authenticate, Auth};
use crate::caps::AwaitCaps;
use crate::config::Limits;
use crate::error::to_status;
use crate::error::Error;
use crate::metrics::{self, ClaimAnswer};
use crate::pb::api::{self, idempotency_server::Idempotency};
use crate::raft::consensus::Consensus;
use crate::record::{self, ClaimOutcome, Command, Op, Outcome, RecordKey};

pub struct IdempotencyService {
    consensus: Arc<Consensus>,
    limits: Limits,
    auth: Option<Arc<Auth>>,
    /// Slots for waiting Awaits (they hold no in-flight slot).
    awaits: Arc<AwaitCaps>,
}

impl IdempotencyService {
    pub fn new(
        consensus: Arc<Consensus>,
        limits: Limits,
        auth: Option<Arc<Auth>>,
        awaits: Arc<AwaitCaps>,
    ) -> Self {
        IdempotencyService {
            consensus,
            limits,
            auth,
            awaits,
        }
    }

    /// With auth on: the call's token must be known (`UNAUTHENTICATED`)
    /// and list every namespace the call names (`PERMISSION_DENIED`).
    /// Checked on the raw names, before validation, so a caller without a
    /// token learns nothing about its input.
    fn allow<'a>(
        &self,
        md: &tonic::metadata::MetadataMap,
        namespaces: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Status> {
        if let Some(who) = authenticate(&self.auth, md).map_err(to_status)? {
            for ns in namespaces {
                who.check_namespace(ns).map_err(to_status)?;
            }
        }
        Ok(())
    }

    async fn op(&self, key: RecordKey, op: Op) -> Result<Outcome, Status> {
        self.consensus
            .write(Command::Op { key, op })
            .await
            .map_err(refused)
    }
}

/// The status of a refused operation, counting the refusals the metrics
/// name (`idemkv_fenced_rejections_total`,
/// `idemkv_fingerprint_mismatches_total`).
fn refused(e: Error) -> Status {
    match &e {
        Error::Rule(record::RuleError::LeaseLost { .. }) => metrics::fenced_rejection(),
        Error::Rule(record::RuleError::FingerprintMismatch) => metrics::fingerprint_mismatch(),
        _ => {}
    }
    to_status(e)
}

/// Count a claim's answer (`idemkv_claims_total`, `idemkv_takeovers_total`).
fn count_claim(o: &ClaimOutcome) {
    metrics::claim(match o {
        ClaimOutcome::Acquired { takeover, .. } => ClaimAnswer::Acquired {
            takeover: *takeover,
        },
        ClaimOutcome::InProgress { .. } => ClaimAnswer::InProgress,
        ClaimOutcome::Completed { .. } => ClaimAnswer::Completed,
        ClaimOutcome::Failed { .. } => ClaimAnswer::Failed,
    });
}

fn unexpected(o: Outcome) -> Status {
    to_status(Error::Internal(format!("unexpected outcome {o:?}")))
}

fn not_found(k: &RecordKey) -> Status {
    to_status(Error::NotFound(format!(
        "no record for namespace {:?} key {:?}",
        k.namespace,
        String::from_utf8_lossy(&k.key)
    )))
}

#[tonic::async_trait]
impl Idempotency for IdempotencyService {
    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace))]
    async fn claim(
        &self,
        req: Request<api::ClaimRequest>,
    ) -> Result<Response<api::ClaimResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let (key, claim) = validate::claim(&self.limits, req.get_ref()).map_err(to_status)?;
        let op = Op::Claim(claim);
        let outcome = match self.consensus.claim_without_write(&key, &op).await {
            Ok(Some(decided)) => decided.map_err(|e| refused(Error::Rule(e)))?,
            Ok(None) | Err(_) => self.op(key, op).await?,
        };
        match outcome {
            Outcome::Claim(o) => {
                count_claim(&o);
                Ok(Response::new(api::ClaimResponse {
                    outcome: Some(convert::claim_outcome(o)),
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(items = req.get_ref().items.len()))]
    async fn claim_batch(
        &self,
        req: Request<api::ClaimBatchRequest>,
    ) -> Result<Response<api::ClaimBatchResponse>, Status> {
        self.allow(
            req.metadata(),
            req.get_ref().items.iter().map(|i| i.namespace.as_str()),
        )?;
        let items = validate::claim_batch(&self.limits, req.get_ref()).map_err(to_status)?;
        let command = Command::ClaimBatch {
            items,
            all_or_nothing: req.get_ref().all_or_nothing,
        };
        match self.consensus.write(command).await.map_err(to_status)? {
            Outcome::Batch { items, applied } => Ok(Response::new(api::ClaimBatchResponse {
                items: items
                    .into_iter()
                    .inspect(|i| {
                        if let Ok(o) = i {
                            count_claim(o);
                        }
                    })
                    .map(convert::batch_item)
                    .collect(),
                applied,
            })),
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace, token = req.get_ref().token))]
    async fn complete(
        &self,
        req: Request<api::CompleteRequest>,
    ) -> Result<Response<api::CompleteResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let (key, op) = validate::complete(&self.limits, req.get_ref()).map_err(to_status)?;
        match self.op(key, op).await? {
            Outcome::Completed {
                completed_at_ms,
                expires_at_ms,
            } => Ok(Response::new(api::CompleteResponse {
                completed_at_ms,
                expires_at_ms,
            })),
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace, token = req.get_ref().token))]
    async fn renew(
        &self,
        req: Request<api::RenewRequest>,
    ) -> Result<Response<api::RenewResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let (key, op) = validate::renew(&self.limits, req.get_ref()).map_err(to_status)?;
        match self.op(key, op).await? {
            Outcome::Renewed { lease_deadline_ms } => {
                Ok(Response::new(api::RenewResponse { lease_deadline_ms }))
            }
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace, token = req.get_ref().token))]
    async fn release(
        &self,
        req: Request<api::ReleaseRequest>,
    ) -> Result<Response<api::ReleaseResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let (key, op) = validate::release(&self.limits, req.get_ref()).map_err(to_status)?;
        match self.op(key, op).await? {
            Outcome::Released { state, attempts } => Ok(Response::new(api::ReleaseResponse {
                state: match state {
                    record::Released::Available => api::RecordState::Available as i32,
                    record::Released::Failed => api::RecordState::Failed as i32,
                },
                attempts,
            })),
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace))]
    async fn get(
        &self,
        req: Request<api::GetRequest>,
    ) -> Result<Response<api::GetResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let r = req.get_ref();
        let key = validate::key(&self.limits, &r.namespace, &r.key).map_err(to_status)?;
        let linearizable = r.consistency != api::Consistency::Serializable as i32;
        match self
            .consensus
            .get(&key, linearizable)
            .await
            .map_err(to_status)?
        {
            Some(rec) => Ok(Response::new(api::GetResponse {
                record: Some(convert::record(&key, &rec)),
            })),
            None => Err(not_found(&key)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace))]
    async fn r#await(
        &self,
        req: Request<api::AwaitRequest>,
    ) -> Result<Response<api::AwaitResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let r = req.get_ref();
        let key = validate::key(&self.limits, &r.namespace, &r.key).map_err(to_status)?;
        let timeout = validate::await_timeout(&self.limits, r.timeout_ms).map_err(to_status)?;
        let _slot = self.awaits.try_acquire(&key.namespace).map_err(to_status)?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
        // Start from a linearizable view, then follow the local replica.
        self.consensus.read_index().await.map_err(to_status)?;
        // Registered before the record is read, so a change committed in
        // between still wakes this call.
        let mut changes = self.consensus.watch_key(&key);
        loop {
            let Some(rec) = self.consensus.get(&key, false).await.map_err(to_status)? else {
                return Err(not_found(&key));
            };
            let lease_left = record::live_lease_left(&rec, self.consensus.now_ms());
            let timed_out = tokio::time::Instant::now() >= deadline;
            let Some(lease_left) = lease_left.filter(|_| !timed_out) else {
                return Ok(Response::new(api::AwaitResponse {
                    record: Some(convert::record(&key, &rec)),
                    timed_out: lease_left.is_some(),
                }));
            };
            // Wake when this key changes, at lease expiry, or at the deadline.
            let wake =
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(lease_left));
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    #[instrument(level = "debug", skip_all, fields(ns = %req.get_ref().namespace))]
    async fn delete(
        &self,
        req: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        self.allow(req.metadata(), [req.get_ref().namespace.as_str()])?;
        let (key, op) = validate::delete(&self.limits, req.get_ref()).map_err(to_status)?;
        match self.op(key, op).await? {
            Outcome::Deleted { existed } => Ok(Response::new(api::DeleteResponse { existed })),
            other => Err(unexpected(other)),
        }
    }
}
