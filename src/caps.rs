//! The caps of a port, as a tower layer in front of every gRPC service of
//! one server.
//!
//! - In flight: a call that finds `max` calls already running is answered
//!   at once with `RESOURCE_EXHAUSTED`, reason `OVERLOADED`, without reaching
//!   its handler, so it changed nothing and may be retried. Health checks
//!   pass uncounted, so an orchestrator does not restart a node for being
//!   busy.
//! - Await: a call that may wait for minutes does not hold an in-flight
//!   slot; it has caps of its own, per node and per namespace
//!   ([`AwaitCaps`]), taken by its handler once it knows the namespace.
//! - Health `Watch`: each open stream holds a slot of its own cap
//!   ([`CappedHealth`]) until the stream ends; plain health checks are not
//!   counted anywhere.
//! - Message size: gRPC refuses a message over the port's size cap before
//!   decoding it, with `OUT_OF_RANGE`; the layer turns that into the
//!   `RESOURCE_EXHAUSTED` the spec promises for "too large", naming the
//!   setting.
//!
//! Why not tower's `ConcurrencyLimit` + `LoadShed`: the first queues a call
//! instead of refusing it, and the second refuses with a boxed `Overloaded`
//! error that tonic turns into `UNKNOWN`; the spec needs an immediate
//! `RESOURCE_EXHAUSTED` with reason `OVERLOADED` (safe to retry), health
//! checks and Awaits left out of the count, and the size refusal rewritten.
//! That is one semaphore and a path check, kept here.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::StreamExt;
use tokio::sync::Semaphore;
use tonic::codegen::http;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::error::to_status;
use crate::error::Error;

const HEALTH_PATH: &str = "/grpc.health.v1.Health/";
/// Await has its own caps ([`AwaitCaps`]) instead of an in-flight slot.
const AWAIT_PATH: &str = "/idemkv.v1.Idempotency/Await";

/// Cap on the calls running at once on one port.
#[derive(Clone)]
pub struct InFlightLayer {
    permits: Arc<Semaphore>,
    max: usize,
    /// Names the setting in the refusal (`max_in_flight`, ...).
    setting: &'static str,
    /// The message size setting of this port (`max_message_bytes`, ...).
    size_setting: &'static str,
}

impl InFlightLayer {
    pub fn new(max: usize, setting: &'static str, size_setting: &'static str) -> Self {
        InFlightLayer {
            permits: Arc::new(Semaphore::new(max)),
            max,
            setting,
            size_setting,
        }
    }
}

/// gRPC's percent-encoding of `grpc-message`, undone.
fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (s[i], s.get(i + 1).copied(), s.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A trailers-only `OUT_OF_RANGE` answer about the message length, rewritten
/// as `RESOURCE_EXHAUSTED` naming the size setting; anything else as is.
fn too_large<R: Default>(resp: http::Response<R>, size_setting: &str) -> http::Response<R> {
    let h = resp.headers();
    if h.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return resp;
    }
    let msg = h
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    if !msg.contains("message length too large") {
        return resp;
    }
    to_status(Error::too_large(
        "message",
        format!("over this port's {size_setting}: {msg}"),
    ))
    .into_http()
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            cap: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    cap: InFlightLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for InFlight<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let size_setting = self.cap.size_setting;
        let path = req.uri().path();
        if path.starts_with(HEALTH_PATH) || path == AWAIT_PATH {
            return Box::pin(self.inner.call(req));
        }
        match self.cap.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let answer = fut.await;
                    drop(permit);
                    answer.map(|r| too_large(r, size_setting))
                })
            }
            Err(_) => {
                crate::metrics::overloaded();
                let status = to_status(Error::Overloaded(format!(
                    "{}: {} calls are already running on this node; retry later",
                    self.cap.setting, self.cap.max
                )));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The caps on Await calls waiting at once on one node: `max_awaits` in all,
/// `max_awaits_per_namespace` in any one namespace.
pub struct AwaitCaps {
    max: usize,
    per_namespace: usize,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    total: usize,
    /// Only namespaces with a waiting Await have an entry.
    by_namespace: HashMap<String, usize>,
}

impl AwaitCaps {
    pub fn new(max: usize, per_namespace: usize) -> Arc<Self> {
        Arc::new(AwaitCaps {
            max,
            per_namespace,
            waiting: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Every update is a pair of counter changes made together; a panic
        // cannot leave them half done.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one Await in `namespace`, or `Overloaded` naming the cap
    /// that is reached. The slot is given back when the permit drops.
    pub fn try_acquire(self: &Arc<Self>, namespace: &str) -> Result<AwaitPermit, Error> {
        let mut w = self.lock();
        if w.total >= self.max {
            crate::metrics::overloaded();
            return Err(Error::Overloaded(format!(
                "max_awaits: {} Await calls are already waiting on this node; retry later",
                self.max
            )));
        }
        let in_ns = w.by_namespace.get(namespace).copied().unwrap_or(0);
        if in_ns >= self.per_namespace {
            crate::metrics::overloaded();
            return Err(Error::Overloaded(format!(
                "max_awaits_per_namespace: {} Await calls are already waiting in namespace {namespace:?} on this node; retry later",
                self.per_namespace
            )));
        }
        w.total += 1;
        w.by_namespace.insert(namespace.to_string(), in_ns + 1);
        Ok(AwaitPermit {
            caps: self.clone(),
            namespace: namespace.to_string(),
        })
    }
}

/// One Await's slot; dropping it frees the slot.
pub struct AwaitPermit {
    caps: Arc<AwaitCaps>,
    namespace: String,
}

impl Drop for AwaitPermit {
    fn drop(&mut self) {
        let mut w = self.caps.lock();
        w.total = w.total.saturating_sub(1);
        if let Some(n) = w.by_namespace.get_mut(&self.namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.by_namespace.remove(&self.namespace);
            }
        }
    }
}

/// The health service with a cap on open `Watch` streams
/// (`max_health_watches`): each stream holds a slot until it ends or its
/// client goes away. `Check` is passed through uncounted.
pub struct CappedHealth<H> {
    inner: H,
    watches: Arc<Semaphore>,
    max: usize,
}

impl<H> CappedHealth<H> {
    pub fn new(inner: H, max: usize) -> Self {
        CappedHealth {
            inner,
            watches: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

type HealthStream =
    Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl<H: Health> Health for CappedHealth<H> {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthStream>, tonic::Status> {
        let Ok(slot) = self.watches.clone().try_acquire_owned() else {
            crate::metrics::overloaded();
            return Err(to_status(Error::Overloaded(format!(
                "max_health_watches: {} health Watch streams are already open on this node; use Check, or retry later",
                self.max
            ))));
        };
        let stream = self.inner.watch(request).await?.into_inner();
        // The slot lives as long as the stream.
        let held: HealthStream = Box::pin(stream.map(move |item| {
            let _slot = &slot;
            item
        }));
        Ok(tonic::Response::new(held))
    }
}
