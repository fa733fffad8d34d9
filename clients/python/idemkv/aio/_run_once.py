"""``run_once`` for coroutines: the thread flavour's logic (``_run_steps``)
on the event loop, with the renewer as an asyncio task, cancelled when the
work returns.

``api`` is anything with the asyncio client's coroutines (``claim``,
``wait``, ``complete``, ``release``, ``_call``): the asyncio client itself,
or the sync client's adapter that runs its calls in threads (so the sync
client's decorator also serves ``async def`` functions).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable, Optional

from .. import _convert as cv
from .._lease import ClaimBase
from .._run_steps import NotAwaitable, run_steps
from .._steps import Steps, adrive
from ..types import RunResult


class AsyncClaim(ClaimBase):
    """The claim an async ``run_once`` work function runs under."""

    def __init__(self, **kw: Any) -> None:
        # Events are set from whichever thread notices (a lease lost in a
        # renewal of the sync client's adapter): through the loop.
        self._loop = asyncio.get_running_loop()
        self._renewer: "Optional[asyncio.Future[None]]" = None
        super().__init__(**kw)

    @staticmethod
    def _event() -> asyncio.Event:
        return asyncio.Event()

    def _set(self, event: asyncio.Event) -> None:
        try:
            self._loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    async def _wait(self, event: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _start_renewal(self, renewer: "Steps[None]") -> None:
        self._renewer = asyncio.ensure_future(adrive(renewer))

    def _stop_renewal(self) -> None:
        super()._stop_renewal()
        if self._renewer is not None:
            self._renewer.cancel()

    async def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Wait until the lease is lost (True) or ``timeout`` seconds pass
        (False); wakes at the client-side deadline by itself."""
        return await adrive(self._wait_lost_steps(timeout))

    async def flush_checkpoint(self, timeout: Optional[float] = None) -> None:
        """Send the last saved checkpoint with a renewal now and wait until
        the cluster stored it (:class:`LeaseLost` if the lease is lost first)."""
        await adrive(self._flush_steps(timeout))


async def run_once(
    api: Any, namespace: str, key: cv.Bytes, fn: Callable[[AsyncClaim], Awaitable[Any]], **options: Any
) -> RunResult[Any]:
    """See :meth:`idemkv.aio.Client.run_once` (the options are its keywords)."""
    return await adrive(run_steps(api, AsyncClaim, namespace, key, _awaited(fn), **options))


def _awaited(fn: Callable[[AsyncClaim], Awaitable[Any]]) -> Callable[[AsyncClaim], Awaitable[Any]]:
    """``fn(claim)``, awaited. A plain function (not detectable before it
    runs: a lambda may return a coroutine) has run when its value turns out
    not to be awaitable; that is handed on as :class:`NotAwaitable`, not
    raised as the work's failure, so the claim is not released for the work
    to run again (``run_steps`` marks the key FAILED instead)."""

    async def work(claim: AsyncClaim) -> Any:
        got = fn(claim)
        if not inspect.isawaitable(got):
            return NotAwaitable(fn, got)
        return await got

    return work
