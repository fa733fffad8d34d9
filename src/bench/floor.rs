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
use std::sync::{Arc, Mutex};

use anyhow::Context;
use futures::StreamExt;
use prost::Message;
use tonic::{Request, Response, Status};

use super::replicate::{self, Counters, Leader, Wait};

use crate::pb::api::{
    self, claim_response::Outcome, cluster_server::Cluster, cluster_server::ClusterServer,
    idempotency_server::Idempotency, idempotency_server::IdempotencyServer,
};
use crate::wire::{Reason, REASON_HEADER};

/// Worker threads of the floor server's runtime: as many as one idemkv
/// node's would have on a two-core machine.
const WORKERS: usize = 2;

/// A record of the map; `write` numbers the replicated floor's write that
/// made it (0 on the plain floor).
#[derive(Clone)]
enum Entry {
    Held {
        owner: String,
        token: u64,
        write: u64,
    },
    Done {
        result: Vec<u8>,
        token: u64,
        write: u64,
    },
}

impl Entry {
    fn write(&self) -> u64 {
        match self {
            Entry::Held { write, .. } | Entry::Done { write, .. } => *write,
        }
    }
}

#[derive(Default)]
struct Floor {
    records: Mutex<HashMap<(String, Vec<u8>), Entry>>,
    tokens: AtomicU64,
    addr: String,
    /// The replicated floor's leader side: writes that change the map are
    /// answered once a majority of copies has synced them.
    replicas: Option<Leader>,
}

impl Floor {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Vec<u8>), Entry>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Floor {
    /// Queue this answer's write (the replicated floor; `bytes` or, when
    /// none were given, `request` encoded) and return its number; 0 on the
    /// plain floor. Only with the map locked.
    fn write(&self, wait: &mut Wait, bytes: &mut Option<Vec<u8>>, request: &impl Message) -> u64 {
        match &self.replicas {
            Some(leader) => {
                if bytes.is_none() {
                    *bytes = Some(request.encode_to_vec());
                }
                leader.write(wait, bytes)
            }
            None => 0,
        }
    }

    /// Wait until what the answer wrote and read is on a majority (the
    /// replicated floor); at once on the plain floor.
    async fn settle(&self, wait: Wait) -> Result<(), Status> {
        match &self.replicas {
            Some(leader) => leader.settle(wait).await,
            None => Ok(()),
        }
    }

    /// A claim's answer, decided on the map as idemkv decides it for a
    /// live lease (no expiry: the bench's leases outlast its runs). A
    /// fresh key is this answer's write; a held or completed one is read.
    fn decide(
        &self,
        records: &mut HashMap<(String, Vec<u8>), Entry>,
        r: api::ClaimRequest,
        wait: &mut Wait,
        bytes: &mut Option<Vec<u8>>,
    ) -> Outcome {
        match records.get(&(r.namespace.clone(), r.key.clone())) {
            Some(e) => {
                wait.saw(e.write());
                match e {
                    Entry::Held { owner, .. } => Outcome::InProgress(api::InProgress {
                        owner: owner.clone(),
                        lease_remaining_ms: r.lease_ms,
                        attempt: 1,
                    }),
                    Entry::Done { result, token, .. } => Outcome::Completed(api::Completed {
                        result: result.clone(),
                        token: *token,
                        ..Default::default()
                    }),
                }
            }
            None => {
                let token = self.tokens.fetch_add(1, Ordering::Relaxed) + 1;
                let write = self.write(wait, bytes, &r);
                records.insert(
                    (r.namespace, r.key),
                    Entry::Held {
                        owner: r.owner,
                        token,
                        write,
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
impl Idempotency for Arc<Floor> {
    async fn claim(
        &self,
        req: Request<api::ClaimRequest>,
    ) -> Result<Response<api::ClaimResponse>, Status> {
        let (mut wait, mut bytes) = (Wait::default(), None);
        let outcome = self.decide(&mut self.records(), req.into_inner(), &mut wait, &mut bytes);
        self.settle(wait).await?;
        Ok(Response::new(api::ClaimResponse {
            outcome: Some(outcome),
        }))
    }

    async fn claim_batch(
        &self,
        req: Request<api::ClaimBatchRequest>,
    ) -> Result<Response<api::ClaimBatchResponse>, Status> {
        use api::claim_batch_item::Outcome as Item;
        let r = req.into_inner();
        // One write for the whole call, as idemkv makes one entry of it.
        let mut wait = Wait::default();
        let mut bytes = self.replicas.as_ref().map(|_| r.encode_to_vec());
        let items: Vec<_> = {
            let mut records = self.records();
            r.items
                .into_iter()
                .map(|r| api::ClaimBatchItem {
                    outcome: Some(match self.decide(&mut records, r, &mut wait, &mut bytes) {
                        Outcome::Acquired(a) => Item::Acquired(a),
                        Outcome::InProgress(p) => Item::InProgress(p),
                        Outcome::Completed(c) => Item::Completed(c),
                        Outcome::Failed(f) => Item::Failed(f),
                    }),
                })
                .collect()
        };
        self.settle(wait).await?;
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
        let (mut wait, mut bytes) = (Wait::default(), None);
        let held = {
            let mut records = self.records();
            let key = (r.namespace.clone(), r.key.clone());
            match records.get(&key) {
                Some(Entry::Held { token, .. }) if *token == r.token => {
                    let write = self.write(&mut wait, &mut bytes, &r);
                    let done = Entry::Done {
                        result: r.result,
                        token: r.token,
                        write,
                    };
                    records.insert(key, done);
                    true
                }
                Some(e) => {
                    wait.saw(e.write());
                    false
                }
                None => false,
            }
        };
        self.settle(wait).await?;
        if held {
            Ok(Response::new(api::CompleteResponse::default()))
        } else {
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
        let mut wait = Wait::default();
        if let Some(e) = &entry {
            wait.saw(e.write());
        }
        self.settle(wait).await?;
        let record = entry.map(|e| {
            let base = api::Record {
                namespace: r.namespace,
                key: r.key,
                attempts: 1,
                ..Default::default()
            };
            match e {
                Entry::Held { owner, token, .. } => api::Record {
                    state: api::RecordState::InProgress as i32,
                    owner,
                    token,
                    ..base
                },
                Entry::Done { result, token, .. } => api::Record {
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
impl Cluster for Arc<Floor> {
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

/// An accepted connection with Nagle's algorithm off (tonic's own setting
/// does not reach a caller's listener), as idemkv's nodes accept theirs.
pub(super) fn no_delay(
    conn: std::io::Result<tokio::net::TcpStream>,
) -> std::io::Result<tokio::net::TcpStream> {
    let conn = conn?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// A floor server that is running: where it listens and, for the
/// replicated floor, its followers and what its copies did. Dropping it
/// stops the followers, the server and its runtime.
pub struct Started {
    pub addr: String,
    pub replication: Option<Arc<Counters>>,
    followers: Option<replicate::Followers>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Started {
    /// Kill the replicated floor's follower processes; returns how many
    /// were running.
    pub fn stop_followers(&mut self) -> usize {
        self.followers.as_mut().map_or(0, |f| f.stop())
    }
}

/// Start the floor server on a free loopback port, on a runtime (and
/// threads) of its own. With `followers` (the `idemkv` program to run
/// them), it is the replicated floor: two follower processes are started
/// and every write waits for a majority of the three copies.
pub fn start(followers: Option<&std::path::Path>) -> anyhow::Result<Started> {
    let counters = followers.map(|_| Arc::new(Counters::default()));
    let (followers, leader) = match (followers, &counters) {
        (Some(program), Some(c)) => {
            let (followers, leader) = replicate::prepare(program, c.clone())?;
            (Some(followers), Some(leader))
        }
        _ => (None, None),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("floor: bind")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("idemkv-floor")
        .enable_all()
        .build()
        .context("floor: runtime")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let at = addr.clone();
    let serve = async move {
        let replicas = match leader {
            Some(start) => Some(start.await.map_err(|e| format!("{e:#}"))?),
            None => None,
        };
        let floor = Arc::new(Floor {
            addr: at,
            replicas,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(no_delay);
        tonic::transport::Server::builder()
            .add_service(IdempotencyServer::new(floor.clone()))
            .add_service(ClusterServer::new(floor))
            .serve_with_incoming(incoming)
            .await
            .map_err(|e| e.to_string())
    };
    std::thread::Builder::new()
        .name("idemkv-floor".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    served = serve => if let Err(e) = served {
                        crate::out::print_error_line(format_args!("floor: {e}"));
                    },
                    // The run is over (the sender was dropped).
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here ends its tasks and closes the
            // leader's file.
        })?;
    Ok(Started {
        addr,
        replication: counters,
        followers,
        _stop: stop,
    })
}
