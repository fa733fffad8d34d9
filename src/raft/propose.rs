//! The leader's proposals: concurrent writes share one Raft entry.
//!
//! Every write a leader proposes (from its own client port or forwarded by
//! a follower) joins one queue ([`super::coalesce`]). While fewer than
//! [`MAX_IN_FLIGHT`] entries are on their way through Raft, a write is
//! proposed at once, alone: an idle leader adds no wait. Once that many are
//! in flight, writes queue, and the next entry to go takes everything queued
//! (up to [`MAX_COMMANDS`] commands and [`MAX_WEIGHT`] bytes) as one
//! [`Command::Many`]. The state machine applies its commands in order at
//! the entry's one stamp, each with its own outcome and its own tokens,
//! exactly as separate entries would have been applied; so a coalesced
//! entry changes what a write costs, never what it does. A sweep or a
//! state hash is never coalesced.

use std::time::Duration;

use openraft::errors::{ClientWriteError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;

use super::clock::LeaderClock;
use super::coalesce::{Coalescer, Limits, Sink};
use super::{NodeId, PeerNode, Raft, Response, ServerState, Vote};
use crate::record::{Command, Outcome, Request};
use crate::store::StateMachineStore;

/// Entries in flight at once before writes start to share one.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most commands in one coalesced entry.
pub const MAX_COMMANDS: usize = 512;
/// About the most bytes of commands in one coalesced entry (the first
/// command always goes, whatever its size).
pub const MAX_WEIGHT: usize = 1 << 20;

/// Why a proposal did not get a decision.
#[derive(Debug, Clone)]
pub(super) enum Refused {
    /// This node does not lead (the leader it knows, if any).
    NotLeader(Option<(NodeId, PeerNode)>),
    /// Not committed within the timeout (it may still commit).
    TimedOut,
    /// openraft refused the write.
    Failed(String),
    /// Raft stopped on a fatal error.
    Stopped(String),
}

struct Inner {
    raft: Raft,
    sm: StateMachineStore,
    clock: LeaderClock,
    timeout: Duration,
}

/// Proposes writes on the leader, coalescing them under load.
#[derive(Clone)]
pub(super) struct Proposer {
    queue: Coalescer<Inner>,
}

impl Proposer {
    pub fn new(raft: Raft, sm: StateMachineStore, timeout: Duration) -> Proposer {
        let inner = Inner {
            raft,
            sm,
            clock: LeaderClock::default(),
            timeout,
        };
        let limits = Limits {
            in_flight: MAX_IN_FLIGHT,
            items: MAX_COMMANDS,
            weight: MAX_WEIGHT,
        };
        Proposer {
            queue: Coalescer::new(inner, limits),
        }
    }

    /// The stamp a command proposed now gets (SPEC §2 Time).
    pub fn stamp(&self) -> u64 {
        self.queue.sink().stamp()
    }

    /// This node's clock as leader, sent with every append it sends; 0
    /// when it does not lead (a deposed leader's replication still
    /// running).
    pub fn leader_clock(&self) -> u64 {
        self.queue.sink().leader_stamp().unwrap_or(0)
    }

    /// Propose `command` and wait for the state machine's decision (the
    /// caller checked that this node leads; if it stops leading meanwhile,
    /// openraft names the new leader).
    pub async fn propose(&self, command: Command) -> Result<Response, Refused> {
        if goes_alone(&command) {
            return self.queue.sink().write(command).await;
        }
        self.queue.submit(command).await
    }

    /// Propose `commands` together, in one entry where the limits allow
    /// (a follower's forwarded writes); one decision per command, in order.
    pub async fn propose_all(&self, commands: Vec<Command>) -> Vec<Result<Response, Refused>> {
        if commands.iter().any(goes_alone) {
            return futures::future::join_all(commands.into_iter().map(|c| self.propose(c))).await;
        }
        self.queue.submit_all(commands).await
    }
}

/// A sweep or a state hash: always an entry of its own, never coalesced.
fn goes_alone(command: &Command) -> bool {
    matches!(command, Command::Sweep { .. } | Command::Hash)
}

impl Sink for Inner {
    type Item = Command;
    type Reply = Result<Response, Refused>;

    fn weight(command: &Command) -> usize {
        command.weight()
    }

    async fn send(&self, mut commands: Vec<Command>) -> Vec<Self::Reply> {
        let n = commands.len();
        if n == 1 {
            return vec![self.write(commands.pop().expect("one")).await];
        }
        match self.write(Command::Many(commands)).await {
            Ok(Ok(Outcome::Many(outs))) if outs.len() == n => outs.into_iter().map(Ok).collect(),
            Ok(other) => {
                let why = format!("a coalesced entry of {n} commands was answered with {other:?}");
                vec![Err(Refused::Failed(why)); n]
            }
            Err(e) => vec![Err(e); n],
        }
    }

    fn lost() -> Self::Reply {
        Err(Refused::Failed("the proposal was dropped".into()))
    }
}

/// The leader a vote is for, as `(term, node)`: in openraft's order, so
/// a later leader's key is greater, even one of the same term.
pub(super) fn leader_key(vote: &Vote) -> (u64, NodeId) {
    use openraft::vote::RaftLeaderId;
    let id = vote.leader_id();
    (id.term(), *id.node_id())
}

impl Inner {
    /// The stamp a command proposed now gets: this node's leader clock
    /// when it leads; else its reading (the write is refused anyway).
    fn stamp(&self) -> u64 {
        self.leader_stamp().unwrap_or_else(|| self.sm.now_ms())
    }

    /// The stamp of this node's leader clock now, if it leads. The leader
    /// id and the role come from one look at the metrics, so a node that
    /// just learned of a newer term never starts a leader clock for it.
    fn leader_stamp(&self) -> Option<u64> {
        let leader = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader {
                return None;
            }
            leader_key(&m.vote)
        };
        let time = self.sm.time();
        let stamp = self.clock.stamp(
            time.now(),
            leader.0,
            || self.sm.now_ms(),
            self.sm.clock_ms(),
            time.wall_ms(),
        );
        // Leading, this node's own clock is the leader's clock.
        self.sm.heard_leader_clock(leader, stamp);
        Some(stamp)
    }

    async fn write(&self, command: Command) -> Result<Response, Refused> {
        let request = Request {
            stamped_ms: self.stamp(),
            command: std::sync::Arc::new(command),
        };
        match tokio::time::timeout(self.timeout, self.raft.client_write(request)).await {
            Err(_) => Err(Refused::TimedOut),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(Refused::NotLeader(f.leader_id.zip(f.leader_node)))
            }
            Ok(Err(RaftError::APIError(e))) => Err(Refused::Failed(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(Refused::Stopped(e.to_string())),
        }
    }
}
