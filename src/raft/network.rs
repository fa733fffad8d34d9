//! The peer network client: openraft's `RaftNetworkV2` over tonic, with one
//! cached channel per peer (tonic channels multiplex and reconnect by
//! themselves). Messages are openraft's own types, bincode-encoded in the
//! opaque `Payload` of `raft.proto`. An AppendEntries message takes each
//! entry's bytes from the log's own encoding where it still has them
//! ([`encode_append`]), so the leader encodes an entry once, not once for
//! its log and again for every follower.

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::consensus::Consensus;
use super::{NodeId, PeerNode, Snapshot, StreamAppendResult, TypeConfig, Vote};
use crate::codec::{decode, encode, encode_into};
use crate::pb::peer::raft_peer_client::RaftPeerClient;
use crate::pb::peer::{Payload, SnapshotChunk};
use crate::store::{ClusterId, Encodings};
use crate::wire::{CLUSTER_HEADER, MAX_PEER_MESSAGE};

// Every peer message that fits the transport must decode: the decoder's
// limit (`codec.rs`, which may not import `wire`) is at least the largest.
const _: () = assert!(crate::codec::DECODE_LIMIT >= MAX_PEER_MESSAGE);

/// A peer's gRPC client; every call carries this node's cluster id.
pub type PeerClient = RaftPeerClient<InterceptedService<Channel, ClusterStamp>>;

/// Adds this node's cluster id (when it has one) to every peer call.
#[derive(Clone)]
pub struct ClusterStamp {
    id: Arc<ClusterId>,
    /// The id as a header value, made once: an id never changes once set,
    /// and every AppendEntries and heartbeat passes here.
    header: Arc<OnceLock<AsciiMetadataValue>>,
}

impl ClusterStamp {
    fn header(&self) -> Option<AsciiMetadataValue> {
        if let Some(v) = self.header.get() {
            return Some(v.clone());
        }
        let v = self.id.get()?.parse().ok()?;
        Some(self.header.get_or_init(|| v).clone())
    }
}

impl tonic::service::Interceptor for ClusterStamp {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = self.header() {
            req.metadata_mut().insert(CLUSTER_HEADER, v);
        }
        Ok(req)
    }
}

const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Hands out the cached channel of each peer.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    /// Mutual TLS to peers (`https://`, this node's certificate as its
    /// identity); none: plaintext.
    tls: Option<ClientTlsConfig>,
    /// This node's cluster id, sent with every call.
    pub identity: Arc<ClusterId>,
    stamp: ClusterStamp,
    /// The log's encodings of its newest entries, sent as they are.
    encoded: Encodings,
    /// This node's stamping clock, read into every AppendEntries request
    /// it sends as leader ([`Payload::leader_clock_ms`]).
    clock: LeaderTime,
}

/// The node's consensus, once it exists: what its clock reads as leader.
/// Held weakly: openraft's core owns the network, and a strong hold on
/// what owns a `Raft` handle would keep the core running after the node
/// is dropped.
#[derive(Clone, Default)]
pub(super) struct LeaderTime(Arc<OnceLock<std::sync::Weak<Consensus>>>);

impl LeaderTime {
    /// The stamp a command proposed now would get; 0 when this node does
    /// not lead, or before (or after) its consensus exists (a follower
    /// reads 0 as not given).
    fn now_ms(&self) -> u64 {
        self.0
            .get()
            .and_then(std::sync::Weak::upgrade)
            .map_or(0, |c| c.leader_clock())
    }
}

impl Peers {
    /// Peers reached over TLS when `tls` is set; AppendEntries messages
    /// take entries' bytes from `encoded` (the log's).
    pub fn new(
        tls: Option<ClientTlsConfig>,
        identity: Arc<ClusterId>,
        encoded: Encodings,
    ) -> Peers {
        Peers {
            channels: Arc::default(),
            encoded,
            tls,
            stamp: ClusterStamp {
                id: identity.clone(),
                header: Arc::default(),
            },
            identity,
            clock: LeaderTime::default(),
        }
    }

    /// Read the leader's clock from `consensus` (set once, at start).
    pub(super) fn set_leader_clock(&self, consensus: std::sync::Weak<Consensus>) {
        let _ = self.clock.0.set(consensus);
    }

    /// The gRPC client of peer `id` at `raft_addr` (reusing its channel).
    pub fn client(&self, id: NodeId, raft_addr: &str) -> Result<PeerClient, tonic::Status> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match map.get(&id) {
            Some((addr, ch)) if addr == raft_addr => ch.clone(),
            _ => {
                let bad = |e: tonic::transport::Error| {
                    tonic::Status::invalid_argument(format!("peer address {raft_addr:?}: {e}"))
                };
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let mut endpoint =
                    Endpoint::from_shared(format!("{scheme}://{raft_addr}")).map_err(bad)?;
                if let Some(tls) = &self.tls {
                    endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
                }
                let ch = endpoint
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .connect_lazy();
                map.insert(id, (raft_addr.to_string(), ch.clone()));
                ch
            }
        };
        Ok(
            RaftPeerClient::with_interceptor(channel, self.stamp.clone())
                .max_decoding_message_size(MAX_PEER_MESSAGE)
                .max_encoding_message_size(MAX_PEER_MESSAGE),
        )
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerConnection {
        PeerConnection {
            client: self.client(target, &node.raft_addr),
            encoded: self.encoded.clone(),
            clock: self.clock.clone(),
            line: None,
        }
    }
}

pub struct PeerConnection {
    client: Result<PeerClient, tonic::Status>,
    encoded: Encodings,
    clock: LeaderTime,
    /// The append stream kept open for single requests ([`Line`]).
    line: Option<Line>,
}

/// An append stream kept open between single requests. openraft sends each
/// heartbeat (every linearizable read's quorum round) as an append stream
/// of one request; opened afresh, each would cost a new HTTP/2 stream, a
/// call through both nodes' gRPC stacks and a stream task on the peer.
/// On a line it costs one message each way. One request is out at a time,
/// so the next answer is always the one to the request just sent.
struct Line {
    requests: tokio::sync::mpsc::Sender<Payload>,
    answers: tonic::Streaming<Payload>,
}

/// `rpc` exactly as [`encode`] writes it, but with the bytes of each entry
/// that `encoded` still holds copied in instead of encoded again. bincode
/// writes a struct as its fields one after another and a `Vec` as its
/// length and then its items, so the parts can be written one by one; the
/// field order is openraft's `AppendEntriesRequest` (vote, prev_log_id,
/// entries, leader_commit), which `tests/log_segments.rs` checks byte for
/// byte.
pub fn encode_append(
    rpc: &AppendEntriesRequest<TypeConfig>,
    encoded: &Encodings,
) -> std::io::Result<Vec<u8>> {
    let AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    } = rpc;
    let kept = encoded.get(entries.iter().map(|e| &e.log_id));
    // Room for the kept bytes and the header fields; an entry encoded
    // here grows it as needed.
    let mut out = Vec::with_capacity(64 + kept.iter().flatten().map(|b| b.len()).sum::<usize>());
    encode_into(&mut out, vote)?;
    encode_into(&mut out, prev_log_id)?;
    encode_into(&mut out, &entries.len())?;
    for (e, kept) in entries.iter().zip(kept) {
        match kept {
            Some(bytes) => out.extend_from_slice(&bytes),
            None => encode_into(&mut out, e)?,
        }
    }
    encode_into(&mut out, leader_commit)?;
    Ok(out)
}

fn status_to_rpc(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&s))
        }
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

/// A peer that did not answer an append within `ttl`: unreachable.
fn no_answer_within(ttl: Duration) -> RPCError<TypeConfig> {
    let e = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no append answer within {ttl:?}"),
    );
    RPCError::Unreachable(Unreachable::new(&e))
}

fn io_to_rpc(e: std::io::Error) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

impl PeerConnection {
    fn client(&self) -> Result<PeerClient, RPCError<TypeConfig>> {
        self.client.clone().map_err(status_to_rpc)
    }

    /// Send `rpc` alone over the [`Line`] (opened if there is none) and
    /// wait up to `ttl` for its answer. The line is kept only after an
    /// answer that leaves the peer's side open (a success: the peer ends
    /// its answers after an error); a line that turns out to have closed
    /// meanwhile is replaced once, since sending an append again is
    /// harmless. Cancelled while waiting, the line is dropped with it.
    async fn on_line(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<StreamAppendResult, RPCError<TypeConfig>> {
        let data = encode_append(rpc, &self.encoded).map_err(io_to_rpc)?;
        let exchange = async {
            let mut reused = self.line.take();
            loop {
                let fresh = reused.is_none();
                let mut line = match reused.take() {
                    Some(line) => line,
                    None => self.open_line().await?,
                };
                let sent = Payload {
                    data: data.clone(),
                    leader_clock_ms: self.clock.now_ms(),
                };
                let answer = match line.requests.send(sent).await {
                    Ok(()) => line.answers.next().await,
                    Err(_) => None,
                };
                let p = match answer {
                    Some(Ok(p)) => p,
                    // The peer closed a line kept from before: try a new one.
                    None | Some(Err(_)) if !fresh => continue,
                    Some(Err(s)) => return Err(status_to_rpc(s)),
                    None => {
                        let e = std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the peer ended the append stream without an answer",
                        );
                        return Err(RPCError::Unreachable(Unreachable::new(&e)));
                    }
                };
                let result: StreamAppendResult = decode(&p.data).map_err(io_to_rpc)?;
                if result.is_ok() {
                    self.line = Some(line);
                }
                return Ok(result);
            }
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(no_answer_within(ttl)),
        }
    }

    /// Open a [`Line`] to the peer.
    async fn open_line(&self) -> Result<Line, RPCError<TypeConfig>> {
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let answers = self
            .client()?
            .append_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(status_to_rpc)?
            .into_inner();
        Ok(Line { requests, answers })
    }

    fn request(data: Vec<u8>, ttl: Duration) -> tonic::Request<Payload> {
        let mut req = tonic::Request::new(Payload {
            data,
            ..Default::default()
        });
        req.set_timeout(ttl);
        req
    }
}

/// The answers to a pipelined append stream, with a deadline: while any
/// request is unanswered, the next answer must come within `ttl` (a follower
/// cut off by a partition, or stopped, must not stall replication forever).
fn append_answers(
    answers: tonic::Streaming<Payload>,
    sent: Arc<InFlight>,
    ttl: Duration,
) -> impl Stream<Item = Result<StreamAppendResult, RPCError<TypeConfig>>> + Send + 'static {
    futures::stream::unfold(Some(answers), move |state| {
        let sent = sent.clone();
        async move {
            let mut answers = state?;
            let next = loop {
                if sent.unanswered.load(Ordering::Acquire) == 0 {
                    tokio::select! {
                        next = answers.next() => break next,
                        // A request went out: start its clock.
                        _ = sent.notify.notified() => continue,
                    }
                }
                match tokio::time::timeout(ttl, answers.next()).await {
                    Ok(next) => break next,
                    Err(_) => return Some((Err(no_answer_within(ttl)), None)),
                }
            };
            sent.unanswered.fetch_sub(1, Ordering::AcqRel);
            match next? {
                Ok(p) => match decode::<StreamAppendResult>(&p.data) {
                    Ok(r) => Some((Ok(r), Some(answers))),
                    Err(e) => Some((Err(io_to_rpc(e)), None)),
                },
                // The follower refused an append as malformed: sending it
                // again at once would be refused again, so back off as
                // from a peer that cannot be reached.
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    Some((Err(RPCError::Unreachable(Unreachable::new(&s))), None))
                }
                Err(s) => Some((Err(status_to_rpc(s)), None)),
            }
        }
    })
}

/// Requests of an append stream not answered yet.
#[derive(Default)]
struct InFlight {
    unanswered: AtomicU64,
    notify: tokio::sync::Notify,
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = std::fs::File;

    /// Pipelined replication over one gRPC stream: requests go out as
    /// openraft produces them, without waiting for earlier answers. A
    /// stream of one request with no entries (a heartbeat) goes over the
    /// connection's [`Line`] instead.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let mut client = self.client()?;
            // Wait for the first request before connecting: openraft applies
            // its backoff (after a peer was unreachable) while producing it,
            // so connecting first would retry a dead peer in a tight loop.
            // Fused: the line's check below may see the end of the input,
            // which must not be polled again after it.
            let mut input = futures::StreamExt::fuse(input);
            let Some(first) = input.next().await else {
                let none: BoxStream<'s, _> = Box::pin(futures::stream::empty());
                return Ok(none);
            };
            // A stream of one empty request (a heartbeat) goes over the
            // line. Replication, probes with entries included, keeps its
            // own streams.
            let mut head = vec![first];
            match futures::FutureExt::now_or_never(input.next()) {
                Some(None) if head[0].entries.is_empty() => {
                    let rpc = head.pop().expect("one request");
                    // Within openraft's own deadline for the call, so the
                    // line is dropped here on a timeout, with a clear error.
                    let answer = self.on_line(&rpc, option.soft_ttl()).await?;
                    let one: BoxStream<'s, _> = Box::pin(futures::stream::iter([Ok(answer)]));
                    return Ok(one);
                }
                Some(Some(second)) => head.push(second),
                Some(None) | None => {}
            }
            let sent = Arc::new(InFlight::default());
            let counter = sent.clone();
            let encoded = self.encoded.clone();
            let clock = self.clock.clone();
            // A request that cannot be encoded ends the stream; openraft
            // starts a new one.
            let requests = futures::stream::iter(head)
                .chain(input)
                .map_while(move |rpc| {
                    let data = encode_append(&rpc, &encoded).ok()?;
                    counter.unanswered.fetch_add(1, Ordering::AcqRel);
                    counter.notify.notify_one();
                    Some(Payload {
                        data,
                        leader_clock_ms: clock.now_ms(),
                    })
                });
            let answers = client
                .append_stream(requests)
                .await
                .map_err(status_to_rpc)?
                .into_inner();
            let stream: BoxStream<'s, _> =
                Box::pin(append_answers(answers, sent, option.hard_ttl()));
            Ok(stream)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let data = encode_append(&rpc, &self.encoded).map_err(io_to_rpc)?;
        let mut req = Self::request(data, option.hard_ttl());
        req.get_mut().leader_clock_ms = self.clock.now_ms();
        let resp = self
            .client()?
            .append_entries(req)
            .await
            .map_err(status_to_rpc)?;
        decode(&resp.into_inner().data).map_err(io_to_rpc)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = Self::request(encode(&rpc).map_err(io_to_rpc)?, option.hard_ttl());
        let resp = self.client()?.vote(req).await.map_err(status_to_rpc)?;
        decode(&resp.into_inner().data).map_err(io_to_rpc)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = Self::request(encode(&rpc).map_err(io_to_rpc)?, option.hard_ttl());
        let resp = self.client()?.pre_vote(req).await.map_err(status_to_rpc)?;
        decode(&resp.into_inner().data).map_err(io_to_rpc)
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = Self::request(encode(&rpc).map_err(io_to_rpc)?, option.hard_ttl());
        let resp = self
            .client()?
            .transfer_leader(req)
            .await
            .map_err(status_to_rpc)?;
        decode(&resp.into_inner().data).map_err(io_to_rpc)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let net = |e: std::io::Error| StreamingError::Network(NetworkError::new(&e));
        let mut client = self
            .client
            .clone()
            .map_err(|s| StreamingError::Unreachable(Unreachable::new(&s)))?;
        let meta = encode(&(vote, snapshot.meta.clone())).map_err(net)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let mut file = snapshot.snapshot;
        // Read the file on a blocking thread, one chunk at a time.
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut first = Some(meta);
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let n = file.read(&mut buf)?;
                buf.truncate(n);
                let chunk = SnapshotChunk {
                    meta: first.take().unwrap_or_default(),
                    data: buf,
                };
                if tx.blocking_send(chunk).is_err() || n == 0 {
                    return Ok(());
                }
            }
        });
        let upload = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        let resp = tokio::select! {
            r = upload => r.map_err(|s| StreamingError::Network(NetworkError::new(&s)))?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        reader
            .await
            .map_err(|e| net(std::io::Error::other(e)))?
            .map_err(net)?;
        decode(&resp.into_inner().data).map_err(net)
    }
}
