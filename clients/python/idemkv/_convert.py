"""Arguments in, results out: Python values <-> the proto's messages.

Shared by the sync and asyncio clients; no I/O here. Each client method is
one :class:`Call` built below (``claim_call``, ``complete_call``, ...): the
checked request, how its reply becomes the result, and how the retry loop
treats it. The clients only run it, blocking or awaited.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple, Type, Union

from ._retry import never_sent_details, not_run
from .errors import ConfigError, NotFound, OutcomeUnknown, ProtocolError, Unavailable
from .types import (
    Acquired,
    BatchResult,
    ClaimOutcome,
    Completed,
    CompleteResult,
    Consistency,
    Failed,
    InProgress,
    ItemError,
    Member,
    Record,
    RecordState,
    ReleaseResult,
    RenewResult,
    Status,
    WaitResult,
)
from .v1 import api_pb2 as pb

#: A duration: seconds (``int`` or ``float``) or a ``timedelta``.
Duration = Union[int, float, timedelta]
#: A key or fingerprint: ``bytes``, or ``str`` (sent as UTF-8).
Bytes = Union[bytes, bytearray, memoryview, str]


def seconds(value: Duration, name: str) -> float:
    """``value`` in seconds; a ``ConfigError`` naming ``name`` if not a
    finite, non-negative duration."""
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        s = float(value)
    else:
        raise ConfigError(f"{name}: expected seconds or a timedelta, got {value!r}")
    if not math.isfinite(s) or s < 0:
        raise ConfigError(f"{name}: must be a finite duration >= 0, got {value!r}")
    return s


def millis(value: Optional[Duration], name: str) -> int:
    """``value`` in whole milliseconds (0 for ``None``: the server default)."""
    if value is None:
        return 0
    return int(round(seconds(value, name) * 1000))


def to_bytes(value: Bytes, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ConfigError(f"{name}: expected bytes or str, got {type(value).__name__}")


def opt_bytes(value: Optional[Bytes], name: str) -> Optional[bytes]:
    return None if value is None else to_bytes(value, name)


def _message(cls: Any, **fields: Any) -> Any:
    """A ``cls`` message of ``fields``, leaving the proto's optional fields
    unset where the value is None."""
    return cls(**{name: value for name, value in fields.items() if value is not None})


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def outcome(msg, claim_id: str = "") -> ClaimOutcome:
    """The outcome of a ClaimResponse (or a batch item without an error)."""
    kind = msg.WhichOneof("outcome")
    if kind == "acquired":
        a = msg.acquired
        return Acquired(
            token=a.token,
            lease_deadline_ms=a.lease_deadline_ms,
            attempt=a.attempt,
            previous_owner=_opt(a, "previous_owner"),
            checkpoint=_opt(a, "checkpoint"),
            claim_id=claim_id,
        )
    if kind == "in_progress":
        p = msg.in_progress
        return InProgress(
            owner=p.owner, lease_remaining=p.lease_remaining_ms / 1000, attempt=p.attempt
        )
    if kind == "completed":
        c = msg.completed
        return Completed(
            result=c.result,
            completed_at_ms=c.completed_at_ms,
            token=c.token,
            code=_opt(c, "code"),
        )
    if kind == "failed":
        return Failed(attempts=msg.failed.attempts, last_error=msg.failed.last_error)
    raise ProtocolError(f"a claim reply without an outcome: {msg}")


def batch_item(msg, claim_id: str):
    if msg.WhichOneof("outcome") == "error":
        return ItemError(reason=msg.error.reason, message=msg.error.message)
    return outcome(msg, claim_id)


def state(value: int) -> RecordState:
    try:
        return RecordState(value)
    except ValueError:
        raise ProtocolError(f"unknown record state {value}") from None


def record(msg) -> Record:
    return Record(
        namespace=msg.namespace,
        key=msg.key,
        state=state(msg.state),
        owner=msg.owner,
        token=msg.token,
        lease_deadline_ms=msg.lease_deadline_ms,
        attempts=msg.attempts,
        max_attempts=msg.max_attempts,
        fingerprint=_opt(msg, "fingerprint"),
        created_at_ms=msg.created_at_ms,
        result=msg.result,
        code=_opt(msg, "code"),
        completed_at_ms=msg.completed_at_ms,
        expires_at_ms=msg.expires_at_ms,
        last_error=msg.last_error,
        checkpoint=_opt(msg, "checkpoint"),
        updated_at_ms=msg.updated_at_ms,
    )


def status(msg) -> Status:
    return Status(
        id=msg.id,
        role=msg.role,
        leader_id=_opt(msg, "leader_id"),
        leader_api_addr=msg.leader_api_addr,
        term=msg.term,
        commit_index=msg.commit_index,
        applied_index=msg.applied_index,
        last_log_index=msg.last_log_index,
        members=[
            Member(id=m.id, api_addr=m.api_addr, raft_addr=m.raft_addr, voter=m.voter)
            for m in msg.members
        ],
        snapshot_index=msg.snapshot_index,
        api_addr=msg.api_addr,
        clock_ms=msg.clock_ms,
        wall_clock_ms=msg.wall_clock_ms,
        data_bytes=msg.data_bytes,
        quota_bytes=msg.quota_bytes,
        alarms=list(msg.alarms),
        cluster_id=msg.cluster_id,
    )


def claim_request(
    namespace: str,
    key: Bytes,
    *,
    owner: str,
    claim_id: str,
    lease: Duration,
    fingerprint: Optional[Bytes],
    max_attempts: int,
    retention: Optional[Duration],
) -> "pb.ClaimRequest":
    return _message(
        pb.ClaimRequest,
        namespace=namespace,
        key=to_bytes(key, "key"),
        owner=owner,
        claim_id=claim_id,
        lease_ms=millis(lease, "lease"),
        max_attempts=max_attempts,
        retention_ms=millis(retention, "retention"),
        fingerprint=opt_bytes(fingerprint, "fingerprint"),
    )


# ---------------------------------------------------------------- the calls


class Call(NamedTuple):
    """One client method's RPC: what to send, what its reply means, and how
    the retry loop treats it (``how``: ``extra_timeout``, ``again``,
    ``cluster``). An error of a class in ``catch`` goes to ``failed``,
    which returns the method's result or raises."""

    rpc: str
    request: Any
    done: Callable[[Any], Any]
    how: Dict[str, Any] = {}
    catch: Tuple[Type[BaseException], ...] = ()
    failed: Optional[Callable[[Any], Any]] = None


def claim_call(
    owner: str,
    namespace: str,
    key: Bytes,
    lease: Duration,
    claim_id: Optional[str],
    fingerprint: Optional[Bytes],
    max_attempts: int,
    retention: Optional[Duration],
) -> Call:
    # Made once here, so every retry of this call is the same claim.
    claim_id = claim_id or uuid.uuid4().hex
    req = claim_request(
        namespace,
        key,
        owner=owner,
        claim_id=claim_id,
        lease=lease,
        fingerprint=fingerprint,
        max_attempts=max_attempts,
        retention=retention,
    )
    return Call("Claim", req, lambda r: outcome(r, claim_id))


def claim_batch_call(
    owner: str,
    namespace: str,
    keys: Iterable[Bytes],
    lease: Duration,
    fingerprints: Optional[Sequence[Optional[Bytes]]],
    max_attempts: int,
    retention: Optional[Duration],
    all_or_nothing: bool,
) -> Call:
    keys = list(keys)
    fps = list(fingerprints) if fingerprints is not None else [None] * len(keys)
    if len(fps) != len(keys):
        raise ConfigError(f"fingerprints: {len(fps)} given for {len(keys)} keys")
    items = [
        claim_request(
            namespace,
            k,
            owner=owner,
            claim_id=uuid.uuid4().hex,
            lease=lease,
            fingerprint=fp,
            max_attempts=max_attempts,
            retention=retention,
        )
        for k, fp in zip(keys, fps)
    ]

    def done(reply: Any) -> BatchResult:
        return BatchResult(
            items=[batch_item(m, it.claim_id) for m, it in zip(reply.items, items)],
            applied=reply.applied,
        )

    return Call("ClaimBatch", pb.ClaimBatchRequest(items=items, all_or_nothing=all_or_nothing), done)


def complete_call(
    namespace: str, key: Bytes, token: int, result: Bytes, code: Optional[int], retention: Optional[Duration]
) -> Call:
    req = _message(
        pb.CompleteRequest,
        namespace=namespace,
        key=to_bytes(key, "key"),
        token=token,
        result=to_bytes(result, "result"),
        retention_ms=millis(retention, "retention"),
        code=code,
    )
    return Call("Complete", req, lambda r: CompleteResult(completed_at_ms=r.completed_at_ms, expires_at_ms=r.expires_at_ms))


def renew_request(namespace: str, key: Bytes, token: int, lease: Duration, checkpoint: Optional[Bytes]) -> Any:
    return _message(
        pb.RenewRequest,
        namespace=namespace,
        key=to_bytes(key, "key"),
        token=token,
        lease_ms=millis(lease, "lease"),
        checkpoint=opt_bytes(checkpoint, "checkpoint"),
    )


def renew_call(namespace: str, key: Bytes, token: int, lease: Duration, checkpoint: Optional[Bytes]) -> Call:
    req = renew_request(namespace, key, token, lease, checkpoint)
    return Call("Renew", req, lambda r: RenewResult(lease_deadline_ms=r.lease_deadline_ms))


def release_request(namespace: str, key: Bytes, token: int, error: str, permanent: bool = False) -> Any:
    return pb.ReleaseRequest(
        namespace=namespace, key=to_bytes(key, "key"), token=token, error=error, permanent=permanent
    )


def release_call(namespace: str, key: Bytes, token: int, error: str, permanent: bool = False) -> Call:
    req = release_request(namespace, key, token, error, permanent)
    return Call("Release", req, lambda r: ReleaseResult(state=state(r.state), attempts=r.attempts))


def get_call(namespace: str, key: Bytes, consistency: Consistency) -> Call:
    req = pb.GetRequest(namespace=namespace, key=to_bytes(key, "key"), consistency=consistency.value)
    # An absent key is None, not an error.
    return Call("Get", req, lambda r: record(r.record), catch=(NotFound,), failed=lambda e: None)


def wait_call(namespace: str, key: Bytes, timeout: Duration) -> Call:
    wait_s = seconds(timeout, "timeout")
    req = pb.AwaitRequest(namespace=namespace, key=to_bytes(key, "key"), timeout_ms=max(1, millis(wait_s, "timeout")))
    done: Callable[[Any], WaitResult] = lambda r: WaitResult(record=record(r.record), timed_out=r.timed_out)
    return Call("Await", req, done, how={"extra_timeout": wait_s})


def _delete_outcome_unknown(e: Unavailable) -> Any:
    if never_sent_details(e.message):
        raise e  # never sent to any node: certainly not applied
    raise OutcomeUnknown(
        f"the unfenced delete may or may not have taken effect, and retrying it is not safe ({e})",
        code=e.code,
    ) from e


def delete_call(namespace: str, key: Bytes, token: Optional[int]) -> Call:
    req = _message(pb.DeleteRequest, namespace=namespace, key=to_bytes(key, "key"), token=token)
    if token is not None:
        # Fenced: retried like every fenced write.
        return Call("Delete", req, lambda r: r.existed)
    # Unfenced: a retry could delete a newer claim. Sent elsewhere only when
    # it cannot have run (refused unrun, or never sent: the connection
    # failed); a lost answer is OutcomeUnknown.
    return Call(
        "Delete",
        req,
        lambda r: r.existed,
        how={"again": not_run},
        catch=(Unavailable,),
        failed=_delete_outcome_unknown,
    )


def status_call() -> Call:
    return Call("Status", pb.StatusRequest(), status, how={"cluster": True})
