"""Which failures the client retries, and how long it keeps trying.

The rules of the Rust client (``src/client/mod.rs``), because SPEC §3 makes
every write safe to retry only as the client sends it: a claim carries a
``claim_id`` fixed before its first attempt, Complete/Renew/Release carry
their token, reads change nothing. An unfenced Delete is the exception: it
moves to another node only when it cannot have run: the node refused it
unrun (OVERLOADED), or the connection to the node failed, so it was never
sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from .errors import code_of, details_of, reason_of

_RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


def overloaded(err: grpc.RpcError) -> bool:
    """Refused by a node's concurrency cap before it started: safe to retry."""
    return code_of(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and reason_of(err) == "OVERLOADED"


#: What gRPC says when no connection to the node could be made: the call
#: never left this client.
NOT_CONNECTED = "failed to connect to all addresses"


def never_sent_details(details: str) -> bool:
    """Whether an UNAVAILABLE error's details say that no connection to the
    node could be made, so the request was never sent."""
    return details.startswith(NOT_CONNECTED)


def never_sent(err: grpc.RpcError) -> bool:
    """No connection to the node could be made (refused, unreachable), so
    the request was never sent: safe to send elsewhere."""
    return code_of(err) == grpc.StatusCode.UNAVAILABLE and never_sent_details(details_of(err))


def not_run(err: grpc.RpcError) -> bool:
    """Safe to send elsewhere even for a write no token makes idempotent
    (an unfenced delete): refused before it ran, or never sent."""
    return overloaded(err) or never_sent(err)


def retryable(err: grpc.RpcError) -> bool:
    """No answer, no leader, or overloaded: worth another endpoint and a
    backoff. A certificate the client does not trust stays untrusted, so
    that is reported at once."""
    if "certificate" in details_of(err).lower():
        return False
    return code_of(err) in _RETRY_CODES or overloaded(err)


@dataclass(frozen=True)
class RetryOptions:
    """Timeouts and backoff, in seconds (the Rust client's defaults)."""

    #: Deadline of one attempt.
    request_timeout: float = 10.0
    #: How long one call keeps retrying before it raises the last error.
    retry_for: float = 15.0
    backoff_initial: float = 0.025
    backoff_max: float = 0.8
