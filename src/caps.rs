//! The caps of a port, as a tower layer in front of every gRPC service of
//! one server.
//!
//! - In flight: a call that finds `max` calls already running is answered
//!   at once with `RESOURCE_EXHAUSTED`, reason `OVERLOADED`, without reaching
//!   its handler, so it changed nothing and may be retried. Health checks
//!   pass uncounted, so an orchestrator does not restart a node for being
//!   busy.
//! - Message size: gRPC refuses a message over the port's size cap before
//!   decoding it, with `OUT_OF_RANGE`; the layer turns that into the
//!   `RESOURCE_EXHAUSTED` the spec promises for "too large", naming the
//!   setting.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::http;

use crate::api::status::to_status;
use crate::error::Error;

const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

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
        if req.uri().path().starts_with(HEALTH_PATH) {
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
                let status = to_status(Error::Overloaded(format!(
                    "{}: {} calls are already running on this node; retry later",
                    self.cap.setting, self.cap.max
                )));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
