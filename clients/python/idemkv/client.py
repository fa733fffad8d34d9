"""The synchronous client: endpoints, leader discovery, safe retries.

Safe to share between threads (one gRPC channel per endpoint). Every call
goes to the preferred endpoint (the leader once known); a retryable failure
(UNAVAILABLE, DEADLINE_EXCEEDED, OVERLOADED) moves to the next endpoint
after a backoff that doubles from 25 ms to 800 ms, for up to ``retry_for``
seconds — only for calls SPEC §3 makes safe to retry, which the client
arranges: a claim's ``claim_id`` is fixed before its first attempt,
fenced writes carry their token, reads change nothing, and an unfenced
Delete whose answer was lost raises :class:`OutcomeUnknown` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, TypeVar, Union

from . import _convert as cv
from ._base import ClientBase, _Conn, _Settings, default_owner  # noqa: F401 - importable from here
from ._steps import drive
from .errors import IdemkvError
from .types import (
    BatchResult,
    ClaimOutcome,
    CompleteResult,
    Consistency,
    ReleaseResult,
    RenewResult,
    Record,
    RunResult,
    Status,
    WaitResult,
)

if TYPE_CHECKING:
    from ._run_once import Claim

T = TypeVar("T")


class Client(ClientBase):
    """A handle to an idemkv cluster.

    Args:
        endpoints: ``"host:port,host:port"`` or a list; each ``host:port``,
            ``http://host:port`` or ``https://host:port``. Any node serves
            any call (followers forward to the leader).
        token: bearer token for a cluster run with ``--auth-tokens``.
        tls: :class:`TLS` settings (CA, client certificate), ``True`` for TLS
            with the system's roots, or None: plaintext unless an endpoint
            says ``https://``.
        owner: the name claims are made under (default ``host:pid``).
        retry: timeouts and backoff (:class:`RetryOptions`).
        follow_leader: ask the cluster who leads (Cluster.Status) before the
            first call and after a failover, and send calls there first;
            saves the followers' forwarding hop.
        interceptors: gRPC client interceptors for every channel (tracing).
        channel_options: extra gRPC channel options.

    Use it as a context manager, or call :meth:`close`.
    """

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for c in self._conns:
                c.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _call(self, rpc: str, request: Any, **how: Any) -> Any:
        """Call ``rpc`` with the client's retries (see ``_base._call_steps``)."""
        return drive(self._call_steps(rpc, request, **how))

    def _do(self, call: cv.Call) -> Any:
        return drive(self._method_steps(call))

    def discover_leader(self) -> Optional[str]:
        """Ask the cluster who leads and prefer that endpoint from now on
        (added to the list if it was not given). Returns its address, or
        None when no leader is known."""
        return drive(self._leader_steps())

    # ------------------------------------------------------------ Idempotency

    def claim(
        self,
        namespace: str,
        key: cv.Bytes,
        *,
        lease: cv.Duration = 30.0,
        owner: Optional[str] = None,
        claim_id: Optional[str] = None,
        fingerprint: Optional[cv.Bytes] = None,
        max_attempts: int = 0,
        retention: Optional[cv.Duration] = None,
    ) -> ClaimOutcome:
        """Claim ``key``: :class:`Acquired` (do the work), :class:`InProgress`
        (another worker holds it), :class:`Completed` (replay its result) or
        :class:`Failed` (attempts exhausted).

        ``claim_id`` (default: a fresh one) is sent with every retry of this
        call, so a reply lost to a timeout never locks its own sender out;
        claiming again with ``Acquired.claim_id`` returns the same grant.
        ``fingerprint`` (a hash of the request payload) makes a reuse of the
        key for another payload a :class:`FingerprintMismatch`.
        ``max_attempts`` 0 is unlimited; ``retention`` None is the server's
        default (24 h).
        """
        owner = owner or self.owner
        return self._do(cv.claim_call(owner, namespace, key, lease, claim_id, fingerprint, max_attempts, retention))

    def claim_batch(
        self,
        namespace: str,
        keys: Iterable[cv.Bytes],
        *,
        lease: cv.Duration = 30.0,
        owner: Optional[str] = None,
        fingerprints: Optional[Sequence[Optional[cv.Bytes]]] = None,
        max_attempts: int = 0,
        retention: Optional[cv.Duration] = None,
        all_or_nothing: bool = False,
    ) -> BatchResult:
        """Claim many keys in one Raft entry; one outcome per key, in order.
        With ``all_or_nothing`` either every key is acquired or none changes
        (then ``applied`` is False)."""
        owner = owner or self.owner
        call = cv.claim_batch_call(owner, namespace, keys, lease, fingerprints, max_attempts, retention, all_or_nothing)
        return self._do(call)

    def complete(
        self,
        namespace: str,
        key: cv.Bytes,
        token: int,
        result: cv.Bytes = b"",
        *,
        code: Optional[int] = None,
        retention: Optional[cv.Duration] = None,
    ) -> CompleteResult:
        """Save ``result`` (and ``code``, e.g. an HTTP status) for every later
        claim to replay. Only the current token may; repeating the same call
        succeeds, another result with the same token is
        :class:`AlreadyCompleted`, another token :class:`LeaseLost`."""
        return self._do(cv.complete_call(namespace, key, token, result, code, retention))

    def renew(
        self,
        namespace: str,
        key: cv.Bytes,
        token: int,
        *,
        lease: cv.Duration = 30.0,
        checkpoint: Optional[cv.Bytes] = None,
    ) -> RenewResult:
        """Extend a live claim by ``lease`` from now, storing ``checkpoint``
        for whoever takes over if this worker dies."""
        return self._do(cv.renew_call(namespace, key, token, lease, checkpoint))

    def release(
        self, namespace: str, key: cv.Bytes, token: int, error: str = "", *, permanent: bool = False
    ) -> ReleaseResult:
        """Give the claim back after a failure: the key is claimable at once
        (AVAILABLE), or FAILED once ``max_attempts`` is reached. With
        ``permanent`` it is FAILED now, whatever attempts remain, and later
        claims get FAILED instead of running the work again."""
        return self._do(cv.release_call(namespace, key, token, error, permanent))

    def get(
        self,
        namespace: str,
        key: cv.Bytes,
        *,
        consistency: Consistency = Consistency.LINEARIZABLE,
    ) -> Optional[Record]:
        """The record, or None when the key is absent. LINEARIZABLE reads
        through the leader; SERIALIZABLE reads the node's own copy."""
        return self._do(cv.get_call(namespace, key, consistency))

    def wait(self, namespace: str, key: cv.Bytes, timeout: cv.Duration = 30.0) -> WaitResult:
        """Wait (the Await RPC) until the record leaves IN_PROGRESS —
        completed, failed, released or its lease expired — or ``timeout``
        passes; :class:`NotFound` if the key is absent."""
        return self._do(cv.wait_call(namespace, key, timeout))

    def delete(self, namespace: str, key: cv.Bytes, *, token: Optional[int] = None) -> bool:
        """Forget a record; True if it existed. With ``token``, only the
        record that token holds or completed (else :class:`LeaseLost`), and
        retried like every fenced write. Without one a retry could delete a
        newer claim, so a lost answer raises :class:`OutcomeUnknown`."""
        return self._do(cv.delete_call(namespace, key, token))

    # ------------------------------------------------------------ Cluster

    def status(self) -> Status:
        """Status of whichever node answers first."""
        return self._do(cv.status_call())

    def status_all(self, timeout: float = 2.0) -> Dict[str, Union[Status, IdemkvError]]:
        """Each endpoint's status, or the error it gave."""
        return {c.authority: drive(self._status_or_error_steps(c, timeout)) for c in self._conns_now()}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every endpoint answers and all name one leader;
        :class:`Unavailable` with what each said if not within ``timeout``."""
        drive(self._wait_ready_steps(timeout))

    # ------------------------------------------------------------ run once

    def run_once(
        self,
        namespace: str,
        key: cv.Bytes,
        fn: Callable[["Claim"], Any],
        *,
        lease: cv.Duration = 30.0,
        fingerprint: Optional[cv.Bytes] = None,
        max_attempts: int = 0,
        retention: Optional[cv.Duration] = None,
        wait_for_duplicate: Optional[cv.Duration] = None,
        serializer: Any = None,
        owner: Optional[str] = None,
        safety_margin: Optional[cv.Duration] = None,
        renew_divisor: int = 3,
    ) -> RunResult[Any]:
        """Run ``fn(claim)`` at most once per ``(namespace, key)`` with
        exactly-once effect: claim, renew the lease in a background thread
        while it runs, complete with its return value; every later call gets
        that value back (``RunResult.replayed``) without running ``fn``.

        - ``fn`` gets a :class:`Claim`: ``claim.token`` (the fencing token for
          downstream writes), ``claim.checkpoint`` (the previous holder's),
          ``claim.save_checkpoint(b"...")``, ``claim.lost`` /
          ``claim.check()`` / ``claim.wait_lost()``.
        - Its return value is stored as bytes (``str`` as UTF-8), or through
          ``serializer`` (``serializer=json``). Return
          ``Completion(value, code=...)`` to store a code with it.
        - If ``fn`` raises, the claim is released (the key is claimable
          again, or FAILED after ``max_attempts``) and the exception
          propagates. Once it has returned it never runs again: a value the
          serializer refuses, or a result the store refuses as too large,
          marks the key FAILED and raises :class:`ResultNotSaved`. An
          ``async def`` ``fn`` (or ``functools.partial`` of one) is refused
          (``TypeError``) before claiming; one that returns an unstarted
          coroutine (a lambda around an ``async def``) ran none of it: the
          coroutine is closed, the claim released (the key stays claimable)
          and ``TypeError`` raised. Any other awaitable it returns (an
          asyncio ``Future`` or ``Task``) is a result that cannot be saved:
          the key is marked FAILED and :class:`ResultNotSaved` raised.
        - The lease is timed on this machine (SPEC §2): valid until the
          instant before the claim was sent plus ``lease`` minus
          ``safety_margin`` (default ``max(lease/10, min(0.1, lease/2))``),
          moved by each renewal. If no renewal gets through by then, or the
          server refuses the token, ``fn`` is told (``claim.lost``) and,
          when it returns, nothing is saved: :class:`LeaseLost`.
        - Another worker holding the key: :class:`Busy`, or with
          ``wait_for_duplicate`` (seconds) wait for its result (replayed),
          taking the key over if it released it or its lease ran out.
          A FAILED key: :class:`AttemptsExhausted`.
        """
        from ._run_once import run_once

        return run_once(
            self, namespace, key, fn, lease=lease, fingerprint=fingerprint, max_attempts=max_attempts,
            retention=retention, wait_for_duplicate=wait_for_duplicate, serializer=serializer, owner=owner,
            safety_margin=safety_margin, renew_divisor=renew_divisor,
        )  # fmt: skip

    def idempotent(self, namespace: str, **options: Any) -> Callable[[Any], Any]:
        """Decorate a plain or ``async def`` function so it runs once per key::

            @client.idempotent("payments", key=lambda order_id, **_: order_id)
            def charge(order_id: str, amount: int) -> dict: ...

        Options: ``key`` (a function of the call's arguments giving a str,
        bytes or int; default a hash of the function's name and all its
        arguments as JSON, which must then be plain JSON values — str, int,
        float, bool, None, bytes, lists and str-keyed dicts of them — else
        :class:`ConfigError` before anything is sent), ``fingerprint``
        (True: a hash of all arguments, the same way, so the same key with
        other arguments is :class:`FingerprintMismatch`; or a function),
        ``lease``,
        ``wait_for_duplicate``, ``max_attempts``, ``retention``,
        ``serializer`` (default ``json``: the return value must be JSON;
        a replay returns it decoded), ``pass_claim`` (pass the
        :class:`Claim` as the ``claim`` keyword argument), ``owner``.
        Inside, :func:`idemkv.current_claim` also gives the claim (its
        ``token`` for downstream writes). The outcomes are run_once's.
        """
        from ._idempotent import decorate

        return decorate(self, namespace, **options)
