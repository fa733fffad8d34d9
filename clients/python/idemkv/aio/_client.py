"""``idemkv.aio.Client``: the synchronous client's calls, retries and leader
following, as coroutines on ``grpc.aio``. Channels are opened on first use,
inside the running event loop; use one client per event loop."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

from .. import _convert as cv
from .._endpoints import DEFAULT_ENDPOINTS, Endpoint, TLSArg, parse
from .._retry import RetryOptions, overloaded, retryable
from ..client import _Conn, _Settings
from ..errors import ConfigError, IdemkvError, NotFound, OutcomeUnknown, Unavailable, from_rpc_error
from ..types import (
    BatchResult,
    ClaimOutcome,
    CompleteResult,
    Consistency,
    Record,
    ReleaseResult,
    RenewResult,
    RunResult,
    Status,
    WaitResult,
)
from ..v1 import api_pb2 as pb
from . import _run_once

log = logging.getLogger("idemkv")


class Client:
    """An asyncio handle to an idemkv cluster; see :class:`idemkv.Client`
    for the arguments. Use ``async with``, or ``await client.close()``."""

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
        self._conns: List[_Conn] = []
        self._preferred = 0
        self._discover = follow_leader
        self._discovering = False

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Client":
        """Like :meth:`idemkv.Client.from_env`."""
        return cls(**{**_Settings.env(), **kwargs})

    @property
    def owner(self) -> str:
        return self._s.owner

    @property
    def preferred_endpoint(self) -> str:
        eps = [c.authority for c in self._conns] or [e.authority for e in self._s.endpoints]
        return eps[self._preferred % len(eps)]

    def _open(self, e: Endpoint) -> _Conn:
        return _Conn(e.authority, self._s.factory.open(grpc.aio, e, self._interceptors))

    def _ensure(self) -> None:
        if not self._conns:
            self._conns = [self._open(e) for e in self._s.endpoints]

    async def close(self) -> None:
        conns, self._conns = self._conns, []
        for c in conns:
            await c.channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _conn_at(self, i: int) -> Tuple[int, _Conn]:
        self._ensure()
        i %= len(self._conns)
        return i, self._conns[i]

    async def _call(
        self,
        rpc: str,
        request: Any,
        *,
        cluster: bool = False,
        extra_timeout: float = 0.0,
        again: Callable[[grpc.RpcError], bool] = retryable,
        deadline: Optional[float] = None,
    ) -> Any:
        if self._discover and deadline is None:
            await self._follow_leader()
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
                reply = await method(request, timeout=timeout, metadata=self._s.metadata)
            except grpc.RpcError as e:
                if again(e) and time.monotonic() + backoff < give_up:
                    log.debug("%s via %s: %s; retrying on another endpoint", rpc, conn.authority, e)
                    self._discover = self._s.follow_leader
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, opts.backoff_max)
                    i = at + 1
                    continue
                raise from_rpc_error(e) from None
            self._preferred = at
            return reply

    async def _follow_leader(self) -> None:
        if self._discovering:
            return
        self._discovering = True
        try:
            if self._discover:
                self._discover = False
                await self.discover_leader()
        except IdemkvError as e:
            log.debug("leader discovery: %s", e)
        finally:
            self._discovering = False

    async def discover_leader(self) -> Optional[str]:
        """Ask the cluster who leads and prefer that endpoint from now on."""
        _, conn = self._conn_at(self._preferred)
        timeout = min(self._s.retry.request_timeout, 2.0)
        try:
            st = await conn.cluster.Status(pb.StatusRequest(), timeout=timeout, metadata=self._s.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        leader = st.leader_api_addr
        if not leader:
            return None
        for pos, c in enumerate(self._conns):
            if c.authority == leader:
                break
        else:
            self._conns.append(self._open(parse(leader)))
            pos = len(self._conns) - 1
        self._preferred = pos
        return leader

    # ------------------------------------------------------------ Idempotency

    async def claim(
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
        """See :meth:`idemkv.Client.claim`."""
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
        return cv.outcome(await self._call("Claim", req), claim_id)

    async def claim_batch(
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
        """See :meth:`idemkv.Client.claim_batch`."""
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
        reply = await self._call("ClaimBatch", pb.ClaimBatchRequest(items=items, all_or_nothing=all_or_nothing))
        return BatchResult(
            items=[cv.batch_item(m, it.claim_id) for m, it in zip(reply.items, items)],
            applied=reply.applied,
        )

    async def complete(
        self,
        namespace: str,
        key: cv.Bytes,
        token: int,
        result: cv.Bytes = b"",
        *,
        code: Optional[int] = None,
        retention: Optional[cv.Duration] = None,
    ) -> CompleteResult:
        """See :meth:`idemkv.Client.complete`."""
        req = pb.CompleteRequest(
            namespace=namespace,
            key=cv.to_bytes(key, "key"),
            token=token,
            result=cv.to_bytes(result, "result"),
            retention_ms=cv.millis(retention, "retention"),
        )
        if code is not None:
            req.code = code
        r = await self._call("Complete", req)
        return CompleteResult(completed_at_ms=r.completed_at_ms, expires_at_ms=r.expires_at_ms)

    async def renew(
        self,
        namespace: str,
        key: cv.Bytes,
        token: int,
        *,
        lease: cv.Duration = 30.0,
        checkpoint: Optional[cv.Bytes] = None,
    ) -> RenewResult:
        """See :meth:`idemkv.Client.renew`."""
        from ..client import Client as SyncClient

        r = await self._call("Renew", SyncClient._renew_request(namespace, key, token, lease, checkpoint))
        return RenewResult(lease_deadline_ms=r.lease_deadline_ms)

    async def release(self, namespace: str, key: cv.Bytes, token: int, error: str = "") -> ReleaseResult:
        """See :meth:`idemkv.Client.release`."""
        req = pb.ReleaseRequest(namespace=namespace, key=cv.to_bytes(key, "key"), token=token, error=error)
        r = await self._call("Release", req)
        return ReleaseResult(state=cv.state(r.state), attempts=r.attempts)

    async def get(
        self,
        namespace: str,
        key: cv.Bytes,
        *,
        consistency: Consistency = Consistency.LINEARIZABLE,
    ) -> Optional[Record]:
        """See :meth:`idemkv.Client.get`."""
        req = pb.GetRequest(namespace=namespace, key=cv.to_bytes(key, "key"), consistency=consistency.value)
        try:
            return cv.record((await self._call("Get", req)).record)
        except NotFound:
            return None

    async def wait(self, namespace: str, key: cv.Bytes, timeout: cv.Duration = 30.0) -> WaitResult:
        """See :meth:`idemkv.Client.wait`."""
        wait_s = cv.seconds(timeout, "timeout")
        req = pb.AwaitRequest(
            namespace=namespace, key=cv.to_bytes(key, "key"), timeout_ms=max(1, cv.millis(wait_s, "timeout"))
        )
        r = await self._call("Await", req, extra_timeout=wait_s)
        return WaitResult(record=cv.record(r.record), timed_out=r.timed_out)

    async def delete(self, namespace: str, key: cv.Bytes, *, token: Optional[int] = None) -> bool:
        """See :meth:`idemkv.Client.delete`."""
        req = pb.DeleteRequest(namespace=namespace, key=cv.to_bytes(key, "key"))
        if token is not None:
            req.token = token
            return (await self._call("Delete", req)).existed
        try:
            return (await self._call("Delete", req, again=overloaded)).existed
        except Unavailable as e:
            raise OutcomeUnknown(
                f"the unfenced delete may or may not have taken effect, and retrying it is not safe ({e})",
                code=e.code,
            ) from e

    # ------------------------------------------------------------ Cluster

    async def status(self) -> Status:
        """Status of whichever node answers first."""
        return cv.status(await self._call("Status", pb.StatusRequest(), cluster=True))

    async def status_all(self, timeout: float = 2.0) -> Dict[str, Union[Status, IdemkvError]]:
        """Each endpoint's status, or the error it gave."""
        self._ensure()

        async def one(c: _Conn) -> Union[Status, IdemkvError]:
            try:
                return cv.status(await c.cluster.Status(pb.StatusRequest(), timeout=timeout, metadata=self._s.metadata))
            except grpc.RpcError as e:
                return from_rpc_error(e)

        conns = list(self._conns)
        got = await asyncio.gather(*(one(c) for c in conns))
        return {c.authority: g for c, g in zip(conns, got)}

    # ------------------------------------------------------------ run once

    async def run_once(
        self,
        namespace: str,
        key: cv.Bytes,
        fn: Callable[["_run_once.AsyncClaim"], Awaitable[Any]],
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
        """:meth:`idemkv.Client.run_once` for a coroutine function: the lease
        is renewed by an asyncio task while ``await fn(claim)`` runs."""
        return await _run_once.run_once(
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
        """:meth:`idemkv.Client.idempotent` for ``async def`` functions."""
        from .._idempotent import decorate

        return decorate(self, namespace, asyncio_only=True, **options)
