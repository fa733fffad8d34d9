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

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from . import _convert as cv
from ._endpoints import DEFAULT_ENDPOINTS, TLS, ChannelFactory, Endpoint, TLSArg, parse, parse_list
from ._retry import RetryOptions, overloaded, retryable
from .errors import ConfigError, IdemkvError, NotFound, OutcomeUnknown, Unavailable, from_rpc_error
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
from .v1 import api_pb2 as pb
from .v1 import api_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ._run_once import Claim

log = logging.getLogger("idemkv")
T = TypeVar("T")


def default_owner() -> str:
    """``host:pid``, the owner name a client uses unless told another."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Conn:
    __slots__ = ("authority", "channel", "idem", "cluster")

    def __init__(self, authority: str, channel: Any) -> None:
        self.authority = authority
        self.channel = channel
        self.idem = pb_grpc.IdempotencyStub(channel)
        self.cluster = pb_grpc.ClusterStub(channel)


class _Settings:
    """What the sync and asyncio clients take alike."""

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]],
        token: Optional[str],
        tls: TLSArg,
        owner: Optional[str],
        retry: Optional[RetryOptions],
        follow_leader: bool,
        channel_options: Sequence[Tuple[str, Any]],
    ) -> None:
        self.endpoints: List[Endpoint] = parse_list(endpoints)
        self.factory = ChannelFactory(self.endpoints, tls, channel_options)
        if token is not None:
            token = token.strip()
            if not token or not token.isascii() or not token.isprintable():
                raise ConfigError("token: must be non-empty printable ASCII")
        self.metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.owner = owner or default_owner()
        self.retry = retry or RetryOptions()
        self.follow_leader = follow_leader

    @staticmethod
    def env() -> Dict[str, Any]:
        """The ``IDEMKV_*`` variables the Rust client reads."""
        return {
            "endpoints": os.environ.get("IDEMKV_ENDPOINTS") or DEFAULT_ENDPOINTS,
            "tls": TLS.from_env(),
            "token": os.environ.get("IDEMKV_AUTH_TOKEN") or None,
        }


class Client:
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

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]] = DEFAULT_ENDPOINTS,
        *,
        token: Optional[str] = None,
        tls: TLSArg = None,
        owner: Optional[str] = None,
        retry: Optional[RetryOptions] = None,
        follow_leader: bool = True,
        interceptors: Sequence[Any] = (),
        channel_options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        self._s = _Settings(endpoints, token, tls, owner, retry, follow_leader, channel_options)
        self._interceptors = list(interceptors)
        self._lock = threading.Lock()
        self._conns: List[_Conn] = [self._open(e) for e in self._s.endpoints]
        self._preferred = 0
        self._discover = follow_leader
        self._discovering = threading.Lock()
        self._closed = False

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Client":
        """A client for ``IDEMKV_ENDPOINTS`` (comma-separated; default the
        cluster ``idemkv up`` starts), ``IDEMKV_AUTH_TOKEN``, and TLS when
        ``IDEMKV_TLS_CA`` names a CA file (``IDEMKV_TLS_CERT`` and
        ``IDEMKV_TLS_KEY`` as the client certificate), as the Rust client
        and ``idemkv ctl`` read them. Keyword arguments override."""
        return cls(**{**_Settings.env(), **kwargs})

    def _open(self, e: Endpoint) -> _Conn:
        return _Conn(e.authority, self._s.factory.open(grpc, e, self._interceptors))

    @property
    def owner(self) -> str:
        return self._s.owner

    @property
    def endpoints(self) -> List[str]:
        """The endpoints in use (``host:port``), the given ones first."""
        with self._lock:
            return [c.authority for c in self._conns]

    @property
    def preferred_endpoint(self) -> str:
        """The endpoint the next call goes to first."""
        with self._lock:
            return self._conns[self._preferred % len(self._conns)].authority

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

    def _conn_at(self, i: int) -> Tuple[int, _Conn]:
        with self._lock:
            i %= len(self._conns)
            return i, self._conns[i]

    def _call(
        self,
        rpc: str,
        request: Any,
        *,
        cluster: bool = False,
        extra_timeout: float = 0.0,
        again: Callable[[grpc.RpcError], bool] = retryable,
        deadline: Optional[float] = None,
    ) -> Any:
        """Call ``rpc`` on the preferred endpoint, moving to the next one
        with backoff while the failure is safe to retry and time is left
        (``retry_for``, and ``deadline`` on ``time.monotonic()`` if given)."""
        if self._discover and deadline is None:
            self._follow_leader()
        opts = self._s.retry
        give_up = time.monotonic() + opts.retry_for
        if deadline is not None:
            give_up = min(give_up, deadline)
        backoff = opts.backoff_initial
        i = self._preferred
        while True:
            at, conn = self._conn_at(i)
            timeout = opts.request_timeout + extra_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise Unavailable(f"{rpc}: no answer before the deadline")
            method = getattr(conn.cluster if cluster else conn.idem, rpc)
            try:
                reply = method(request, timeout=timeout, metadata=self._s.metadata)
            except grpc.RpcError as e:
                if again(e) and time.monotonic() + backoff < give_up:
                    log.debug("%s via %s: %s; retrying on another endpoint", rpc, conn.authority, e)
                    # The endpoint failed: ask again who leads, next time.
                    self._discover = self._s.follow_leader
                    time.sleep(backoff)
                    backoff = min(backoff * 2, opts.backoff_max)
                    i = at + 1
                    continue
                raise from_rpc_error(e) from None
            self._preferred = at
            return reply

    def _follow_leader(self) -> None:
        # One thread asks; the others go ahead meanwhile.
        if not self._discovering.acquire(blocking=False):
            return
        try:
            if self._discover:
                self._discover = False
                self.discover_leader()
        except IdemkvError as e:
            log.debug("leader discovery: %s", e)
        finally:
            self._discovering.release()

    def discover_leader(self) -> Optional[str]:
        """Ask the cluster who leads and prefer that endpoint from now on
        (added to the list if it was not given). Returns its address, or
        None when no leader is known."""
        at, conn = self._conn_at(self._preferred)
        timeout = min(self._s.retry.request_timeout, 2.0)
        try:
            st = conn.cluster.Status(pb.StatusRequest(), timeout=timeout, metadata=self._s.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        leader = st.leader_api_addr
        if not leader:
            return None
        with self._lock:
            for pos, c in enumerate(self._conns):
                if c.authority == leader:
                    break
            else:
                self._conns.append(self._open(parse(leader)))
                pos = len(self._conns) - 1
            self._preferred = pos
        return leader

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
        claim_id = claim_id or uuid.uuid4().hex
        req = cv.claim_request(
            namespace,
            key,
            owner=owner or self._s.owner,
            claim_id=claim_id,
            lease=lease,
            fingerprint=fingerprint,
            max_attempts=max_attempts,
            retention=retention,
        )
        return cv.outcome(self._call("Claim", req), claim_id)

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
        keys = list(keys)
        fps = list(fingerprints) if fingerprints is not None else [None] * len(keys)
        if len(fps) != len(keys):
            raise ConfigError(f"fingerprints: {len(fps)} given for {len(keys)} keys")
        items = [
            cv.claim_request(
                namespace,
                k,
                owner=owner or self._s.owner,
                claim_id=uuid.uuid4().hex,
                lease=lease,
                fingerprint=fp,
                max_attempts=max_attempts,
                retention=retention,
            )
            for k, fp in zip(keys, fps)
        ]
        req = pb.ClaimBatchRequest(items=items, all_or_nothing=all_or_nothing)
        reply = self._call("ClaimBatch", req)
        return BatchResult(
            items=[cv.batch_item(m, it.claim_id) for m, it in zip(reply.items, items)],
            applied=reply.applied,
        )

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
        req = pb.CompleteRequest(
            namespace=namespace,
            key=cv.to_bytes(key, "key"),
            token=token,
            result=cv.to_bytes(result, "result"),
            retention_ms=cv.millis(retention, "retention"),
        )
        if code is not None:
            req.code = code
        r = self._call("Complete", req)
        return CompleteResult(completed_at_ms=r.completed_at_ms, expires_at_ms=r.expires_at_ms)

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
        r = self._call("Renew", self._renew_request(namespace, key, token, lease, checkpoint))
        return RenewResult(lease_deadline_ms=r.lease_deadline_ms)

    @staticmethod
    def _renew_request(namespace, key, token, lease, checkpoint) -> Any:
        req = pb.RenewRequest(
            namespace=namespace,
            key=cv.to_bytes(key, "key"),
            token=token,
            lease_ms=cv.millis(lease, "lease"),
        )
        if checkpoint is not None:
            req.checkpoint = cv.to_bytes(checkpoint, "checkpoint")
        return req

    def release(self, namespace: str, key: cv.Bytes, token: int, error: str = "") -> ReleaseResult:
        """Give the claim back after a failure: the key is claimable at once
        (AVAILABLE), or FAILED once ``max_attempts`` is reached."""
        req = pb.ReleaseRequest(namespace=namespace, key=cv.to_bytes(key, "key"), token=token, error=error)
        r = self._call("Release", req)
        return ReleaseResult(state=cv.state(r.state), attempts=r.attempts)

    def get(
        self,
        namespace: str,
        key: cv.Bytes,
        *,
        consistency: Consistency = Consistency.LINEARIZABLE,
    ) -> Optional[Record]:
        """The record, or None when the key is absent. LINEARIZABLE reads
        through the leader; SERIALIZABLE reads the node's own copy."""
        req = pb.GetRequest(namespace=namespace, key=cv.to_bytes(key, "key"), consistency=consistency.value)
        try:
            return cv.record(self._call("Get", req).record)
        except NotFound:
            return None

    def wait(self, namespace: str, key: cv.Bytes, timeout: cv.Duration = 30.0) -> WaitResult:
        """Wait (the Await RPC) until the record leaves IN_PROGRESS —
        completed, failed, released or its lease expired — or ``timeout``
        passes; :class:`NotFound` if the key is absent."""
        wait_s = cv.seconds(timeout, "timeout")
        req = pb.AwaitRequest(namespace=namespace, key=cv.to_bytes(key, "key"), timeout_ms=max(1, cv.millis(wait_s, "timeout")))
        r = self._call("Await", req, extra_timeout=wait_s)
        return WaitResult(record=cv.record(r.record), timed_out=r.timed_out)

    def delete(self, namespace: str, key: cv.Bytes, *, token: Optional[int] = None) -> bool:
        """Forget a record; True if it existed. With ``token``, only the
        record that token holds or completed (else :class:`LeaseLost`), and
        retried like every fenced write. Without one a retry could delete a
        newer claim, so a lost answer raises :class:`OutcomeUnknown`."""
        req = pb.DeleteRequest(namespace=namespace, key=cv.to_bytes(key, "key"))
        if token is not None:
            req.token = token
            return self._call("Delete", req).existed
        try:
            return self._call("Delete", req, again=overloaded).existed
        except Unavailable as e:
            raise OutcomeUnknown(
                f"the unfenced delete may or may not have taken effect, and retrying it is not safe ({e})",
                code=e.code,
            ) from e

    # ------------------------------------------------------------ Cluster

    def status(self) -> Status:
        """Status of whichever node answers first."""
        return cv.status(self._call("Status", pb.StatusRequest(), cluster=True))

    def status_all(self, timeout: float = 2.0) -> Dict[str, Union[Status, IdemkvError]]:
        """Each endpoint's status, or the error it gave."""
        out: Dict[str, Union[Status, IdemkvError]] = {}
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                out[c.authority] = cv.status(
                    c.cluster.Status(pb.StatusRequest(), timeout=timeout, metadata=self._s.metadata)
                )
            except grpc.RpcError as e:
                out[c.authority] = from_rpc_error(e)
        return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every endpoint answers and all name one leader;
        :class:`Unavailable` with what each said if not within ``timeout``."""
        give_up = time.monotonic() + timeout
        while True:
            seen = self.status_all()
            leaders = {s.leader_id if isinstance(s, Status) else None for s in seen.values()}
            if len(leaders) == 1 and None not in leaders:
                return
            if time.monotonic() >= give_up:
                raise Unavailable(f"no agreed leader within {timeout} s: {seen}")
            time.sleep(0.05)

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
          propagates.
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
            self,
            namespace,
            key,
            fn,
            lease=lease,
            fingerprint=fingerprint,
            max_attempts=max_attempts,
            retention=retention,
            wait_for_duplicate=wait_for_duplicate,
            serializer=serializer,
            owner=owner,
            safety_margin=safety_margin,
            renew_divisor=renew_divisor,
        )

    def idempotent(self, namespace: str, **options: Any) -> Callable[[Any], Any]:
        """Decorate a plain or ``async def`` function so it runs once per key::

            @client.idempotent("payments", key=lambda order_id, **_: order_id)
            def charge(order_id: str, amount: int) -> dict: ...

        Options: ``key`` (a function of the call's arguments giving a str,
        bytes or int; default a hash of all arguments), ``fingerprint``
        (True: a hash of all arguments, so the same key with other arguments
        is :class:`FingerprintMismatch`; or a function), ``lease``,
        ``wait_for_duplicate``, ``max_attempts``, ``retention``,
        ``serializer`` (default ``json``: the return value must be JSON;
        a replay returns it decoded), ``pass_claim`` (pass the
        :class:`Claim` as the ``claim`` keyword argument), ``owner``.
        Inside, :func:`idemkv.current_claim` also gives the claim (its
        ``token`` for downstream writes). The outcomes are run_once's.
        """
        from ._idempotent import decorate

        return decorate(self, namespace, **options)
