"""run_once: claim, renew while the work runs, complete — or replay; a
failed run releases; a crashed worker's checkpoint goes to the next one;
a lost lease (the client's node paused, or the token fenced out) tells the
work and saves nothing; 50 threads on one key run the work once."""

from __future__ import annotations

import decimal
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import List

import pytest

import idemkv
from conftest import leader_and_followers


def test_runs_once_then_replays(client: idemkv.Client, ns: str) -> None:
    calls: List[int] = []

    def work(claim: idemkv.Claim) -> bytes:
        calls.append(claim.token)
        assert idemkv.current_claim() is claim
        return b"shipped:" + str(claim.token).encode()

    first = client.run_once(ns, "order-1", work, lease=5)
    assert not first.replayed and first.value == b"shipped:%d" % first.token
    second = client.run_once(ns, "order-1", work, lease=5)
    assert second.replayed and second.value == first.value and second.token == first.token
    assert calls == [first.token]
    assert idemkv.current_claim() is None


def test_json_results_and_codes_are_replayed(client: idemkv.Client, ns: str) -> None:
    def work(claim: idemkv.Claim) -> idemkv.Completion:
        return idemkv.Completion({"order": 7, "status": "created"}, code=201)

    first = client.run_once(ns, "k", work, serializer=json)
    again = client.run_once(ns, "k", work, serializer=json)
    assert again.replayed and again.value == {"order": 7, "status": "created"} and again.code == 201
    assert first.raw == again.raw and json.loads(again.raw) == again.value


def test_a_failed_run_releases_the_key_and_the_next_run_goes_ahead(client: idemkv.Client, ns: str) -> None:
    class Boom(Exception):
        pass

    def fail(claim: idemkv.Claim) -> bytes:
        raise Boom("the payment provider said no")

    with pytest.raises(Boom):
        client.run_once(ns, "k", fail)
    rec = client.get(ns, "k")
    assert rec.state is idemkv.RecordState.AVAILABLE and "payment provider" in rec.last_error

    def ok(claim: idemkv.Claim) -> bytes:
        assert claim.attempt == 2
        return b"paid"

    assert client.run_once(ns, "k", ok).value == b"paid"


def test_max_attempts_turns_the_key_failed(client: idemkv.Client, ns: str) -> None:
    def fail(claim: idemkv.Claim) -> bytes:
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        client.run_once(ns, "k", fail, max_attempts=1)
    with pytest.raises(idemkv.AttemptsExhausted) as e:
        client.run_once(ns, "k", fail, max_attempts=1)
    assert e.value.attempts == 1 and "bad row" in e.value.last_error


def test_work_whose_result_is_too_large_to_save_never_runs_again(client: idemkv.Client, ns: str) -> None:
    calls: List[int] = []

    def work(claim: idemkv.Claim) -> bytes:
        calls.append(claim.token)
        return b"x" * (1024 * 1024 + 1)  # the store keeps results up to 1 MiB

    with pytest.raises(idemkv.ResultNotSaved) as e:
        client.run_once(ns, "export-9", work, lease=1)
    assert e.value.marked_failed and e.value.size == 1024 * 1024 + 1
    rec = client.get(ns, "export-9")
    assert rec.state is idemkv.RecordState.FAILED and "was not saved" in rec.last_error
    # A later delivery, waiting well past the first run's lease, is told the
    # key failed; it does not run the work a second time.
    with pytest.raises(idemkv.AttemptsExhausted) as again:
        client.run_once(ns, "export-9", work, lease=1, wait_for_duplicate=3)
    assert "does not run again" in again.value.last_error
    assert calls == [e.value.token]


def test_a_value_the_serializer_refuses_marks_the_key_failed_and_the_work_never_runs_again(
    client: idemkv.Client, ns: str
) -> None:
    calls: List[int] = []

    def work(claim: idemkv.Claim) -> dict:
        calls.append(claim.token)  # the invoice is sent here: the effect happened
        return {"total": decimal.Decimal("9.99")}  # json cannot store a Decimal

    with pytest.raises(idemkv.ResultNotSaved) as e:
        client.run_once(ns, "invoice-5", work, serializer=json)
    assert e.value.marked_failed and isinstance(e.value.__cause__, TypeError)
    rec = client.get(ns, "invoice-5")
    assert rec.state is idemkv.RecordState.FAILED and "Decimal" in rec.last_error
    # A redelivery is told the key failed; it does not send the invoice again.
    with pytest.raises(idemkv.AttemptsExhausted) as again:
        client.run_once(ns, "invoice-5", work, serializer=json)
    assert "does not run again" in again.value.last_error
    assert calls == [e.value.token]


def test_sync_work_that_returns_a_coroutine_is_refused_and_the_key_stays_claimable(
    client: idemkv.Client, ns: str
) -> None:
    calls: List[int] = []

    async def charge(claim: idemkv.Claim) -> bytes:
        calls.append(claim.token)
        return b"charged"

    # Not async def itself, so not refused before claiming; its coroutine
    # never runs in the thread flavour: refused, the key released.
    with pytest.raises(TypeError, match="idemkv.aio"):
        client.run_once(ns, "refund-6", lambda claim: charge(claim))
    assert calls == []
    rec = client.get(ns, "refund-6")
    assert rec.state is idemkv.RecordState.AVAILABLE, rec
    # Claimable again: a plain function runs, and is replayed after.
    r = client.run_once(ns, "refund-6", lambda claim: b"refunded")
    assert not r.replayed and r.value == b"refunded"
    assert client.run_once(ns, "refund-6", lambda claim: b"must not run").replayed


def test_a_duplicate_is_busy_or_waits_for_the_result(client: idemkv.Client, ns: str) -> None:
    started, finish = threading.Event(), threading.Event()

    def slow(claim: idemkv.Claim) -> bytes:
        started.set()
        assert finish.wait(10)
        return b"first"

    t = threading.Thread(target=lambda: client.run_once(ns, "k", slow, owner="first-worker"))
    t.start()
    assert started.wait(10)
    with pytest.raises(idemkv.Busy) as e:
        client.run_once(ns, "k", slow)
    assert e.value.owner == "first-worker"
    threading.Timer(0.2, finish.set).start()
    waited = client.run_once(ns, "k", slow, wait_for_duplicate=10)
    assert waited.replayed and waited.value == b"first"
    t.join()


def test_fifty_threads_on_one_key_run_the_work_once(client: idemkv.Client, ns: str) -> None:
    ran: List[int] = []
    results: List[idemkv.RunResult] = []
    errors: List[BaseException] = []
    gate = threading.Barrier(50)
    lock = threading.Lock()

    def work(claim: idemkv.Claim) -> bytes:
        with lock:
            ran.append(claim.token)
        time.sleep(0.3)  # the work takes a while: the others arrive meanwhile
        return b"charged once"

    def worker() -> None:
        try:
            gate.wait()
            r = client.run_once(ns, "order-42", work, wait_for_duplicate=20)
            with lock:
                results.append(r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ran) == 1
    assert len(results) == 50 and {r.value for r in results} == {b"charged once"}
    assert {r.token for r in results} == {ran[0]}
    assert sum(not r.replayed for r in results) == 1


CRASHING_WORKER = textwrap.dedent(
    """
    import os, sys, idemkv
    ns, key = sys.argv[1], sys.argv[2]
    client = idemkv.Client.from_env(owner="crashing-worker")

    def work(claim):
        claim.save_checkpoint(b"rows 0-499 copied")
        claim.flush_checkpoint(timeout=10)
        print(claim.token, flush=True)
        os.kill(os.getpid(), 9)  # crash mid-work: no release, no complete

    client.run_once(ns, key, work, lease=1.0)
    """
)


def test_after_a_crash_mid_work_the_next_worker_resumes_from_the_checkpoint(client: idemkv.Client, ns: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_WORKER, ns, "copy-batch"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "IDEMKV_ENDPOINTS": ",".join(client.endpoints)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    crashed_token = int(proc.stdout.strip())
    rec = client.get(ns, "copy-batch")
    assert rec.state is idemkv.RecordState.IN_PROGRESS and rec.owner == "crashing-worker"

    seen = {}

    def resume(claim: idemkv.Claim) -> bytes:
        seen.update(checkpoint=claim.checkpoint, previous=claim.previous_owner, attempt=claim.attempt)
        return b"rows 500-999 copied"

    # The crashed worker holds the key until its 1 s lease ends; the next
    # worker waits for that, then takes over.
    r = client.run_once(ns, "copy-batch", resume, wait_for_duplicate=10, owner="next-worker")
    assert not r.replayed and r.token > crashed_token
    assert seen == {"checkpoint": b"rows 0-499 copied", "previous": "crashing-worker", "attempt": 2}


def test_the_work_learns_at_its_deadline_that_the_lease_is_lost_when_its_node_is_paused(
    client: idemkv.Client, pids, ns: str
) -> None:
    _, followers = leader_and_followers(client)
    node = followers[0]
    lease = 2.0  # safety margin 0.2 s: the client gives up 1.8 s after sending the claim
    noticed = {}

    def work(claim: idemkv.Claim) -> bytes:
        os.kill(pids[node], signal.SIGSTOP)  # the only node this client talks to
        try:
            noticed["lost"] = claim.wait_lost(timeout=10)
            noticed["at"] = time.monotonic()
            with pytest.raises(idemkv.LeaseLost):
                claim.check()
        finally:
            os.kill(pids[node], signal.SIGCONT)
        return b"too late"

    with idemkv.Client([node], follow_leader=False) as c:
        started = time.monotonic()
        with pytest.raises(idemkv.LeaseLost) as e:
            c.run_once(ns, "nightly-report", work, lease=lease)
    assert e.value.why == "expired" and e.value.token > 0
    assert noticed["lost"] is True
    # Before the server's lease ends (2 s after the claim) and not before
    # the client's own deadline (1.8 s after it).
    took = noticed["at"] - started
    assert 1.8 <= took < lease, took
    # The result was never saved, and the next worker takes over.
    rec = client.get(ns, "nightly-report")
    assert rec.state is idemkv.RecordState.IN_PROGRESS and rec.result == b""
    r = client.run_once(ns, "nightly-report", lambda claim: b"rerun", wait_for_duplicate=10)
    assert not r.replayed and r.value == b"rerun" and r.token > e.value.token


def test_a_result_that_could_not_be_saved_comes_back_to_be_saved_later(
    client: idemkv.Client, pids, ns: str
) -> None:
    _, followers = leader_and_followers(client)
    node = followers[0]

    def work(claim: idemkv.Claim) -> bytes:
        os.kill(pids[node], signal.SIGSTOP)  # the only node this client talks to
        return b"shipped"

    retry = idemkv.RetryOptions(request_timeout=0.3, retry_for=1.0)
    try:
        with idemkv.Client([node], follow_leader=False, retry=retry) as c:
            with pytest.raises(idemkv.ResultNotSaved) as e:
                c.run_once(ns, "parcel-3", work, lease=30)
    finally:
        os.kill(pids[node], signal.SIGCONT)
    assert not e.value.marked_failed and e.value.raw == b"shipped" and e.value.token > 0
    assert isinstance(e.value.__cause__, idemkv.Unavailable), repr(e.value.__cause__)
    # Saved by hand once the cluster is back: later calls replay it.
    client.complete(ns, "parcel-3", e.value.token, e.value.raw, code=e.value.result_code)
    r = client.run_once(ns, "parcel-3", lambda claim: b"must not run")
    assert r.replayed and r.value == b"shipped"


def test_a_token_fenced_out_mid_work_is_told_and_saves_nothing(client: idemkv.Client, ns: str) -> None:
    def work(claim: idemkv.Claim) -> bytes:
        # An operator deletes the record while the work runs.
        client.delete(ns, "k", token=claim.token)
        claim.save_checkpoint(b"step 2")
        with pytest.raises(idemkv.LeaseLost):
            claim.flush_checkpoint(timeout=10)
        assert claim.lost
        return b"done"

    with pytest.raises(idemkv.LeaseLost) as e:
        client.run_once(ns, "k", work)
    assert e.value.why == "fenced"
    assert client.get(ns, "k") is None


def test_the_lease_is_renewed_while_the_work_runs(client: idemkv.Client, ns: str) -> None:
    def work(claim: idemkv.Claim) -> bytes:
        # Three leases long: it survives only by renewal.
        assert claim.wait_lost(timeout=1.5) is False
        assert claim.remaining() > 0
        return b"long job"

    r = client.run_once(ns, "k", work, lease=0.5)
    assert r.value == b"long job" and not r.replayed


def test_a_margin_as_long_as_the_lease_is_refused_before_claiming(client: idemkv.Client, ns: str) -> None:
    with pytest.raises(idemkv.ConfigError, match="safety_margin"):
        client.run_once(ns, "k", lambda c: b"", lease=1, safety_margin=1)
    assert client.get(ns, "k") is None
