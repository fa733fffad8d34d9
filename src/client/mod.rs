//! The Rust client: an endpoint list, leader discovery, and retries with
//! backoff on `UNAVAILABLE` — only for calls SPEC §3 says are safe to retry,
//! which is all of them because the client makes them so: a claim carries a
//! `claim_id` fixed before the first attempt, fenced writes carry their
//! token, reads and Delete change nothing on a repeat.

pub mod endpoint;
pub(crate) mod error;
mod run_once;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

pub use error::ClientError;
pub use run_once::{Claimed, Completion, LeaseLoss, RunError, RunOptions, RunOutcome};

pub use crate::tls::ClientTls;

use crate::pb::api::{self, cluster_client::ClusterClient, idempotency_client::IdempotencyClient};

/// How long a snapshot save (build and transfer) may take.
pub const SAVE_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Retry and timeout settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of one attempt.
    pub request_timeout: Duration,
    /// Total time spent retrying a call before giving up with the last error.
    pub retry_for: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// TLS (`https://` endpoints): the CA to trust and, for a cluster run
    /// with `--client-auth`, a client certificate. None: plaintext.
    pub tls: Option<ClientTls>,
    /// Bearer token sent with every call, for a cluster run with
    /// `--auth-tokens`. None: no `authorization` metadata.
    pub token: Option<String>,
    /// While calls are open on a connection, an HTTP/2 ping after this
    /// long without news from the node; None: no pings. With
    /// `keepalive_timeout`, how soon a node that froze with its
    /// connections open is given up for another (about 5 s by default,
    /// against `request_timeout`'s 10).
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered before the connection
    /// is dropped (and its calls retried elsewhere where safe).
    pub keepalive_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(15),
            backoff_initial: Duration::from_millis(25),
            backoff_max: Duration::from_millis(800),
            tls: None,
            token: None,
            keepalive_interval: Some(Duration::from_secs(2)),
            keepalive_timeout: Duration::from_secs(3),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    fn new(token: Option<&str>) -> Result<Bearer, ClientError> {
        match token {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {}", t.trim())
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| ClientError::Config("token: must be printable ASCII".into())),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The connection every generated client of this crate runs over.
pub type Transport = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// A handle to an idemkv cluster; cheap to clone, safe to share.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// (host:port, channel), in the order given.
    endpoints: Mutex<Vec<(String, Channel)>>,
    /// TLS for an address without a scheme (a leader hint, a member).
    default_tls: bool,
    /// Index of the endpoint to try first (the leader, once discovered).
    preferred: AtomicUsize,
    opts: ClientOptions,
    bearer: Bearer,
}

/// A lazily connected channel to `addr` (see [`endpoint`] for the forms
/// and how plaintext or TLS is chosen).
fn channel(addr: &str, opts: &ClientOptions, default_tls: bool) -> Result<Channel, ClientError> {
    channel_of(&endpoint::parse(addr)?, opts, default_tls)
}

fn channel_of(
    addr: &endpoint::Addr,
    opts: &ClientOptions,
    default_tls: bool,
) -> Result<Channel, ClientError> {
    let ep = endpoint::endpoint(addr, opts.tls.as_ref(), default_tls)?;
    Ok(
        endpoint::with_keepalive(ep, opts.keepalive_interval, opts.keepalive_timeout)
            .connect_lazy(),
    )
}

fn retryable(s: &Status) -> bool {
    // A certificate the client does not trust stays untrusted: say so now
    // instead of retrying for `retry_for`.
    if s.message().contains("certificate") {
        return false;
    }
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    ) || (s.code() == Code::Unknown && s.message().contains("transport"))
        || overloaded(s)
}

/// Refused by a node's in-flight cap before it started: safe to retry.
fn overloaded(s: &Status) -> bool {
    s.code() == Code::ResourceExhausted
        && error::reason_of(s) == Some(crate::wire::Reason::Overloaded.as_str())
}

/// The connection to the node could not be made (refused, or the TCP
/// connect failed), so the request never left this client: safe to send
/// elsewhere even when a retry would not be. Told by the transport error
/// under the status, which a server's answer never carries.
fn never_sent(s: &Status) -> bool {
    let Some(under) = std::error::Error::source(s) else {
        return false;
    };
    // "tcp connect error" is hyper-util's connector's wording for any
    // failed TCP connect (the refused one is also told by its io kind).
    error::caused_by(under, |e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            || e.to_string() == "tcp connect error"
    })
}

/// Safe to retry for a write that no token or claim id makes idempotent:
/// refused before it ran, or never sent.
fn not_run(s: &Status) -> bool {
    overloaded(s) || never_sent(s)
}

/// Refuse to send a request over gRPC's message limit: the call would end
/// in a reset stream ("h2 protocol error"), not in a status that names the
/// size. `OUT_OF_RANGE`, which [`ClientError::is_too_large`] counts.
fn within_message_limit(req: &impl prost::Message, call: &str) -> Result<(), ClientError> {
    let len = req.encoded_len();
    if len > crate::wire::MAX_API_MESSAGE {
        return Err(ClientError::Status(Status::out_of_range(format!(
            "the {call} request is {len} bytes; gRPC messages are limited to {} bytes",
            crate::wire::MAX_API_MESSAGE
        ))));
    }
    Ok(())
}

impl Client {
    /// A client for the cluster reachable at `endpoints` (`host:port`,
    /// `http://host:port` or `https://host:port`).
    pub fn new<S: AsRef<str>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<Client, ClientError> {
        Client::with_options(endpoints, ClientOptions::default())
    }

    /// A client for `IDEMKV_ENDPOINTS` (comma-separated), or the cluster
    /// `idemkv up` starts by default; over TLS when `IDEMKV_TLS_CA` names a
    /// CA file (with `IDEMKV_TLS_CERT` and `IDEMKV_TLS_KEY` as the client
    /// certificate, if set).
    pub fn from_env() -> Result<Client, ClientError> {
        let endpoints = std::env::var("IDEMKV_ENDPOINTS")
            .unwrap_or_else(|_| crate::wire::DEFAULT_ENDPOINTS.to_string());
        let path = |v: &str| std::env::var_os(v).map(std::path::PathBuf::from);
        let (ca, cert, key) = (
            path("IDEMKV_TLS_CA"),
            path("IDEMKV_TLS_CERT"),
            path("IDEMKV_TLS_KEY"),
        );
        let tls = ClientTls::from_options(ca.as_deref(), cert.as_deref(), key.as_deref())
            .map_err(ClientError::Config)?;
        Client::with_options(
            endpoints.split(','),
            ClientOptions {
                tls,
                token: std::env::var("IDEMKV_AUTH_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty()),
                ..ClientOptions::default()
            },
        )
    }

    pub fn with_options<S: AsRef<str>>(
        endpoints: impl IntoIterator<Item = S>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let addrs = endpoints
            .into_iter()
            .map(|e| endpoint::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        // Addresses the cluster reports (leader, members) have no scheme:
        // TLS for them when any given endpoint asked for it.
        let default_tls = opts.tls.is_some() || addrs.iter().any(|a| a.tls == Some(true));
        let endpoints = addrs
            .into_iter()
            .map(|a| {
                let ch = channel_of(&a, &opts, default_tls)?;
                Ok((a.authority, ch))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: Mutex::new(endpoints),
                default_tls,
                preferred: AtomicUsize::new(0),
                bearer: Bearer::new(opts.token.as_deref())?,
                opts,
            }),
        })
    }

    fn channel_at(&self, i: usize) -> (usize, Transport) {
        let eps = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let i = i % eps.len();
        (i, self.wrap(eps[i].1.clone()))
    }

    fn wrap(&self, ch: Channel) -> Transport {
        Transport::new(ch, self.inner.bearer.clone())
    }

    /// The channel to `addr` (`host:port`, as the cluster names members):
    /// the one made for it from the endpoints given, which keeps the scheme
    /// written there, else a new one by the client's TLS choice.
    fn channel_to(&self, addr: &str) -> Result<Channel, ClientError> {
        let eps = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match eps.iter().find(|(a, _)| a == addr) {
            Some((_, ch)) => Ok(ch.clone()),
            None => channel(addr, &self.inner.opts, self.inner.default_tls),
        }
    }

    /// A client of the one member at `addr` (`host:port`, as the cluster
    /// reports it), with this client's options and TLS choice: to ask each
    /// member in turn (`ctl status`, `ctl check`).
    pub fn member(&self, addr: &str) -> Result<Client, ClientError> {
        let addr = endpoint::parse(addr)?.authority;
        let ch = self.channel_to(&addr)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: Mutex::new(vec![(addr, ch)]),
                default_tls: self.inner.default_tls,
                preferred: AtomicUsize::new(0),
                bearer: self.inner.bearer.clone(),
                opts: self.inner.opts.clone(),
            }),
        })
    }

    /// Ask the cluster who leads and prefer that endpoint from now on.
    pub async fn discover_leader(&self) -> Result<(), ClientError> {
        let status = self.status().await?;
        if status.leader_api_addr.is_empty() {
            return Ok(());
        }
        let mut eps = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let pos = match eps.iter().position(|(a, _)| *a == status.leader_api_addr) {
            Some(p) => p,
            None => {
                let ch = channel(
                    &status.leader_api_addr,
                    &self.inner.opts,
                    self.inner.default_tls,
                )?;
                eps.push((status.leader_api_addr.clone(), ch));
                eps.len() - 1
            }
        };
        self.inner.preferred.store(pos, Ordering::Relaxed);
        Ok(())
    }

    /// Run `call` against the preferred endpoint, moving to the next one
    /// with backoff while the answer is retryable.
    async fn retry<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Transport, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_if(call, retryable).await
    }

    /// Call, retrying on other endpoints with backoff while `again` says
    /// the failure is safe to retry and time is left.
    async fn retry_if<T, F, Fut>(
        &self,
        call: F,
        again: fn(&Status) -> bool,
    ) -> Result<T, ClientError>
    where
        F: Fn(Transport, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let opts = &self.inner.opts;
        let give_up = tokio::time::Instant::now() + opts.retry_for;
        let mut backoff = opts.backoff_initial;
        let mut i = self.inner.preferred.load(Ordering::Relaxed);
        loop {
            let (at, ch) = self.channel_at(i);
            match call(ch, opts.request_timeout).await {
                Ok(resp) => {
                    self.inner.preferred.store(at, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Err(s) if again(&s) && tokio::time::Instant::now() + backoff < give_up => {
                    tracing::debug!(code = ?s.code(), msg = s.message(), "retrying on another endpoint");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(opts.backoff_max);
                    i = at + 1;
                }
                Err(s) => return Err(ClientError::Status(s)),
            }
        }
    }

    fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    fn idem(ch: Transport) -> IdempotencyClient<Transport> {
        IdempotencyClient::new(ch)
            .max_decoding_message_size(crate::wire::MAX_API_MESSAGE)
            .max_encoding_message_size(crate::wire::MAX_API_MESSAGE)
    }

    /// Claim a key. An empty `claim_id` is replaced by a fresh one, fixed for
    /// every retry of this call, so a lost reply never locks its sender out.
    pub async fn claim(
        &self,
        mut req: api::ClaimRequest,
    ) -> Result<api::claim_response::Outcome, ClientError> {
        if req.claim_id.is_empty() {
            req.claim_id = uuid::Uuid::new_v4().to_string();
        }
        within_message_limit(&req, "Claim")?;
        let resp = self
            .retry(|ch, t| {
                let req = req.clone();
                async move { Self::idem(ch).claim(Self::request(req, t)).await }
            })
            .await?;
        resp.outcome
            .ok_or_else(|| ClientError::Protocol("claim reply without an outcome".into()))
    }

    /// Claim many keys in one Raft entry.
    pub async fn claim_batch(
        &self,
        mut req: api::ClaimBatchRequest,
    ) -> Result<api::ClaimBatchResponse, ClientError> {
        for item in &mut req.items {
            if item.claim_id.is_empty() {
                item.claim_id = uuid::Uuid::new_v4().to_string();
            }
        }
        within_message_limit(&req, "ClaimBatch")?;
        self.retry(|ch, t| {
            let req = req.clone();
            async move { Self::idem(ch).claim_batch(Self::request(req, t)).await }
        })
        .await
    }

    pub async fn complete(
        &self,
        req: api::CompleteRequest,
    ) -> Result<api::CompleteResponse, ClientError> {
        within_message_limit(&req, "Complete")?;
        self.retry(|ch, t| {
            let req = req.clone();
            async move { Self::idem(ch).complete(Self::request(req, t)).await }
        })
        .await
    }

    pub async fn renew(&self, req: api::RenewRequest) -> Result<api::RenewResponse, ClientError> {
        self.retry(|ch, t| {
            let req = req.clone();
            async move { Self::idem(ch).renew(Self::request(req, t)).await }
        })
        .await
    }

    pub async fn release(
        &self,
        req: api::ReleaseRequest,
    ) -> Result<api::ReleaseResponse, ClientError> {
        self.retry(|ch, t| {
            let req = req.clone();
            async move { Self::idem(ch).release(Self::request(req, t)).await }
        })
        .await
    }

    /// The record, or `Ok(None)` when the key is absent.
    pub async fn get(&self, req: api::GetRequest) -> Result<Option<api::Record>, ClientError> {
        let res = self
            .retry(|ch, t| {
                let req = req.clone();
                async move { Self::idem(ch).get(Self::request(req, t)).await }
            })
            .await;
        match res {
            Ok(r) => Ok(r.record),
            Err(ClientError::Status(s)) if s.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Wait until the record leaves IN_PROGRESS or `timeout_ms` passes.
    pub async fn r#await(&self, req: api::AwaitRequest) -> Result<api::AwaitResponse, ClientError> {
        let wait = Duration::from_millis(req.timeout_ms);
        self.retry(|ch, t| {
            let req = req.clone();
            async move { Self::idem(ch).r#await(Self::request(req, t + wait)).await }
        })
        .await
    }

    /// Delete a record. A fenced Delete (`token` set) is retried like every
    /// other fenced write. An unfenced one moves to another node only when
    /// it cannot have run: the node refused it unrun (overloaded) or the
    /// connection to it was refused, so it was never sent; any other failure where
    /// it may have been applied is [`ClientError::OutcomeUnknown`], because
    /// a retry could delete a newer claim.
    pub async fn delete(
        &self,
        req: api::DeleteRequest,
    ) -> Result<api::DeleteResponse, ClientError> {
        let call = |ch, t| {
            let req = req.clone();
            async move { Self::idem(ch).delete(Self::request(req, t)).await }
        };
        if req.token.is_some() {
            return self.retry(call).await;
        }
        match self.retry_if(call, not_run).await {
            // The retries stop at the first attempt that may have run, so a
            // last error that says "not run" (refused at connect, or
            // overloaded) means none ran: that error, as it is.
            Err(ClientError::Status(s)) if retryable(&s) && !not_run(&s) => {
                Err(ClientError::OutcomeUnknown {
                    what: "unfenced delete",
                    status: s,
                })
            }
            other => other,
        }
    }

    /// Status of whichever node answers first.
    pub async fn status(&self) -> Result<api::StatusResponse, ClientError> {
        self.retry(|ch, t| async move {
            ClusterClient::new(ch)
                .status(Self::request(api::StatusRequest {}, t))
                .await
        })
        .await
    }

    /// `index` 0: hash the cluster's state now (a hash entry through the
    /// log; the leader's hash, with the entry's index). Otherwise this
    /// endpoint's hash as of the hash entry at `index`.
    pub async fn hash_state(&self, index: u64) -> Result<api::HashStateResponse, ClientError> {
        self.retry(|ch, t| async move {
            ClusterClient::new(ch)
                .hash_state(Self::request(api::HashStateRequest { index }, t))
                .await
        })
        .await
    }

    /// A snapshot built now on the leader, as a stream of its file's bytes
    /// (`ctl snapshot save`).
    pub async fn save_snapshot(&self) -> Result<tonic::Streaming<api::SnapshotData>, ClientError> {
        let status = self.status().await?;
        let leader = if status.leader_api_addr.is_empty() {
            self.clone()
        } else {
            self.member(&status.leader_api_addr)?
        };
        leader
            .retry(|ch, t| async move {
                ClusterClient::new(ch)
                    .save_snapshot(Self::request(
                        api::SaveSnapshotRequest {},
                        t.max(SAVE_SNAPSHOT_TIMEOUT),
                    ))
                    .await
            })
            .await
    }

    /// Status of every endpoint (an error where one does not answer).
    pub async fn status_all(&self) -> Vec<(String, Result<api::StatusResponse, ClientError>)> {
        let eps: Vec<(String, Channel)> = self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let timeout = Duration::from_secs(2);
        let calls = eps.into_iter().map(|(addr, ch)| async move {
            let res = ClusterClient::new(self.wrap(ch))
                .status(Self::request(api::StatusRequest {}, timeout))
                .await
                .map(|r| r.into_inner())
                .map_err(ClientError::Status);
            (addr, res)
        });
        futures::future::join_all(calls).await
    }

    /// Wait until every endpoint answers and all agree on one leader;
    /// `Err` with what each endpoint said if that does not happen `within`.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let all = self.status_all().await;
            let leaders: Vec<Option<u64>> = all
                .iter()
                .map(|(_, r)| r.as_ref().ok().and_then(|s| s.leader_id))
                .collect();
            if leaders.iter().all(|l| l.is_some() && *l == leaders[0]) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let seen: Vec<String> = all
                    .iter()
                    .map(|(ep, r)| match r {
                        Ok(s) => format!("{ep}: {} leader={:?}", s.role, s.leader_id),
                        Err(e) => format!("{ep}: {}", e.message()),
                    })
                    .collect();
                return Err(ClientError::Unready(format!(
                    "no agreed leader within {within:?}: {}",
                    seen.join("; ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A `Cluster` client on the preferred endpoint, for membership calls.
    pub fn cluster(&self) -> ClusterClient<Transport> {
        let (_, ch) = self.channel_at(self.inner.preferred.load(Ordering::Relaxed));
        ClusterClient::new(ch)
    }

    /// The members as the cluster knows them (voters and learners).
    pub async fn members(&self) -> Result<Vec<api::Member>, ClientError> {
        Ok(self.status().await?.members)
    }

    /// Add node `id` as a learner. It then catches up from the leader (by
    /// snapshot if the log it needs was purged); promote it once its
    /// applied index has reached the leader's.
    pub async fn add_learner(
        &self,
        id: u64,
        api_addr: &str,
        raft_addr: &str,
    ) -> Result<Vec<api::Member>, ClientError> {
        let req = api::AddLearnerRequest {
            id,
            api_addr: api_addr.to_string(),
            raft_addr: raft_addr.to_string(),
        };
        self.on_leader(|mut c| {
            let req = req.clone();
            async move { c.add_learner(req).await }
        })
        .await
    }

    /// Make exactly `voters` the voting members (joint consensus inside);
    /// members left out are removed.
    pub async fn change_voters(&self, voters: Vec<u64>) -> Result<Vec<api::Member>, ClientError> {
        let req = api::ChangeMembershipRequest {
            voters,
            retain: false,
        };
        self.on_leader(|mut c| {
            let req = req.clone();
            async move { c.change_membership(req).await }
        })
        .await
    }

    /// Hand leadership to voter `to` (etcdctl's move-leader); returns once
    /// `to` leads. Writes under way are not lost: they commit under the old
    /// or the new leader, or fail retryably.
    pub async fn move_leader(&self, to: u64) -> Result<Vec<api::Member>, ClientError> {
        let req = api::TransferLeaderRequest { to };
        self.on_leader(|mut c| async move { c.transfer_leader(req).await })
            .await
    }

    /// Run a membership call on the leader: the endpoint that says it leads,
    /// or the leader address the nodes report; retried across leader
    /// changes for `retry_for`.
    async fn on_leader<F, Fut>(&self, call: F) -> Result<Vec<api::Member>, ClientError>
    where
        F: Fn(ClusterClient<Transport>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<api::MembershipResponse>, Status>>,
    {
        let give_up = tokio::time::Instant::now() + self.inner.opts.retry_for;
        let mut backoff = self.inner.opts.backoff_initial;
        loop {
            let all = self.status_all().await;
            let leader = all
                .iter()
                .find(|(_, r)| r.as_ref().is_ok_and(|s| s.role == "leader"))
                .map(|(ep, _)| ep.clone())
                .or_else(|| {
                    all.iter().find_map(|(_, r)| {
                        r.as_ref()
                            .ok()
                            .map(|s| s.leader_api_addr.clone())
                            .filter(|a| !a.is_empty())
                    })
                });
            let res = match &leader {
                Some(addr) => call(ClusterClient::new(self.wrap(self.channel_to(addr)?)))
                    .await
                    .map(|r| r.into_inner().members),
                None => Err(Status::unavailable("no leader known")),
            };
            match res {
                Ok(members) => return Ok(members),
                Err(s) if retryable(&s) && tokio::time::Instant::now() + backoff < give_up => {
                    tracing::debug!(code = ?s.code(), msg = s.message(), "membership call: retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.inner.opts.backoff_max);
                }
                Err(s) => return Err(ClientError::Status(s)),
            }
        }
    }
}
