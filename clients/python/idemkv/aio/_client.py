"""``idemkv.aio.Client``: the synchronous client's calls, retries and leader
following, as coroutines on ``grpc.aio``. Channels are opened on first use,
inside the running event loop; use one client per event loop.

The logic is the sync client's own (``_base``, ``_convert``), run by the
asyncio driver of ``_steps``: this class only awaits it."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, ClassVar, Dict, Iterable, Optional, Sequence, Union

import grpc.aio

from .. import _convert as cv
from .._base import ClientBase
from .._steps import adrive
from ..errors import IdemkvError
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
from . import _run_once


class Client(ClientBase):
    """An asyncio handle to an idemkv cluster; see :class:`idemkv.Client`
    for the arguments. Use ``async with``, or ``await client.close()``."""

    _grpc: ClassVar[Any] = grpc.aio
    _sleep: ClassVar[Callable[[float], Any]] = staticmethod(asyncio.sleep)
    _eager: ClassVar[bool] = False

    async def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            await c.channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------ plumbing

    async def _call(self, rpc: str, request: Any, **how: Any) -> Any:
        """Call ``rpc`` with the client's retries (see ``_base._call_steps``)."""
        return await adrive(self._call_steps(rpc, request, **how))

    async def _do(self, call: cv.Call) -> Any:
        return await adrive(self._method_steps(call))

    async def discover_leader(self) -> Optional[str]:
        """Ask the cluster who leads and prefer that endpoint from now on."""
        return await adrive(self._leader_steps())

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
        owner = owner or self.owner
        return await self._do(cv.claim_call(owner, namespace, key, lease, claim_id, fingerprint, max_attempts, retention))

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
        owner = owner or self.owner
        call = cv.claim_batch_call(owner, namespace, keys, lease, fingerprints, max_attempts, retention, all_or_nothing)
        return await self._do(call)

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
        return await self._do(cv.complete_call(namespace, key, token, result, code, retention))

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
        return await self._do(cv.renew_call(namespace, key, token, lease, checkpoint))

    async def release(
        self, namespace: str, key: cv.Bytes, token: int, error: str = "", *, permanent: bool = False
    ) -> ReleaseResult:
        """See :meth:`idemkv.Client.release`."""
        return await self._do(cv.release_call(namespace, key, token, error, permanent))

    async def get(
        self,
        namespace: str,
        key: cv.Bytes,
        *,
        consistency: Consistency = Consistency.LINEARIZABLE,
    ) -> Optional[Record]:
        """See :meth:`idemkv.Client.get`."""
        return await self._do(cv.get_call(namespace, key, consistency))

    async def wait(self, namespace: str, key: cv.Bytes, timeout: cv.Duration = 30.0) -> WaitResult:
        """See :meth:`idemkv.Client.wait`."""
        return await self._do(cv.wait_call(namespace, key, timeout))

    async def delete(self, namespace: str, key: cv.Bytes, *, token: Optional[int] = None) -> bool:
        """See :meth:`idemkv.Client.delete`."""
        return await self._do(cv.delete_call(namespace, key, token))

    # ------------------------------------------------------------ Cluster

    async def status(self) -> Status:
        """Status of whichever node answers first."""
        return await self._do(cv.status_call())

    async def status_all(self, timeout: float = 2.0) -> Dict[str, Union[Status, IdemkvError]]:
        """Each endpoint's status, or the error it gave (asked all at once)."""
        conns = self._conns_now()
        got = await asyncio.gather(*(adrive(self._status_or_error_steps(c, timeout)) for c in conns))
        return {c.authority: g for c, g in zip(conns, got)}

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """See :meth:`idemkv.Client.wait_ready`."""
        await adrive(self._wait_ready_steps(timeout))

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
            self, namespace, key, fn, lease=lease, fingerprint=fingerprint, max_attempts=max_attempts,
            retention=retention, wait_for_duplicate=wait_for_duplicate, serializer=serializer, owner=owner,
            safety_margin=safety_margin, renew_divisor=renew_divisor,
        )  # fmt: skip

    def idempotent(self, namespace: str, **options: Any) -> Callable[[Any], Any]:
        """:meth:`idemkv.Client.idempotent` for ``async def`` functions."""
        from .._idempotent import decorate

        return decorate(self, namespace, asyncio_only=True, **options)
