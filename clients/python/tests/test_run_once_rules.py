"""run_once's rules against a scripted stand-in for the cluster (no cluster
needed): once the work has returned, nothing may let it run again; a
duplicate whose holder's record vanished claims the key; the error of a
result not saved keeps ``code`` for the gRPC status; checkpoints are bytes
within the store's limit; the renewer pauses after a refusal and stops
with the work."""

from __future__ import annotations

import asyncio
import decimal
import functools
import gc
import json
import socket
import threading
import time
import warnings
from typing import Any, List, Optional, Tuple

import grpc
import pytest

import idemkv
from idemkv import _convert as cv
from idemkv._lease import LeaseClock
from idemkv._run_once import Claim
from idemkv._run_once import run_once as sync_run_once
from idemkv._run_steps import renew_steps
from idemkv.aio import _run_once as aio_run_once

ACQUIRED = idemkv.Acquired(token=7, lease_deadline_ms=0, attempt=1)
HELD = idemkv.InProgress(owner="other-worker", lease_remaining=1.0, attempt=1)


class FakeApi:
    """The calls ``run_once`` makes, answered from a script; each recorded
    as ``(name, details)``. Claims answer ``claims`` in turn (the last one
    again after); ``wait`` raises ``wait_error``; ``complete`` builds the
    request as the client does, then raises ``complete_error`` if set;
    ``release`` answers FAILED for a permanent one; Renew raises
    ``renew_error`` if set."""

    def __init__(
        self,
        claims: Tuple[Any, ...] = (ACQUIRED,),
        wait_error: Optional[BaseException] = None,
        complete_error: Optional[BaseException] = None,
        renew_error: Optional[BaseException] = None,
    ) -> None:
        self.claims = list(claims)
        self.wait_error = wait_error
        self.complete_error = complete_error
        self.renew_error = renew_error
        self.calls: List[Tuple[str, Any]] = []
        self._lock = threading.Lock()

    def _record(self, name: str, details: Any = None) -> None:
        with self._lock:
            self.calls.append((name, details))

    def names(self) -> List[str]:
        with self._lock:
            return [n for n, _ in self.calls]

    def claim(self, namespace: str, key: bytes, **kw: Any) -> Any:
        self._record("claim", kw["claim_id"])
        return self.claims.pop(0) if len(self.claims) > 1 else self.claims[0]

    def wait(self, namespace: str, key: bytes, timeout: float) -> Any:
        self._record("wait")
        if self.wait_error is not None:
            raise self.wait_error
        raise AssertionError("no wait scripted")

    def complete(self, namespace: str, key: bytes, token: int, result: bytes, *, code=None, retention=None) -> Any:
        cv.complete_call(namespace, key, token, result, code, retention)  # as the client checks it
        self._record("complete", (result, code))
        if self.complete_error is not None:
            raise self.complete_error
        return idemkv.CompleteResult(completed_at_ms=1, expires_at_ms=2)

    def release(self, namespace: str, key: bytes, token: int, error: str = "", *, permanent: bool = False) -> Any:
        self._record("release", (permanent, error))
        state = idemkv.RecordState.FAILED if permanent else idemkv.RecordState.AVAILABLE
        return idemkv.ReleaseResult(state=state, attempts=1)

    def _call(self, rpc: str, request: Any, **how: Any) -> Any:
        self._record(rpc)
        if rpc == "Renew" and self.renew_error is not None:
            raise self.renew_error
        return None


class AsyncFakeApi:
    """The same, as the asyncio client's coroutines."""

    def __init__(self, fake: FakeApi) -> None:
        self.f = fake

    async def claim(self, *a: Any, **kw: Any) -> Any:
        return self.f.claim(*a, **kw)

    async def wait(self, *a: Any, **kw: Any) -> Any:
        return self.f.wait(*a, **kw)

    async def complete(self, *a: Any, **kw: Any) -> Any:
        return self.f.complete(*a, **kw)

    async def release(self, *a: Any, **kw: Any) -> Any:
        return self.f.release(*a, **kw)

    async def _call(self, *a: Any, **kw: Any) -> Any:
        return self.f._call(*a, **kw)


OPTIONS = dict(
    lease=30.0,
    fingerprint=None,
    max_attempts=0,
    retention=None,
    wait_for_duplicate=None,
    serializer=None,
    owner="me",
    safety_margin=None,
)


def run(api: Any, fn: Any, **options: Any) -> idemkv.RunResult:
    return sync_run_once(api, "ns", "k", fn, **{**OPTIONS, **options})


def arun(api: FakeApi, fn: Any, **options: Any) -> idemkv.RunResult:
    return asyncio.run(aio_run_once.run_once(AsyncFakeApi(api), "ns", "k", fn, **{**OPTIONS, **options}))


def test_a_value_the_serializer_refuses_marks_the_key_failed_instead_of_releasing_it() -> None:
    api = FakeApi()
    ran: List[int] = []

    def work(claim: idemkv.Claim) -> Any:
        ran.append(claim.token)
        return {"total": decimal.Decimal("9.99")}  # json cannot store it

    with pytest.raises(idemkv.ResultNotSaved) as e:
        run(api, work, serializer=json)
    assert isinstance(e.value.__cause__, TypeError) and "Decimal" in str(e.value)
    assert e.value.marked_failed and e.value.token == 7 and ran == [7]
    # Marked FAILED for good (no release that frees the key for a rerun),
    # and nothing completed.
    assert [d for n, d in api.calls if n == "release"] == [(True, api.calls[-1][1][1])]
    assert "does not run again" in api.calls[-1][1][1]
    assert "complete" not in api.names()


def test_aio_work_that_returns_no_awaitable_marks_the_key_failed_instead_of_releasing_it() -> None:
    api = FakeApi()
    ran: List[int] = []

    def plain(claim: Any) -> bytes:  # not async: it runs when called
        ran.append(claim.token)
        return b"charged"

    with pytest.raises(idemkv.ResultNotSaved) as e:
        arun(api, plain)
    assert isinstance(e.value.__cause__, TypeError) and "not an awaitable" in str(e.value.__cause__)
    assert e.value.marked_failed and ran == [7]
    assert [(n, d[0]) for n, d in api.calls if n == "release"] == [("release", True)]

    # A function that returns a coroutine (not itself async def) is fine.
    async def job(claim: Any) -> bytes:
        return b"done"

    got = arun(FakeApi(), lambda claim: job(claim))
    assert got.value == b"done" and not got.replayed


def test_a_completion_code_must_be_an_int32() -> None:
    with pytest.raises(TypeError, match="code"):
        idemkv.Completion(b"created", code="201")
    with pytest.raises(TypeError, match="code"):
        idemkv.Completion(b"created", code=True)
    with pytest.raises(ValueError, match="int32"):
        idemkv.Completion(b"created", code=2**31)
    assert idemkv.Completion(b"created", code=-(2**31)).code == -(2**31)

    # Changed after it was built: the work has run, so the key is marked
    # FAILED rather than left held for a later call to run it again.
    api = FakeApi()
    done = idemkv.Completion(b"created", code=201)
    object.__setattr__(done, "code", "201")
    with pytest.raises(idemkv.ResultNotSaved) as e:
        run(api, lambda claim: done)
    assert e.value.marked_failed and isinstance(e.value.__cause__, TypeError)
    assert [(n, d[0]) for n, d in api.calls if n == "release"] == [("release", True)]


def test_the_sync_run_once_refuses_an_async_function_before_claiming() -> None:
    api = FakeApi()

    async def work(claim: Any) -> bytes:
        return b"never awaited"

    with pytest.raises(TypeError, match="async def"):
        run(api, work)
    assert api.calls == []


def test_sync_work_that_returns_a_coroutine_ran_nothing_and_frees_the_key() -> None:
    # A lambda (or partial, or callable object) wrapping an async def passes
    # the check before claiming; calling it runs nothing. The coroutine is
    # closed (never run, no "never awaited" warning), the claim released as
    # after a failure (not FAILED: nothing ran), and TypeError raised.
    api = FakeApi()
    ran: List[int] = []

    async def charge(claim: Any) -> bytes:
        ran.append(claim.token)
        return b"charged"

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="idemkv.aio") as e:
            run(api, lambda claim: charge(claim))
        del e  # the traceback holds the frames
        gc.collect()
    assert ran == []
    assert [w for w in seen if issubclass(w.category, RuntimeWarning)] == []
    assert [(n, d[0]) for n, d in api.calls if n == "release"] == [("release", False)]
    assert "complete" not in api.names()

    # The aio flavour awaits the same lambda's coroutine: it runs.
    got = arun(FakeApi(), lambda claim: charge(claim))
    assert got.value == b"charged" and ran == [7]


class _Scheduled:
    """An awaitable that is not a coroutine (as an asyncio Future or Task):
    no ``close()``, and it may run, or have run, whatever run_once does."""

    def __await__(self) -> Any:
        return iter(())


class _Pause:
    def __await__(self) -> Any:
        yield


async def _paused() -> None:
    await _Pause()


def _started() -> Any:
    """A coroutine already started (suspended at its first await)."""
    coro = _paused()
    coro.send(None)
    return coro


def test_sync_work_that_returns_another_awaitable_marks_the_key_failed() -> None:
    # Only an unstarted coroutine is known not to have run. Any other
    # awaitable (a Future, a scheduled Task, a started coroutine) is a value
    # the work returned after doing whatever it did: it cannot be saved, so
    # the key is marked FAILED for good rather than released for a rerun.
    loop = asyncio.new_event_loop()
    try:
        for made in (_Scheduled, loop.create_future, _started):
            api = FakeApi()
            ran: List[int] = []

            def work(claim: Any) -> Any:
                ran.append(claim.token)  # its effect happened
                return made()

            with pytest.raises(idemkv.ResultNotSaved) as e:
                run(api, work)
            assert isinstance(e.value.__cause__, TypeError), made
            assert "an awaitable that is not an unstarted coroutine" in str(e.value.__cause__)
            assert e.value.marked_failed and ran == [7]
            assert [(n, d[0]) for n, d in api.calls if n == "release"] == [("release", True)]
            assert "does not run again" in api.calls[-1][1][1]
            assert "complete" not in api.names()
    finally:
        loop.close()


def test_the_sync_run_once_refuses_a_partial_of_an_async_function_before_claiming() -> None:
    api = FakeApi()

    async def charge(claim: Any, amount: int) -> bytes:
        return b"never awaited"

    with pytest.raises(TypeError, match="async def"):
        run(api, functools.partial(charge, amount=5))
    assert api.calls == []


def test_an_await_answered_not_found_claims_the_key_again() -> None:
    # The holder's record is deleted (or swept) while a duplicate waits on
    # it: the key is free, so the duplicate claims it and runs the work.
    api = FakeApi(claims=(HELD, ACQUIRED), wait_error=idemkv.NotFound("no record"))
    got = run(api, lambda claim: b"ran", wait_for_duplicate=5)
    assert got.value == b"ran" and not got.replayed and got.token == 7
    assert api.names() == ["claim", "wait", "claim", "complete"]
    first, second = (d for n, d in api.calls if n == "claim")
    assert first != second  # a new claim_id for the new claim


def test_a_result_not_saved_keeps_code_for_the_grpc_status_and_prints() -> None:
    down = idemkv.Unavailable("no quorum", code=grpc.StatusCode.UNAVAILABLE)
    api = FakeApi(complete_error=down)
    with pytest.raises(idemkv.ResultNotSaved) as e:
        run(api, lambda claim: idemkv.Completion(b"shipped", code=201))
    assert "was not saved" in str(e.value) and "no quorum" in str(e.value)
    assert e.value.code is None and e.value.result_code == 201
    assert e.value.raw == b"shipped" and not e.value.marked_failed
    assert e.value.__cause__ is down
    # Any code an IdemkvError is given still prints.
    assert "boom" in str(idemkv.IdemkvError("boom", code=5))


def _claim(valid_for: float) -> Claim:
    return Claim(
        namespace="ns",
        key=b"k",
        token=7,
        attempt=1,
        previous_owner=None,
        checkpoint=None,
        lease=LeaseClock(time.monotonic() + valid_for),
    )


def test_save_checkpoint_takes_bytes_or_str_up_to_64_kib() -> None:
    claim = _claim(10)
    with pytest.raises(TypeError, match="bytes or str"):
        claim.save_checkpoint(500)  # bytes(500) would be 500 zero bytes
    with pytest.raises(idemkv.TooLarge, match="65537 bytes"):
        claim.save_checkpoint(b"x" * (64 * 1024 + 1))
    with pytest.raises(idemkv.TooLarge):
        claim.save_checkpoint("é" * (32 * 1024 + 1))  # 2 bytes each in UTF-8
    assert claim._checkpoint_to_send() == (None, 0)  # nothing stored
    claim.save_checkpoint("rows 0-499")
    assert claim._checkpoint_to_send() == (b"rows 0-499", 1)
    claim.save_checkpoint(bytearray(b"y" * 64 * 1024))
    assert claim._checkpoint_to_send() == (b"y" * 64 * 1024, 2)


def test_a_refused_renewal_waits_its_pause_even_when_a_flush_is_pending() -> None:
    # The store refuses every renewal (not retried: TooLarge). With a lease
    # of 3 s the renewer renews every 1 s and, after a failure, tries again
    # after a pause of 0.25 s: a pending flush must not make that a loop.
    api = FakeApi(renew_error=idemkv.TooLarge("checkpoint: over the limit"))
    claim = _claim(2.7)
    claim._start_renewal(renew_steps(api, claim, 3.0, 2.7, time.monotonic(), 3))
    try:
        claim.save_checkpoint(b"step 1")
        with pytest.raises(TimeoutError):
            claim.flush_checkpoint(timeout=0.6)
    finally:
        claim._stop_renewal()
    renews = api.names().count("Renew")
    assert 1 <= renews <= 5, f"{renews} renewals in 0.6 s"


def _refused_address() -> str:
    """An address where nothing listens: connections there are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_the_renewer_stops_retrying_when_run_once_returns() -> None:
    # Renewals go to a node that refuses connections: each is retried (up
    # to retry_for, 60 s here, and the lease deadline, 54 s) while the work
    # runs. Once run_once has returned, the renewer must stop retrying: its
    # thread ends within a moment (10 s allowed, for a loaded machine), not
    # when retry_for or the lease runs out.
    retry = idemkv.RetryOptions(retry_for=60.0)
    with idemkv.Client([_refused_address()], follow_leader=False, retry=retry) as dead:
        api = FakeApi()
        renewing = threading.Event()
        renewers: List[threading.Thread] = []

        def renew(rpc: str, request: Any, **how: Any) -> Any:
            api._record(rpc)
            renewers.append(threading.current_thread())
            renewing.set()
            try:
                return dead._call(rpc, request, **how)
            finally:
                api._record(f"{rpc} ended")

        api._call = renew  # type: ignore[method-assign]

        def work(claim: idemkv.Claim) -> bytes:
            # Renewals every 0.2 s: return while one is being retried.
            assert renewing.wait(10), "no renewal was attempted"
            time.sleep(0.3)
            return b"done"

        got = run(api, work, lease=60.0, renew_divisor=300)
        returned = time.monotonic()
        assert got.value == b"done"
        assert api.names().count("Renew") >= 1
        renewer = renewers[0]
        assert renewer.name == f"idemkv-renew-{got.token}"
        renewer.join(10)
        assert not renewer.is_alive(), "the renewer went on retrying after run_once returned"
        assert time.monotonic() - returned < 10
        # The renewal in flight ended (given up), and none was sent after.
        assert api.names().count("Renew") == api.names().count("Renew ended")
