"""``Client.run_once`` for threads: claim, renew in a background thread,
complete with the work's result — or replay the result a previous run saved.

The lease timing is the Rust helper's (``src/client/run_once.rs``, see
``_lease.py``): the renewer renews every ``lease / 3`` (and at least twice
per ``lease - margin``), carries the latest checkpoint, and gives up when
the server refuses the token or no renewal got through by the client-side
deadline. The work is told (``claim.lost``, ``claim.wait_lost()``,
``claim.check()``) but not interrupted: ``run_once`` waits for it to
return, then saves nothing and raises :class:`LeaseLost`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from . import _convert as cv
from . import serializers
from ._lease import EXPIRED, FENCED, ClaimBase, LeaseClock, _current, lease_lost, validity
from .errors import (
    AttemptsExhausted,
    Busy,
    GrantExpired,
    IdemkvError,
    LeaseLost,
)
from .types import Acquired, Completed, Completion, Failed, InProgress, RecordState, RunResult
from .v1 import api_pb2 as pb

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("idemkv")
T = TypeVar("T")


class Claim(ClaimBase):
    """The claim a ``run_once`` work function runs under (thread flavour)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._lost_event = threading.Event()
        self._wake_event = threading.Event()
        self._acked_cond = threading.Condition()
        self._lease.on_lost(self._on_lost)

    def _on_lost(self) -> None:
        self._lost_event.set()
        self._wake()

    def _wake(self) -> None:
        self._wake_event.set()
        with self._acked_cond:
            self._acked_cond.notify_all()

    def wait_lost(self, timeout: Optional[float] = None) -> bool:
        """Block until the lease is lost (True) or ``timeout`` seconds pass
        (False). Wakes at the client-side deadline by itself: it does not
        depend on a renewal's answer arriving."""
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
            self._lost_event.wait(max(step, 0.0))

    def flush_checkpoint(self, timeout: Optional[float] = None) -> None:
        """Send the last saved checkpoint with a renewal now and wait until
        the cluster stored it. Raises :class:`LeaseLost` if the lease is lost
        first, ``TimeoutError`` after ``timeout`` seconds."""
        seq = self._request_flush()
        end = None if timeout is None else time.monotonic() + timeout
        with self._acked_cond:
            while not self._flushed(seq):
                self.check()
                left = self.remaining()
                if end is not None:
                    if time.monotonic() >= end:
                        raise TimeoutError("the checkpoint was not stored in time")
                    left = min(left, end - time.monotonic())
                self._acked_cond.wait(max(left, 0.001))


def _renewer(
    client: "Client",
    claim: Claim,
    lease_s: float,
    valid_for: float,
    claim_sent: float,
    renew_divisor: int,
    stop: threading.Event,
) -> None:
    """Renew every ``every`` after the last successful send; after a failure,
    try again shortly; stop on LEASE_LOST, at the deadline, or on ``stop``."""
    lease = claim._lease
    every = max(min(lease_s / max(renew_divisor, 2), valid_for / 2), 0.001)
    pause = max(every / 4, 0.01)
    next_at = claim_sent + every
    while True:
        claim._wake_event.clear()
        if stop.is_set():
            return
        deadline, lost = lease.check()
        if lost is not None:
            return
        wait = min(next_at, deadline) - time.monotonic()
        if wait > 0 and not claim._flush_wanted():
            claim._wake_event.wait(wait)
            continue
        data, seq = claim._checkpoint_to_send()
        req = client._renew_request(claim.namespace, claim.key, claim.token, lease_s, data)
        sent = time.monotonic()
        try:
            client._call("Renew", req, deadline=deadline)
        except LeaseLost:
            lease.lose(FENCED)
            return
        except IdemkvError as e:
            if stop.is_set():
                return
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


def run_once(
    client: "Client",
    namespace: str,
    key: cv.Bytes,
    fn: Callable[[Claim], Any],
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
    # Fixed here, so every retry of the claim is the same claim (and grant),
    # and the instant taken before each send precedes all of its attempts.
    claim_id = uuid.uuid4().hex
    wait_until = None
    if wait_for_duplicate is not None:
        wait_until = time.monotonic() + cv.seconds(wait_for_duplicate, "wait_for_duplicate")
    while True:
        sent = time.monotonic()
        got = client.claim(
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
        # released the key or its lease ran out.
        rec = client.wait(namespace, key_b, timeout=left).record
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
        _release_late_grant(client, namespace, key_b, token, waited, lease_s)
        raise GrantExpired(
            f"the grant (token {token}) arrived {waited:.3f} s after the claim was sent, "
            "past its lease deadline; the work was not started",
            token=token,
            waited=waited,
        )
    claim = Claim(
        namespace=namespace,
        key=key_b,
        token=token,
        attempt=got.attempt,
        previous_owner=got.previous_owner,
        checkpoint=got.checkpoint,
        lease=clock,
    )
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renewer,
        args=(client, claim, lease_s, valid_for, sent, renew_divisor, stop),
        name=f"idemkv-renew-{token}",
        daemon=True,
    )
    renewer.start()
    ctx_token = _current.set(claim)
    try:
        value = fn(claim)
        code = None
        if isinstance(value, Completion):
            value, code = value.value, value.code
        data = serializers.dumps(ser, value)
    except BaseException as e:
        stop.set()
        claim._wake()
        why = clock.check()[1]
        if why is not None:
            if isinstance(e, LeaseLost):
                raise
            raise lease_lost(token, why) from e
        # A release that fails leaves the lease to expire: same end.
        try:
            client.release(namespace, key_b, token, error=f"{type(e).__name__}: {e}"[:1024])
        except IdemkvError as re:
            log.warning("release after a failed run (token %d): %s", token, re)
        raise
    finally:
        _current.reset(ctx_token)
        stop.set()
        claim._wake()
    why = clock.check()[1]
    if why is not None:
        raise lease_lost(token, why)
    try:
        client.complete(namespace, key_b, token, data, code=code, retention=retention)
    except LeaseLost:
        raise lease_lost(token, FENCED) from None
    return RunResult(value=value, replayed=False, token=token, code=code, raw=data)


def _busy(owner: str) -> Busy:
    return Busy(f"another worker ({owner}) holds a live claim on the key", owner=owner)


def _exhausted(attempts: int, last_error: str) -> AttemptsExhausted:
    return AttemptsExhausted(
        f"the key is FAILED after {attempts} attempts; last error: {last_error}",
        attempts=attempts,
        last_error=last_error,
    )


def _release_late_grant(client: "Client", namespace: str, key: bytes, token: int, waited: float, lease_s: float) -> None:
    """Give back a grant that came too late to use, so the key is claimable
    at once; bounded by one lease (by then the server's lease ran out)."""
    try:
        client._call(
            "Release",
            release_request(namespace, key, token, f"grant arrived {waited:.3f} s after the claim was sent; not started"),
            deadline=time.monotonic() + lease_s,
        )
    except IdemkvError as e:
        log.warning("release of a late grant (token %d): %s", token, e)


def release_request(namespace: str, key: bytes, token: int, error: str) -> Any:
    return pb.ReleaseRequest(namespace=namespace, key=key, token=token, error=error)
