"""Arguments in, results out: Python values <-> the proto's messages.

Shared by the sync and asyncio clients; no I/O here.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Optional, Union

from .errors import ConfigError, ProtocolError
from .types import (
    Acquired,
    ClaimOutcome,
    Completed,
    Failed,
    InProgress,
    ItemError,
    Member,
    Record,
    RecordState,
    Status,
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
    req = pb.ClaimRequest(
        namespace=namespace,
        key=to_bytes(key, "key"),
        owner=owner,
        claim_id=claim_id,
        lease_ms=millis(lease, "lease"),
        max_attempts=max_attempts,
        retention_ms=millis(retention, "retention"),
    )
    if fingerprint is not None:
        req.fingerprint = to_bytes(fingerprint, "fingerprint")
    return req
