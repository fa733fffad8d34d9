//! `idemkv bench --target floor`: what gRPC alone reaches on this machine.
//!
//! A server of idemkv's public API (the same generated service, the same
//! client, the same HTTP/2 stack) that answers every call at once from one
//! in-memory map: no Raft, no disk, no replication, no rules beyond what
//! the workloads check (a held key answers IN_PROGRESS, a completed one
//! its result). It runs in this process on a runtime of its own, so the
//! table carries the ceiling any gRPC service could reach here; idemkv's
//! share of it is what the replicated, durable path costs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use tonic::{Request, Response, Status};

use crate::pb::api::{
    self, claim_response::Outcome, cluster_server::Cluster, cluster_server::ClusterServer,
    idempotency_server::Idempotency, idempotency_server::IdempotencyServer,
};
use crate::wire::{Reason, REASON_HEADER};

/// Worker threads of the floor server's runtime: as many as one idemkv
/// node's would have on a two-core machine.
const WORKERS: usize = 2;

#[derive(Clone)]
enum Entry {
    Held { owner: String, token: u64 },
    Done { result: Vec<u8>, token: u64 },
}

#[derive(Default)]
struct Floor {
    records: Mutex<HashMap<(String, Vec<u8>), Entry>>,
    tokens: AtomicU64,
    addr: String,
}

impl Floor {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Vec<u8>), Entry>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Floor {
    /// A claim's answer, decided on the map as idemkv decides it for a
    /// live lease (no expiry: the bench's leases outlast its runs).
    fn decide(
        &self,
        records: &mut HashMap<(String, Vec<u8>), Entry>,
        r: api::ClaimRequest,
    ) -> Outcome {
        match records.get(&(r.namespace.clone(), r.key.clone())) {
            Some(Entry::Held { owner, .. }) => Outcome::InProgress(api::InProgress {
                owner: owner.clone(),
                lease_remaining_ms: r.lease_ms,
                attempt: 1,
            }),
            Some(Entry::Done { result, token }) => Outcome::Completed(api::Completed {
                result: result.clone(),
                token: *token,
                ..Default::default()
            }),
            None => {
                let token = self.tokens.fetch_add(1, Ordering::Relaxed) + 1;
                records.insert(
                    (r.namespace, r.key),
                    Entry::Held {
                        owner: r.owner,
                        token,
                    },
                );
                Outcome::Acquired(api::Acquired {
                    token,
                    lease_deadline_ms: r.lease_ms,
                    attempt: 1,
                    ..Default::default()
                })
            }
        }
    }
}

/// The answer to a Cluster call about what the floor does not have.
fn no_cluster<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "the floor target has no {what}"
    )))
}

/// The answer to every call the floor does not serve.
fn unsupported<T>() -> Result<T, Status> {
    Err(Status::unimplemented(
        "the floor target answers Claim, ClaimBatch, Complete and Get",
    ))
}

#[tonic::async_trait]
impl Idempotency for std::sync::Arc<Floor> {
    async fn claim(
        &self,
        req: Request<api::ClaimRequest>,
    ) -> Result<Response<api::ClaimResponse>, Status> {
        let outcome = self.decide(&mut self.records(), req.into_inner());
        Ok(Response::new(api::ClaimResponse {
            outcome: Some(outcome),
        }))
    }

    async fn claim_batch(
        &self,
        req: Request<api::ClaimBatchRequest>,
    ) -> Result<Response<api::ClaimBatchResponse>, Status> {
        use api::claim_batch_item::Outcome as Item;
        let mut records = self.records();
        let items = req
            .into_inner()
            .items
            .into_iter()
            .map(|r| api::ClaimBatchItem {
                outcome: Some(match self.decide(&mut records, r) {
                    Outcome::Acquired(a) => Item::Acquired(a),
                    Outcome::InProgress(p) => Item::InProgress(p),
                    Outcome::Completed(c) => Item::Completed(c),
                    Outcome::Failed(f) => Item::Failed(f),
                }),
            })
            .collect();
        Ok(Response::new(api::ClaimBatchResponse {
            items,
            applied: true,
        }))
    }

    async fn complete(
        &self,
        req: Request<api::CompleteRequest>,
    ) -> Result<Response<api::CompleteResponse>, Status> {
        let r = req.into_inner();
        let mut records = self.records();
        match records.get_mut(&(r.namespace, r.key)) {
            Some(e) if matches!(&*e, Entry::Held { token, .. } if *token == r.token) => {
                *e = Entry::Done {
                    result: r.result,
                    token: r.token,
                };
                Ok(Response::new(api::CompleteResponse::default()))
            }
            _ => {
                // Refused as idemkv refuses it: the reason in its header.
                let reason = Reason::LeaseLost.as_str();
                let mut status =
                    Status::failed_precondition(format!("{reason}: not held with this token"));
                status.metadata_mut().insert(
                    REASON_HEADER,
                    tonic::metadata::MetadataValue::from_static(reason),
                );
                Err(status)
            }
        }
    }

    async fn renew(
        &self,
        _: Request<api::RenewRequest>,
    ) -> Result<Response<api::RenewResponse>, Status> {
        unsupported()
    }

    async fn release(
        &self,
        _: Request<api::ReleaseRequest>,
    ) -> Result<Response<api::ReleaseResponse>, Status> {
        unsupported()
    }

    async fn get(
        &self,
        req: Request<api::GetRequest>,
    ) -> Result<Response<api::GetResponse>, Status> {
        let r = req.into_inner();
        let entry = self
            .records()
            .get(&(r.namespace.clone(), r.key.clone()))
            .cloned();
        let record = entry.map(|e| {
            let base = api::Record {
                namespace: r.namespace,
                key: r.key,
                attempts: 1,
                ..Default::default()
            };
            match e {
                Entry::Held { owner, token } => api::Record {
                    state: api::RecordState::InProgress as i32,
                    owner,
                    token,
                    ..base
                },
                Entry::Done { result, token } => api::Record {
                    state: api::RecordState::Completed as i32,
                    result,
                    token,
                    ..base
                },
            }
        });
        Ok(Response::new(api::GetResponse { record }))
    }

    async fn r#await(
        &self,
        _: Request<api::AwaitRequest>,
    ) -> Result<Response<api::AwaitResponse>, Status> {
        unsupported()
    }

    async fn delete(
        &self,
        _: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        unsupported()
    }
}

#[tonic::async_trait]
impl Cluster for std::sync::Arc<Floor> {
    type SaveSnapshotStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::SnapshotData, Status>> + Send>>;

    async fn save_snapshot(
        &self,
        _: Request<api::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        no_cluster("snapshots")
    }

    async fn status(
        &self,
        _: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        // One node that leads itself, so the client's leader discovery
        // settles on it.
        Ok(Response::new(api::StatusResponse {
            id: 1,
            role: "leader".into(),
            leader_id: Some(1),
            leader_api_addr: self.addr.clone(),
            api_addr: self.addr.clone(),
            ..Default::default()
        }))
    }

    async fn add_learner(
        &self,
        _: Request<api::AddLearnerRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        no_cluster("membership")
    }

    async fn change_membership(
        &self,
        _: Request<api::ChangeMembershipRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        no_cluster("membership")
    }

    async fn trigger_snapshot(
        &self,
        _: Request<api::TriggerSnapshotRequest>,
    ) -> Result<Response<api::TriggerSnapshotResponse>, Status> {
        no_cluster("snapshots")
    }

    async fn hash_state(
        &self,
        _: Request<api::HashStateRequest>,
    ) -> Result<Response<api::HashStateResponse>, Status> {
        no_cluster("state to hash")
    }

    async fn transfer_leader(
        &self,
        _: Request<api::TransferLeaderRequest>,
    ) -> Result<Response<api::MembershipResponse>, Status> {
        no_cluster("membership")
    }
}

/// Start the floor server on a free loopback port, on a runtime (and
/// threads) of its own that lives as long as the process; returns its
/// address.
pub fn start() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("floor: bind")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    let floor = std::sync::Arc::new(Floor {
        addr: addr.clone(),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("idemkv-floor")
        .enable_all()
        .build()
        .context("floor: runtime")?;
    std::thread::Builder::new()
        .name("idemkv-floor".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("floor: {e}"),
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let served = tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(IdempotencyServer::new(floor.clone()))
                    .add_service(ClusterServer::new(floor))
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(e) = served {
                    eprintln!("floor: {e}");
                }
            })
        })?;
    Ok(addr)
}
