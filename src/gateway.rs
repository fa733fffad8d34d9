//! The HTTP gateway (SPEC §8): Idempotency-Key, as the IETF httpapi draft
//! describes it, in front of any HTTP service. A request on a guarded
//! method that carries the header is claimed in idemkv before the upstream
//! sees it; the upstream's response is saved with Complete and replayed to
//! every retry. The rules stay in the store: this edge only maps HTTP to
//! Claim / Renew / Complete / Release / Await and the outcomes back.
//!
//! Must not: call the upstream for a guarded request without holding its
//! claim; save a response after its lease was lost (the store refuses the
//! Complete); call the upstream twice for a response too large to save (its
//! record is completed with a marker instead).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::client::{Client, ClientError};
use crate::pb::api::{self, claim_response::Outcome};
use crate::wire::Reason;

/// The header the draft names.
pub const KEY_HEADER: &str = "idempotency-key";
/// Added to every replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Set when the response was too large to save: a retry gets its status
/// and saved headers, without the body, and the upstream is not called.
pub const UNSAVED_HEADER: &str = "idempotent-response-unsaved";
/// Longest Idempotency-Key value taken (Stripe's limit).
pub const KEY_MAX: usize = 255;

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Base URL of the service behind the gateway (`http://host:port`).
    pub upstream: Uri,
    pub namespace: String,
    /// Methods whose requests are guarded when they carry the header.
    pub methods: Vec<Method>,
    /// Path prefixes, by whole segments, where a guarded method must carry
    /// the header (400 without it).
    pub require_key: Vec<String>,
    /// The request header whose value scopes keys (one caller's key never
    /// meets another's); stored hashed.
    pub scope_header: Option<HeaderName>,
    /// Response headers saved and replayed with the status and body.
    pub save_headers: Vec<HeaderName>,
    pub lease: Duration,
    pub retention: Duration,
    /// How long a request that finds its key in progress awaits the
    /// first one's response before answering 409 (0: at once).
    pub wait: Duration,
    /// Save 5xx responses too (by default they release the claim, so a
    /// retry calls the upstream again).
    pub save_5xx: bool,
    /// Largest request body taken and response body saved, bytes.
    pub max_body: usize,
    /// How long the upstream may take to answer and send a body the
    /// gateway saves; past it the claim is released and the caller gets 504.
    pub upstream_timeout: Duration,
}

/// A saved response, the Complete's result.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// The body was not saved: it was this many bytes or more.
    unsaved: Option<u64>,
}

/// The gateway: an idemkv client and an HTTP client for the upstream.
pub struct Gateway {
    cfg: GatewayConfig,
    store: Client,
    http: HttpClient<HttpConnector, Body>,
    /// Owner name of this gateway's claims.
    owner: String,
    /// The claimed requests running, each on a task of its own.
    work: tokio_util::task::TaskTracker,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, store: Client) -> Arc<Gateway> {
        let http = HttpClient::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let owner = format!("gateway-{}-{}", std::process::id(), uuid::Uuid::new_v4());
        Arc::new(Gateway {
            cfg,
            store,
            http,
            owner,
            work: tokio_util::task::TaskTracker::new(),
        })
    }

    /// At shutdown, once no new request comes in: wait for the claimed
    /// requests still running, whose callers may have hung up, so each
    /// response is saved (or its claim released) rather than cut off with
    /// the claim held, when a retry after the lease would call the upstream
    /// again. Bounded by the upstream timeout plus time to save; false if
    /// some were still running then.
    pub async fn finish(&self) -> bool {
        self.work.close();
        let running = self.work.len();
        if running > 0 {
            tracing::info!(running, "waiting for claimed requests to finish");
        }
        let within = self.cfg.upstream_timeout + Duration::from_secs(15);
        tokio::time::timeout(within, self.work.wait()).await.is_ok()
    }

    /// The router: every path and method goes through [`handle`].
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(self.clone())
    }
}

/// Whether reading a body failed because it is over the size limit (not
/// because it broke off or was malformed).
fn over_limit(e: &axum::Error) -> bool {
    crate::client::error::caused_by(e, |c| c.is::<http_body_util::LengthLimitError>())
}

/// An `application/problem+json` answer (RFC 9457), as the draft shows.
fn problem(status: StatusCode, title: &str, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn unavailable(e: &ClientError) -> Response {
    let mut r = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "The idempotency store cannot be reached",
        format!(
            "the request was not sent upstream; retry later ({})",
            e.message()
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let span = tracing::info_span!("gateway", method = %req.method(), path = %req.uri().path());
    gw.serve(req).instrument(span).await
}

impl Gateway {
    async fn serve(self: Arc<Self>, req: Request) -> Response {
        let guarded = self.cfg.methods.contains(req.method());
        let mut keys = req.headers().get_all(KEY_HEADER).iter();
        let key = keys.next().cloned();
        if guarded && keys.next().is_some() {
            crate::metrics::gateway("bad_key");
            return problem(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is given more than once",
                "send one Idempotency-Key header per request",
            );
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let Some(key) = key.filter(|_| guarded) else {
            if guarded
                && self
                    .cfg
                    .require_key
                    .iter()
                    .any(|p| under(req.uri().path(), p))
            {
                crate::metrics::gateway("missing_key");
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key is missing",
                    format!("{} {path} needs an Idempotency-Key header", req.method()),
                );
            }
            crate::metrics::gateway("passed_through");
            return self.forward(req).await;
        };
        let key = match key.to_str() {
            Ok(k) if (1..=KEY_MAX).contains(&k.len()) => k.to_string(),
            _ => {
                crate::metrics::gateway("bad_key");
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key is malformed",
                    format!(
                        "the Idempotency-Key value must be 1-{KEY_MAX} visible ASCII characters"
                    ),
                );
            }
        };
        let (parts, body) = req.into_parts();
        let body = match axum::body::to_bytes(body, self.cfg.max_body).await {
            Ok(b) => b,
            Err(e) if over_limit(&e) => {
                crate::metrics::gateway("too_large");
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body too large",
                    format!(
                        "a request with an Idempotency-Key may carry at most {} bytes",
                        self.cfg.max_body
                    ),
                );
            }
            // Nothing claimed yet: the caller can send it again whole.
            Err(e) => {
                crate::metrics::gateway("bad_body");
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Request body could not be read",
                    format!("the request body broke off or is malformed ({e}); nothing was done"),
                );
            }
        };
        let scope = self
            .cfg
            .scope_header
            .as_ref()
            .map_or(String::from("-"), |h| scope_of(&parts.headers, h));
        // Scope hashed, method, path (hashed when long) and the key value.
        let path_part = if path.len() <= 512 {
            path.clone()
        } else {
            hex(&Sha256::digest(path.as_bytes()))
        };
        let record_key = format!("{scope} {} {path_part} {key}", parts.method);
        let mut fp = Sha256::new();
        fp.update(parts.method.as_str());
        fp.update([0]);
        fp.update(&path);
        fp.update([0]);
        fp.update(&body);
        let claim = api::ClaimRequest {
            namespace: self.cfg.namespace.clone(),
            key: record_key.clone().into_bytes(),
            owner: self.owner.clone(),
            claim_id: uuid::Uuid::new_v4().to_string(),
            lease_ms: self.cfg.lease.as_millis() as u64,
            fingerprint: Some(fp.finalize().to_vec()),
            retention_ms: self.cfg.retention.as_millis() as u64,
            ..Default::default()
        };
        // From the claim on, on a task of its own: a caller that hangs up
        // must not drop the work half way with the claim held (its retry
        // would meet 409 until the lease ran out, the upstream never
        // called); the request is seen through and its response saved for
        // that retry instead.
        let gw = self.clone();
        let work = async move { gw.claim_and_run(claim, parts, body, record_key).await };
        self.work
            .spawn(work.in_current_span())
            .await
            .unwrap_or_else(|e| {
                problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The gateway failed",
                    e.to_string(),
                )
            })
    }

    /// Claim the request's record and act on the outcome: run it upstream,
    /// replay the saved response, or answer that another holds the key.
    async fn claim_and_run(
        self: Arc<Self>,
        claim: api::ClaimRequest,
        parts: axum::http::request::Parts,
        body: Bytes,
        record_key: String,
    ) -> Response {
        let outcome = match self.store.claim(claim).await {
            Ok(o) => o,
            Err(e) if e.reason() == Some(Reason::FingerprintMismatch.as_str()) => {
                crate::metrics::gateway("mismatch");
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Idempotency-Key reused for another request",
                    "this Idempotency-Key was first used with another method, path or body",
                );
            }
            Err(e) => return self.store_error(&e),
        };
        match outcome {
            Outcome::Acquired(a) => {
                let req = Request::from_parts(parts, Body::from(body));
                self.run_upstream(req, record_key.into_bytes(), a.token)
                    .await
            }
            Outcome::Completed(c) => {
                crate::metrics::gateway("replayed");
                replay(&c.result)
            }
            Outcome::InProgress(p) => self.in_progress(record_key.into_bytes(), &p).await,
            Outcome::Failed(f) => failed_for_good(f.attempts),
        }
    }

    fn store_error(&self, e: &ClientError) -> Response {
        use tonic::Code;
        match e.code() {
            Some(Code::InvalidArgument) | Some(Code::ResourceExhausted)
                if e.reason() != Some(Reason::NoSpace.as_str()) =>
            {
                crate::metrics::gateway("refused");
                problem(
                    StatusCode::BAD_REQUEST,
                    "Refused by the idempotency store",
                    e.message(),
                )
            }
            _ => {
                crate::metrics::gateway("unavailable");
                tracing::warn!(error = %e.message(), "idemkv unavailable: answering 503");
                unavailable(e)
            }
        }
    }

    /// Another request holds the key: await its response up to `wait`,
    /// else 409.
    async fn in_progress(&self, key: Vec<u8>, p: &api::InProgress) -> Response {
        if !self.cfg.wait.is_zero() {
            let waited = self
                .store
                .r#await(api::AwaitRequest {
                    namespace: self.cfg.namespace.clone(),
                    key,
                    timeout_ms: self.cfg.wait.as_millis() as u64,
                })
                .await;
            if let Ok(api::AwaitResponse {
                record: Some(r),
                timed_out: false,
            }) = &waited
            {
                if r.state == api::RecordState::Completed as i32 {
                    crate::metrics::gateway("replayed");
                    return replay(&r.result);
                }
                if r.state == api::RecordState::Failed as i32 {
                    return failed_for_good(r.attempts);
                }
            }
        }
        crate::metrics::gateway("in_progress");
        let mut r = problem(
            StatusCode::CONFLICT,
            "A request with this Idempotency-Key is being processed",
            format!(
                "retry after it finishes (its lease has {} ms left)",
                p.lease_remaining_ms
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }

    /// Call the upstream under the claim `token` (renewed while it runs),
    /// then save its response (or release the claim for a 5xx).
    async fn run_upstream(&self, req: Request, key: Vec<u8>, token: u64) -> Response {
        // Renewing until the answer is in (or this call ends early).
        let renew = {
            let store = self.store.clone();
            let (ns, key) = (self.cfg.namespace.clone(), key.clone());
            let lease_ms = self.cfg.lease.as_millis() as u64;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(lease_ms / 3)).await;
                    let r = store
                        .renew(api::RenewRequest {
                            namespace: ns.clone(),
                            key: key.clone(),
                            token,
                            lease_ms,
                            checkpoint: None,
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e.message(), "lease renewal failed");
                        if e.reason() == Some(Reason::LeaseLost.as_str()) {
                            return;
                        }
                    }
                }
            })
            .abort_handle()
        };
        let renew = StopOnDrop(renew);
        // The answer and the body to save within the timeout (a body too
        // large to save then streams on without it).
        let limit = tokio::time::Instant::now() + self.cfg.upstream_timeout;
        let upstream = tokio::time::timeout_at(limit, self.send(req)).await;
        let resp = match upstream {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                drop(renew);
                return self
                    .upstream_failed(key, token, "The upstream service failed", e)
                    .await;
            }
            Err(_) => {
                drop(renew);
                return self.upstream_timed_out(key, token).await;
            }
        };
        let (parts, body) = resp.into_parts();
        if parts.status.is_server_error() && !self.cfg.save_5xx {
            drop(renew);
            self.release(key, token, &format!("upstream answered {}", parts.status))
                .await;
            crate::metrics::gateway("released_5xx");
            return Response::from_parts(parts, Body::new(body));
        }
        let headers = self.saved_headers(&parts.headers);
        let collected = tokio::time::timeout_at(limit, collect(body, self.cfg.max_body)).await;
        drop(renew);
        let Ok(collected) = collected else {
            return self.upstream_timed_out(key, token).await;
        };
        let (saved, body) = match collected {
            Ok(Collected::Whole(b)) => (
                Saved {
                    status: parts.status.as_u16(),
                    headers,
                    body: b.to_vec(),
                    unsaved: None,
                },
                Body::from(b),
            ),
            Ok(Collected::TooLarge(seen, rest)) => (
                Saved {
                    status: parts.status.as_u16(),
                    headers,
                    body: Vec::new(),
                    unsaved: Some(seen as u64),
                },
                rest,
            ),
            Err(e) => {
                let title = "The upstream response broke off";
                return self.upstream_failed(key, token, title, e).await;
            }
        };
        let mut unsaved = saved.unsaved;
        let mut completed = self.save(key.clone(), token, &saved).await;
        if unsaved.is_none() && completed.as_ref().is_err_and(ClientError::is_too_large) {
            // Within --max-body but over the store's result limit (with
            // its saved headers, perhaps): saved as too large to save whole,
            // status only, so a retry replays that and never calls the
            // upstream a second time (SPEC §8). Without the headers if they
            // are what does not fit.
            let n = saved.body.len() as u64;
            unsaved = Some(n);
            for headers in [saved.headers.clone(), Vec::new()] {
                let marker = Saved {
                    status: saved.status,
                    headers,
                    body: Vec::new(),
                    unsaved: Some(n),
                };
                completed = self.save(key.clone(), token, &marker).await;
                if !completed.as_ref().is_err_and(ClientError::is_too_large) {
                    break;
                }
            }
        }
        let mut out = Response::from_parts(parts, body);
        match completed {
            Ok(_) => crate::metrics::gateway("saved"),
            Err(e) => {
                // The lease was lost (another gateway took over) or the
                // store is gone: this response was not saved, and the one
                // saved (if any) stays. The caller is told, since a retry
                // may replay another response than this one.
                tracing::warn!(error = %e.message(), "response not saved");
                crate::metrics::gateway("not_saved");
                let why = if e.reason() == Some(Reason::LeaseLost.as_str()) {
                    "not saved: the lease was lost; a retry replays the response saved by the request that took it over"
                } else {
                    "not saved: the store did not take it; a retry may call the upstream again"
                };
                out.headers_mut().insert(
                    HeaderName::from_static(UNSAVED_HEADER),
                    HeaderValue::from_static(why),
                );
                return out;
            }
        }
        if let Some(n) = unsaved {
            let why = if n as usize > self.cfg.max_body {
                format!("body over {} bytes ({n} seen)", self.cfg.max_body)
            } else {
                format!("body of {n} bytes over the store's result limit")
            };
            out.headers_mut().insert(
                HeaderName::from_static(UNSAVED_HEADER),
                HeaderValue::from_str(&why).expect("ascii"),
            );
        }
        out
    }

    /// Save `saved` as the record's result, with its status as the code.
    async fn save(&self, key: Vec<u8>, token: u64, saved: &Saved) -> Result<(), ClientError> {
        let result =
            crate::codec::encode(saved).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.store
            .complete(api::CompleteRequest {
                namespace: self.cfg.namespace.clone(),
                key,
                token,
                result,
                code: Some(i32::from(saved.status)),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// The upstream could not be reached or broke off: release the claim
    /// (a retry calls it again) and answer 502.
    async fn upstream_failed(&self, key: Vec<u8>, token: u64, title: &str, e: String) -> Response {
        self.release(key, token, &e).await;
        crate::metrics::gateway("upstream_failed");
        problem(
            StatusCode::BAD_GATEWAY,
            title,
            format!("{e}; the claim was released, so a retry calls it again"),
        )
    }

    /// No answer within `--upstream-timeout`: the call is dropped, the
    /// claim released (a retry calls the upstream again), 504.
    async fn upstream_timed_out(&self, key: Vec<u8>, token: u64) -> Response {
        let after = self.cfg.upstream_timeout;
        self.release(key, token, &format!("upstream timed out after {after:?}"))
            .await;
        crate::metrics::gateway("upstream_timeout");
        problem(
            StatusCode::GATEWAY_TIMEOUT,
            "The upstream service timed out",
            format!(
                "no whole answer within {after:?}; the claim was released, so a retry calls it again"
            ),
        )
    }

    async fn release(&self, key: Vec<u8>, token: u64, why: &str) {
        let r = self
            .store
            .release(api::ReleaseRequest {
                namespace: self.cfg.namespace.clone(),
                key,
                token,
                error: why.to_string(),
                permanent: false,
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e.message(), "release failed; the lease will run out instead");
        }
    }

    fn saved_headers(&self, h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        self.cfg
            .save_headers
            .iter()
            .flat_map(|n| {
                h.get_all(n)
                    .iter()
                    .map(move |v| (n.to_string(), v.as_bytes().to_vec()))
            })
            .collect()
    }

    /// Send `req` to the upstream, its path and query on the upstream's base.
    async fn send(&self, req: Request) -> Result<Response, String> {
        let (mut parts, body) = req.into_parts();
        let base = &self.cfg.upstream;
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let prefix = base.path().trim_end_matches('/');
        parts.uri = format!(
            "{}://{}{prefix}{pq}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map_or("", |a| a.as_str())
        )
        .parse()
        .map_err(|e| format!("upstream URL: {e}"))?;
        for h in HOP_BY_HOP {
            parts.headers.remove(*h);
        }
        parts.headers.remove(header::HOST);
        let resp = self
            .http
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| format!("upstream {base}: {e}"))?;
        let (mut parts, body) = resp.into_parts();
        for h in HOP_BY_HOP {
            parts.headers.remove(*h);
        }
        // The gateway speaks its own HTTP version to its caller.
        parts.version = axum::http::Version::HTTP_11;
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    /// A request the gateway does not guard, sent on as it came.
    async fn forward(&self, req: Request) -> Response {
        match self.send(req).await {
            Ok(r) => r,
            Err(e) => problem(StatusCode::BAD_GATEWAY, "The upstream service failed", e),
        }
    }
}

/// Stops a task when dropped.
struct StopOnDrop(tokio::task::AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Headers of one connection, not of the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The answer for a key whose record is FAILED: no response was saved and
/// none will be.
fn failed_for_good(attempts: u32) -> Response {
    crate::metrics::gateway("failed");
    problem(
        StatusCode::CONFLICT,
        "The request failed for good",
        format!("it was tried {attempts} times without a saved response"),
    )
}

/// Whether `path` is `prefix` or below it, by whole segments: `/orders`
/// covers `/orders` and `/orders/7`, not `/orders-archive`.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'))
}

/// The record key's scope: a hash of every value of the scope header, in
/// order (a header split over several lines, like `cookie`, counts whole);
/// `-` without one. One value hashes as itself, as it always has.
fn scope_of(headers: &HeaderMap, name: &HeaderName) -> String {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        return "-".to_string();
    }
    let mut h = Sha256::new();
    for (i, v) in values.enumerate() {
        // A header value never holds a NUL: no two lists hash alike.
        if i > 0 {
            h.update([0]);
        }
        h.update(v.as_bytes());
    }
    hex(&h.finalize())
}

/// A saved response, replayed.
fn replay(result: &[u8]) -> Response {
    let saved: Saved = match crate::codec::decode(result) {
        Ok(s) => s,
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The saved response cannot be read",
                format!("the record's result is not a gateway response: {e}"),
            )
        }
    };
    let mut r = Response::new(Body::from(saved.body));
    *r.status_mut() = StatusCode::from_u16(saved.status).unwrap_or(StatusCode::OK);
    for (n, v) in saved.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(n), HeaderValue::from_bytes(&v)) {
            r.headers_mut().append(n, v);
        }
    }
    r.headers_mut().insert(
        HeaderName::from_static(REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    if let Some(n) = saved.unsaved {
        r.headers_mut().insert(
            HeaderName::from_static(UNSAVED_HEADER),
            HeaderValue::from_str(&format!("body of {n} bytes or more was not saved"))
                .expect("ascii"),
        );
    }
    r
}

enum Collected {
    Whole(Bytes),
    /// Over the limit after this many bytes: the whole body, to stream on.
    TooLarge(usize, Body),
}

/// Read `body` whole if it fits in `limit` bytes; else hand it on as a
/// stream (what was read first, then the rest).
async fn collect<B>(mut body: B, limit: usize) -> Result<Collected, String>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Into<axum::BoxError>,
{
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > limit {
            let seen = buf.len();
            let head = futures::stream::once(futures::future::ready(Ok::<_, axum::BoxError>(
                http_body::Frame::data(buf.freeze()),
            )));
            let rest = futures::StreamExt::map(BodyStream::new(body), |f| f.map_err(Into::into));
            let stream = futures::StreamExt::chain(head, rest);
            return Ok(Collected::TooLarge(
                seen,
                Body::new(StreamBody::new(stream)),
            ));
        }
    }
    Ok(Collected::Whole(buf.freeze()))
}
