"""idemkv: the Python client of the idemkv idempotency store.

::

    import idemkv

    client = idemkv.Client("127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")
    result = client.run_once("orders", "o-1", lambda claim: b"shipped", lease=30.0)
    result.value      # b"shipped", from this run or replayed
    result.replayed   # True for every call after the first

- :class:`Client` (and :class:`idemkv.aio.Client` for asyncio): every call
  of the API, with safe retries and leader following.
- :meth:`Client.run_once` and :meth:`Client.idempotent`: claim, renew while
  the work runs, complete or replay.
- :mod:`idemkv.errors`: one exception per gRPC status and refusal reason.
- :mod:`idemkv.v1`: the generated stubs, for anything the client lacks.
"""

from ._endpoints import DEFAULT_ENDPOINTS, TLS
from ._lease import current_claim
from ._retry import RetryOptions
from ._run_once import Claim
from .client import Client
from .errors import (
    AlreadyCompleted,
    AttemptsExhausted,
    Busy,
    ConfigError,
    DeadlineExceeded,
    FingerprintMismatch,
    GrantExpired,
    ResultNotSaved,
    IdemkvError,
    InternalError,
    InvalidArgument,
    LeaseLost,
    NoSpace,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    RuleError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from .types import (
    Acquired,
    BatchResult,
    ClaimOutcome,
    Completed,
    CompleteResult,
    Completion,
    Consistency,
    Failed,
    InProgress,
    ItemError,
    Member,
    Record,
    RecordState,
    ReleaseResult,
    RenewResult,
    RunResult,
    Status,
    WaitResult,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ENDPOINTS",
    "TLS",
    "Client",
    "Claim",
    "RetryOptions",
    "current_claim",
    "AlreadyCompleted",
    "AttemptsExhausted",
    "Busy",
    "ConfigError",
    "DeadlineExceeded",
    "FingerprintMismatch",
    "GrantExpired",
    "ResultNotSaved",
    "IdemkvError",
    "InternalError",
    "InvalidArgument",
    "LeaseLost",
    "NoSpace",
    "NotFound",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "RuleError",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "Acquired",
    "BatchResult",
    "ClaimOutcome",
    "Completed",
    "CompleteResult",
    "Completion",
    "Consistency",
    "Failed",
    "InProgress",
    "ItemError",
    "Member",
    "Record",
    "RecordState",
    "ReleaseResult",
    "RenewResult",
    "RunResult",
    "Status",
    "WaitResult",
]
