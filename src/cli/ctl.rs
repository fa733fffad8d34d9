//! `idemkv ctl`: every operation from the shell. Human output by default,
//! `--json` for scripts. Outcomes (ACQUIRED, IN_PROGRESS, COMPLETED, FAILED)
//! exit 0; an error exits 1 with the gRPC code, reason and message on stderr.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::parse_duration_ms;
use idemkv::client::ClientError;
use idemkv::pb::api::{self, claim_response::Outcome};
use idemkv::wire::DEFAULT_ENDPOINTS;
use idemkv::Client;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Client endpoints of the cluster, comma-separated.
    #[arg(long, env = "IDEMKV_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, global = true)]
    pub endpoints: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long a call keeps trying while no node can answer it (none
    /// reachable, no leader yet), backing off up to 800 ms between tries:
    /// 15s by default; 0 makes one attempt, for a script that polls.
    #[arg(long, env = "IDEMKV_RETRY_FOR", global = true, value_parser = parse_duration_ms)]
    pub retry_for: Option<u64>,
    #[command(flatten)]
    pub conn: super::ClientConnArgs,
    #[command(subcommand)]
    pub op: CtlOp,
}

#[derive(Debug, Args)]
pub struct Target {
    pub namespace: String,
    pub key: String,
}

#[derive(Debug, Subcommand)]
pub enum CtlOp {
    /// Claim a key: ACQUIRED (with a token), IN_PROGRESS, COMPLETED (replay) or FAILED.
    Claim {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
        lease: u64,
        /// Reuse to retry a claim idempotently (default: a fresh one).
        #[arg(long, default_value = "")]
        claim_id: String,
        /// Request fingerprint (e.g. a payload hash).
        #[arg(long)]
        fingerprint: Option<String>,
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
        #[arg(long, value_parser = parse_duration_ms)]
        retention: Option<u64>,
    },
    /// Claim several keys of one namespace in one Raft entry.
    ClaimBatch {
        namespace: String,
        #[arg(required = true)]
        keys: Vec<String>,
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
        lease: u64,
        /// Acquire every key or none.
        #[arg(long)]
        all_or_nothing: bool,
    },
    /// Complete a claim with its result (replayed to every later claim).
    Complete {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        token: u64,
        #[arg(long, default_value = "")]
        result: String,
        /// A user code replayed with the result (e.g. an HTTP status).
        #[arg(long)]
        code: Option<i32>,
        #[arg(long, value_parser = parse_duration_ms)]
        retention: Option<u64>,
    },
    /// Extend a live claim, optionally saving a checkpoint.
    Renew {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        token: u64,
        #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
        lease: u64,
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Give a claim back after a failure.
    Release {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        token: u64,
        #[arg(long, default_value = "")]
        error: String,
        /// Give up for good: the record becomes FAILED now and later
        /// claims get FAILED instead of running the work again.
        #[arg(long)]
        permanent: bool,
    },
    /// Show a record.
    Get {
        #[command(flatten)]
        t: Target,
        /// Read the local replica (possibly stale) instead of linearizably.
        #[arg(long)]
        serializable: bool,
    },
    /// Wait until a record leaves IN_PROGRESS.
    Await {
        #[command(flatten)]
        t: Target,
        #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
        timeout: u64,
    },
    /// Forget a record. With --token, only the record that token holds or
    /// completed (safe to retry); without, whatever is there (not retried
    /// when its outcome is unknown).
    Delete {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        token: Option<u64>,
    },
    /// Cluster status as every endpoint sees it.
    Status,
    /// Compare the replicas (like etcdctl's hashkv check): hash the state
    /// through the log, ask every member for its hash as of that entry;
    /// exit 0 when all agree, 1 naming any that differs or cannot answer.
    Check,
    /// Backups: `snapshot save FILE` (a snapshot built now on the leader,
    /// checked whole before it is kept; `idemkv snapshot status FILE`
    /// reads one).
    Snapshot {
        #[command(subcommand)]
        op: SnapshotOp,
    },
    /// Membership: list, add a learner, promote it, remove a node.
    Member {
        #[command(subcommand)]
        op: MemberOp,
    },
}

#[derive(Debug, Subcommand)]
pub enum MemberOp {
    /// Voters and learners with their addresses.
    List,
    /// Add node ID as a learner (it must be running, started without
    /// --init); it then catches up from the leader (`ctl status` shows its
    /// applied index), by snapshot if the log it needs was purged.
    Add {
        id: u64,
        /// Its client address (host:port).
        api_addr: String,
        /// Its peer address (host:port).
        raft_addr: String,
    },
    /// Make learner ID a voter.
    Promote { id: u64 },
    /// Remove node ID from the cluster (voter or learner).
    Remove { id: u64 },
    /// Make voter ID the leader (a leader transfer); returns once it leads.
    MoveLeader { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotOp {
    /// Save a snapshot of the cluster's state to FILE (written beside it
    /// as FILE.part, checked whole, then renamed).
    Save { file: std::path::PathBuf },
}

/// The canonical gRPC name of a status code (`FAILED_PRECONDITION`).
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn outcome_json(o: &Outcome) -> Value {
    match o {
        Outcome::Acquired(a) => json!({
            "outcome": "ACQUIRED", "token": a.token, "lease_deadline_ms": a.lease_deadline_ms,
            "attempt": a.attempt, "previous_owner": a.previous_owner,
            "checkpoint": a.checkpoint.as_deref().map(text),
        }),
        Outcome::InProgress(p) => json!({
            "outcome": "IN_PROGRESS", "owner": p.owner,
            "lease_remaining_ms": p.lease_remaining_ms, "attempt": p.attempt,
        }),
        Outcome::Completed(c) => json!({
            "outcome": "COMPLETED", "result": text(&c.result), "code": c.code,
            "completed_at_ms": c.completed_at_ms, "token": c.token,
        }),
        Outcome::Failed(f) => json!({
            "outcome": "FAILED", "attempts": f.attempts, "last_error": f.last_error,
        }),
    }
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Acquired(a) => {
            let mut s = format!("ACQUIRED token={} attempt={}", a.token, a.attempt);
            if let Some(p) = &a.previous_owner {
                s += &format!(" previous_owner={p}");
            }
            if let Some(cp) = &a.checkpoint {
                s += &format!(" checkpoint={}", text(cp));
            }
            s
        }
        Outcome::InProgress(p) => format!(
            "IN_PROGRESS owner={} lease_remaining={}ms attempt={}",
            p.owner, p.lease_remaining_ms, p.attempt
        ),
        Outcome::Completed(c) => {
            let code = c.code.map(|c| format!(" code={c}")).unwrap_or_default();
            format!(
                "COMPLETED result={}{code} token={}",
                text(&c.result),
                c.token
            )
        }
        Outcome::Failed(f) => format!("FAILED attempts={} last_error={}", f.attempts, f.last_error),
    }
}

fn state_name(s: i32) -> &'static str {
    match api::RecordState::try_from(s) {
        Ok(api::RecordState::InProgress) => "IN_PROGRESS",
        Ok(api::RecordState::Available) => "AVAILABLE",
        Ok(api::RecordState::Completed) => "COMPLETED",
        Ok(api::RecordState::Failed) => "FAILED",
        _ => "UNKNOWN",
    }
}

fn record_json(r: &api::Record) -> Value {
    json!({
        "namespace": r.namespace, "key": text(&r.key), "state": state_name(r.state),
        "owner": r.owner, "token": r.token, "lease_deadline_ms": r.lease_deadline_ms,
        "attempts": r.attempts, "max_attempts": r.max_attempts,
        "result": text(&r.result), "code": r.code, "completed_at_ms": r.completed_at_ms,
        "expires_at_ms": r.expires_at_ms, "last_error": r.last_error,
        "checkpoint": r.checkpoint.as_deref().map(text), "created_at_ms": r.created_at_ms,
    })
}

fn record_text(r: &api::Record) -> String {
    let mut s = format!("{} {}/{}", state_name(r.state), r.namespace, text(&r.key));
    match api::RecordState::try_from(r.state) {
        Ok(api::RecordState::InProgress) => {
            s += &format!(
                " owner={} token={} lease_deadline_ms={}",
                r.owner, r.token, r.lease_deadline_ms
            )
        }
        Ok(api::RecordState::Completed) => {
            s += &format!(" result={} token={}", text(&r.result), r.token);
            if let Some(c) = r.code {
                s += &format!(" code={c}");
            }
        }
        Ok(api::RecordState::Available) | Ok(api::RecordState::Failed) => {
            s += &format!(" last_owner={} last_error={}", r.owner, r.last_error)
        }
        _ => {}
    }
    s + &format!(" attempts={} expires_at_ms={}", r.attempts, r.expires_at_ms)
}

/// Run one ctl command; returns the process exit code.
pub async fn run(a: CtlArgs) -> anyhow::Result<i32> {
    let mut opts = a.conn.options()?;
    if let Some(ms) = a.retry_for {
        opts.retry_for = std::time::Duration::from_millis(ms);
    }
    let client = Client::with_options(a.endpoints.split(','), opts)?;
    match exec(&client, a.op).await {
        Ok((human, value)) => {
            if a.json {
                say!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                say!("{human}");
            }
            // Only `status` and `check` say `healthy`; a degraded cluster
            // or a failed check exits 1.
            Ok(if value["healthy"] == json!(false) {
                1
            } else {
                0
            })
        }
        Err(e) => {
            let code = e.code().map(code_name).unwrap_or("ERROR");
            if a.json {
                let v = json!({"error": code, "reason": e.reason(), "message": e.message()});
                say_err!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                say_err!("error: {code}: {}", e.message());
            }
            Ok(1)
        }
    }
}

async fn exec(client: &Client, op: CtlOp) -> Result<(String, Value), ClientError> {
    Ok(match op {
        CtlOp::Claim {
            t,
            owner,
            lease,
            claim_id,
            fingerprint,
            max_attempts,
            retention,
        } => {
            let o = client
                .claim(api::ClaimRequest {
                    namespace: t.namespace,
                    key: t.key.into_bytes(),
                    owner,
                    claim_id,
                    lease_ms: lease,
                    fingerprint: fingerprint.map(String::into_bytes),
                    max_attempts,
                    retention_ms: retention.unwrap_or(0),
                })
                .await?;
            (outcome_text(&o), outcome_json(&o))
        }
        CtlOp::ClaimBatch {
            namespace,
            keys,
            owner,
            lease,
            all_or_nothing,
        } => {
            let items = keys
                .iter()
                .map(|k| api::ClaimRequest {
                    namespace: namespace.clone(),
                    key: k.clone().into_bytes(),
                    owner: owner.clone(),
                    lease_ms: lease,
                    ..Default::default()
                })
                .collect();
            let r = client
                .claim_batch(api::ClaimBatchRequest {
                    items,
                    all_or_nothing,
                })
                .await?;
            let mut lines = vec![format!("applied={}", r.applied)];
            let mut values = Vec::new();
            for (k, item) in keys.iter().zip(&r.items) {
                use api::claim_batch_item::Outcome as B;
                let (h, v) = match &item.outcome {
                    Some(B::Acquired(x)) => {
                        let o = Outcome::Acquired(x.clone());
                        (outcome_text(&o), outcome_json(&o))
                    }
                    Some(B::InProgress(x)) => {
                        let o = Outcome::InProgress(x.clone());
                        (outcome_text(&o), outcome_json(&o))
                    }
                    Some(B::Completed(x)) => {
                        let o = Outcome::Completed(x.clone());
                        (outcome_text(&o), outcome_json(&o))
                    }
                    Some(B::Failed(x)) => {
                        let o = Outcome::Failed(x.clone());
                        (outcome_text(&o), outcome_json(&o))
                    }
                    Some(B::Error(e)) => (
                        format!("{}: {}", e.reason, e.message),
                        json!({"outcome": "ERROR", "reason": e.reason, "message": e.message}),
                    ),
                    None => ("?".into(), Value::Null),
                };
                lines.push(format!("{k}: {h}"));
                let mut v = v;
                v["key"] = json!(k);
                values.push(v);
            }
            (
                lines.join("\n"),
                json!({"applied": r.applied, "items": values}),
            )
        }
        CtlOp::Complete {
            t,
            token,
            result,
            code,
            retention,
        } => {
            let r = client
                .complete(api::CompleteRequest {
                    namespace: t.namespace,
                    key: t.key.into_bytes(),
                    token,
                    result: result.into_bytes(),
                    code,
                    retention_ms: retention.unwrap_or(0),
                })
                .await?;
            (
                format!(
                    "COMPLETED completed_at_ms={} expires_at_ms={}",
                    r.completed_at_ms, r.expires_at_ms
                ),
                json!({"outcome": "COMPLETED", "completed_at_ms": r.completed_at_ms, "expires_at_ms": r.expires_at_ms}),
            )
        }
        CtlOp::Renew {
            t,
            token,
            lease,
            checkpoint,
        } => {
            let r = client
                .renew(api::RenewRequest {
                    namespace: t.namespace,
                    key: t.key.into_bytes(),
                    token,
                    lease_ms: lease,
                    checkpoint: checkpoint.map(String::into_bytes),
                })
                .await?;
            (
                format!("RENEWED lease_deadline_ms={}", r.lease_deadline_ms),
                json!({"outcome": "RENEWED", "lease_deadline_ms": r.lease_deadline_ms}),
            )
        }
        CtlOp::Release {
            t,
            token,
            error,
            permanent,
        } => {
            let r = client
                .release(api::ReleaseRequest {
                    namespace: t.namespace,
                    key: t.key.into_bytes(),
                    token,
                    error,
                    permanent,
                })
                .await?;
            let state = state_name(r.state);
            (
                format!("RELEASED state={state} attempts={}", r.attempts),
                json!({"outcome": "RELEASED", "state": state, "attempts": r.attempts}),
            )
        }
        CtlOp::Get { t, serializable } => {
            let consistency = if serializable {
                api::Consistency::Serializable
            } else {
                api::Consistency::Linearizable
            };
            let req = api::GetRequest {
                namespace: t.namespace.clone(),
                key: t.key.clone().into_bytes(),
                consistency: consistency as i32,
            };
            match client.get(req).await? {
                Some(r) => (record_text(&r), record_json(&r)),
                None => (
                    format!("ABSENT {}/{}", t.namespace, t.key),
                    json!({"state": "ABSENT", "namespace": t.namespace, "key": t.key}),
                ),
            }
        }
        CtlOp::Await { t, timeout } => {
            let r = client
                .r#await(api::AwaitRequest {
                    namespace: t.namespace,
                    key: t.key.into_bytes(),
                    timeout_ms: timeout,
                })
                .await?;
            let rec = r.record.unwrap_or_default();
            let mut v = record_json(&rec);
            v["timed_out"] = json!(r.timed_out);
            let suffix = if r.timed_out { " (timed out)" } else { "" };
            (format!("{}{suffix}", record_text(&rec)), v)
        }
        CtlOp::Delete { t, token } => {
            let r = client
                .delete(api::DeleteRequest {
                    namespace: t.namespace,
                    key: t.key.into_bytes(),
                    token,
                })
                .await?;
            (
                format!("DELETED existed={}", r.existed),
                json!({"outcome": "DELETED", "existed": r.existed}),
            )
        }
        CtlOp::Status => status(client).await,
        CtlOp::Check => check(client).await?,
        CtlOp::Snapshot {
            op: SnapshotOp::Save { file },
        } => save_snapshot(client, &file).await?,

        CtlOp::Member { op } => member(client, op).await?,
    })
}

async fn save_snapshot(
    client: &Client,
    file: &std::path::Path,
) -> Result<(String, Value), ClientError> {
    use std::io::Write;
    let io = |path: &std::path::Path, e: std::io::Error| {
        ClientError::Local(format!("{}: {e}", path.display()))
    };
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = std::path::PathBuf::from(part);
    let mut stream = client.save_snapshot().await?;
    let out = std::fs::File::create(&part).map_err(|e| io(&part, e))?;
    // From here on, whatever stops the save (the leader gone mid-stream, a
    // full disk, a copy that does not check) removes the part file it made.
    let received = async {
        let mut out = out;
        while let Some(chunk) = stream.message().await.map_err(ClientError::Status)? {
            out.write_all(&chunk.data).map_err(|e| io(&part, e))?;
        }
        out.sync_all().map_err(|e| io(&part, e))?;
        drop(out);
        let info = idemkv::store::inspect_snapshot(&part).map_err(|e| {
            ClientError::Protocol(format!(
                "the snapshot received does not check, nothing kept: {e}"
            ))
        })?;
        std::fs::rename(&part, file).map_err(|e| io(file, e))?;
        Ok(info)
    };
    let info = match received.await {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((
        format!(
            "SAVED {} index={} term={} records={} bytes={}",
            file.display(),
            info.index,
            info.term,
            info.records,
            info.bytes
        ),
        json!({"outcome": "SAVED", "file": file.display().to_string(), "snapshot": info}),
    ))
}

async fn check(client: &Client) -> Result<(String, Value), ClientError> {
    let at = client.hash_state(0).await?;
    let mut answers = Vec::new();
    for m in client.members().await? {
        let got = match client.member(&m.api_addr) {
            Ok(c) => c.hash_state(at.index).await,
            Err(e) => Err(e),
        };
        answers.push((m, got));
    }
    // The hash a majority of members hold is the reference and the rest
    // are named; without a majority, the leader's is, and that is said.
    let mut counts: std::collections::BTreeMap<&[u8], usize> = Default::default();
    for (_, got) in &answers {
        if let Ok(h) = got {
            *counts.entry(h.hash.as_slice()).or_default() += 1;
        }
    }
    let mut problems = Vec::new();
    let majority = match counts.iter().find(|(_, n)| **n * 2 > answers.len()) {
        Some((h, _)) => h.to_vec(),
        None => {
            problems.push(format!(
                "no majority of the {} members holds one hash; compared with the leader's",
                answers.len()
            ));
            at.hash.clone()
        }
    };
    let short = |h: &str| h.get(..16).unwrap_or(h).to_string();
    let mut lines = Vec::new();
    let mut nodes = Vec::new();
    for (m, got) in &answers {
        match got {
            Ok(h) => {
                let hash = hex::encode(&h.hash);
                let agrees = h.hash == majority;
                lines.push(format!(
                    "node {}  {}  entry={} records={} hash={}{}",
                    m.id,
                    m.api_addr,
                    h.index,
                    h.records,
                    short(&hash),
                    if agrees { "" } else { "  DIFFERS" }
                ));
                if !agrees {
                    problems.push(format!(
                        "node {} differs from the others at entry {} ({} records, hash {})",
                        m.id,
                        h.index,
                        h.records,
                        &hash[..16]
                    ));
                }
                nodes.push(json!({"id": m.id, "endpoint": m.api_addr, "index": h.index,
                    "records": h.records, "hash": hash, "agrees": agrees}));
            }
            Err(e) => {
                lines.push(format!(
                    "node {}  {}  NO ANSWER ({})",
                    m.id,
                    m.api_addr,
                    e.message()
                ));
                problems.push(format!("node {} could not answer: {}", m.id, e.message()));
                nodes.push(json!({"id": m.id, "endpoint": m.api_addr, "error": e.message()}));
            }
        }
    }
    let healthy = problems.is_empty();
    lines.push(if healthy {
        format!(
            "CHECK ok: {} members agree at entry {} ({} records)",
            answers.len(),
            at.index,
            at.records
        )
    } else {
        format!("CHECK failed: {}", problems.join("; "))
    });
    Ok((
        lines.join("\n"),
        json!({"healthy": healthy, "index": at.index, "problems": problems, "nodes": nodes}),
    ))
}

async fn member(client: &Client, op: MemberOp) -> Result<(String, Value), ClientError> {
    let voters = |members: &[api::Member]| -> Vec<u64> {
        members.iter().filter(|m| m.voter).map(|m| m.id).collect()
    };
    let (what, members) = match op {
        MemberOp::List => ("MEMBERS".to_string(), client.members().await?),
        MemberOp::Add {
            id,
            api_addr,
            raft_addr,
        } => (
            format!("ADDED learner {id}"),
            client.add_learner(id, &api_addr, &raft_addr).await?,
        ),
        MemberOp::Promote { id } => {
            let members = client.members().await?;
            if !members.iter().any(|m| m.id == id) {
                return Err(ClientError::Config(format!(
                    "node {id} is not a member; add it first with `ctl member add`"
                )));
            }
            let mut v = voters(&members);
            v.push(id);
            (format!("PROMOTED {id}"), client.change_voters(v).await?)
        }
        MemberOp::Remove { id } => {
            let members = client.members().await?;
            let v: Vec<u64> = voters(&members).into_iter().filter(|x| *x != id).collect();
            if v.is_empty() {
                return Err(ClientError::Config(format!(
                    "node {id} is the last voter; a cluster needs one"
                )));
            }
            (format!("REMOVED {id}"), client.change_voters(v).await?)
        }
        MemberOp::MoveLeader { id } => (format!("LEADER {id}"), client.move_leader(id).await?),
    };
    let mut lines = vec![what.clone()];
    let mut list = Vec::new();
    for m in &members {
        let kind = if m.voter { "voter" } else { "learner" };
        lines.push(format!(
            "member {}  {}  {}  {kind}",
            m.id, m.api_addr, m.raft_addr
        ));
        list.push(
            json!({"id": m.id, "api_addr": m.api_addr, "raft_addr": m.raft_addr, "voter": m.voter}),
        );
    }
    Ok((
        lines.join("\n"),
        json!({"outcome": what.split(' ').next(), "members": list}),
    ))
}

/// Every endpoint given and every member the cluster names, asked for its
/// status. Healthy when each answers and all agree on one leader; the
/// value's `healthy` says so (ctl exits 1 otherwise, for scripts and probes).
async fn status(client: &Client) -> (String, Value) {
    let mut all = client.status_all().await;
    let known: Vec<api::Member> = all
        .iter()
        .find_map(|(_, r)| r.as_ref().ok())
        .map(|s| s.members.clone())
        .unwrap_or_default();
    for m in &known {
        if all.iter().any(|(ep, _)| *ep == m.api_addr) {
            continue;
        }
        match client.member(&m.api_addr) {
            Ok(c) => all.extend(c.status_all().await),
            Err(e) => all.push((m.api_addr.clone(), Err(e))),
        }
    }
    let mut lines = Vec::new();
    let mut nodes = Vec::new();
    let mut problems = Vec::new();
    let mut leaders = std::collections::BTreeSet::new();
    for (ep, res) in &all {
        match res {
            Ok(s) => {
                let leader = s.leader_id.map_or("none".to_string(), |l| l.to_string());
                leaders.insert(s.leader_id);
                let mut line = format!(
                    "{ep}  node {}  {:<9} term={} leader={} commit={} applied={} last_log={} snapshot={}",
                    s.id, s.role, s.term, leader, s.commit_index, s.applied_index, s.last_log_index, s.snapshot_index
                );
                if let Some(until) = s.rejoin_until {
                    line.push_str(&format!(
                        "  REJOINING (no vote until it holds entry {until})"
                    ));
                    problems.push(format!(
                        "{ep} cut a damaged log record and gives no vote until it holds entry {until}"
                    ));
                }
                for alarm in &s.alarms {
                    line.push_str(&format!(
                        "  ALARM {alarm} (data {} of quota {} bytes: claims refused)",
                        s.data_bytes, s.quota_bytes
                    ));
                    problems.push(format!(
                        "{ep} raises {alarm}: its records take {} bytes, over the quota of {}",
                        s.data_bytes, s.quota_bytes
                    ));
                }
                lines.push(line);
                nodes.push(json!({
                    "endpoint": ep, "healthy": true, "id": s.id, "role": s.role, "term": s.term,
                    "leader_id": s.leader_id, "commit_index": s.commit_index,
                    "applied_index": s.applied_index, "last_log_index": s.last_log_index,
                    "snapshot_index": s.snapshot_index, "rejoin_until": s.rejoin_until,
                    "data_bytes": s.data_bytes, "quota_bytes": s.quota_bytes, "alarms": s.alarms,
                    "cluster_id": s.cluster_id,
                }));
            }
            Err(e) => {
                problems.push(format!("{ep} unreachable"));
                lines.push(format!("{ep}  UNREACHABLE ({})", e.message()));
                nodes.push(json!({"endpoint": ep, "healthy": false, "error": e.message()}));
            }
        }
    }
    match leaders.len() {
        0 => {}
        1 if leaders.first() == Some(&None) => problems.push("no leader".into()),
        1 => {}
        _ => problems.push(format!("nodes disagree on the leader: {leaders:?}")),
    }
    let members: Vec<Value> = known
        .iter()
        .map(|m| json!({"id": m.id, "api_addr": m.api_addr, "raft_addr": m.raft_addr, "voter": m.voter}))
        .collect();
    for m in &known {
        let kind = if m.voter { "voter" } else { "learner" };
        lines.push(format!("member {}  {}  {kind}", m.id, m.api_addr));
    }
    let healthy = problems.is_empty();
    lines.push(if healthy {
        "HEALTH ok".to_string()
    } else {
        format!("HEALTH degraded: {}", problems.join("; "))
    });
    (
        lines.join("\n"),
        json!({"healthy": healthy, "problems": problems, "nodes": nodes, "members": members}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--retry-for`'s help repeats the client's defaults (how long a call
    /// keeps trying, the longest pause between tries); a change to
    /// `ClientOptions::default()` must change the help with it.
    #[test]
    fn retry_for_help_names_the_clients_defaults() {
        #[derive(clap::Parser)]
        struct Ctl {
            #[command(flatten)]
            args: CtlArgs,
        }
        let help = Ctl::command().render_long_help().to_string();
        let d = idemkv::client::ClientOptions::default();
        let window = format!("{}s by default", d.retry_for.as_secs());
        let pause = format!("up to {} ms", d.backoff_max.as_millis());
        assert!(help.contains(&window), "help lacks {window:?}:\n{help}");
        assert!(help.contains(&pause), "help lacks {pause:?}:\n{help}");
    }
}
