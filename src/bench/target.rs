//! The systems `idemkv bench` can drive, each behind the same three calls:
//! claim a key, complete it with a result, read its result. Each maps the
//! idempotency record as faithfully as the system allows (BENCHMARKS.md):
//!
//! - idemkv: the real API through [`crate::Client`].
//! - etcd: claim is one Txn — if `create_revision(key) == 0` put
//!   `R<owner>` with a lease, else get the key; the put's revision is the
//!   fencing token. Complete is one Txn on `mod_revision(key) == token` that
//!   puts `D<result>`.
//! - Redis: claim is `SET key R<owner> NX PX lease GET` (one round trip);
//!   complete is a script that checks the owner before writing `D<result>`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use tonic::transport::Channel;

use crate::pb::api;
use crate::pb::etcd::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, response_op, Compare,
    LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::Client;

/// Which system to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    Idemkv,
    Etcd,
    Redis,
    /// gRPC alone: an in-process server of the public API that answers at
    /// once from memory (see `floor.rs`); no endpoints.
    Floor,
    /// The floor with two followers (see `replicate.rs`): every write that
    /// changes the map is fdatasynced on the leader and one follower
    /// before it is answered; no endpoints.
    ReplicatedFloor,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Idemkv => "idemkv",
            TargetKind::Etcd => "etcd",
            TargetKind::Redis => "redis",
            TargetKind::Floor => "floor",
            TargetKind::ReplicatedFloor => "replicated-floor",
        }
    }

    pub fn default_endpoints(self) -> &'static str {
        match self {
            TargetKind::Idemkv => crate::wire::DEFAULT_ENDPOINTS,
            TargetKind::Etcd => "127.0.0.1:2379",
            TargetKind::Redis => "127.0.0.1:6379",
            // Replaced by the floor server's own address when it starts.
            TargetKind::Floor | TargetKind::ReplicatedFloor => "",
        }
    }
}

/// What a claim saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the key; `token` fences its complete.
    Acquired { token: u64 },
    /// Someone else holds a live lease.
    Busy { owner: String },
    /// Done before: the stored result.
    Completed { result: Vec<u8> },
}

/// One connection to a target.
#[derive(Clone)]
pub enum Target {
    Idemkv(Client),
    Etcd { kv: KvClient<Channel>, lease: i64 },
    Redis(redis::aio::MultiplexedConnection),
}

const NAMESPACE: &str = "bench";
const RUNNING: u8 = b'R';
const DONE: u8 = b'D';

/// Redis: write the result only while the caller still owns the key.
const REDIS_COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// idemkv: a claim of `key` in the bench's namespace.
fn claim_request(key: &str, owner: &str, lease_ms: u64) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: NAMESPACE.into(),
        key: key.as_bytes().to_vec(),
        owner: owner.into(),
        lease_ms,
        ..Default::default()
    }
}

/// Redis: claim `key` if nobody holds it, returning what was there
/// (one round trip).
fn redis_claim(key: &str, owner: &str, lease_ms: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(tagged(RUNNING, owner.as_bytes()))
        .arg("NX")
        .arg("PX")
        .arg(lease_ms)
        .arg("GET");
    cmd
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 1);
    v.push(tag);
    v.extend_from_slice(body);
    v
}

fn put_op(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value,
            lease,
        })),
    }
}

/// Read an etcd or Redis value back as a claim outcome.
fn decode(value: &[u8]) -> anyhow::Result<Claim> {
    match value.split_first() {
        Some((&RUNNING, owner)) => Ok(Claim::Busy {
            owner: String::from_utf8_lossy(owner).into_owned(),
        }),
        Some((&DONE, result)) => Ok(Claim::Completed {
            result: result.to_vec(),
        }),
        _ => bail!("unexpected stored value {value:?}"),
    }
}

/// `redis://…` / `rediss://…` as written, or `host:port`.
fn redis_url(endpoint: &str) -> anyhow::Result<String> {
    let e = endpoint.trim();
    if e.starts_with("redis://") || e.starts_with("rediss://") {
        return Ok(e.to_string());
    }
    let addr = crate::client::endpoint::parse(e)?;
    if addr.tls.is_some() {
        bail!(
            "endpoint {e:?}: Redis is not reached over HTTP; write host:port or redis://host:port"
        );
    }
    Ok(format!("redis://{}/", addr.authority))
}

impl Target {
    /// Connect to `endpoints`; `lease_for` bounds how long the run's
    /// claims must stay held (etcd grants one lease per connection for it);
    /// `find_leader`: an idemkv client prefers the leader's endpoint.
    pub async fn connect(
        kind: TargetKind,
        endpoints: &[String],
        lease_for: Duration,
        opts: crate::client::ClientOptions,
        find_leader: bool,
    ) -> anyhow::Result<Target> {
        match kind {
            TargetKind::Idemkv | TargetKind::Floor | TargetKind::ReplicatedFloor => {
                let client = Client::with_options(endpoints, opts)?;
                if find_leader {
                    client
                        .discover_leader()
                        .await
                        .context("cannot reach the idemkv cluster")?;
                }
                Ok(Target::Idemkv(client))
            }
            TargetKind::Etcd => {
                // Clients talk to one member; etcd forwards to its leader.
                let member = crate::client::endpoint::parse(&endpoints[0])?;
                let ch = crate::client::endpoint::endpoint(&member, None, false)?
                    .connect()
                    .await
                    .context("cannot reach etcd")?;
                let grant = LeaseClient::new(ch.clone())
                    .lease_grant(LeaseGrantRequest {
                        ttl: lease_for.as_secs().max(10) as i64,
                        id: 0,
                    })
                    .await?
                    .into_inner();
                if !grant.error.is_empty() {
                    bail!("etcd lease grant: {}", grant.error);
                }
                Ok(Target::Etcd {
                    kv: KvClient::new(ch),
                    lease: grant.id,
                })
            }
            TargetKind::Redis => {
                let url = redis_url(&endpoints[0])?;
                let client = redis::Client::open(url.as_str())?;
                let con = client
                    .get_multiplexed_async_connection()
                    .await
                    .context("cannot reach redis")?;
                Ok(Target::Redis(con))
            }
        }
    }

    pub async fn claim(
        &mut self,
        key: &str,
        owner: &str,
        lease: Duration,
    ) -> anyhow::Result<Claim> {
        let lease_ms = lease.as_millis() as u64;
        match self {
            Target::Idemkv(client) => {
                use api::claim_response::Outcome;
                let out = client.claim(claim_request(key, owner, lease_ms)).await?;
                Ok(match out {
                    Outcome::Acquired(a) => Claim::Acquired { token: a.token },
                    Outcome::InProgress(p) => Claim::Busy { owner: p.owner },
                    Outcome::Completed(c) => Claim::Completed { result: c.result },
                    Outcome::Failed(f) => bail!("claim of {key} says FAILED: {}", f.last_error),
                })
            }
            Target::Etcd { kv, lease } => {
                let txn = TxnRequest {
                    compare: vec![Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Create as i32,
                        key: key.into(),
                        target_union: Some(compare::TargetUnion::CreateRevision(0)),
                    }],
                    success: vec![put_op(key, tagged(RUNNING, owner.as_bytes()), *lease)],
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest {
                            key: key.into(),
                            ..Default::default()
                        })),
                    }],
                };
                let resp = kv.txn(txn).await?.into_inner();
                if resp.succeeded {
                    let rev = resp
                        .header
                        .map(|h| h.revision)
                        .ok_or_else(|| anyhow!("etcd txn without a header"))?;
                    return Ok(Claim::Acquired { token: rev as u64 });
                }
                for op in resp.responses {
                    if let Some(response_op::Response::ResponseRange(r)) = op.response {
                        if let Some(kv) = r.kvs.first() {
                            return decode(&kv.value);
                        }
                    }
                }
                bail!("etcd txn on {key} failed its compare but the key is gone")
            }
            Target::Redis(con) => {
                let old: Option<Vec<u8>> =
                    redis_claim(key, owner, lease_ms).query_async(con).await?;
                match old {
                    None => Ok(Claim::Acquired { token: 0 }),
                    Some(v) => decode(&v),
                }
            }
        }
    }

    /// Claim every key of `keys` for `owner` in one call: one answer per
    /// key, in order.
    pub async fn claim_batch(
        &mut self,
        keys: &[String],
        owner: &str,
        lease: Duration,
    ) -> anyhow::Result<Vec<Claim>> {
        let lease_ms = lease.as_millis() as u64;
        match self {
            Target::Idemkv(client) => {
                use api::claim_batch_item::Outcome;
                let items = keys
                    .iter()
                    .map(|key| claim_request(key, owner, lease_ms))
                    .collect();
                let resp = client
                    .claim_batch(api::ClaimBatchRequest {
                        items,
                        all_or_nothing: false,
                    })
                    .await?;
                resp.items
                    .into_iter()
                    .zip(keys)
                    .map(|(item, key)| {
                        Ok(match item.outcome {
                            Some(Outcome::Acquired(a)) => Claim::Acquired { token: a.token },
                            Some(Outcome::InProgress(p)) => Claim::Busy { owner: p.owner },
                            Some(Outcome::Completed(c)) => Claim::Completed { result: c.result },
                            other => bail!("batch claim of {key}: {other:?}"),
                        })
                    })
                    .collect()
            }
            Target::Etcd { kv, lease } => {
                // All keys in one Txn: each must be new; fresh keys always are.
                let txn = TxnRequest {
                    compare: keys
                        .iter()
                        .map(|key| Compare {
                            result: compare::CompareResult::Equal as i32,
                            target: compare::CompareTarget::Create as i32,
                            key: key.clone().into(),
                            target_union: Some(compare::TargetUnion::CreateRevision(0)),
                        })
                        .collect(),
                    success: keys
                        .iter()
                        .map(|key| put_op(key, tagged(RUNNING, owner.as_bytes()), *lease))
                        .collect(),
                    failure: vec![],
                };
                let resp = kv.txn(txn).await?.into_inner();
                if !resp.succeeded {
                    bail!(
                        "etcd batch txn of {} keys: a key already existed",
                        keys.len()
                    );
                }
                let rev = resp
                    .header
                    .map(|h| h.revision)
                    .ok_or_else(|| anyhow!("etcd txn without a header"))?;
                Ok(vec![Claim::Acquired { token: rev as u64 }; keys.len()])
            }
            Target::Redis(con) => {
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.add_command(redis_claim(key, owner, lease_ms));
                }
                let olds: Vec<Option<Vec<u8>>> = pipe.query_async(con).await?;
                olds.into_iter()
                    .map(|old| match old {
                        None => Ok(Claim::Acquired { token: 0 }),
                        Some(v) => decode(&v),
                    })
                    .collect()
            }
        }
    }

    /// Save `result` for a key held by `owner` with `token`; `false` when
    /// the target refused because the claim no longer holds.
    pub async fn complete(
        &mut self,
        key: &str,
        owner: &str,
        token: u64,
        result: &[u8],
        retention: Duration,
    ) -> anyhow::Result<bool> {
        match self {
            Target::Idemkv(client) => {
                let r = client
                    .complete(api::CompleteRequest {
                        namespace: NAMESPACE.into(),
                        key: key.as_bytes().to_vec(),
                        token,
                        result: result.to_vec(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => Ok(true),
                    Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Target::Etcd { kv, .. } => {
                let txn = TxnRequest {
                    compare: vec![Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Mod as i32,
                        key: key.into(),
                        target_union: Some(compare::TargetUnion::ModRevision(token as i64)),
                    }],
                    success: vec![put_op(key, tagged(DONE, result), 0)],
                    failure: vec![],
                };
                Ok(kv.txn(txn).await?.into_inner().succeeded)
            }
            Target::Redis(con) => {
                let done: i64 = redis::Script::new(REDIS_COMPLETE)
                    .key(key)
                    .arg(tagged(RUNNING, owner.as_bytes()))
                    .arg(tagged(DONE, result))
                    .arg(retention.as_millis() as u64)
                    .invoke_async(con)
                    .await?;
                Ok(done == 1)
            }
        }
    }

    /// The stored result of a completed key (a linearizable read).
    pub async fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let stored = match self {
            Target::Idemkv(client) => {
                let rec = client
                    .get(api::GetRequest {
                        namespace: NAMESPACE.into(),
                        key: key.as_bytes().to_vec(),
                        consistency: api::Consistency::Linearizable as i32,
                    })
                    .await?;
                return Ok(rec
                    .filter(|r| r.state == api::RecordState::Completed as i32)
                    .map(|r| r.result));
            }
            Target::Etcd { kv, .. } => kv
                .range(RangeRequest {
                    key: key.into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .kvs
                .into_iter()
                .next()
                .map(|kv| kv.value),
            Target::Redis(con) => redis::cmd("GET").arg(key).query_async(con).await?,
        };
        match stored {
            None => Ok(None),
            Some(v) => match decode(&v)? {
                Claim::Completed { result } => Ok(Some(result)),
                _ => Ok(None),
            },
        }
    }
}
