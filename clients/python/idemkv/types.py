"""The results of the client's calls, as typed, frozen dataclasses.

Times the server reports are milliseconds since the Unix epoch on the
cluster's clock (the ``*_ms`` fields, as in the proto), with ``datetime``
properties beside them; durations are seconds (``float``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Generic, List, Optional, TypeVar, Union

T = TypeVar("T")


def _at(ms: int) -> Optional[datetime]:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


class RecordState(enum.Enum):
    """The state of a stored record (SPEC §1)."""

    IN_PROGRESS = 1
    AVAILABLE = 2
    COMPLETED = 3
    FAILED = 4


class Consistency(enum.Enum):
    """How ``get`` reads: through the leader (default) or from the local node."""

    LINEARIZABLE = 0
    SERIALIZABLE = 1


@dataclass(frozen=True)
class Acquired:
    """The claim is ours: do the work, then ``complete`` or ``release``."""

    token: int
    lease_deadline_ms: int
    attempt: int
    previous_owner: Optional[str] = None
    #: The last checkpoint of the previous holder, if it saved one.
    checkpoint: Optional[bytes] = None
    #: The claim's id; claiming again with it returns this same grant.
    claim_id: str = ""


@dataclass(frozen=True)
class InProgress:
    """Another worker holds a live lease on the key."""

    owner: str
    #: Seconds left on the holder's lease.
    lease_remaining: float
    attempt: int


@dataclass(frozen=True)
class Completed:
    """The key is done: the saved result, replayed."""

    result: bytes
    completed_at_ms: int
    token: int
    code: Optional[int] = None

    @property
    def completed_at(self) -> Optional[datetime]:
        return _at(self.completed_at_ms)


@dataclass(frozen=True)
class Failed:
    """``max_attempts`` is used up: the key is a dead letter."""

    attempts: int
    last_error: str


#: What a claim returns.
ClaimOutcome = Union[Acquired, InProgress, Completed, Failed]


@dataclass(frozen=True)
class ItemError:
    """A batch item the rules refused (``FINGERPRINT_MISMATCH``), or did not
    try (``NOT_ATTEMPTED``, in a refused all-or-nothing batch)."""

    reason: str
    message: str


@dataclass(frozen=True)
class BatchResult:
    """One outcome per requested key, in order; ``applied`` is false when an
    all-or-nothing batch changed nothing."""

    items: List[Union[Acquired, InProgress, Completed, Failed, ItemError]]
    applied: bool


@dataclass(frozen=True)
class Record:
    """A stored record, as ``get`` and ``wait`` return it."""

    namespace: str
    key: bytes
    state: RecordState
    owner: str = ""
    token: int = 0
    lease_deadline_ms: int = 0
    attempts: int = 0
    max_attempts: int = 0
    fingerprint: Optional[bytes] = None
    created_at_ms: int = 0
    result: bytes = b""
    code: Optional[int] = None
    completed_at_ms: int = 0
    expires_at_ms: int = 0
    last_error: str = ""
    checkpoint: Optional[bytes] = None
    updated_at_ms: int = 0

    @property
    def created_at(self) -> Optional[datetime]:
        return _at(self.created_at_ms)

    @property
    def completed_at(self) -> Optional[datetime]:
        return _at(self.completed_at_ms)

    @property
    def expires_at(self) -> Optional[datetime]:
        return _at(self.expires_at_ms)


@dataclass(frozen=True)
class WaitResult:
    """What ``wait`` (the Await RPC) saw: the record once it left
    IN_PROGRESS, or as it was when the timeout passed (``timed_out``)."""

    record: Record
    timed_out: bool


@dataclass(frozen=True)
class CompleteResult:
    completed_at_ms: int
    expires_at_ms: int

    @property
    def expires_at(self) -> Optional[datetime]:
        return _at(self.expires_at_ms)


@dataclass(frozen=True)
class RenewResult:
    #: The new lease deadline on the cluster's clock (ms since the epoch).
    lease_deadline_ms: int


@dataclass(frozen=True)
class ReleaseResult:
    #: AVAILABLE, or FAILED once ``max_attempts`` is reached.
    state: RecordState
    attempts: int


@dataclass(frozen=True)
class Member:
    id: int
    api_addr: str
    raft_addr: str
    voter: bool


@dataclass(frozen=True)
class Status:
    """One node's view of the cluster (the Cluster.Status RPC)."""

    id: int
    role: str
    leader_id: Optional[int]
    leader_api_addr: str
    term: int
    commit_index: int
    applied_index: int
    last_log_index: int
    members: List[Member]
    snapshot_index: int
    api_addr: str
    clock_ms: int
    wall_clock_ms: int
    data_bytes: int
    quota_bytes: int
    alarms: List[str] = field(default_factory=list)
    cluster_id: str = ""


@dataclass(frozen=True)
class Completion(Generic[T]):
    """What ``run_once`` work may return to save a code with its result:
    ``Completion(value, code=201)``. ``value`` goes through the serializer;
    ``code`` is an ``int`` in the proto's int32 range (``TypeError`` or
    ``ValueError`` here otherwise, before anything is sent)."""

    value: T
    code: Optional[int] = None

    def __post_init__(self) -> None:
        check_code(self.code)


def check_code(code: Optional[int]) -> None:
    """A result's code: None, or an ``int`` (not a ``bool``) within int32."""
    if code is None:
        return
    if not isinstance(code, int) or isinstance(code, bool):
        raise TypeError(f"code: expected an int (an HTTP status, say) or None, got {type(code).__name__} {code!r}")
    if not -(2**31) <= code < 2**31:
        raise ValueError(f"code: {code} is outside the int32 range the store keeps")


@dataclass(frozen=True)
class RunResult(Generic[T]):
    """What ``run_once`` returns: the work's value, from this run or replayed."""

    value: T
    #: False: this call ran the work and saved its result. True: an earlier
    #: run's saved result.
    replayed: bool
    #: The fencing token the result was saved under.
    token: int
    code: Optional[int] = None
    #: The stored bytes.
    raw: bytes = b""
