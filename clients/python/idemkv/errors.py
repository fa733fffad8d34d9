"""Exceptions the client raises: one class per gRPC status and refusal reason.

The server answers a refusal with a gRPC status code, a message that names
the field or rule, and for rule refusals and overloads a reason in the
``idemkv-reason`` trailer (``LEASE_LOST``, ``FINGERPRINT_MISMATCH``,
``ALREADY_COMPLETED``, ``OVERLOADED``, ``NOSPACE``). :func:`from_rpc_error`
turns that into the most specific class below; every one carries the
server's ``message``, the ``code`` and the ``reason``, so a reason this
version does not know still reaches the caller as its code's class.

Hierarchy::

    IdemkvError
    ├── InvalidArgument            bad input; the message names the field
    ├── NotFound
    ├── RuleError                  FAILED_PRECONDITION: a record rule refused
    │   ├── LeaseLost              the token no longer holds the claim
    │   ├── FingerprintMismatch    the key was used for another request
    │   └── AlreadyCompleted       completed with another result
    ├── Unavailable                no leader/quorum, node down (retried first)
    │   ├── DeadlineExceeded       no answer in time
    │   └── OutcomeUnknown         an unsafe-to-retry write may have happened
    ├── ResourceExhausted
    │   ├── TooLarge               a field over its limit
    │   ├── Overloaded             a node's cap (retried first)
    │   └── NoSpace                the cluster's data quota is full
    ├── Unauthenticated
    ├── PermissionDenied
    ├── InternalError
    ├── ProtocolError              a reply that breaks the protocol
    ├── Busy                       run_once: another worker holds the key
    ├── AttemptsExhausted          run_once: the key is FAILED
    ├── GrantExpired               run_once: the grant came too late to use
    ├── ResultNotSaved             run_once: the work ran, its result not saved
    └── ConfigError (ValueError)   bad endpoints or settings
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

REASON_TRAILER = "idemkv-reason"


class IdemkvError(Exception):
    """Base of every error the idemkv client raises.

    Attributes:
        message: the server's message (or the client's, for local errors).
        code: the gRPC status code, or ``None`` for client-side errors.
        reason: the ``idemkv-reason`` trailer (``LEASE_LOST``, ...), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        reason: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{getattr(self.code, 'name', self.code)}: {self.message}"


class InvalidArgument(IdemkvError):
    """The request was refused before anything was proposed (INVALID_ARGUMENT)."""


class NotFound(IdemkvError):
    """The record does not exist (NOT_FOUND)."""


class RuleError(IdemkvError):
    """A rule of the record model refused the call (FAILED_PRECONDITION);
    nothing changed."""


class LeaseLost(RuleError):
    """The token no longer holds the claim: another worker took it over, or it
    was deleted (``LEASE_LOST``).

    :meth:`Client.run_once` raises it too when the client-side lease
    deadline passed with no renewal through; then ``why`` is ``"expired"``
    (``"fenced"`` when the server refused the token) and ``code`` is
    ``None``. Either way the work's result was not saved.
    """

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        reason: Optional[str] = "LEASE_LOST",
        token: Optional[int] = None,
        why: str = "fenced",
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.token = token
        self.why = why


class FingerprintMismatch(RuleError):
    """The key holds another request's fingerprint: the key was reused for a
    different payload (``FINGERPRINT_MISMATCH``)."""


class AlreadyCompleted(RuleError):
    """The record was completed with another result (``ALREADY_COMPLETED``)."""


class Unavailable(IdemkvError):
    """No leader or quorum, or the node could not be reached (UNAVAILABLE).
    Raised only after the client's safe retries ran out."""


class DeadlineExceeded(Unavailable):
    """No answer within the call's deadline (DEADLINE_EXCEEDED)."""


class OutcomeUnknown(Unavailable):
    """A write that is not safe to retry (an unfenced delete) was sent and no
    answer came: it may or may not have taken effect. Read the record to
    find out, or use a fenced call."""


class ResourceExhausted(IdemkvError):
    """RESOURCE_EXHAUSTED with a reason this client does not know."""


class TooLarge(ResourceExhausted):
    """A field or message is over its size limit; the message names it."""


class Overloaded(ResourceExhausted):
    """A node's concurrency cap refused the call before running it
    (``OVERLOADED``); safe to retry later."""


class NoSpace(ResourceExhausted):
    """The cluster's data-size quota is exceeded (``NOSPACE``): new claims are
    refused until retention or deletes make room."""


class Unauthenticated(IdemkvError):
    """No valid bearer token (UNAUTHENTICATED)."""


class PermissionDenied(IdemkvError):
    """The token may not touch this namespace or operation (PERMISSION_DENIED)."""


class InternalError(IdemkvError):
    """The node cannot serve (INTERNAL, UNKNOWN and other codes)."""


class Busy(IdemkvError):
    """``run_once``: another worker holds a live claim on the key (and no
    result came within ``wait_for_duplicate``)."""

    def __init__(self, message: str, *, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


class AttemptsExhausted(IdemkvError):
    """``run_once``: the key is FAILED: its ``max_attempts`` used up, or a run
    gave up for good (a permanent release; ``last_error`` says why)."""

    def __init__(self, message: str, *, attempts: int, last_error: str) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class GrantExpired(IdemkvError):
    """``run_once``: the claim was granted only after its client-side lease
    deadline (retries took longer than the lease); the work was not started
    and the grant was released."""

    def __init__(self, message: str, *, token: int, waited: float) -> None:
        super().__init__(message)
        self.token = token
        self.waited = waited


class ResultNotSaved(IdemkvError):
    """``run_once``: the work ran (its effect happened), but its result was
    not saved; ``__cause__`` is why.

    - The store refused it as over its result limit: the key was marked
      FAILED (a permanent release; ``marked_failed``) so that later calls
      raise :class:`AttemptsExhausted` and never run the work again.
    - Complete failed otherwise (the cluster unreachable past the retries):
      ``marked_failed`` is false, and once the lease runs out a later call
      may run the work again. ``raw`` and ``result_code`` are the
      serialized result and the work's code (``Completion.code``), to save
      with ``client.complete(namespace, key, token, raw, code=result_code)``
      when the cluster is back (fenced by ``token``).
    - The work returned, but its value could not be made into a result (the
      serializer refused it, an asyncio work function that returned no
      awaitable): the key was marked FAILED as for a result too large
      (``marked_failed``), so the work does not run again; ``raw`` is empty.

    ``code`` is ``None``: as for every client-side error, it is the gRPC
    status code, not the work's.
    """

    def __init__(
        self,
        message: str,
        *,
        token: int,
        size: int,
        marked_failed: bool,
        raw: bytes = b"",
        result_code: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.token = token
        self.size = size
        self.marked_failed = marked_failed
        self.raw = raw
        #: The work's code (``Completion.code``) to save with ``raw``.
        self.result_code = result_code


class ConfigError(IdemkvError, ValueError):
    """Bad client configuration: endpoints, TLS files, durations."""


_BY_REASON: Dict[str, Type[IdemkvError]] = {
    "LEASE_LOST": LeaseLost,
    "FINGERPRINT_MISMATCH": FingerprintMismatch,
    "ALREADY_COMPLETED": AlreadyCompleted,
    "OVERLOADED": Overloaded,
    "NOSPACE": NoSpace,
}

_BY_CODE: Dict[grpc.StatusCode, Type[IdemkvError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: RuleError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.OUT_OF_RANGE: TooLarge,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def reason_of(err: grpc.RpcError) -> Optional[str]:
    """The ``idemkv-reason`` trailer of a failed call, if any."""
    trailers = getattr(err, "trailing_metadata", None)
    try:
        md = trailers() if callable(trailers) else None
    except Exception:  # a call that failed before the server answered
        md = None
    for key, value in md or ():
        if key == REASON_TRAILER:
            return value if isinstance(value, str) else value.decode()
    return None


def code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code = getattr(err, "code", None)
    try:
        got = code() if callable(code) else None
    except Exception:
        got = None
    return got if isinstance(got, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def details_of(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    try:
        got = details() if callable(details) else None
    except Exception:
        got = None
    return got or str(err)


def from_rpc_error(err: grpc.RpcError) -> IdemkvError:
    """The exception for a failed call: by reason first, then by code."""
    code, reason, message = code_of(err), reason_of(err), details_of(err)
    cls = _BY_REASON.get(reason or "")
    if cls is None:
        cls = _BY_CODE.get(code, InternalError)
        if cls is ResourceExhausted and reason is None:
            cls = TooLarge
    return cls(message, code=code, reason=reason)


class ProtocolError(IdemkvError):
    """The server's reply broke the protocol (e.g. a claim without an outcome)."""
