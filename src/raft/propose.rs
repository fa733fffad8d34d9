//! The leader's proposals: concurrent writes share one Raft entry.
//!
//! Every write a leader proposes (from its own client port or forwarded by
//! a follower) joins one queue. While fewer than [`MAX_IN_FLIGHT`] entries
//! are on their way through Raft, a write is proposed at once, alone: an
//! idle leader adds no wait. Once that many are in flight, writes queue, and
//! the next entry to go takes everything queued (up to [`MAX_COMMANDS`]
//! commands and [`MAX_WEIGHT`] bytes) as one [`Command::Many`]. The state
//! machine applies its commands in order at the entry's one stamp, each
//! with its own outcome and its own tokens, exactly as separate entries
//! would have been applied; so a coalesced entry changes what a write
//! costs, never what it does. A sweep is never coalesced.
//!
//! Proposals run in tasks of their own, so a caller that goes away (a
//! client that hangs up) never takes other callers' writes with it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{ClientWriteError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use tokio::sync::oneshot;

use super::clock::LeaderClock;
use super::{NodeId, PeerNode, Raft, Response};
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

type Reply = oneshot::Sender<Result<Response, Refused>>;

struct Waiting {
    command: Command,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    in_flight: usize,
}

struct Inner {
    raft: Raft,
    sm: StateMachineStore,
    clock: LeaderClock,
    timeout: Duration,
    queue: Mutex<Queue>,
}

/// Proposes writes on the leader, coalescing them under load.
#[derive(Clone)]
pub(super) struct Proposer {
    inner: Arc<Inner>,
}

impl Proposer {
    pub fn new(raft: Raft, sm: StateMachineStore, timeout: Duration) -> Proposer {
        Proposer {
            inner: Arc::new(Inner {
                raft,
                sm,
                clock: LeaderClock::default(),
                timeout,
                queue: Mutex::new(Queue::default()),
            }),
        }
    }

    /// The stamp a command proposed now gets (SPEC §2 Time).
    pub fn stamp(&self) -> u64 {
        self.inner.stamp()
    }

    /// Propose `command` and wait for the state machine's decision (the
    /// caller checked that this node leads; if it stops leading meanwhile,
    /// openraft names the new leader).
    pub async fn propose(&self, command: Command) -> Result<Response, Refused> {
        if matches!(command, Command::Sweep { .. }) {
            return self.inner.write(command).await;
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.inner.queue();
            q.waiting.push_back(Waiting { command, reply: tx });
            if q.in_flight < MAX_IN_FLIGHT {
                q.in_flight += 1;
                Some(take(&mut q))
            } else {
                None
            }
        };
        if let Some(batch) = start {
            tokio::spawn(self.inner.clone().run(batch));
        }
        rx.await
            .unwrap_or_else(|_| Err(Refused::Failed("the proposal was dropped".into())))
    }
}

/// Take the next entry's worth of queued writes.
fn take(q: &mut Queue) -> Vec<Waiting> {
    let mut batch = Vec::new();
    let mut weight = 0;
    while let Some(w) = q.waiting.front() {
        let wt = w.command.weight();
        if !batch.is_empty() && (batch.len() == MAX_COMMANDS || weight + wt > MAX_WEIGHT) {
            break;
        }
        weight += wt;
        batch.extend(q.waiting.pop_front());
    }
    batch
}

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp(&self) -> u64 {
        let time = self.sm.time();
        let term = self.raft.metrics().borrow_watched().current_term;
        self.clock.stamp(
            time.now(),
            term,
            self.sm.now_ms(),
            self.sm.clock_ms(),
            time.wall_ms(),
        )
    }

    /// Propose `batch`, then whatever queued meanwhile, until the queue is
    /// empty; this task's slot in flight is then free.
    async fn run(self: Arc<Self>, mut batch: Vec<Waiting>) {
        loop {
            self.propose_batch(batch).await;
            let mut q = self.queue();
            if q.waiting.is_empty() {
                q.in_flight -= 1;
                return;
            }
            batch = take(&mut q);
        }
    }

    async fn propose_batch(&self, mut batch: Vec<Waiting>) {
        if batch.len() == 1 {
            let w = batch.pop().expect("one");
            let res = self.write(w.command).await;
            let _ = w.reply.send(res);
            return;
        }
        let (commands, replies): (Vec<Command>, Vec<Reply>) =
            batch.into_iter().map(|w| (w.command, w.reply)).unzip();
        let n = commands.len();
        match self.write(Command::Many(commands)).await {
            Ok(Ok(Outcome::Many(outs))) if outs.len() == n => {
                for (reply, out) in replies.into_iter().zip(outs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Ok(other) => {
                let why = format!("a coalesced entry of {n} commands was answered with {other:?}");
                for reply in replies {
                    let _ = reply.send(Err(Refused::Failed(why.clone())));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn write(&self, command: Command) -> Result<Response, Refused> {
        let request = Request {
            stamped_ms: self.stamp(),
            command,
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
