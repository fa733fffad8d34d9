//! The API edge: every limit of SPEC §4 is checked here, before anything is
//! proposed, and protobuf requests become record commands. Each validator
//! builds the command, then checks it with the same functions the leader
//! runs on forwarded commands ([`command`]), so the two cannot drift. An error names the
//! field and the limit; a rejected request changes nothing.

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::pb::api;
use crate::record::{self, Claim, Command, Op, RecordKey};

fn check_len(field: &str, len: usize, max: usize, unit: &str) -> Result<()> {
    if len > max {
        return Err(Error::too_large(
            field,
            format!("is {len} {unit}; the limit is {max} {unit}"),
        ));
    }
    Ok(())
}

pub fn key(limits: &Limits, namespace: &str, key: &[u8]) -> Result<RecordKey> {
    if namespace.is_empty() || namespace.chars().count() > limits.namespace_max {
        return Err(Error::invalid(
            "namespace",
            format!(
                "must be 1-{} characters of [A-Za-z0-9_.-]",
                limits.namespace_max
            ),
        ));
    }
    if let Some(c) = namespace
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return Err(Error::invalid(
            "namespace",
            format!("character {c:?} is not allowed; use [A-Za-z0-9_.-]"),
        ));
    }
    if key.is_empty() {
        return Err(Error::invalid(
            "key",
            format!("must be 1-{} bytes; it is empty", limits.key_max),
        ));
    }
    if key.len() > limits.key_max {
        return Err(Error::invalid(
            "key",
            format!(
                "is {} bytes; the limit is {} bytes",
                key.len(),
                limits.key_max
            ),
        ));
    }
    Ok(RecordKey {
        namespace: namespace.to_string(),
        key: key.to_vec(),
    })
}

pub fn lease(limits: &Limits, field: &str, ms: u64) -> Result<u64> {
    if ms < limits.lease_min_ms || ms > limits.lease_max_ms {
        return Err(Error::invalid(
            field,
            format!(
                "is {ms} ms; it must be between {} ms and {} ms",
                limits.lease_min_ms, limits.lease_max_ms
            ),
        ));
    }
    Ok(ms)
}

/// `0` means "not given"; otherwise it must be within the limits.
pub fn retention(limits: &Limits, ms: u64) -> Result<Option<u64>> {
    if ms == 0 {
        return Ok(None);
    }
    if ms < limits.retention_min_ms || ms > limits.retention_max_ms {
        return Err(Error::invalid(
            "retention_ms",
            format!(
                "is {ms} ms; it must be between {} ms and {} ms",
                limits.retention_min_ms, limits.retention_max_ms
            ),
        ));
    }
    Ok(Some(ms))
}

fn token(t: u64) -> Result<u64> {
    if t == 0 {
        return Err(Error::invalid(
            "token",
            "is required (the token ACQUIRED returned)",
        ));
    }
    Ok(t)
}

pub fn delete(limits: &Limits, r: &api::DeleteRequest) -> Result<(RecordKey, Op)> {
    let k = key(limits, &r.namespace, &r.key)?;
    let op = match r.token {
        Some(token) => Op::DeleteFenced { token },
        None => Op::Delete,
    };
    op_limits(limits, &op)?;
    Ok((k, op))
}

pub fn claim(limits: &Limits, r: &api::ClaimRequest) -> Result<(RecordKey, Claim)> {
    let k = key(limits, &r.namespace, &r.key)?;
    let c = Claim {
        owner: r.owner.clone(),
        claim_id: r.claim_id.clone(),
        lease_ms: r.lease_ms,
        fingerprint: r.fingerprint.clone(),
        max_attempts: r.max_attempts,
        // 0 means "not given".
        retention_ms: match r.retention_ms {
            0 => limits.retention_default_ms,
            ms => ms,
        },
    };
    claim_limits(limits, &c)?;
    Ok((k, c))
}

/// Short identifiers over their limit are bad input, not "too large" data.
fn as_invalid(e: Error) -> Error {
    match e {
        Error::TooLarge { field, message } => Error::InvalidArgument { field, message },
        other => other,
    }
}

pub fn claim_batch(limits: &Limits, r: &api::ClaimBatchRequest) -> Result<Vec<(RecordKey, Claim)>> {
    batch_len(limits, r.items.len())?;
    let items = r
        .items
        .iter()
        .enumerate()
        .map(|(i, item)| claim(limits, item).map_err(at_item(i)))
        .collect::<Result<Vec<_>>>()?;
    distinct_keys(&items)?;
    Ok(items)
}

fn batch_len(limits: &Limits, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("items", "the batch is empty"));
    }
    if n > limits.batch_max {
        return Err(Error::too_large(
            "items",
            format!("the batch has {n} items; the limit is {}", limits.batch_max),
        ));
    }
    Ok(())
}

/// The field of an error about item `i` of a batch, as `items[i].field`.
fn at_item(i: usize) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::InvalidArgument { field, message } => Error::InvalidArgument {
            field: format!("items[{i}].{field}"),
            message,
        },
        Error::TooLarge { field, message } => Error::TooLarge {
            field: format!("items[{i}].{field}"),
            message,
        },
        other => other,
    }
}

fn distinct_keys(items: &[(RecordKey, Claim)]) -> Result<()> {
    match record::repeated_key(items.iter().map(|(k, _)| k)) {
        Some(i) => Err(Error::invalid(
            &format!("items[{i}].key"),
            "appears twice in the batch; each key may be claimed once per batch",
        )),
        None => Ok(()),
    }
}

pub fn complete(limits: &Limits, r: &api::CompleteRequest) -> Result<(RecordKey, Op)> {
    let k = key(limits, &r.namespace, &r.key)?;
    let op = Op::Complete {
        token: r.token,
        result: r.result.clone(),
        code: r.code,
        // 0 means "keep the retention chosen at claim time".
        retention_ms: (r.retention_ms != 0).then_some(r.retention_ms),
    };
    op_limits(limits, &op)?;
    Ok((k, op))
}

pub fn renew(limits: &Limits, r: &api::RenewRequest) -> Result<(RecordKey, Op)> {
    let k = key(limits, &r.namespace, &r.key)?;
    let op = Op::Renew {
        token: r.token,
        lease_ms: r.lease_ms,
        checkpoint: r.checkpoint.clone(),
    };
    op_limits(limits, &op)?;
    Ok((k, op))
}

pub fn release(limits: &Limits, r: &api::ReleaseRequest) -> Result<(RecordKey, Op)> {
    let k = key(limits, &r.namespace, &r.key)?;
    let (token, error) = (r.token, r.error.clone());
    let op = if r.permanent {
        Op::ReleasePermanent { token, error }
    } else {
        Op::Release { token, error }
    };
    op_limits(limits, &op)?;
    Ok((k, op))
}

pub fn await_timeout(limits: &Limits, ms: u64) -> Result<u64> {
    if ms == 0 || ms > limits.await_max_ms {
        return Err(Error::invalid(
            "timeout_ms",
            format!(
                "is {ms} ms; it must be between 1 ms and {} ms",
                limits.await_max_ms
            ),
        ));
    }
    Ok(ms)
}

/// The most records one sweep entry may remove, whoever proposed it.
pub const SWEEP_LIMIT_MAX: u32 = 100_000;

/// Check a decoded command against every limit of SPEC §4: the same checks
/// the client port makes (its validators above build the command and call
/// these), run again by the leader on every forwarded write, so a peer (or
/// a follower configured with looser limits) never gets in what a client
/// could not (SPEC §5).
pub fn command(limits: &Limits, c: &Command) -> Result<()> {
    match c {
        Command::Op { key: k, op } => {
            record_key(limits, k)?;
            op_limits(limits, op)
        }
        Command::ClaimBatch { items, .. } => {
            batch_len(limits, items.len())?;
            for (i, (k, c)) in items.iter().enumerate() {
                record_key(limits, k)
                    .and_then(|()| claim_limits(limits, c))
                    .map_err(at_item(i))?;
            }
            distinct_keys(items)
        }
        Command::Many(_) => Err(Error::invalid(
            "command",
            "a coalesced entry is made by the leader alone; it is never accepted from a peer",
        )),
        // Changes nothing; a follower forwards `ctl check`'s request.
        Command::Hash => Ok(()),
        Command::Sweep { limit } => {
            if *limit == 0 || *limit > SWEEP_LIMIT_MAX {
                return Err(Error::invalid(
                    "sweep.limit",
                    format!("is {limit}; it must be 1-{SWEEP_LIMIT_MAX}"),
                ));
            }
            Ok(())
        }
    }
}

fn record_key(limits: &Limits, k: &RecordKey) -> Result<()> {
    key(limits, &k.namespace, &k.key).map(|_| ())
}

fn claim_limits(limits: &Limits, c: &Claim) -> Result<()> {
    if c.owner.is_empty() {
        return Err(Error::invalid("owner", "is required"));
    }
    check_len("owner", c.owner.len(), limits.owner_max, "bytes").map_err(as_invalid)?;
    if c.claim_id.is_empty() {
        return Err(Error::invalid(
            "claim_id",
            format!(
                "is required (1-{} bytes, fixed for every retry of one claim; the client library makes one)",
                limits.claim_id_max
            ),
        ));
    }
    check_len("claim_id", c.claim_id.len(), limits.claim_id_max, "bytes").map_err(as_invalid)?;
    if let Some(fp) = &c.fingerprint {
        check_len("fingerprint", fp.len(), limits.fingerprint_max, "bytes").map_err(as_invalid)?;
    }
    lease(limits, "lease_ms", c.lease_ms)?;
    retention_set(limits, c.retention_ms)
}

/// A retention that is set (never 0 inside a command) and within limits.
fn retention_set(limits: &Limits, ms: u64) -> Result<()> {
    match retention(limits, ms)? {
        Some(_) => Ok(()),
        None => Err(Error::invalid("retention_ms", "is 0")),
    }
}

fn op_limits(limits: &Limits, op: &Op) -> Result<()> {
    match op {
        Op::Claim(c) => claim_limits(limits, c),
        Op::Complete {
            token: t,
            result,
            retention_ms,
            ..
        } => {
            token(*t)?;
            check_len("result", result.len(), limits.result_max, "bytes")?;
            match retention_ms {
                Some(ms) => retention_set(limits, *ms),
                None => Ok(()),
            }
        }
        Op::Renew {
            token: t,
            lease_ms,
            checkpoint,
        } => {
            token(*t)?;
            lease(limits, "lease_ms", *lease_ms)?;
            match checkpoint {
                Some(cp) => check_len("checkpoint", cp.len(), limits.checkpoint_max, "bytes"),
                None => Ok(()),
            }
        }
        Op::Release { token: t, error } | Op::ReleasePermanent { token: t, error } => {
            token(*t)?;
            check_len("error", error.len(), limits.error_max, "bytes")
        }
        Op::Delete => Ok(()),
        Op::DeleteFenced { token: t } => token(*t).map(|_| ()),
    }
}
