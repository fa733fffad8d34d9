"""``Client.run_once`` for threads: claim, renew in a background thread,
complete with the work's result — or replay the result a previous run saved.

The logic is ``_run_steps`` (the Rust helper's rules, ``src/client/run_once.rs``),
driven here in the calling thread; the renewer runs in a thread of its own.
The work is told of a lost lease (``claim.lost``, ``claim.wait_lost()``,
``claim.check()``) but not interrupted: ``run_once`` waits for it to
return, then saves nothing and raises :class:`LeaseLost`.
"""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _convert as cv
from ._lease import ClaimBase
from ._run_steps import AwaitableReturned, NotRun, run_steps
from ._steps import Steps, drive
from .types import RunResult

if TYPE_CHECKING:
    from .client import Client

#: How long ``run_once`` waits for its renewer thread to end once the work
#: is done (it ends at once unless a renewal is in flight).
_JOIN_RENEWER = 0.5


class Claim(ClaimBase):
    """The claim a ``run_once`` work function runs under (thread flavour)."""

    @staticmethod
    def _event() -> threading.Event:
        return threading.Event()

    def _set(self, event: threading.Event) -> None:
        event.set()

    def _wait(self, event: threading.Event, seconds: float) -> None:
        event.wait(seconds)

    _renewer: Optional[threading.Thread] = None

    def _start_renewal(self, renewer: "Steps[None]") -> None:
        self._renewer = threading.Thread(target=drive, args=(renewer,), name=f"idemkv-renew-{self.token}", daemon=True)
        self._renewer.start()

    def _stop_renewal(self) -> None:
        super()._stop_renewal()
        # Woken, it returns at once, or after the attempt in flight (its
        # retries stop: they ask `_renewal_stopped`). Waited for once.
        t, self._renewer = self._renewer, None
        if t is not None and t is not threading.current_thread():
            t.join(_JOIN_RENEWER)

    def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Block until the lease is lost (True) or ``timeout`` seconds pass
        (False). Wakes at the client-side deadline by itself: it does not
        depend on a renewal's answer arriving."""
        return drive(self._wait_lost_steps(timeout))

    def flush_checkpoint(self, timeout: Optional[float] = None) -> None:
        """Send the last saved checkpoint with a renewal now and wait until
        the cluster stored it. Raises :class:`LeaseLost` if the lease is lost
        first, ``TimeoutError`` after ``timeout`` seconds."""
        drive(self._flush_steps(timeout))


def run_once(
    client: "Client", namespace: str, key: cv.Bytes, fn: Callable[[Claim], Any], **options: Any
) -> RunResult[Any]:
    """See :meth:`idemkv.Client.run_once` (the options are its keywords)."""
    if inspect.iscoroutinefunction(fn):
        # Calling it would run nothing: refused before claiming (a
        # functools.partial of an async def too: it is seen through).
        raise TypeError(
            "idemkv.Client.run_once calls the work and saves what it returns; "
            f"{getattr(fn, '__qualname__', repr(fn))} is "
            "async def (use idemkv.aio.Client.run_once, or the decorator)"
        )
    return drive(run_steps(client, Claim, namespace, key, _called(fn), **options))


def _called(fn: Callable[[Claim], Any]) -> Callable[[Claim], Any]:
    """``fn(claim)``, called. A function that returns an unstarted coroutine
    (a lambda or callable object around an ``async def``) ran none of that
    coroutine: it is closed, so it never runs nor warns that it was never
    awaited, and handed on as :class:`NotRun`, so ``run_steps`` releases the
    claim for a rerun (not FAILED) and raises ``TypeError``. Any other
    awaitable (an asyncio ``Future`` or ``Task``, already scheduled and with
    no ``close()``; a coroutine already started) may run, or have run, and
    is left alone: handed on as :class:`AwaitableReturned`, a value the work
    returned that cannot be saved, so the key is marked FAILED for good."""

    def work(claim: Claim) -> Any:
        got = fn(claim)
        if inspect.iscoroutine(got) and inspect.getcoroutinestate(got) == inspect.CORO_CREATED:
            got.close()
            return NotRun(fn, got)
        if inspect.isawaitable(got):
            return AwaitableReturned(fn, got)
        return got

    return work
