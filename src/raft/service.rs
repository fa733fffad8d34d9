//! The peer gRPC service (`idemkv.raft.v1.RaftPeer`): receives Raft messages
//! from other nodes and requests forwarded by followers. Served on the peer
//! port only.
//!
//! An incoming snapshot is spooled to an unnamed temp file in the snapshot
//! directory (gone when dropped, so an error or a crash leaves nothing
//! behind), at most `peer_max_snapshot_bytes` of it and one at a time per
//! node; the state machine checks it whole before installing anything.

use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::consensus::{Consensus, Forwarded};
use super::{AppendEntriesRequest, Snapshot, SnapshotMeta, Vote};
use crate::codec::{decode, encode};
use crate::error::to_status;
use crate::error::Error;
use crate::pb::peer::raft_peer_server::RaftPeer;
use crate::pb::peer::{Payload, SnapshotChunk};

pub struct PeerService {
    consensus: Arc<Consensus>,
    admission: Admission,
    /// Becomes true when the node shuts down: open append streams end then
    /// (the server's graceful shutdown waits for every open call).
    stop: tokio::sync::watch::Receiver<bool>,
    /// Where incoming snapshots are spooled before install.
    spool_dir: std::path::PathBuf,
    /// Largest snapshot stream accepted (`peer_max_snapshot_bytes`).
    spool_max: u64,
}

impl PeerService {
    /// A node that cut a damaged log record it may have acknowledged gives
    /// no vote until it holds that entry again (store/rejoin.rs): to the
    /// candidate it is as if this node were down.
    fn refuse_vote_while_rejoining(&self) -> Result<(), Status> {
        match self.consensus.rejoin_until() {
            Some(until) => Err(to_status(Error::Unavailable(format!(
                "node {} gives no vote until it holds log entry {until} again \
                 (it cut a damaged record it may have acknowledged)",
                self.consensus.id
            )))),
            None => Ok(()),
        }
    }

    pub fn new(
        consensus: Arc<Consensus>,
        spool_dir: std::path::PathBuf,
        spool_max: u64,
        stop: tokio::sync::watch::Receiver<bool>,
        members_only: bool,
    ) -> Self {
        PeerService {
            admission: Admission {
                consensus: consensus.clone(),
                members_only,
                cache: Default::default(),
                certs: Default::default(),
            },
            consensus,
            stop,
            spool_dir,
            spool_max,
        }
    }
}

/// Peer calls are accepted only from the addresses of the cluster's members
/// (voters and learners): a process elsewhere cannot vote, append or forward
/// writes past the client port's checks. A node that belongs to no cluster
/// yet (fresh, waiting to be added) accepts any peer, as it has nothing to
/// protect and does not know its leader. Member host names are resolved and
/// cached; an unknown address triggers at most one re-resolution a second.
/// Over TLS the caller's certificate must also be a node's
/// ([`Admission::node_certificate`]), whatever the address.
struct Admission {
    consensus: Arc<Consensus>,
    /// Off: every caller is served (`peer_members_only = false`).
    members_only: bool,
    cache: RwLock<AdmissionCache>,
    /// Certificates already found to be nodes' (their DER bytes).
    certs: RwLock<HashSet<Vec<u8>>>,
}

/// The member addresses as resolved for one membership (its log index).
#[derive(Default)]
struct AdmissionCache {
    membership: Option<u64>,
    /// No members yet: a fresh node serves anyone.
    open: bool,
    ips: HashSet<IpAddr>,
    resolved: Option<Instant>,
}

impl AdmissionCache {
    /// Some(verdict) when this cache can decide for `membership`.
    fn decide(&self, membership: Option<u64>, ip: Option<IpAddr>) -> Option<bool> {
        if self.membership != membership || self.resolved.is_none() {
            return None;
        }
        if self.open || ip.is_some_and(|ip| self.ips.contains(&ip)) {
            return Some(true);
        }
        // An unknown address may be a member whose name now resolves
        // elsewhere: look again, at most once a second.
        let fresh = self
            .resolved
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        fresh.then_some(false)
    }
}

impl Admission {
    async fn resolve(addrs: &[String]) -> HashSet<IpAddr> {
        let mut ips = HashSet::new();
        for a in addrs {
            if let Ok(sa) = a.parse::<SocketAddr>() {
                ips.insert(sa.ip());
            } else if let Ok(found) = tokio::net::lookup_host(a.as_str()).await {
                ips.extend(found.map(|sa| sa.ip()));
            }
        }
        ips
    }

    async fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if let Some(chain) = req.peer_certs() {
            if let Err(why) = self.node_certificate(&chain) {
                crate::metrics::peer_refused();
                tracing::warn!(%why, "refused a peer call made with a certificate that is not a node's");
                return Err(to_status(Error::PermissionDenied(format!(
                    "peer: {why}; peer calls are accepted only with a node certificate \
                     (one that may serve TLS: extended key usage serverAuth)"
                ))));
            }
        }
        let theirs = req
            .metadata()
            .get(crate::wire::CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok());
        if let Err(e) = self.consensus.admit_cluster(theirs) {
            crate::metrics::peer_refused();
            tracing::warn!(error = %e, "refused a peer call from another cluster");
            return Err(to_status(e));
        }
        if !self.members_only {
            return Ok(());
        }
        let ip = req.remote_addr().map(|a| match a.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        });
        let membership = self.consensus.membership_index();
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .decide(membership, ip);
        let admitted = match cached {
            Some(verdict) => verdict,
            None => {
                let addrs = self.consensus.member_raft_addrs();
                let fresh = AdmissionCache {
                    membership,
                    open: addrs.is_empty(),
                    ips: Self::resolve(&addrs).await,
                    resolved: Some(Instant::now()),
                };
                let verdict = fresh.decide(membership, ip) == Some(true);
                *self.cache.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                verdict
            }
        };
        if admitted {
            return Ok(());
        }
        crate::metrics::peer_refused();
        let who = ip.map_or("an unknown address".to_string(), |ip| ip.to_string());
        tracing::warn!(caller = %who, "refused a peer call from a non-member address");
        Err(to_status(Error::PermissionDenied(format!(
            "peer: {who} is not the address of a cluster member; peer calls are accepted only from members"
        ))))
    }
}

impl Admission {
    /// The caller's certificate (already verified against the CA by TLS)
    /// must be one a node could serve with: its extended key usage names
    /// serverAuth (or any use, or is absent). A client certificate from the
    /// same CA (`idemkv certs`' client.pem: clientAuth only) is refused, so
    /// a client cannot write past the bearer tokens or take part in Raft.
    /// Certificates seen before are remembered.
    fn node_certificate(
        &self,
        chain: &[tonic::transport::CertificateDer<'static>],
    ) -> Result<(), String> {
        let Some(leaf) = chain.first() else {
            return Err("no certificate was presented".into());
        };
        let leaf: &[u8] = leaf.as_ref();
        if self
            .certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(leaf)
        {
            return Ok(());
        }
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("the certificate presented cannot be read: {e}"))?;
        let serves = match cert.extended_key_usage() {
            Ok(None) => true,
            Ok(Some(eku)) => eku.value.server_auth || eku.value.any,
            Err(e) => {
                return Err(format!(
                    "the certificate's extended key usage cannot be read: {e}"
                ))
            }
        };
        if !serves {
            return Err(format!(
                "the certificate presented ({}) is a client certificate, not a node certificate",
                cert.subject()
            ));
        }
        let mut seen = self.certs.write().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= 64 {
            seen.clear();
        }
        seen.insert(leaf.to_vec());
        Ok(())
    }
}

/// The greatest leader clock an append may carry, ms (the year 37,648): a
/// clock beyond it is garbage from a faulty member, and taken it would put
/// this node's reading past any real leader's.
const MAX_LEADER_CLOCK_MS: u64 = 1 << 50;

/// An append's leader clock as a leader sends it (see
/// [`MAX_LEADER_CLOCK_MS`]).
fn clock_well_formed(clock_ms: u64) -> Result<(), String> {
    if clock_ms > MAX_LEADER_CLOCK_MS {
        return Err(format!(
            "leader clock {clock_ms} ms is beyond any real clock (at most {MAX_LEADER_CLOCK_MS})"
        ));
    }
    Ok(())
}

/// An append's entries as a leader sends them: each index one past the
/// one before, the first one past `prev_log_id` (0 without one), and no
/// entry of an earlier term than the one before it, or of a later one than
/// the sender's. openraft hands them to
/// the log as given, and the log refuses a gap with an error that stops the
/// node, so a malformed append from a faulty member is refused here.
fn well_formed(rpc: &AppendEntriesRequest) -> Result<(), String> {
    use openraft::vote::RaftLeaderId;
    let sender = rpc.vote.leader_id().term();
    let mut prev = rpc.prev_log_id;
    for e in &rpc.entries {
        let id = e.log_id;
        let want = match prev {
            None => 0,
            Some(p) => p
                .index()
                .checked_add(1)
                .ok_or("an entry follows the last index there can be")?,
        };
        let term = id.committed_leader_id().term();
        if term > sender {
            return Err(format!(
                "entry {} is of term {term}, after the sender's term {sender}",
                id.index()
            ));
        }
        if id.index() != want {
            return Err(format!(
                "entry {} comes where entry {want} belongs: an append's entries must be consecutive",
                id.index()
            ));
        }
        if let Some(p) = prev {
            let (was, is) = (
                p.committed_leader_id().term(),
                id.committed_leader_id().term(),
            );
            if is < was {
                return Err(format!(
                    "entry {} is of term {is}, after an entry of term {was}",
                    id.index()
                ));
            }
        }
        prev = Some(id);
    }
    Ok(())
}

/// The append a member sent, decoded and checked (its entries, its leader
/// clock), its leader clock noted; refused as bad input otherwise, and
/// counted. The one check of the unary call and the append stream.
fn checked_append(consensus: &Consensus, m: &Payload) -> Result<AppendEntriesRequest, Status> {
    let refused = |status: Status| {
        crate::metrics::peer_refused();
        status
    };
    let rpc: AppendEntriesRequest = decode(&m.data).map_err(|e| refused(bad(e)))?;
    well_formed(&rpc)
        .map_err(|why| Error::invalid("entries", why))
        .and(
            clock_well_formed(m.leader_clock_ms)
                .map_err(|why| Error::invalid("leader_clock_ms", why)),
        )
        .map_err(|e| refused(to_status(e)))?;
    consensus.note_leader_clock(&rpc, m.leader_clock_ms);
    Ok(rpc)
}

fn bad(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<Payload>, Status> {
    let data = encode(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(Payload {
        data,
        ..Default::default()
    }))
}

fn raft_err(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

/// The answers of a pipelined append stream, in request order.
type AppendAnswers = std::pin::Pin<Box<dyn Stream<Item = Result<Payload, Status>> + Send>>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    type AppendStreamStream = AppendAnswers;

    async fn append_stream(
        &self,
        req: Request<Streaming<Payload>>,
    ) -> Result<Response<AppendAnswers>, Status> {
        self.admission.check(&req).await?;
        crate::metrics::peer_append_stream();
        // Both directions end when the node stops: openraft reads the input
        // in a task of its own, which would otherwise keep the call (and so
        // the server's graceful shutdown) open until the leader sends again.
        let mut stop = self.stop.clone();
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let stopping = futures::FutureExt::shared(Box::pin(stopping));
        // A message that does not decode or is malformed ends the input,
        // and the answers, once every earlier append is answered, end with
        // an error saying why (INVALID_ARGUMENT); the leader starts a new
        // stream. A broken input (the caller went away) just ends it.
        let input = futures::StreamExt::take_until(req.into_inner(), stopping.clone());
        let consensus = self.consensus.clone();
        let refusal: Arc<Mutex<Option<Status>>> = Arc::default();
        let refused = refusal.clone();
        let requests = input.map_while(move |m| match checked_append(&consensus, &m.ok()?) {
            Ok(rpc) => Some(rpc),
            Err(why) => {
                tracing::warn!(why = %why.message(), "ended an append stream on a malformed append");
                *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                None
            }
        });
        let answers = self
            .consensus
            .raft
            .stream_append(requests)
            .map(|r| match r {
                Ok(result) => encode(&result)
                    .map(|data| Payload {
                        data,
                        ..Default::default()
                    })
                    .map_err(|e| Status::internal(e.to_string())),
                Err(fatal) => Err(raft_err(fatal)),
            })
            .chain(
                futures::stream::once(async move {
                    refusal.lock().unwrap_or_else(|p| p.into_inner()).take()
                })
                .filter_map(|why| why.map(Err)),
            );
        let answers = futures::StreamExt::take_until(answers, stopping);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admission.check(&req).await?;
        let rpc = checked_append(&self.consensus, req.get_ref())?;
        let resp = self
            .consensus
            .raft
            .append_entries(rpc)
            .await
            .map_err(raft_err)?;
        reply(&resp)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admission.check(&req).await?;
        self.refuse_vote_while_rejoining()?;
        let rpc = decode(&req.into_inner().data).map_err(bad)?;
        let resp = self.consensus.raft.vote(rpc).await.map_err(raft_err)?;
        reply(&resp)
    }

    async fn pre_vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admission.check(&req).await?;
        self.refuse_vote_while_rejoining()?;
        let rpc = decode(&req.into_inner().data).map_err(bad)?;
        let resp = self.consensus.raft.pre_vote(rpc).await.map_err(raft_err)?;
        reply(&resp)
    }

    async fn transfer_leader(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admission.check(&req).await?;
        // Leadership handed over means campaigning: not while rejoining.
        self.refuse_vote_while_rejoining()?;
        let rpc = decode(&req.into_inner().data).map_err(bad)?;
        let resp = self
            .consensus
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(raft_err)?;
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Payload>, Status> {
        self.admission.check(&req).await?;
        let _one = self.consensus.receive_snapshot().ok_or_else(|| {
            crate::metrics::overloaded();
            to_status(Error::Overloaded(
                "peer: this node is already receiving a snapshot; one at a time (retry later)"
                    .into(),
            ))
        })?;
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.meta).map_err(bad)?;
        let spool_err = |e: std::io::Error| {
            to_status(Error::Internal(format!(
                "peer: spooling the snapshot in {}: {e}",
                self.spool_dir.display()
            )))
        };
        std::fs::create_dir_all(&self.spool_dir).map_err(spool_err)?;
        // Unnamed: every early return below drops (and so removes) it.
        let mut file = tempfile::tempfile_in(&self.spool_dir).map_err(spool_err)?;
        let mut spooled: u64 = 0;
        let mut chunk = Some(first.data);
        while let Some(data) = chunk {
            spooled += data.len() as u64;
            if spooled > self.spool_max {
                tracing::warn!(
                    spooled,
                    cap = self.spool_max,
                    "refused a snapshot over peer_max_snapshot_bytes"
                );
                return Err(to_status(Error::too_large(
                    "peer_max_snapshot_bytes",
                    format!(
                        "peer: the snapshot stream passed the cap of {} bytes; refused",
                        self.spool_max
                    ),
                )));
            }
            file.write_all(&data).map_err(spool_err)?;
            chunk = match stream.next().await {
                Some(c) => Some(c?.data),
                None => None,
            };
        }
        // A damaged file is refused here, so openraft never sees it (an
        // install error would stop this node's Raft); the leader retries.
        let checked = tokio::task::spawn_blocking(move || {
            let res = crate::store::check_received_snapshot(&mut file, "received from the leader");
            (file, res)
        })
        .await
        .map_err(|e| to_status(Error::Internal(e.to_string())))?;
        let (file, sent_meta) = checked;
        match sent_meta {
            Ok(m) if m.last_log_id == meta.last_log_id => {}
            Ok(m) => {
                return Err(to_status(Error::invalid(
                    "snapshot",
                    format!(
                        "peer: the snapshot received is of log id {:?}, sent as {:?}; refused",
                        m.last_log_id, meta.last_log_id
                    ),
                )))
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a damaged snapshot from the leader");
                return Err(to_status(Error::invalid(
                    "snapshot",
                    format!("peer: the snapshot received is damaged, refused: {e}"),
                )));
            }
        }
        let snapshot = Snapshot {
            meta,
            snapshot: file,
        };
        let resp = self
            .consensus
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(raft_err)?;
        reply(&resp)
    }

    async fn forward(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.admission.check(&req).await?;
        let fwd: Forwarded = decode(&req.into_inner().data).map_err(bad)?;
        reply(&self.consensus.serve_forwarded(fwd).await)
    }
}
