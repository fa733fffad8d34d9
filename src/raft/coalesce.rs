//! A queue that sends work one item at a time while the line is free and in
//! groups once it is busy: the leader's proposals (many writes, one Raft
//! entry) and a follower's forwards (many writes, one call to the leader)
//! both go through one.
//!
//! While fewer than [`Limits::in_flight`] sends are under way, an item goes
//! at once, alone: an idle line adds no wait. Beyond that, items queue, and
//! the next send takes everything queued (up to [`Limits::items`] items and
//! about [`Limits::weight`] bytes). Sends run in tasks of their own, so a
//! caller that goes away (a client that hangs up) never takes the other
//! callers' items with it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Where a coalescer's groups go.
pub(super) trait Sink: Send + Sync + 'static {
    type Item: Send + 'static;
    type Reply: Send + 'static;
    /// About the bytes `item` adds to a group.
    fn weight(item: &Self::Item) -> usize;
    /// Send `items` together; exactly one reply per item, in their order.
    fn send(&self, items: Vec<Self::Item>) -> impl Future<Output = Vec<Self::Reply>> + Send;
    /// The reply of an item whose send was lost (its task ended early).
    fn lost() -> Self::Reply;
}

/// How much may be under way and how big a group gets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Sends under way at once before items start to share one.
    pub in_flight: usize,
    /// Most items in one send.
    pub items: usize,
    /// About the most bytes in one send (the first item always goes,
    /// whatever its size).
    pub weight: usize,
}

struct Waiting<S: Sink> {
    item: S::Item,
    reply: oneshot::Sender<S::Reply>,
}

struct Queue<S: Sink> {
    waiting: VecDeque<Waiting<S>>,
    in_flight: usize,
}

struct Shared<S: Sink> {
    sink: S,
    limits: Limits,
    queue: Mutex<Queue<S>>,
}

/// Sends items to a [`Sink`], grouping them under load; cheap to clone.
pub(super) struct Coalescer<S: Sink> {
    shared: Arc<Shared<S>>,
}

impl<S: Sink> Clone for Coalescer<S> {
    fn clone(&self) -> Self {
        Coalescer {
            shared: self.shared.clone(),
        }
    }
}

impl<S: Sink> Coalescer<S> {
    pub fn new(sink: S, limits: Limits) -> Self {
        Coalescer {
            shared: Arc::new(Shared {
                sink,
                limits,
                queue: Mutex::new(Queue {
                    waiting: VecDeque::new(),
                    in_flight: 0,
                }),
            }),
        }
    }

    pub fn sink(&self) -> &S {
        &self.shared.sink
    }

    /// Send `item` (alone or with others) and wait for its reply.
    pub async fn submit(&self, item: S::Item) -> S::Reply {
        let alone = {
            let mut q = self.shared.queue();
            let free = q.in_flight < self.shared.limits.in_flight && q.waiting.is_empty();
            q.in_flight += usize::from(free);
            free
        };
        if alone {
            // An idle line: send from this task, with no task to spawn and
            // wake. The slot is handed on when this send ends or is dropped.
            let slot = Slot(&self.shared);
            let mut replies = self.shared.sink.send(vec![item]).await;
            drop(slot);
            return replies.pop().unwrap_or_else(S::lost);
        }
        let rx = self.enqueue(vec![item]).pop().expect("one item, one reply");
        rx.await.unwrap_or_else(|_| S::lost())
    }

    /// Send `items` together (one group, as far as the limits allow, never
    /// split by the idle line's send-alone rule) and wait for every reply,
    /// in their order. For items that arrived together and are answered
    /// together (a follower's forwarded writes): sent one by one, the
    /// first would go alone and the rest only after it, and the answer to
    /// all of them would wait for both.
    pub async fn submit_all(&self, items: Vec<S::Item>) -> Vec<S::Reply> {
        if items.is_empty() {
            return Vec::new();
        }
        futures::future::join_all(self.enqueue(items))
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|_| S::lost()))
            .collect()
    }

    /// Queue `items` in one go, and start a send in a task of its own if a
    /// slot is free; their replies come on the receivers, in order.
    fn enqueue(&self, items: Vec<S::Item>) -> Vec<oneshot::Receiver<S::Reply>> {
        let mut replies = Vec::with_capacity(items.len());
        let start = {
            let mut q = self.shared.queue();
            for item in items {
                let (tx, rx) = oneshot::channel();
                q.waiting.push_back(Waiting { item, reply: tx });
                replies.push(rx);
            }
            if q.in_flight < self.shared.limits.in_flight {
                q.in_flight += 1;
                Some(self.shared.take(&mut q))
            } else {
                None
            }
        };
        if let Some(group) = start {
            tokio::spawn(self.shared.clone().run(group));
        }
        replies
    }
}

/// A send slot taken by [`Coalescer::submit`] for its own item: once that
/// send ends (or its caller goes away), what queued meanwhile goes on in a
/// task of its own, or the slot is freed.
struct Slot<'a, S: Sink>(&'a Arc<Shared<S>>);

impl<S: Sink> Drop for Slot<'_, S> {
    fn drop(&mut self) {
        let shared = self.0;
        let mut q = shared.queue();
        let runtime = tokio::runtime::Handle::try_current();
        match (q.waiting.is_empty(), runtime) {
            (false, Ok(rt)) => {
                let group = shared.take(&mut q);
                drop(q);
                rt.spawn(shared.clone().run(group));
            }
            (true, _) => q.in_flight -= 1,
            // No runtime to send them from (it is shutting down): their
            // callers get `lost`.
            (false, Err(_)) => {
                q.waiting.clear();
                q.in_flight -= 1;
            }
        }
    }
}

impl<S: Sink> Shared<S> {
    fn queue(&self) -> MutexGuard<'_, Queue<S>> {
        // Every change under this lock is a push, a pop or a count.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the next send's worth of queued items.
    fn take(&self, q: &mut Queue<S>) -> Vec<Waiting<S>> {
        let mut group = Vec::new();
        let mut weight = 0;
        while let Some(w) = q.waiting.front() {
            let wt = S::weight(&w.item);
            if !group.is_empty()
                && (group.len() == self.limits.items || weight + wt > self.limits.weight)
            {
                break;
            }
            weight += wt;
            group.extend(q.waiting.pop_front());
        }
        group
    }

    /// Send `group`, then whatever queued meanwhile, until the queue is
    /// empty; this task's slot in flight is then free.
    async fn run(self: Arc<Self>, mut group: Vec<Waiting<S>>) {
        loop {
            let (items, replies): (Vec<_>, Vec<_>) =
                group.into_iter().map(|w| (w.item, w.reply)).unzip();
            let n = replies.len();
            let mut answers = self.sink.send(items).await.into_iter();
            for reply in replies {
                let _ = reply.send(answers.next().unwrap_or_else(S::lost));
            }
            debug_assert!(answers.next().is_none(), "{n} items got more replies");
            let mut q = self.queue();
            if q.waiting.is_empty() {
                q.in_flight -= 1;
                return;
            }
            group = self.take(&mut q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Replies with each item doubled after a yield; counts sends.
    #[derive(Default)]
    struct Doubler {
        sends: AtomicUsize,
        biggest: AtomicUsize,
    }

    impl Sink for Doubler {
        type Item = u32;
        type Reply = Option<u32>;
        fn weight(_: &u32) -> usize {
            4
        }
        async fn send(&self, items: Vec<u32>) -> Vec<Option<u32>> {
            self.sends.fetch_add(1, Ordering::Relaxed);
            self.biggest.fetch_max(items.len(), Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            items.into_iter().map(|i| Some(i * 2)).collect()
        }
        fn lost() -> Option<u32> {
            None
        }
    }

    /// A coalescer over a [`Doubler`]: `in_flight` sends at once, at most
    /// 50 items each.
    fn doubler(in_flight: usize) -> Coalescer<Doubler> {
        let limits = Limits {
            in_flight,
            items: 50,
            weight: 1 << 20,
        };
        Coalescer::new(Doubler::default(), limits)
    }

    #[tokio::test(start_paused = true)]
    async fn each_item_gets_its_own_reply_and_a_busy_line_groups_them() {
        let c = doubler(2);
        let calls = (0..300u32).map(|i| {
            let c = c.clone();
            async move { (i, c.submit(i).await) }
        });
        for (i, got) in futures::future::join_all(calls).await {
            assert_eq!(got, Some(i * 2));
        }
        let sends = c.sink().sends.load(Ordering::Relaxed);
        assert!(sends < 300 / 10, "300 items took {sends} sends");
        assert!(c.sink().biggest.load(Ordering::Relaxed) <= 50);
        // An idle line sends at once, alone.
        assert_eq!(c.submit(7).await, Some(14));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_gone_mid_send_leaves_no_one_queued_behind_it_stranded() {
        let c = doubler(1);
        // The first caller sends from its own task and gives up 1 ms into
        // its 5 ms send; two more queue behind it meanwhile.
        let first = {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(1), c.submit(1)).await
            })
        };
        tokio::task::yield_now().await;
        let later: Vec<_> = [2u32, 3]
            .into_iter()
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.submit(i).await })
            })
            .collect();
        assert!(first.await.unwrap().is_err(), "the first caller gave up");
        for (i, h) in [2u32, 3].into_iter().zip(later) {
            let got = tokio::time::timeout(Duration::from_secs(5), h).await;
            assert_eq!(got.ok().map(|r| r.unwrap()), Some(Some(i * 2)), "item {i}");
        }
        // And the line is free again.
        assert_eq!(c.submit(7).await, Some(14));
    }

    /// Replies to each item with the moment its send began, on a counter
    /// that each submission also advances.
    #[derive(Default)]
    struct Stamper {
        clock: AtomicUsize,
        sends: AtomicUsize,
    }

    impl Sink for Stamper {
        type Item = usize;
        type Reply = usize;
        fn weight(_: &usize) -> usize {
            0
        }
        async fn send(&self, items: Vec<usize>) -> Vec<usize> {
            let began = self.clock.fetch_add(1, Ordering::SeqCst);
            self.sends.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            vec![began; items.len()]
        }
        fn lost() -> usize {
            0
        }
    }

    /// What a follower's shared read-index calls rest on: an item never
    /// joins a send that began before it was submitted. 200 items, one
    /// every 0.25 ms, over 5 ms sends, one at a time.
    #[tokio::test(start_paused = true)]
    async fn an_item_never_joins_a_send_already_under_way() {
        let limits = Limits {
            in_flight: 1,
            items: usize::MAX,
            weight: usize::MAX,
        };
        let c = Coalescer::new(Stamper::default(), limits);
        let calls: Vec<_> = (0..200u64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(250 * i)).await;
                    let submitted = c.sink().clock.fetch_add(1, Ordering::SeqCst);
                    (submitted, c.submit(submitted).await)
                })
            })
            .collect();
        for call in calls {
            let (submitted, began) = call.await.unwrap();
            assert!(
                began > submitted,
                "an item submitted at {submitted} went in a send begun at {began}"
            );
        }
        let sends = c.sink().sends.load(Ordering::Relaxed);
        assert!(sends < 100, "200 items took {sends} sends");
    }

    #[tokio::test(start_paused = true)]
    async fn items_submitted_together_go_in_one_send_busy_line_or_idle() {
        let c = doubler(2);
        // Idle: one send for all, each its own reply in order.
        assert_eq!(
            c.submit_all((0..20).collect()).await,
            (0..20).map(|i| Some(i * 2)).collect::<Vec<_>>()
        );
        assert_eq!(c.sink().sends.load(Ordering::Relaxed), 1);
        // Busy (both slots taken by lone items): they queue together and go
        // in the one send after.
        let busy: Vec<_> = [100u32, 101]
            .into_iter()
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.submit(i).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let together = c.submit_all((0..30).collect()).await;
        assert_eq!(together, (0..30).map(|i| Some(i * 2)).collect::<Vec<_>>());
        for (i, h) in [100u32, 101].into_iter().zip(busy) {
            assert_eq!(h.await.unwrap(), Some(i * 2));
        }
        assert_eq!(c.sink().sends.load(Ordering::Relaxed), 4);
        assert_eq!(c.sink().biggest.load(Ordering::Relaxed), 30);
        // Nothing to send: no send.
        assert!(c.submit_all(Vec::new()).await.is_empty());
        assert_eq!(c.sink().sends.load(Ordering::Relaxed), 4);
    }
}
