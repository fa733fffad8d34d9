"""``run_once`` for coroutines: the thread flavour's rules (``_run_once.py``)
with the renewer as an asyncio task, cancelled when the work returns.

``api`` is anything with the asyncio client's coroutines (``claim``,
``wait``, ``complete``, ``release``, ``_call``): the asyncio client itself,
or the sync client's adapter that runs its calls in threads (so the sync
client's decorator also serves ``async def`` functions).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Optional

from .. import _convert as cv
from .. import serializers
from .._lease import EXPIRED, FENCED, ClaimBase, LeaseClock, _current, lease_lost, validity
from .._run_once import _busy, _exhausted, release_request
from ..errors import GrantExpired, IdemkvError, LeaseLost
from ..types import Acquired, Completed, Completion, Failed, InProgress, RecordState, RunResult

log = logging.getLogger("idemkv")


class AsyncClaim(ClaimBase):
    """The claim an async ``run_once`` work function runs under."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._loop = asyncio.get_running_loop()
        self._lost_event = asyncio.Event()
        self._wake_event = asyncio.Event()
        self._lease.on_lost(self._on_lost)

    def _set(self, ev: asyncio.Event) -> None:
        try:
            self._loop.call_soon_threadsafe(ev.set)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _on_lost(self) -> None:
        self._set(self._lost_event)
        self._wake()

    def _wake(self) -> None:
        self._set(self._wake_event)

    async def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Wait until the lease is lost (True) or ``timeout`` seconds pass
        (False); wakes at the client-side deadline by itself."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            deadline, lost = self._lease.check(now)
            if lost is not None:
                return True
            step = deadline - now
            if end is not None:
                if now >= end:
                    return False
                step = min(step, end - now)
            try:
                await asyncio.wait_for(self._lost_event.wait(), max(step, 0.0))
            except asyncio.TimeoutError:
                pass

    async def flush_checkpoint(self, timeout: Optional[float] = None) -> None:
        """Send the last saved checkpoint with a renewal now and wait until
        the cluster stored it (:class:`LeaseLost` if the lease is lost first)."""
        seq = self._request_flush()
        end = None if timeout is None else time.monotonic() + timeout
        while not self._flushed(seq):
            self.check()
            if end is not None and time.monotonic() >= end:
                raise TimeoutError("the checkpoint was not stored in time")
            await asyncio.sleep(0.005)


async def _renewer(api: Any, claim: AsyncClaim, lease_s: float, valid_for: float, claim_sent: float, renew_divisor: int) -> None:
    lease = claim._lease
    every = max(min(lease_s / max(renew_divisor, 2), valid_for / 2), 0.001)
    pause = max(every / 4, 0.01)
    next_at = claim_sent + every
    from ..client import Client as SyncClient

    while True:
        claim._wake_event.clear()
        deadline, lost = lease.check()
        if lost is not None:
            return
        wait = min(next_at, deadline) - time.monotonic()
        if wait > 0 and not claim._flush_wanted():
            try:
                await asyncio.wait_for(claim._wake_event.wait(), wait)
            except asyncio.TimeoutError:
                pass
            continue
        data, seq = claim._checkpoint_to_send()
        req = SyncClient._renew_request(claim.namespace, claim.key, claim.token, lease_s, data)
        sent = time.monotonic()
        try:
            await api._call("Renew", req, deadline=deadline)
        except LeaseLost:
            lease.lose(FENCED)
            return
        except IdemkvError as e:
            if time.monotonic() >= deadline:
                log.warning("no lease renewal got through before the deadline (token %d): the lease is lost", claim.token)
                lease.lose(EXPIRED)
                return
            log.warning("lease renewal failed (%s); retrying until the lease deadline", e)
            next_at = time.monotonic() + pause
            continue
        if not lease.renewed(sent, valid_for):
            return
        claim._acked(seq)
        next_at = sent + every


async def run_once(
    api: Any,
    namespace: str,
    key: cv.Bytes,
    fn: Callable[[AsyncClaim], Awaitable[Any]],
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
    ser = serializers.resolve(serializer)
    lease_s = cv.seconds(lease, "lease")
    margin_s = None if safety_margin is None else cv.seconds(safety_margin, "safety_margin")
    valid_for = validity(lease_s, margin_s)
    key_b = cv.to_bytes(key, "key")
    claim_id = uuid.uuid4().hex
    wait_until = None
    if wait_for_duplicate is not None:
        wait_until = time.monotonic() + cv.seconds(wait_for_duplicate, "wait_for_duplicate")
    while True:
        sent = time.monotonic()
        got = await api.claim(
            namespace,
            key_b,
            lease=lease_s,
            owner=owner,
            claim_id=claim_id,
            fingerprint=fingerprint,
            max_attempts=max_attempts,
            retention=retention,
        )
        if isinstance(got, Acquired):
            break
        if isinstance(got, Completed):
            return RunResult(value=ser.loads(got.result), replayed=True, token=got.token, code=got.code, raw=got.result)
        if isinstance(got, Failed):
            raise _exhausted(got.attempts, got.last_error)
        assert isinstance(got, InProgress)
        left = None if wait_until is None else wait_until - time.monotonic()
        if left is None or left <= 0:
            raise _busy(got.owner)
        rec = (await api.wait(namespace, key_b, timeout=left)).record
        if rec.state == RecordState.COMPLETED:
            return RunResult(value=ser.loads(rec.result), replayed=True, token=rec.token, code=rec.code, raw=rec.result)
        if rec.state == RecordState.FAILED:
            raise _exhausted(rec.attempts, rec.last_error)
        if time.monotonic() >= wait_until:
            raise _busy(rec.owner)

    token = got.token
    clock = LeaseClock(sent + valid_for)
    if clock.check()[1] is not None:
        waited = time.monotonic() - sent
        try:
            note = f"grant arrived {waited:.3f} s after the claim was sent; not started"
            await api._call("Release", release_request(namespace, key_b, token, note), deadline=time.monotonic() + lease_s)
        except IdemkvError as e:
            log.warning("release of a late grant (token %d): %s", token, e)
        raise GrantExpired(
            f"the grant (token {token}) arrived {waited:.3f} s after the claim was sent, "
            "past its lease deadline; the work was not started",
            token=token,
            waited=waited,
        )
    claim = AsyncClaim(
        namespace=namespace,
        key=key_b,
        token=token,
        attempt=got.attempt,
        previous_owner=got.previous_owner,
        checkpoint=got.checkpoint,
        lease=clock,
    )
    renewer = asyncio.ensure_future(_renewer(api, claim, lease_s, valid_for, sent, renew_divisor))
    ctx_token = _current.set(claim)
    try:
        value = await fn(claim)
        code = None
        if isinstance(value, Completion):
            value, code = value.value, value.code
        data = serializers.dumps(ser, value)
    except BaseException as e:
        renewer.cancel()
        why = clock.check()[1]
        if why is not None:
            if isinstance(e, LeaseLost):
                raise
            raise lease_lost(token, why) from e
        try:
            await api.release(namespace, key_b, token, error=f"{type(e).__name__}: {e}"[:1024])
        except IdemkvError as re:
            log.warning("release after a failed run (token %d): %s", token, re)
        raise
    finally:
        _current.reset(ctx_token)
        renewer.cancel()
    why = clock.check()[1]
    if why is not None:
        raise lease_lost(token, why)
    try:
        await api.complete(namespace, key_b, token, data, code=code, retention=retention)
    except LeaseLost:
        raise lease_lost(token, FENCED) from None
    return RunResult(value=value, replayed=False, token=token, code=code, raw=data)
