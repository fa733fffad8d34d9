//! The one door from idemkv to its Raft group: propose a command, confirm a
//! linearizable read, look at membership. Any node can be asked; a follower
//! hands writes and read-index requests to the leader over the peer port,
//! writes received together in one call ([`super::coalesce`]).
//!
//! This is where openraft's errors become [`Error`]s: "not the leader" is
//! forwarded, "no leader / no quorum / timed out" becomes `Unavailable`
//! (safe to retry: every write is idempotent), a stopped Raft is `Internal`.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::errors::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::ReadPolicy;
use serde::{Deserialize, Serialize};

use super::coalesce::{Coalescer, Limits, Sink};
use super::network::Peers;
use super::propose::{self, Proposer, Refused};
use super::{NodeId, PeerNode, Raft, Response};
use crate::codec::{decode, encode};
use crate::error::{Error, Result};
use crate::pb::peer::Payload;
use crate::record::{self, Command, Op, Outcome, Record, RecordKey, RuleError};
use crate::store::{Rejoin, StateMachineStore};

/// A request a follower hands to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub enum Forwarded {
    Write(Command),
    ReadIndex,
    /// Writes a follower received while its earlier forwards were under
    /// way, each checked and proposed as if forwarded alone (at most
    /// [`propose::MAX_COMMANDS`]). (Added last, so older requests decode.)
    Writes(Vec<Command>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Write(Response),
    ReadIndex(u64),
    /// The receiver is not the leader (any more) or has no quorum.
    Unavailable(String),
    Internal(String),
    /// The leader's own limits refused the command (bad input or too
    /// large): nothing was proposed. (Added last, so older replies decode.)
    Invalid {
        field: String,
        message: String,
    },
    TooLarge {
        field: String,
        message: String,
    },
    /// The replies to [`Forwarded::Writes`], one per write, in order.
    Writes(Vec<ForwardReply>),
    /// The leader's data-size quota refused a claim; nothing was proposed.
    NoSpace(String),
}

/// Checks a forwarded command against this node's limits before the leader
/// proposes it (SPEC §5: the peer port never takes what the client port
/// would refuse). The API layer supplies it, as this layer knows no limits;
/// commands from this node's own client port were checked there already.
pub type CommandCheck = std::sync::Arc<dyn Fn(&Command) -> Result<()> + Send + Sync>;

/// What the leader checks before it proposes a command.
pub struct Admission {
    /// This node's limits, for forwarded commands.
    pub check: CommandCheck,
    /// The data-size quota (bytes of [`StateMachineStore::data_bytes`]):
    /// past it, no claim is proposed.
    pub quota_bytes: u64,
}

/// Why the local node could not serve a leader-only request.
enum Local {
    NotLeader(Option<(NodeId, PeerNode)>),
    Failed(Error),
}

/// A member of the cluster as `Status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    pub node: PeerNode,
    pub voter: bool,
}

/// A point-in-time view of this node's Raft state.
#[derive(Debug, Clone)]
pub struct RaftStatus {
    pub id: NodeId,
    pub role: String,
    pub leader: Option<(NodeId, PeerNode)>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub members: Vec<MemberInfo>,
    /// Set while this node, having cut a damaged log record it may have
    /// acknowledged, neither votes nor campaigns: the entry it must hold
    /// again first.
    pub rejoin_until: Option<u64>,
}

pub struct Consensus {
    pub id: NodeId,
    /// The Raft group and the state machine stay behind this type: the
    /// layers above see only its methods (the peer service, in this
    /// module, hands Raft its messages).
    pub(super) raft: Raft,
    pub(super) sm: StateMachineStore,
    peers: Peers,
    /// How long a write or read index may wait for a quorum before the
    /// caller gets `Unavailable`.
    pub timeout: Duration,
    /// Proposes this node's writes while it leads, coalescing concurrent
    /// ones, and stamps them (reading the node's [`crate::clock::Clock`],
    /// which the state machine holds).
    proposer: Proposer,
    /// Hands this node's writes to the leader while it follows, many per
    /// call when they come faster than the leader answers.
    forwards: Coalescer<Forwards>,
    /// Hands this node's linearizable reads to the leader while it
    /// follows: one read index per call, for every read that arrived
    /// before the call went.
    read_forwards: Coalescer<ReadForwards>,
    /// Calls that carried forwarded writes to the leader.
    forward_calls: std::sync::atomic::AtomicU64,
    /// Calls that asked the leader for a read index.
    read_forward_calls: std::sync::atomic::AtomicU64,
    /// Held while a snapshot stream from the leader is received (and
    /// installed): one at a time per node.
    snapshot_gate: tokio::sync::Semaphore,
    check: CommandCheck,
    /// The data-size quota (bytes of [`StateMachineStore::data_bytes`]):
    /// past it, this node, leading, proposes no claim.
    quota_bytes: u64,
    /// Set while this node keeps out of elections after cutting a damaged
    /// log record (see `store/rejoin.rs`).
    rejoin: Arc<Rejoin>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("{what}: {e}"))
}

impl Consensus {
    pub fn new(
        id: NodeId,
        raft: Raft,
        sm: StateMachineStore,
        peers: Peers,
        timeout: Duration,
        admission: Admission,
        rejoin: Arc<Rejoin>,
    ) -> Arc<Self> {
        let Admission { check, quota_bytes } = admission;
        let proposer = Proposer::new(raft.clone(), sm.clone(), timeout);
        let consensus = Arc::new_cyclic(|me| Consensus {
            id,
            raft,
            sm,
            peers,
            timeout,
            proposer,
            forwards: Coalescer::new(
                Forwards {
                    consensus: me.clone(),
                },
                Limits {
                    in_flight: FORWARDS_IN_FLIGHT,
                    items: propose::MAX_COMMANDS,
                    weight: propose::MAX_WEIGHT,
                },
            ),
            read_forwards: Coalescer::new(
                ReadForwards {
                    consensus: me.clone(),
                },
                Limits {
                    in_flight: READ_FORWARDS_IN_FLIGHT,
                    items: usize::MAX,
                    weight: usize::MAX,
                },
            ),
            forward_calls: Default::default(),
            read_forward_calls: Default::default(),
            snapshot_gate: tokio::sync::Semaphore::new(1),
            check,
            quota_bytes,
            rejoin,
        });
        // The network reads this node's clock as leader into every append.
        consensus.peers.set_leader_clock(Arc::downgrade(&consensus));
        consensus
    }

    /// Whether `command` may store a record or take one over: what the
    /// data-size quota refuses. A claim that changes nothing (a replay, the
    /// holder's own retry, a live lease held by another), as
    /// `record::claim_without_write` judges it, stores nothing, so it goes
    /// on under NOSPACE like completes and reads.
    fn stores_more(&self, command: &Command) -> bool {
        // The record model's own test (the no-write fast path's): a claim
        // that changes nothing stores nothing.
        let now = record::advance_clock(self.sm.clock_ms(), self.now_ms());
        let replays = |key: &RecordKey, c: &record::Claim| match self.sm.get(key) {
            Ok(rec) => {
                let op = Op::Claim(c.clone());
                record::claim_without_write(rec.as_ref(), &op, now, self.sm.last_token()).is_some()
            }
            Err(_) => false,
        };
        match command {
            Command::Op {
                key,
                op: Op::Claim(c),
            } => !replays(key, c),
            Command::ClaimBatch { items, .. } => items.iter().any(|(k, c)| !replays(k, c)),
            _ => false,
        }
    }

    /// This node's cluster id (none: it never joined a cluster that has
    /// one).
    pub fn cluster_id(&self) -> Option<String> {
        self.peers.identity.get()
    }

    /// A peer call's cluster id against this node's: taken when this node
    /// has none yet, refused when it differs, not checked when absent.
    pub fn admit_cluster(&self, theirs: Option<&str>) -> Result<()> {
        let Some(theirs) = theirs else {
            return Ok(());
        };
        match self.peers.identity.admit(theirs)? {
            None => Ok(()),
            Some(ours) => Err(Error::PermissionDenied(format!(
                "peer: the call comes from another cluster (id {theirs}); node {} belongs to cluster {ours}",
                self.id
            ))),
        }
    }

    /// What the records take and the quota (bytes).
    pub fn data_size(&self) -> (u64, u64) {
        (self.sm.data_bytes(), self.quota_bytes)
    }

    /// The NOSPACE alarm: raised while the records take more than the
    /// quota, cleared as soon as the sweep or deletes bring them under it.
    pub fn no_space(&self) -> Option<Error> {
        let (data, quota) = self.data_size();
        (data > quota).then(|| {
            Error::NoSpace(format!(
                "NOSPACE: the records take {data} bytes, over the data-size quota of {quota} \
                 (--quota-bytes); claims are refused until retention sweeps or deletes make \
                 room, while complete, renew, release, reads and deletes work"
            ))
        })
    }

    /// Calls this node made to carry its forwarded writes to the leader
    /// (fewer than the writes when they shared calls).
    pub fn forward_calls(&self) -> u64 {
        self.forward_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The right to receive a snapshot stream, held from when its call
    /// arrives (before the first chunk) until the snapshot is installed or
    /// refused or the stream breaks off; `None` while another holds it.
    pub(crate) fn receive_snapshot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.snapshot_gate.try_acquire().ok()
    }

    /// Whether a snapshot stream holds that right now (waiting for its
    /// chunks, spooled, checked or being installed).
    pub fn receiving_snapshot(&self) -> bool {
        self.snapshot_gate.available_permits() == 0
    }

    /// Calls this node made, or tried to make (no leader known), to ask
    /// the leader for a read index.
    pub fn read_forward_calls(&self) -> u64 {
        self.read_forward_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Register a waiter on the record at `key` (Await); register before
    /// reading the record, so no change in between is missed.
    pub fn watch_key(&self, key: &RecordKey) -> crate::store::watch::KeyWatch {
        self.sm.watch_key(key)
    }

    /// Keys some Await on this node is waiting on.
    pub fn watched_keys(&self) -> usize {
        self.sm.watched_keys()
    }

    /// Times an Await on this node was woken by a change of its key.
    pub fn watch_wakeups(&self) -> u64 {
        self.sm.watch_wakeups()
    }

    /// Whether this node has ever been part of a cluster (it holds a vote
    /// or a log).
    pub async fn is_initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// Stop the Raft group, then write what it applied to sled.
    pub async fn shutdown(&self) -> Result<()> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| Error::Internal(format!("raft shutdown: {e}")))?;
        Ok(self.sm.persist().await?)
    }

    /// Whether this node leads and holds records whose retention has run
    /// out at the cluster's clock: then a sweep is due.
    pub fn sweep_due(&self) -> bool {
        self.raft.is_leader() && self.sm.has_expired(self.now_ms())
    }

    /// The entry this node must hold again before it votes or campaigns
    /// (it cut a damaged record it may have acknowledged); `None` normally.
    pub fn rejoin_until(&self) -> Option<u64> {
        self.rejoin.until()
    }

    /// While [`Consensus::rejoin_until`] is set the node was started with
    /// elections off; turn them on once it holds the entry again. The only
    /// voter of its cluster has no one to get the entry from: it says the
    /// entry is lost and goes on.
    pub async fn rejoin(&self) {
        let Some(until) = self.rejoin.until() else {
            return;
        };
        let voters: Vec<NodeId> = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            m.membership_config.membership().voter_ids().collect()
        };
        if voters == [self.id] {
            tracing::error!(
                entry = until,
                "this node is the only voter and cut a damaged log record it may have \
                 acknowledged: entries up to {until} may be lost"
            );
            self.rejoin.forget("the only voter: no one holds the entry");
        } else {
            tracing::warn!(
                entry = until,
                "not voting or campaigning until this node holds entry {until} again"
            );
            self.rejoin.wait().await;
        }
        self.raft.runtime_config().elect(true);
    }

    /// The stamp a command proposed now gets (SPEC §2 Time).
    fn stamp(&self) -> u64 {
        self.proposer.stamp()
    }

    /// This node's clock as leader, for the appends it sends; 0 when it
    /// does not lead.
    pub(super) fn leader_clock(&self) -> u64 {
        self.proposer.leader_clock()
    }

    /// The one clock for lease decisions made outside the state machine
    /// (Await, the no-write claim path, the sweeper): on the leader, the
    /// stamp a write would get now; elsewhere the node's reading (the
    /// leader's clock as last heard plus the monotonic time since,
    /// `store/reading.rs`).
    pub fn now_ms(&self) -> u64 {
        let sm = self.sm.now_ms();
        if self.raft.is_leader() {
            sm.max(self.stamp())
        } else {
            sm
        }
    }

    /// An append from the leader of `rpc`'s vote says its clock read
    /// `clock_ms` as it sent it (0: not given): taken as heard now, it
    /// bounds the clock's reading (`store/reading.rs`). Only from a leader
    /// this node could still follow: one whose vote is not below the one
    /// it holds (a deposed leader's append, refused anyway, says nothing).
    pub fn note_leader_clock(&self, rpc: &super::AppendEntriesRequest, clock_ms: u64) {
        if clock_ms == 0 || rpc.vote < self.raft.metrics().borrow_watched().vote {
            return;
        }
        self.sm
            .heard_leader_clock(propose::leader_key(&rpc.vote), clock_ms);
    }

    /// The node's wall clock (ms since the epoch), as its
    /// [`crate::clock::Clock`] reads it: shown in `Status`, steers stamps,
    /// never decides a lease.
    pub fn wall_clock_ms(&self) -> u64 {
        self.sm.time().wall_ms()
    }

    /// Propose `command` (at the leader, wherever this node is) and return
    /// the state machine's decision.
    pub async fn write(&self, command: Command) -> Result<Outcome> {
        match self.propose_local(command.clone()).await {
            Ok(resp) => resp.map_err(Error::Rule),
            Err(Local::Failed(e)) => Err(e),
            Err(Local::NotLeader(_)) => match self.forwards.submit(command).await {
                ForwardReply::Write(resp) => resp.map_err(Error::Rule),
                other => Err(reply_error(other)),
            },
        }
    }

    /// Forward `commands` to the leader known now, in one call; one reply
    /// per command (a failed call is every command's reply).
    async fn forward_writes(&self, mut commands: Vec<Command>) -> Vec<ForwardReply> {
        if self.raft.is_leader() {
            // This node took office while the writes queued: it proposes
            // them itself, checked as a forwarded group would be.
            return self.serve_writes(commands).await;
        }
        let n = commands.len();
        self.forward_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = if n == 1 {
            // Alone, as nodes before `Writes` take it.
            Forwarded::Write(commands.pop().expect("one"))
        } else {
            Forwarded::Writes(commands)
        };
        match self.forward(self.leader(), req).await {
            Ok(ForwardReply::Writes(replies)) if replies.len() == n => replies,
            Ok(ForwardReply::Writes(replies)) => vec![
                ForwardReply::Internal(format!(
                    "the leader answered {} of {n} forwarded writes",
                    replies.len()
                ));
                n
            ],
            Ok(reply) => vec![reply; n],
            Err(e) => vec![failed_forward(e); n],
        }
    }

    /// Ask the leader known now for a read index, in one call.
    async fn forward_read_index(&self) -> ForwardReply {
        if self.raft.is_leader() {
            // This node took office while the reads queued: it confirms
            // them itself, with a round that starts after all of them
            // arrived (read_index waits for it to be applied here).
            return self.read_index_reply().await;
        }
        self.read_forward_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.forward(self.leader(), Forwarded::ReadIndex)
            .await
            .unwrap_or_else(failed_forward)
    }

    async fn propose_local(&self, command: Command) -> Result<Response, Local> {
        self.may_propose(&command)?;
        let decided = self.proposer.propose(command).await;
        self.local(decided)
    }

    /// Whether this node may propose `command` now: it leads, and the
    /// data-size quota leaves room for what the command stores.
    fn may_propose(&self, command: &Command) -> Result<(), Local> {
        if !self.raft.is_leader() {
            return Err(Local::NotLeader(self.leader()));
        }
        if let Some(e) = self.no_space() {
            if self.stores_more(command) {
                return Err(Local::Failed(e));
            }
        }
        Ok(())
    }

    /// A proposal's fate, as this node reports it.
    fn local(&self, decided: Result<Response, Refused>) -> Result<Response, Local> {
        match decided {
            Ok(resp) => Ok(resp),
            Err(Refused::NotLeader(leader)) => Err(Local::NotLeader(leader)),
            Err(Refused::TimedOut) => Err(Local::Failed(Error::Unavailable(format!(
                "{}; the write was not committed within {:?} (it may still commit once they answer), and retrying is safe",
                self.quorum_lost(),
                self.timeout
            )))),
            Err(Refused::Failed(e)) => Err(Local::Failed(unavailable("write", e))),
            Err(Refused::Stopped(e)) => Err(Local::Failed(raft_stopped(e))),
        }
    }

    /// A read index: once this node has applied it, a local read is
    /// linearizable. Confirmed by the leader with a quorum round, never with
    /// a clock lease.
    pub async fn read_index(&self) -> Result<u64> {
        let index = match self.read_index_local().await {
            Ok(i) => i.handed_on(),
            Err(Local::Failed(e)) => return Err(e),
            Err(Local::NotLeader(_)) => match self.read_forwards.submit(()).await {
                ForwardReply::ReadIndex(i) => i,
                other => return Err(reply_error(other)),
            },
        };
        self.wait_applied(index).await?;
        Ok(index)
    }

    /// This node's read index, confirmed by a quorum round; not waited
    /// for: every caller waits for it to be applied, where it is served
    /// ([`Self::wait_applied`]). Not openraft's `ensure_linearizable`,
    /// whose wait for the index woke each waiting read at every turn of
    /// Raft's loop (its metrics channel), not when this node applies.
    async fn read_index_local(&self) -> Result<Unapplied, Local> {
        if !self.raft.is_leader() {
            return Err(Local::NotLeader(self.leader()));
        }
        let res = tokio::time::timeout(
            self.timeout,
            self.raft.get_read_linearizer(ReadPolicy::ReadIndex),
        )
        .await;
        match res {
            Err(_) => Err(Local::Failed(Error::Unavailable(format!(
                "{}; its leadership was not confirmed within {:?}, so the linearizable read was not served",
                self.quorum_lost(),
                self.timeout
            )))),
            Ok(Ok(read)) => Ok(Unapplied(read.read_log_id().index())),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(Local::NotLeader(f.leader_id.zip(f.leader_node)))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)))) => {
                let voters = self.voter_ids();
                let silent: Vec<NodeId> =
                    voters.iter().filter(|id| !q.got.contains(id)).copied().collect();
                let got: Vec<NodeId> = q.got.iter().copied().collect();
                Err(Local::Failed(Error::Unavailable(format!(
                    "this node (id {}) is leader of term {}, but only {:?} of its voters {voters:?} confirmed its leadership (no answer from {silent:?}; a majority is needed), so the linearizable read was not served; check that the other nodes are up",
                    self.id,
                    self.term(),
                    got,
                ))))
            }
            Ok(Err(RaftError::Fatal(e))) => {
                Err(Local::Failed(raft_stopped(e)))
            }
        }
    }

    /// This node's read index as a reply to reads that asked for it, who
    /// wait for it to be applied where they are served (a follower's, or
    /// this node's own queued reads, in [`Self::read_index`]).
    async fn read_index_reply(&self) -> ForwardReply {
        self.answer(
            self.read_index_local()
                .await
                .map(|i| ForwardReply::ReadIndex(i.handed_on())),
        )
    }

    /// The last index this node's state machine applied: what a local
    /// read sees.
    pub fn applied_index(&self) -> u64 {
        *self.sm.subscribe_applied().borrow()
    }

    /// Wait until the local state machine has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut rx = self.sm.subscribe_applied();
        let res = tokio::time::timeout(self.timeout, rx.wait_for(|applied| *applied >= index))
            .await
            .map(|r| r.map(|_| ()));
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Internal("state machine closed".into())),
            Err(_) => Err(Error::Unavailable(format!(
                "this node did not apply index {index} within {:?}",
                self.timeout
            ))),
        }
    }

    /// Read a record, linearizably or from the local replica.
    /// Answer a claim that changes nothing without a log entry: a replay of a
    /// completed result, a live lease held by someone else, the holder's own
    /// retry, a fingerprint mismatch. Only on the leader, and only after a
    /// read-index barrier, so the record judged is the committed one; the
    /// clock is the one a write proposed now would get. `None`: the claim
    /// changes something (or this node cannot tell) and must be written.
    pub async fn claim_without_write(
        &self,
        key: &RecordKey,
        op: &Op,
    ) -> Result<Option<std::result::Result<Outcome, RuleError>>> {
        if !self.raft.is_leader() {
            return Ok(None);
        }
        // `None` for anything but a claim that changes nothing.
        let judge = |rec: Option<Record>| {
            let now = record::advance_clock(self.sm.clock_ms(), self.now_ms());
            record::claim_without_write(rec.as_ref(), op, now, self.sm.last_token())
        };
        // Cheap local look first: a fresh key goes straight to the log.
        if judge(self.sm.get(key)?).is_none() {
            return Ok(None);
        }
        let Ok(index) = self.read_index_local().await else {
            return Ok(None);
        };
        self.wait_applied(index.handed_on()).await?;
        Ok(judge(self.sm.get(key)?))
    }

    pub async fn get(&self, key: &RecordKey, linearizable: bool) -> Result<Option<Record>> {
        if linearizable {
            self.read_index().await?;
        }
        Ok(self.sm.get(key)?)
    }

    /// Serve a request forwarded by a follower. Never forwards again.
    pub async fn serve_forwarded(&self, req: Forwarded) -> ForwardReply {
        match req {
            Forwarded::Write(c) => self.serve_write(c).await,
            Forwarded::ReadIndex => self.read_index_reply().await,
            Forwarded::Writes(cs) if cs.len() > propose::MAX_COMMANDS => ForwardReply::Invalid {
                field: "writes".into(),
                message: format!(
                    "{} forwarded writes in one call; at most {} are taken",
                    cs.len(),
                    propose::MAX_COMMANDS
                ),
            },
            Forwarded::Writes(cs) => ForwardReply::Writes(self.serve_writes(cs).await),
        }
    }

    /// Check a forwarded write against this node's limits, then propose it.
    async fn serve_write(&self, c: Command) -> ForwardReply {
        self.answer(match self.admit(&c) {
            Ok(()) => self
                .local(self.proposer.propose(c).await)
                .map(ForwardReply::Write),
            Err(e) => Err(e),
        })
    }

    /// Whether a forwarded write may be proposed: checked again against
    /// this node's limits, then as any local write ([`Self::may_propose`]).
    fn admit(&self, c: &Command) -> Result<(), Local> {
        (self.check)(c).map_err(Local::Failed)?;
        self.may_propose(c)
    }

    /// Serve a follower's forwarded writes: each is checked again, and
    /// those that pass are proposed together, so they share an entry
    /// (proposed one by one, the first would go alone and the follower's
    /// answer would wait for two rounds). One reply per write, in order.
    async fn serve_writes(&self, cs: Vec<Command>) -> Vec<ForwardReply> {
        // `None`: admitted, answered by its decision below.
        let mut refusals = Vec::with_capacity(cs.len());
        let mut proposed = Vec::with_capacity(cs.len());
        for c in cs {
            match self.admit(&c) {
                Ok(()) => {
                    refusals.push(None);
                    proposed.push(c);
                }
                Err(e) => refusals.push(Some(self.answer(Err(e)))),
            }
        }
        let mut decided = self.proposer.propose_all(proposed).await.into_iter();
        refusals
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    let d = decided
                        .next()
                        .unwrap_or_else(|| Err(Refused::Failed("no decision came back".into())));
                    self.answer(self.local(d).map(ForwardReply::Write))
                })
            })
            .collect()
    }

    /// The reply a follower gets for what this node made of its request.
    fn answer(&self, res: std::result::Result<ForwardReply, Local>) -> ForwardReply {
        match res {
            Ok(reply) => reply,
            Err(Local::NotLeader(l)) => ForwardReply::Unavailable(format!(
                "node {} is not the leader (leader: {})",
                self.id,
                l.map_or("unknown".to_string(), |(id, _)| id.to_string())
            )),
            Err(Local::Failed(Error::Unavailable(m))) => ForwardReply::Unavailable(m),
            Err(Local::Failed(Error::InvalidArgument { field, message })) => {
                ForwardReply::Invalid { field, message }
            }
            Err(Local::Failed(Error::TooLarge { field, message })) => {
                ForwardReply::TooLarge { field, message }
            }
            Err(Local::Failed(Error::NoSpace(m))) => ForwardReply::NoSpace(m),
            Err(Local::Failed(e)) => ForwardReply::Internal(e.to_string()),
        }
    }

    async fn forward(
        &self,
        leader: Option<(NodeId, PeerNode)>,
        req: Forwarded,
    ) -> Result<ForwardReply> {
        let Some((id, node)) = leader else {
            return Err(Error::Unavailable(self.no_leader()));
        };
        if id == self.id {
            // This node's last vote made it leader, but it does not act as
            // one (it stepped down, or it is taking office right now).
            return Err(Error::Unavailable(format!(
                "this node (id {}) was elected leader of term {} but is not serving as leader now ({}): leadership is changing; retry shortly",
                self.id,
                self.term(),
                self.role(),
            )));
        }
        let mut client = self
            .peers
            .client(id, &node.raft_addr)
            .map_err(|s| unavailable("leader address", s))?;
        let mut request = tonic::Request::new(Payload {
            data: encode(&req)?,
            ..Default::default()
        });
        request.set_timeout(self.timeout + Duration::from_secs(1));
        let resp = client.forward(request).await.map_err(|s| {
            Error::Unavailable(format!(
                "this node (id {}) cannot reach the leader it knows, node {id} at {}: {}; check that the other nodes are up (a new leader is elected once a majority of the voters {:?} can reach each other); retrying is safe",
                self.id,
                node.raft_addr,
                s.message(),
                self.voter_ids(),
            ))
        })?;
        let from_leader = |reply| match reply {
            ForwardReply::Unavailable(m) => {
                ForwardReply::Unavailable(format!("the leader, node {id}, answered: {m}"))
            }
            other => other,
        };
        Ok(match decode(&resp.into_inner().data)? {
            ForwardReply::Writes(replies) => {
                ForwardReply::Writes(replies.into_iter().map(from_leader).collect())
            }
            other => from_leader(other),
        })
    }

    fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    fn role(&self) -> String {
        format!("{:?}", self.raft.metrics().borrow_watched().state).to_lowercase()
    }

    /// The voters of the membership in force.
    fn voter_ids(&self) -> Vec<NodeId> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        m.membership_config.membership().voter_ids().collect()
    }

    /// On the leader: the other voters it has not heard from within an
    /// election timeout (empty elsewhere).
    fn silent_voters(&self) -> Vec<NodeId> {
        let within = Duration::from_millis(self.raft.config().election_timeout_max);
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        let Some(acks) = &m.heartbeat else {
            return Vec::new();
        };
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != self.id)
            .filter(|id| !matches!(acks.get(id), Some(Some(t)) if openraft::Instant::elapsed(&**t) <= within))
            .collect()
    }

    /// A leader that cannot reach a majority, in words: who it is, which
    /// voters it needs, which of them are silent.
    fn quorum_lost(&self) -> String {
        let silent = self.silent_voters();
        let silent = if silent.is_empty() {
            String::new()
        } else {
            format!(" (no answer from {silent:?})")
        };
        format!(
            "this node (id {}) is leader of term {} but cannot reach a majority of its voters {:?}{silent}; check that the other nodes are up",
            self.id,
            self.term(),
            self.voter_ids(),
        )
    }

    /// Why no leader can be named, from what this node is doing now.
    fn no_leader(&self) -> String {
        let (id, term, voters) = (self.id, self.term(), self.voter_ids());
        match self.raft.metrics().borrow_watched().state {
            openraft::ServerState::Candidate => format!(
                "no leader: this node (id {id}) is standing for election in term {term} and has not got the votes of a majority of the voters {voters:?}; check that the other nodes are up; retrying is safe"
            ),
            openraft::ServerState::Leader => format!(
                "this node (id {id}) is taking office as leader of term {term}: leadership is changing; retry shortly"
            ),
            state => format!(
                "no leader is known to this node (id {id}, {} in term {term}): an election is under way, or a majority of the voters {voters:?} cannot reach each other; check that the other nodes are up; retrying is safe",
                format!("{state:?}").to_lowercase()
            ),
        }
    }

    /// Resolves when Raft has stopped on a fatal error (a write the disk
    /// refused, for one), with that error.
    pub async fn fatal(&self) -> String {
        // The server metrics change with the role, the vote, the leader or
        // the members, and close when Raft's core ends; the whole metrics
        // change at every turn of its loop, and watching them woke this
        // task thousands of times a second under load.
        let mut server = self.raft.server_metrics();
        while server.changed().await.is_ok() {}
        match &self.raft.metrics().borrow_watched().running_state {
            Err(e) => e.to_string(),
            Ok(()) => "raft stopped".to_string(),
        }
    }

    /// The leader as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, PeerNode)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    /// The log index of the membership in force (None before any): changes
    /// whenever the members do.
    pub fn membership_index(&self) -> Option<u64> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        m.membership_config.log_id().as_ref().map(|l| l.index())
    }

    /// The peer addresses of every member (voters and learners) this node
    /// knows of; empty before it belongs to a cluster.
    pub fn member_raft_addrs(&self) -> Vec<String> {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        m.membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.raft_addr.clone())
            .collect()
    }

    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: *id,
                node: node.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let leader = m
            .current_leader
            .and_then(|id| membership.get_node(&id).map(|n| (id, n.clone())));
        RaftStatus {
            id: self.id,
            role: format!("{:?}", m.state).to_lowercase(),
            leader,
            term: m.current_term,
            commit_index: m.local_committed.map_or(0, |l| l.index()),
            applied_index: m.last_applied.map_or(0, |l| l.index()),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map_or(0, |l| l.index()),
            members,
            rejoin_until: self.rejoin.until(),
        }
    }

    /// Initialise a new cluster with these members (a no-op error if this
    /// node was already initialised).
    pub async fn initialize(&self, members: BTreeMap<NodeId, PeerNode>) -> Result<()> {
        // A new cluster gets its id (kept if this node already has one):
        // made from the founding members, so that every node initialised
        // with them agrees whichever starts first.
        self.peers
            .identity
            .adopt(&crate::store::ClusterId::of_members(&members))?;
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // A peer founding the same cluster (its calls carried this
            // cluster's id: the same members) reached this node first and
            // it has a vote or entries now: it is a member, as initialising
            // would have made it.
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                tracing::info!(state = %e, "not initialising: a peer founding the same cluster reached this node first");
                Ok(())
            }
            Err(RaftError::APIError(e)) => {
                Err(Error::invalid("members", format!("cannot initialise: {e}")))
            }
            Err(RaftError::Fatal(e)) => Err(raft_stopped(e)),
        }
    }

    pub async fn add_learner(&self, id: NodeId, node: PeerNode) -> Result<()> {
        membership_result(self.raft.add_learner(id, node, true).await)
    }

    pub async fn change_membership(&self, voters: Vec<NodeId>, retain: bool) -> Result<()> {
        let set: std::collections::BTreeSet<NodeId> = voters.into_iter().collect();
        membership_result(self.raft.change_membership(set, retain).await)
    }

    /// Hash the state through a hash entry (proposed at the leader, wherever
    /// this node is); the leader's hash as of that entry.
    pub async fn hash_now(&self) -> Result<crate::store::StateHash> {
        match self.write(Command::Hash).await? {
            Outcome::Hashed {
                index,
                hash,
                records,
            } => Ok(crate::store::StateHash {
                index,
                hash,
                records,
            }),
            other => Err(Error::Internal(format!(
                "a hash entry was answered with {other:?}"
            ))),
        }
    }

    /// This node's hash as of the hash entry at `index`, once it has
    /// applied it (waiting at most `within`).
    pub async fn hash_at(
        &self,
        index: u64,
        within: std::time::Duration,
    ) -> Result<crate::store::StateHash> {
        tokio::time::timeout(within, self.wait_applied(index))
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "node {} has not applied entry {index} within {within:?}",
                    self.id
                ))
            })??;
        self.sm.hash_at(index).ok_or_else(|| {
            Error::NotFound(format!(
                "node {} holds no hash for entry {index}: it did not apply that entry itself \
                 (it was down, caught up by snapshot, or the entry is not a hash entry); run the check again",
                self.id
            ))
        })
    }

    /// A snapshot holding at least every entry applied now, built on this
    /// node (the leader: the caller checks), as its meta and open file.
    pub async fn fresh_snapshot(
        &self,
        within: std::time::Duration,
    ) -> Result<(crate::raft::types::SnapshotMeta, std::fs::File)> {
        if !self.raft.is_leader() {
            return Err(Error::Unavailable(format!(
                "node {} does not lead; snapshots are saved from the leader",
                self.id
            )));
        }
        let applied = self.status().applied_index;
        self.trigger_snapshot().await?;
        self.raft
            .wait(Some(within))
            .metrics(
                |m| m.snapshot.as_ref().is_some_and(|s| s.index() >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| Error::Unavailable(format!("no snapshot within {within:?}: {e}")))?;
        match self.sm.newest_snapshot() {
            Ok(Some((meta, f))) => Ok((meta, f)),
            Ok(None) => Err(Error::Internal("the snapshot built is gone".into())),
            Err(e) => Err(Error::Internal(format!("reading the snapshot: {e}"))),
        }
    }

    /// Move leadership to voter `to` and wait until this node sees it lead
    /// (at most `within`). Refused, changing nothing, when `to` is not a
    /// voter or this node does not lead; `to` already leading is success.
    pub async fn move_leader(&self, to: NodeId, within: std::time::Duration) -> Result<()> {
        let status = self.status();
        if !status.members.iter().any(|m| m.id == to && m.voter) {
            let voters: Vec<NodeId> = status
                .members
                .iter()
                .filter(|m| m.voter)
                .map(|m| m.id)
                .collect();
            return Err(Error::invalid(
                "to",
                format!("node {to} is not a voter (voters: {voters:?})"),
            ));
        }
        match status.leader.as_ref().map(|(id, _)| *id) {
            Some(l) if l == to => return Ok(()),
            Some(l) if l == self.id => self.can_take_over(to)?,
            Some(l) => {
                return Err(Error::Unavailable(format!(
                    "node {} does not lead (node {l} does); call the leader",
                    self.id
                )))
            }
            None => return Err(Error::Unavailable(self.no_leader())),
        }
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(raft_stopped)?;
        self.raft
            .wait(Some(within))
            .current_leader(to, "move leader")
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::Unavailable(format!(
                    "node {to} did not take over within {within:?} ({e}); the cluster keeps its leader, and retrying is safe"
                ))
            })
    }

    /// On the leader: whether voter `to` could take over now. The leader
    /// stops taking writes as it hands over, and a target that is down or
    /// far behind would not win: refuse rather than cost an election.
    fn can_take_over(&self, to: NodeId) -> Result<()> {
        if self.silent_voters().contains(&to) {
            return Err(Error::invalid(
                "to",
                format!("node {to} has not answered the leader within an election timeout (down or cut off?); the leader stays"),
            ));
        }
        let m = self.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&to).cloned())
            .flatten()
            .map(|l| l.index());
        match matched {
            Some(i) if last.saturating_sub(i) <= MOVE_LEADER_MAX_LAG => Ok(()),
            Some(i) => Err(Error::invalid(
                "to",
                format!("node {to} is {} entries behind the leader; wait until it catches up (ctl status)", last - i),
            )),
            None => Err(Error::invalid(
                "to",
                format!("node {to} has acknowledged no entry from this leader (down or unreachable?); the leader stays"),
            )),
        }
    }

    pub async fn trigger_snapshot(&self) -> Result<()> {
        self.raft.trigger().snapshot().await.map_err(raft_stopped)
    }
}

/// How far behind the leader's log a node may be for leadership to move to
/// it (it catches up within the transfer; further behind, it would not
/// win before an election timeout).
const MOVE_LEADER_MAX_LAG: u64 = 10_000;

/// Raft stopped on this node (its storage failed: crash-only, it exits).
/// The request may or may not have been committed by the others before; to
/// the client this is one node gone, so UNAVAILABLE: go to another node
/// (INTERNAL would say the request itself broke something).
fn raft_stopped(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!(
        "this node stopped serving after a storage failure ({e}); retry on another node"
    ))
}

fn membership_result<T>(
    r: std::result::Result<T, RaftError<super::TypeConfig, ClientWriteError<super::TypeConfig>>>,
) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(Error::Unavailable(format!(
                "membership changes go to the leader: node {}",
                f.leader_id
                    .map_or("unknown".to_string(), |id| id.to_string())
            )))
        }
        Err(RaftError::APIError(e)) => Err(Error::invalid("membership", e.to_string())),
        Err(RaftError::Fatal(e)) => Err(raft_stopped(e)),
    }
}

/// Forward calls under way at once before a follower's writes share one.
const FORWARDS_IN_FLIGHT: usize = 2;

/// Where a follower's forwarded writes go: the leader, through the node's
/// [`Consensus`] (held weakly: the coalescer lives inside it).
struct Forwards {
    consensus: Weak<Consensus>,
}

impl Sink for Forwards {
    type Item = Command;
    type Reply = ForwardReply;

    fn weight(command: &Command) -> usize {
        command.weight()
    }

    async fn send(&self, commands: Vec<Command>) -> Vec<ForwardReply> {
        match self.consensus.upgrade() {
            Some(c) => c.forward_writes(commands).await,
            None => vec![Self::lost(); commands.len()],
        }
    }

    fn lost() -> ForwardReply {
        ForwardReply::Unavailable(
            "this node is stopping; the write was not forwarded; retrying is safe".into(),
        )
    }
}

/// Read-index calls under way at once from a follower. Reads that arrive
/// while one is under way wait and share the next: the call under way may
/// carry an index the leader took before they arrived. One, not two as for
/// writes: at 64 clients reading through a follower, one call at a time
/// served more reads (BENCHMARKS.md, any endpoint).
const READ_FORWARDS_IN_FLIGHT: usize = 1;

/// Where a follower's linearizable reads go: the leader, one read-index
/// call per group, through the node's [`Consensus`] (held weakly: the
/// coalescer lives inside it). The call goes after every read of its group
/// arrived, so the index the leader confirms serves them all.
struct ReadForwards {
    consensus: Weak<Consensus>,
}

impl Sink for ReadForwards {
    type Item = ();
    type Reply = ForwardReply;

    fn weight(_: &()) -> usize {
        0
    }

    async fn send(&self, reads: Vec<()>) -> Vec<ForwardReply> {
        match self.consensus.upgrade() {
            Some(c) => vec![c.forward_read_index().await; reads.len()],
            None => vec![Self::lost(); reads.len()],
        }
    }

    fn lost() -> ForwardReply {
        ForwardReply::Unavailable(
            "this node is stopping; the read index was not asked of the leader; retrying is safe"
                .into(),
        )
    }
}

/// A read index this node's leadership confirmed, which its state machine
/// may not have applied yet (it applies on a task of its own, behind the
/// commit the index covers). Only [`Unapplied::handed_on`] opens it, to a
/// caller that waits for it to be applied where the read is served
/// ([`Consensus::wait_applied`]): a read that skipped the wait at the
/// leader could miss an acknowledged write.
#[must_use = "a read index must be applied where the read is served"]
struct Unapplied(u64);

impl Unapplied {
    fn handed_on(self) -> u64 {
        self.0
    }
}

/// A forward call that got no reply, as the reply of each request it
/// carried.
fn failed_forward(e: Error) -> ForwardReply {
    match e {
        Error::Unavailable(m) => ForwardReply::Unavailable(m),
        Error::Internal(m) => ForwardReply::Internal(m),
        e => ForwardReply::Internal(e.to_string()),
    }
}

fn reply_error(reply: ForwardReply) -> Error {
    match reply {
        ForwardReply::Unavailable(m) => Error::Unavailable(m),
        ForwardReply::Internal(m) => Error::Internal(m),
        ForwardReply::Invalid { field, message } => Error::InvalidArgument { field, message },
        ForwardReply::TooLarge { field, message } => Error::TooLarge { field, message },
        ForwardReply::NoSpace(m) => Error::NoSpace(m),
        other => Error::Internal(format!("unexpected reply from the leader: {other:?}")),
    }
}

#[cfg(test)]
mod stopped {
    use super::*;

    /// A node whose Raft stopped (its storage failed) tells clients to go
    /// elsewhere; INTERNAL would blame their request.
    #[test]
    fn a_stopped_raft_is_unavailable_to_clients() {
        let e = membership_result::<()>(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)));
        assert!(matches!(e, Err(Error::Unavailable(_))), "{e:?}");
        let status = crate::error::to_status(e.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    /// A forward call that failed inside (the leader's reply did not
    /// decode) reaches the client with the failure's words once: the
    /// follower passes the message on, not the error's display, which
    /// would prefix "internal error:" a second time.
    #[test]
    fn a_failed_forward_keeps_one_internal_error_prefix() {
        let e = reply_error(failed_forward(Error::Internal(
            "the leader's reply did not decode".into(),
        )));
        let shown = crate::error::to_status(e).message().to_string();
        assert_eq!(
            shown.matches("internal error").count(),
            1,
            "the client sees: {shown}"
        );
        assert!(shown.contains("did not decode"), "{shown}");
        // Unavailable stays Unavailable, so a client retries elsewhere.
        let e = reply_error(failed_forward(Error::Unavailable("no leader".into())));
        assert_eq!(crate::error::to_status(e).code(), tonic::Code::Unavailable);
    }
}
