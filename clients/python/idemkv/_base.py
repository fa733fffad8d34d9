"""What the sync and asyncio clients share: their settings, the endpoint
list and which endpoint is preferred, leader discovery, and the retry loop
— the last two as step generators (``_steps``) that each client drives its
own way (``idemkv.Client`` in the calling thread, ``idemkv.aio.Client`` on
the event loop).

The retry rules are the Rust client's (``src/client/mod.rs``): every call
goes to the preferred endpoint (the leader once known); a failure that is
safe to retry (``_retry``) moves to the next endpoint after a backoff that
doubles from 25 ms to 800 ms, for up to ``retry_for`` seconds (and no
later than a ``deadline``, if one is given). A retry resends the very same
request, so a claim keeps its ``claim_id`` and a fenced write its token.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import grpc

from . import _convert as cv
from ._endpoints import DEFAULT_ENDPOINTS, TLS, ChannelFactory, Endpoint, TLSArg, parse, parse_list
from ._retry import RetryOptions, retryable
from ._steps import Steps, step
from .errors import ConfigError, IdemkvError, Unavailable, from_rpc_error
from .types import Status
from .v1 import api_pb2 as pb
from .v1 import api_pb2_grpc as pb_grpc

log = logging.getLogger("idemkv")
C = TypeVar("C", bound="ClientBase")

#: How often a backoff asks its ``stop`` check (``_call_steps``).
_STOP_POLL = 0.02


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


class ClientBase:
    """The state and logic of a client, without its I/O.

    A subclass names how it does I/O: ``_grpc`` (the module whose channels
    it opens), ``_sleep`` (how it backs off), and runs the step generators
    below with ``_steps.drive`` or ``_steps.adrive``.
    """

    #: ``grpc`` or ``grpc.aio``.
    _grpc: ClassVar[Any] = grpc
    #: ``time.sleep`` or ``asyncio.sleep``.
    _sleep: ClassVar[Callable[[float], Any]] = staticmethod(time.sleep)
    #: Open the channels in the constructor (else on first use, which for
    #: ``grpc.aio`` is inside the running event loop).
    _eager: ClassVar[bool] = True

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
        self._conns: List[_Conn] = []
        self._preferred = 0
        self._discover = follow_leader
        # One caller asks who leads; the others go ahead meanwhile.
        self._discovering = threading.Lock()
        self._closed = False
        if self._eager:
            self._conns_now()

    @classmethod
    def from_env(cls: Type[C], **kwargs: Any) -> C:
        """A client for ``IDEMKV_ENDPOINTS`` (comma-separated; default the
        cluster ``idemkv up`` starts), ``IDEMKV_AUTH_TOKEN``, and TLS when
        ``IDEMKV_TLS_CA`` names a CA file (``IDEMKV_TLS_CERT`` and
        ``IDEMKV_TLS_KEY`` as the client certificate), as the Rust client
        and ``idemkv ctl`` read them. Keyword arguments override."""
        return cls(**{**_Settings.env(), **kwargs})

    @property
    def owner(self) -> str:
        return self._s.owner

    @property
    def preferred_endpoint(self) -> str:
        """The endpoint the next call goes to first."""
        with self._lock:
            eps = [c.authority for c in self._conns] or [e.authority for e in self._s.endpoints]
            return eps[self._preferred % len(eps)]

    # ------------------------------------------------------------ endpoints

    def _open(self, e: Endpoint) -> _Conn:
        return _Conn(e.authority, self._s.factory.open(self._grpc, e, self._interceptors))

    def _conns_now(self) -> List[_Conn]:
        """The connections, opened if they are not yet."""
        with self._lock:
            if not self._conns:
                self._conns = [self._open(e) for e in self._s.endpoints]
            return list(self._conns)

    def _conn_at(self, i: int) -> Tuple[int, _Conn]:
        conns = self._conns_now()
        i %= len(conns)
        return i, conns[i]

    def _prefer(self, leader: str) -> Optional[str]:
        """Prefer ``leader`` (added to the list if it was not given)."""
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

    @property
    def endpoints(self) -> List[str]:
        """The endpoints in use (``host:port``), the given ones first."""
        with self._lock:
            return [c.authority for c in self._conns] or [e.authority for e in self._s.endpoints]

    # ------------------------------------------------------------ steps

    def _wait_ready_steps(self, timeout: float) -> Steps[None]:
        """Until every endpoint answers and all name one leader;
        :class:`Unavailable` with what each said if not within ``timeout``."""
        give_up = time.monotonic() + timeout
        while True:
            seen = yield step(self.status_all)
            leaders = {s.leader_id if isinstance(s, Status) else None for s in seen.values()}
            if len(leaders) == 1 and None not in leaders:
                return
            if time.monotonic() >= give_up:
                raise Unavailable(f"no agreed leader within {timeout} s: {seen}")
            yield step(self._sleep, 0.05)

    def _status_steps(self, conn: _Conn, timeout: float) -> Steps[Any]:
        """Cluster.Status of one endpoint, unretried."""
        try:
            return (yield step(conn.cluster.Status, pb.StatusRequest(), timeout=timeout, metadata=self._s.metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _status_or_error_steps(self, conn: _Conn, timeout: float) -> Steps[Union[Status, IdemkvError]]:
        try:
            return cv.status((yield from self._status_steps(conn, timeout)))
        except IdemkvError as e:
            return e

    def _leader_steps(self) -> Steps[Optional[str]]:
        """Ask the preferred endpoint who leads, and prefer the leader."""
        _, conn = self._conn_at(self._preferred)
        st = yield from self._status_steps(conn, min(self._s.retry.request_timeout, 2.0))
        return self._prefer(st.leader_api_addr)

    def _follow_leader_steps(self) -> Steps[None]:
        if not self._discovering.acquire(blocking=False):
            return
        try:
            if self._discover:
                self._discover = False
                yield from self._leader_steps()
        except IdemkvError as e:
            log.debug("leader discovery: %s", e)
        finally:
            self._discovering.release()

    def _call_steps(
        self,
        rpc: str,
        request: Any,
        *,
        cluster: bool = False,
        extra_timeout: float = 0.0,
        again: Callable[[grpc.RpcError], bool] = retryable,
        deadline: Optional[float] = None,
        stop: Optional[Callable[[], bool]] = None,
    ) -> Steps[Any]:
        """Call ``rpc`` on the preferred endpoint, moving to the next one
        with backoff while the failure is safe to retry (``again``) and time
        is left (``retry_for``, and ``deadline`` on ``time.monotonic()`` if
        given). Each attempt sends the same ``request``. ``stop``, if given,
        is asked before each attempt and during each backoff: once it says
        True the call gives up (:class:`Unavailable`), so a caller that no
        longer wants the answer (a renewer whose work is done) is not kept
        retrying for ``retry_for``."""
        if self._discover and deadline is None:
            yield from self._follow_leader_steps()
        opts = self._s.retry
        give_up = time.monotonic() + opts.retry_for
        if deadline is not None:
            give_up = min(give_up, deadline)
        backoff = opts.backoff_initial
        i = self._preferred
        while True:
            if stop is not None and stop():
                raise Unavailable(f"{rpc}: stopped before an answer came")
            at, conn = self._conn_at(i)
            timeout = opts.request_timeout + extra_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise Unavailable(f"{rpc}: no answer before the deadline")
            method = getattr(conn.cluster if cluster else conn.idem, rpc)
            try:
                reply = yield step(method, request, timeout=timeout, metadata=self._s.metadata)
            except grpc.RpcError as e:
                if again(e) and time.monotonic() + backoff < give_up:
                    log.debug("%s via %s: %s; retrying on another endpoint", rpc, conn.authority, e)
                    # The endpoint failed: ask again who leads, next time.
                    self._discover = self._s.follow_leader
                    yield from self._backoff_steps(backoff, stop)
                    backoff = min(backoff * 2, opts.backoff_max)
                    i = at + 1
                    continue
                raise from_rpc_error(e) from None
            self._preferred = at
            return reply

    def _backoff_steps(self, seconds: float, stop: Optional[Callable[[], bool]]) -> Steps[None]:
        """Sleep ``seconds``; with ``stop``, in slices, ending early once it
        says True."""
        if stop is None:
            yield step(self._sleep, seconds)
            return
        end = time.monotonic() + seconds
        while not stop():
            left = end - time.monotonic()
            if left <= 0:
                return
            yield step(self._sleep, min(left, _STOP_POLL))

    def _method_steps(self, call: cv.Call) -> Steps[Any]:
        """A client method: its call, retried, and its result."""
        try:
            reply = yield from self._call_steps(call.rpc, call.request, **call.how)
        except call.catch as e:
            assert call.failed is not None
            return call.failed(e)
        return call.done(reply)
