"""The client's own clock for one lease, and what the work sees of its claim.

SPEC §2 (Time): a lease is valid until the client's monotonic instant
*before the claim was sent* plus the lease, minus a safety margin; each
successful renewal moves that deadline to its own send instant plus the
lease minus the margin. When no renewal got through by the deadline, the
lease is lost: the work is told, and its result is never saved. This module
never trusts the server's lease deadline (another clock) for that decision.
Shared by the thread-based and the asyncio ``run_once``; no I/O here: what
the claim waits on is a step (``_steps``) its flavour carries out.
"""

from __future__ import annotations

import contextvars
import threading
import time
from typing import Any, Callable, List, Optional, Tuple, Union

from ._steps import Steps, step
from .errors import ConfigError, LeaseLost, TooLarge

FENCED = "fenced"
EXPIRED = "expired"

#: The largest checkpoint the store keeps by default (SPEC §4: 64 KiB).
CHECKPOINT_MAX = 64 * 1024

_WHY = {
    FENCED: "the server fenced the token out (another claim took the record over, or it was deleted)",
    EXPIRED: "no renewal succeeded before the client-side lease deadline",
}


def margin(lease: float, safety_margin: Optional[float]) -> float:
    """The safety margin in force: ``max(lease / 10, min(0.1 s, lease / 2))``
    unless given. ``lease / 10`` covers a 1 % clock-rate difference between
    this machine and the leader ten times over; the 100 ms floor covers
    scheduling and network slack on short leases, capped at half the lease
    so the shortest leases stay usable."""
    if safety_margin is not None:
        return safety_margin
    return max(lease / 10, min(0.1, lease / 2))


def validity(lease: float, safety_margin: Optional[float]) -> float:
    """How long after a send the client may rely on the lease it asked for."""
    m = margin(lease, safety_margin)
    if m >= lease:
        raise ConfigError(f"safety_margin ({m} s) must be shorter than the lease ({lease} s)")
    return lease - m


class LeaseClock:
    """One lease as this client sees it. Once lost it stays lost, even if a
    renewal sent in time answers late: every reader decides under the lock."""

    def __init__(self, deadline: float) -> None:
        self._lock = threading.Lock()
        self._deadline = deadline
        self._lost: Optional[str] = None
        self._callbacks: List[Callable[[], None]] = []

    def _fire(self) -> None:
        for cb in self._callbacks:
            cb()

    def check(self, now: Optional[float] = None) -> Tuple[float, Optional[str]]:
        """(deadline, why lost or None) at ``now``, marking the lease expired
        if its deadline has passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            fire = self._lost is None and now >= self._deadline
            if fire:
                self._lost = EXPIRED
            seen = (self._deadline, self._lost)
        if fire:
            self._fire()
        return seen

    def renewed(self, sent: float, valid_for: float) -> bool:
        """A renewal sent at ``sent`` succeeded: the lease now runs to
        ``sent + valid_for``, unless it was already lost (then False)."""
        deadline, lost = self.check()
        if lost is not None:
            return False
        with self._lock:
            if self._lost is not None:
                return False
            self._deadline = max(deadline, sent + valid_for)
            return True

    def lose(self, why: str) -> None:
        """Mark the lease lost; the first reason recorded stays."""
        with self._lock:
            first = self._lost is None
            if first:
                self._lost = why
        if first:
            self._fire()

    def on_lost(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` (from whichever thread notices) once the lease is lost."""
        with self._lock:
            self._callbacks.append(cb)
            lost = self._lost is not None
        if lost:
            cb()


class ClaimBase:
    """What the work gets from ``run_once``: its fencing token, the previous
    holder's checkpoint, a way to save its own, and its lease.

    Pass ``token`` to every downstream write the work makes (a database row
    version, a storage precondition), so a worker that lost its lease is
    refused there too.

    A flavour (threads, asyncio) says how to make, set and wait on an event
    (``_event``, ``_set``, ``_wait``) and how to run the renewer
    (``_start_renewal``); the waiting logic is here, as steps.
    """

    def __init__(
        self,
        *,
        namespace: str,
        key: bytes,
        token: int,
        attempt: int,
        previous_owner: Optional[str],
        checkpoint: Optional[bytes],
        lease: LeaseClock,
    ) -> None:
        self.namespace = namespace
        self.key = key
        #: The fencing token of this claim: unique, increasing cluster-wide.
        self.token = token
        #: 1 for the first claim of the key, 2 after one takeover or release...
        self.attempt = attempt
        #: Who held the key before (after a takeover or a release).
        self.previous_owner = previous_owner
        #: The last checkpoint saved by whoever held the claim before, if any.
        self.checkpoint = checkpoint
        self._lease = lease
        self._ck_lock = threading.Lock()
        self._ck_data: Optional[bytes] = None
        self._ck_seq = 0
        self._ck_acked = 0
        self._ck_flush = 0
        self._renewal_stopped = False
        #: Set when the lease is lost.
        self._lost_event = self._event()
        #: Wakes the renewer (a flush asked for, the work done, the lease lost).
        self._wake_event = self._event()
        #: Wakes a flush_checkpoint waiter (a renewal stored, the lease lost).
        self._changed_event = self._event()
        self._lease.on_lost(self._on_lost)

    # The flavour's side.
    def _event(self) -> Any:
        raise NotImplementedError

    def _set(self, event: Any) -> None:
        raise NotImplementedError

    def _wait(self, event: Any, seconds: float) -> Any:
        """Wait until ``event`` is set or ``seconds`` pass (a step)."""
        raise NotImplementedError

    def _start_renewal(self, renewer: "Steps[None]") -> None:
        raise NotImplementedError

    def _stop_renewal(self) -> None:
        self._renewal_stopped = True
        self._wake()

    def _on_lost(self) -> None:
        self._set(self._lost_event)
        self._wake()

    def _wake(self) -> None:
        self._set(self._wake_event)
        self._set(self._changed_event)

    def _nap(self, seconds: float) -> Any:
        """The renewer's pause: ``seconds``, or until woken (a step)."""
        return step(self._wait, self._wake_event, seconds)

    # The renewer's side.
    def _checkpoint_to_send(self) -> Tuple[Optional[bytes], int]:
        with self._ck_lock:
            return self._ck_data, self._ck_seq

    def _flush_wanted(self) -> bool:
        with self._ck_lock:
            return self._ck_flush > self._ck_acked

    def _acked(self, seq: int) -> None:
        with self._ck_lock:
            self._ck_acked = max(self._ck_acked, seq)
        self._wake()

    # The work's side.
    def save_checkpoint(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Store a progress marker: ``bytes``, or ``str`` (stored as UTF-8),
        up to 64 KiB (``TypeError`` for anything else, :class:`TooLarge`
        when longer; nothing is stored then). It rides on the next lease
        renewal and is handed to whoever takes the key over if this worker
        dies; see ``flush_checkpoint`` to wait until it is stored."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        else:
            raise TypeError(f"checkpoint: expected bytes or str, got {type(data).__name__}")
        if len(data) > CHECKPOINT_MAX:
            raise TooLarge(f"checkpoint: {len(data)} bytes is over the limit of {CHECKPOINT_MAX} bytes (64 KiB)")
        with self._ck_lock:
            self._ck_data = data
            self._ck_seq += 1

    def _request_flush(self) -> int:
        with self._ck_lock:
            self._ck_flush = self._ck_seq
            seq = self._ck_seq
        self._wake()
        return seq

    def _flushed(self, seq: int) -> bool:
        with self._ck_lock:
            return self._ck_acked >= seq

    def _wait_lost_steps(self, timeout: Optional[float]) -> "Steps[bool]":
        """``wait_lost``: wakes at the client-side deadline by itself, not
        depending on a renewal's answer arriving."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            deadline, lost = self._lease.check(now)
            if lost is not None:
                return True
            pause = deadline - now
            if end is not None:
                if now >= end:
                    return False
                pause = min(pause, end - now)
            yield step(self._wait, self._lost_event, max(pause, 0.0))

    def _flush_steps(self, timeout: Optional[float]) -> "Steps[None]":
        """``flush_checkpoint``: until a renewal stored the checkpoint."""
        seq = self._request_flush()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._changed_event.clear()  # before looking: a later ack sets it
            if self._flushed(seq):
                return
            self.check()
            left = self.remaining()
            if end is not None:
                if time.monotonic() >= end:
                    raise TimeoutError("the checkpoint was not stored in time")
                left = min(left, end - time.monotonic())
            yield step(self._wait, self._changed_event, max(left, 0.001))

    @property
    def deadline(self) -> float:
        """Until when, on ``time.monotonic()``, the lease is known to be held
        (if no renewal moves it later). Past it the work must stop."""
        return self._lease.check()[0]

    def remaining(self) -> float:
        """Seconds left before ``deadline``; 0 once the lease is lost."""
        now = time.monotonic()
        deadline, lost = self._lease.check(now)
        return 0.0 if lost else max(0.0, deadline - now)

    @property
    def lost(self) -> bool:
        """True once the lease is lost: stop, the result will not be saved."""
        return self._lease.check()[1] is not None

    def check(self) -> None:
        """Raise :class:`~idemkv.LeaseLost` if the lease is lost; call it
        between steps, before each side effect."""
        why = self._lease.check()[1]
        if why is not None:
            raise lease_lost(self.token, why)


def lease_lost(token: int, why: str) -> LeaseLost:
    return LeaseLost(
        f"lease lost while running (token {token}): {_WHY[why]}; the result was not saved",
        token=token,
        why=why,
        reason="LEASE_LOST" if why == FENCED else None,
    )


_current: "contextvars.ContextVar[Optional[ClaimBase]]" = contextvars.ContextVar(
    "idemkv_claim", default=None
)


def current_claim() -> Optional[ClaimBase]:
    """The claim of the ``run_once`` (or ``@idempotent`` call) running in this
    thread or asyncio task, or None outside one."""
    return _current.get()
