"""``run_once`` and its lease renewer, written once for threads and asyncio
as step generators (``_steps``): ``_run_once.py`` drives them in the
calling thread (the renewer in a thread of its own), ``aio/_run_once.py``
on the event loop (the renewer in a task).

The rules are the Rust helper's (``src/client/run_once.rs``):

- claim (its ``claim_id`` fixed before the first attempt, so each retry is
  the same claim and the same grant; a new one for each claim after waiting
  for a duplicate), replay a saved result, or wait for a duplicate's;
- the lease is timed on this machine (``_lease``): valid until the instant
  taken before the claim was sent plus the lease minus the safety margin,
  moved by each renewal from its own send instant; a grant that arrives
  after that is released unused (:class:`GrantExpired`);
- the renewer renews every ``lease / renew_divisor`` (at least twice per
  ``lease - margin``) with the latest checkpoint, and gives up when the
  server refuses the token or no renewal got through by the deadline: the
  work is told, not interrupted; when it returns nothing is saved
  (:class:`LeaseLost`);
- the work's exception releases the claim (unless the lease was lost), and
  propagates; so does, in the thread flavour, a work function that returned
  an unstarted coroutine: that coroutine never ran (it is closed unrun), so
  the key is released for a rerun, not marked FAILED, and ``TypeError``
  raised;
- once the work has returned, its effect has happened: whatever then keeps
  its result from being saved must not let it run again. A value the
  serializer refuses (or, in asyncio, a work function that returned no
  awaitable; in threads, one that returned any other awaitable, a Future or
  Task say), or a result the store refuses as too large, marks the key
  FAILED for good (a permanent release) and raises :class:`ResultNotSaved`
  with the cause chained; a Complete that fails otherwise raises it too,
  with the result to save later.

``api`` is anything with the client's calls (``claim``, ``wait``,
``complete``, ``release``, ``_call``): the sync client (blocking), the
asyncio client, or ``_idempotent``'s adapter running the sync client's
calls in threads (both awaited).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Optional

from . import _convert as cv
from . import serializers
from ._lease import EXPIRED, FENCED, ClaimBase, LeaseClock, _current, lease_lost, validity
from ._steps import Steps, step
from .errors import (
    AttemptsExhausted,
    Busy,
    GrantExpired,
    IdemkvError,
    LeaseLost,
    NotFound,
    ResultNotSaved,
    TooLarge,
)
from .types import Acquired, Completed, Completion, Failed, InProgress, RecordState, RunResult, check_code

log = logging.getLogger("idemkv")

#: Most characters of a cause quoted in a give-up's release ``error``, so
#: the end of the message (why the key is FAILED) is never cut.
_CAUSE_MAX = 400


class _Returned:
    """The work ``fn`` returned ``value``, of a kind its flavour cannot use."""

    __slots__ = ("fn", "value")

    def __init__(self, fn: Any, value: Any) -> None:
        self.fn = fn
        self.value = value

    def _what(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"{name} returned {type(self.value).__name__}"


class NotAwaitable(_Returned):
    """What the asyncio flavour's work step gives back when ``fn(claim)``
    returned no awaitable: a plain function ran (its effect happened) and
    returned ``value``, which was never awaited."""

    __slots__ = ()

    def error(self) -> TypeError:
        return TypeError(
            f"idemkv.aio run_once awaits the work, but {self._what()}, "
            "not an awaitable: make it async def (or use idemkv.Client.run_once for plain functions)"
        )


class NotRun(_Returned):
    """What the thread flavour's work step gives back when ``fn(claim)``
    returned an unstarted coroutine (a lambda or callable object wrapping an
    ``async def``, not detectable before the call; an ``async def`` or a
    ``functools.partial`` of one is refused before claiming): the coroutine
    did not run — it runs only when awaited — and ``value`` was closed
    unrun."""

    __slots__ = ()

    def error(self) -> TypeError:
        return TypeError(
            f"idemkv.Client.run_once calls the work and saves what it returns, but {self._what()}, "
            "an awaitable it cannot await, so the work did not run: use "
            "idemkv.aio.Client.run_once (or the decorator), or make the function a plain (sync) one"
        )


class AwaitableReturned(_Returned):
    """What the thread flavour's work step gives back when ``fn(claim)``
    returned an awaitable other than an unstarted coroutine (an asyncio
    ``Future`` or ``Task``, already scheduled; a coroutine already started):
    the work ran (and what it scheduled may run, or have run), so like any
    value that cannot be saved it marks the key FAILED for good."""

    __slots__ = ()

    def error(self) -> TypeError:
        return TypeError(
            f"idemkv.Client.run_once calls the work and saves what it returns, but {self._what()}, "
            "an awaitable that is not an unstarted coroutine (it may run, or have run): it cannot be "
            "awaited nor saved; use idemkv.aio.Client.run_once (or the decorator) for async work"
        )


def run_steps(
    api: Any,
    new_claim: Callable[..., ClaimBase],
    namespace: str,
    key: cv.Bytes,
    fn: Callable[[Any], Any],
    *,
    lease: cv.Duration,
    fingerprint: Optional[cv.Bytes],
    max_attempts: int,
    retention: Optional[cv.Duration],
    wait_for_duplicate: Optional[cv.Duration],
    serializer: Any,
    owner: Optional[str],
    safety_margin: Optional[cv.Duration],
    renew_divisor: int = 3,
) -> Steps[RunResult[Any]]:
    """run_once (the defaults are the clients' ``run_once`` signatures'):
    ``new_claim(...)`` makes the flavour's claim; the step ``fn(claim)`` is
    the work (called, or awaited)."""
    ser = serializers.resolve(serializer)
    lease_s = cv.seconds(lease, "lease")
    margin_s = None if safety_margin is None else cv.seconds(safety_margin, "safety_margin")
    valid_for = validity(lease_s, margin_s)
    key_b = cv.to_bytes(key, "key")
    wait_until = None
    if wait_for_duplicate is not None:
        wait_until = time.monotonic() + cv.seconds(wait_for_duplicate, "wait_for_duplicate")
    while True:
        # Fixed here, so every retry of this claim is the same claim (and
        # grant), and the instant taken next precedes all of its attempts.
        # A new one for each claim: the server answers a claim_id with the
        # grant it already made to it, which a retry of an earlier claim,
        # delayed on its way, may have won after `sent` was taken for it;
        # taking that grant as this claim's would time it from too late.
        claim_id = uuid.uuid4().hex
        sent = time.monotonic()
        got = yield step(
            api.claim,
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
        # Wait for the holder; replay its result, or claim again if it
        # released the key, its lease ran out, or the record was deleted
        # (or swept) meanwhile: the key is free.
        try:
            rec = (yield step(api.wait, namespace, key_b, timeout=left)).record
        except NotFound:
            continue
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
        yield from _release_late_grant(api, namespace, key_b, token, waited, lease_s)
        raise GrantExpired(
            f"the grant (token {token}) arrived {waited:.3f} s after the claim was sent, "
            "past its lease deadline; the work was not started",
            token=token,
            waited=waited,
        )
    claim = new_claim(
        namespace=namespace,
        key=key_b,
        token=token,
        attempt=got.attempt,
        previous_owner=got.previous_owner,
        checkpoint=got.checkpoint,
        lease=clock,
    )
    claim._start_renewal(renew_steps(api, claim, lease_s, valid_for, sent, renew_divisor))
    ctx_token = _current.set(claim)
    try:
        value = yield step(fn, claim)
    except BaseException as e:
        claim._stop_renewal()
        why = clock.check()[1]
        if why is not None:
            if isinstance(e, LeaseLost):
                raise
            raise lease_lost(token, why) from e
        # A release that fails leaves the lease to expire: same end.
        try:
            yield step(api.release, namespace, key_b, token, error=f"{type(e).__name__}: {e}"[:1024])
        except IdemkvError as re:
            log.warning("release after a failed run (token %d): %s", token, re)
        raise
    finally:
        _current.reset(ctx_token)
        claim._stop_renewal()
    if isinstance(value, NotRun):
        # Nothing ran: an ordinary release (as after the work's exception)
        # leaves the key claimable, not FAILED. With the lease lost there is
        # nothing to give back; the mistake is still the error to raise.
        error = value.error()
        if clock.check()[1] is None:
            try:
                yield step(api.release, namespace, key_b, token, error=f"TypeError: {error}"[:1024])
            except IdemkvError as re:
                log.warning("release after a work function returned an awaitable (token %d): %s", token, re)
        raise error
    why = clock.check()[1]
    if why is not None:
        raise lease_lost(token, why)
    # The work has returned: its effect happened. Whatever keeps its result
    # from being saved now must not let a later delivery run it again.
    code = None
    try:
        if isinstance(value, (NotAwaitable, AwaitableReturned)):
            raise value.error()
        if isinstance(value, Completion):
            check_code(value.code)  # checked when built, unless altered since
            value, code = value.value, value.code
        data = serializers.dumps(ser, value)
    except Exception as e:
        cause = f"{type(e).__name__}: {e}"[:_CAUSE_MAX]
        marked = yield from _give_up(api, namespace, key_b, token, f"the work ran, but its result was not saved ({cause})")
        raise _not_saved(f"its result could not be saved ({cause}); {_then(marked)}", token, b"", code, marked) from e
    try:
        yield step(api.complete, namespace, key_b, token, data, code=code, retention=retention)
    except LeaseLost:
        raise lease_lost(token, FENCED) from None
    except TooLarge as e:
        # The work ran and had its effect; only its result cannot be kept.
        why = f"the work ran, but its result of {len(data)} bytes was not saved ({e.message[:_CAUSE_MAX]})"
        marked = yield from _give_up(api, namespace, key_b, token, why)
        raise _not_saved(
            f"its result of {len(data)} bytes is over the store's result limit and was not saved; {_then(marked)}",
            token,
            data,
            code,
            marked,
        ) from e
    except IdemkvError as e:
        raise _not_saved(f"its result was not saved: {e}", token, data, code, False) from e
    return RunResult(value=value, replayed=False, token=token, code=code, raw=data)


def _give_up(api: Any, namespace: str, key: bytes, token: int, why: str) -> Steps[bool]:
    """The work ran and had its effect, but its result cannot be saved: mark
    the key FAILED for good (a permanent release) so that no later delivery
    runs the work again; they get :class:`AttemptsExhausted` with ``why``.
    True if the mark was made (the Rust helper's ``give_up``)."""
    error = f"{why}; marked failed so that it does not run again"
    try:
        released = yield step(api.release, namespace, key, token, error=error[:1024], permanent=True)
    except IdemkvError as re:
        log.warning("marking a run whose result was not saved FAILED (token %d): %s", token, re)
        return False
    # A store older than ``permanent`` ignores it and frees the key.
    return released.state is RecordState.FAILED


def _then(marked: bool) -> str:
    if marked:
        return "the key is marked FAILED so the work does not run again"
    return "marking the key FAILED failed too: a call after the lease may run the work again"


def _not_saved(why: str, token: int, data: bytes, code: Optional[int], marked: bool) -> ResultNotSaved:
    """The work ran (with ``token``) but ``data`` was not saved: ``why``."""
    return ResultNotSaved(
        f"the work ran (token {token}) but {why}",
        token=token,
        size=len(data),
        marked_failed=marked,
        raw=data,
        result_code=code,
    )


def renew_steps(
    api: Any,
    claim: ClaimBase,
    lease_s: float,
    valid_for: float,
    claim_sent: float,
    renew_divisor: int,
) -> Steps[None]:
    """Renew every ``every`` after the last successful send; after a failure,
    try again shortly; stop on LEASE_LOST, at the deadline, or when the work
    is done."""
    lease = claim._lease
    every = max(min(lease_s / max(renew_divisor, 2), valid_for / 2), 0.001)
    pause = max(every / 4, 0.01)
    next_at = claim_sent + every
    # After a failed renewal, no other before this instant: a flush that is
    # asked for does not cut the pause short (a refusal that is not retried,
    # a checkpoint too large say, would be sent again at once, and again).
    paused_until = 0.0
    stopped = lambda: claim._renewal_stopped  # noqa: E731 - the retry loop's stop check
    while True:
        claim._wake_event.clear()
        if claim._renewal_stopped:
            return
        deadline, lost = lease.check()
        if lost is not None:
            return
        now = time.monotonic()
        wait = min(next_at, deadline) - now
        if wait > 0 and (now < paused_until or not claim._flush_wanted()):
            yield claim._nap(wait)
            continue
        data, seq = claim._checkpoint_to_send()
        req = cv.renew_request(claim.namespace, claim.key, claim.token, lease_s, data)
        sent = time.monotonic()
        try:
            # Retried until the deadline, or until the work is done.
            yield step(api._call, "Renew", req, deadline=deadline, stop=stopped)
        except LeaseLost:
            lease.lose(FENCED)
            return
        except IdemkvError as e:
            if claim._renewal_stopped:
                return
            if time.monotonic() >= deadline:
                log.warning("no lease renewal got through before the deadline (token %d): the lease is lost", claim.token)
                lease.lose(EXPIRED)
                return
            log.warning("lease renewal failed (%s); retrying until the lease deadline", e)
            next_at = paused_until = time.monotonic() + pause
            continue
        if not lease.renewed(sent, valid_for):
            return
        claim._acked(seq)
        next_at = sent + every


def _release_late_grant(api: Any, namespace: str, key: bytes, token: int, waited: float, lease_s: float) -> Steps[None]:
    """Give back a grant that came too late to use, so the key is claimable
    at once; bounded by one lease (by then the server's lease ran out)."""
    note = f"grant arrived {waited:.3f} s after the claim was sent; not started"
    try:
        yield step(api._call, "Release", cv.release_request(namespace, key, token, note), deadline=time.monotonic() + lease_s)
    except IdemkvError as e:
        log.warning("release of a late grant (token %d): %s", token, e)


def _busy(owner: str) -> Busy:
    return Busy(f"another worker ({owner}) holds a live claim on the key", owner=owner)


def _exhausted(attempts: int, last_error: str) -> AttemptsExhausted:
    return AttemptsExhausted(
        f"the key is FAILED after {attempts} attempts; last error: {last_error}",
        attempts=attempts,
        last_error=last_error,
    )
