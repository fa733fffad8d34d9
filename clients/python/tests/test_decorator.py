"""@client.idempotent on plain and async functions: one execution per key,
the value replayed, the fencing token available inside, fingerprints
guarding against a reused key."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List

import pytest

import idemkv
import idemkv.aio


def test_a_plain_function_runs_once_per_key(client: idemkv.Client, ns: str) -> None:
    charged: List[Dict[str, Any]] = []

    @client.idempotent(ns, key=lambda order_id, **_: order_id, pass_claim=True)
    def charge(order_id: str, amount: int, claim: idemkv.Claim) -> Dict[str, Any]:
        """Charge the card."""
        charged.append({"order": order_id, "token": claim.token})
        return {"order": order_id, "amount": amount, "token": claim.token}

    first = charge("o-1", 500)
    assert charge("o-1", 500) == first
    assert charge(order_id="o-1", amount=500) == first  # however it is called
    assert charge("o-2", 300)["order"] == "o-2"
    assert [c["order"] for c in charged] == ["o-1", "o-2"]
    assert first["token"] == charged[0]["token"] > 0
    assert charge.__name__ == "charge" and charge.__doc__ == "Charge the card."


def test_the_same_key_with_other_arguments_is_a_fingerprint_mismatch(client: idemkv.Client, ns: str) -> None:
    @client.idempotent(ns, key=lambda order_id, **_: order_id, fingerprint=True)
    def charge(order_id: str, amount: int) -> int:
        return amount

    assert charge("o-1", 500) == 500
    assert charge("o-1", 500) == 500
    with pytest.raises(idemkv.FingerprintMismatch):
        charge("o-1", 999)


def test_an_exception_is_not_saved_and_the_next_call_runs_again(client: idemkv.Client, ns: str) -> None:
    attempts: List[int] = []

    @client.idempotent(ns)  # key: a hash of all the arguments
    def flaky(n: int) -> str:
        attempts.append(n)
        if len(attempts) == 1:
            raise ConnectionError("upstream timed out")
        return f"ok {n}"

    with pytest.raises(ConnectionError):
        flaky(1)
    assert flaky(1) == "ok 1"
    assert flaky(1) == "ok 1"
    assert attempts == [1, 1]


def test_an_async_function_on_the_sync_client(client: idemkv.Client, ns: str) -> None:
    runs: List[int] = []

    @client.idempotent(ns, key=lambda event: event["id"], wait_for_duplicate=10)
    async def handle(event: Dict[str, Any]) -> Dict[str, Any]:
        claim = idemkv.current_claim()
        runs.append(claim.token)
        await asyncio.sleep(0.2)  # the others arrive while this runs
        return {"handled": event["id"], "token": claim.token}

    async def main() -> List[Dict[str, Any]]:
        return await asyncio.gather(*(handle({"id": "msg-9"}) for _ in range(10)))

    got = asyncio.run(main())
    assert len(runs) == 1
    assert got == [{"handled": "msg-9", "token": runs[0]}] * 10


def test_an_async_function_on_the_asyncio_client(endpoints, ns: str) -> None:
    runs: List[str] = []

    async def main() -> None:
        async with idemkv.aio.Client(endpoints) as ac:

            @ac.idempotent(ns, key=lambda msg_id, **_: msg_id, wait_for_duplicate=10, pass_claim=True)
            async def consume(msg_id: str, body: str, claim: idemkv.aio.AsyncClaim) -> str:
                runs.append(msg_id)
                await asyncio.sleep(0.2)
                return f"{body} stored with token {claim.token}"

            got = await asyncio.gather(*(consume(f"m-{i % 2}", "hello") for i in range(20)))
            assert sorted(runs) == ["m-0", "m-1"]
            assert len(set(got)) == 2 and all(g.startswith("hello stored with token ") for g in got)

            with pytest.raises(TypeError, match="async functions"):

                @ac.idempotent(ns)
                def plain() -> None: ...

    asyncio.run(main())


def test_threads_calling_a_decorated_function_run_it_once(client: idemkv.Client, ns: str) -> None:
    runs: List[int] = []
    out: List[str] = []
    gate = threading.Barrier(20)

    @client.idempotent(ns, key=lambda job, **_: job, wait_for_duplicate=10)
    def daily(job: str) -> str:
        runs.append(1)
        gate_wait = threading.Event()
        gate_wait.wait(0.2)
        return f"{job} done"

    def call() -> None:
        gate.wait()
        out.append(daily("report-2026-12-04"))

    ts = [threading.Thread(target=call) for _ in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert runs == [1] and out == ["report-2026-12-04 done"] * 20


class _RecordingClient:
    """Stands in for the client: records what the decorator asks to run."""

    def __init__(self) -> None:
        self.runs: List[Any] = []

    def run_once(self, namespace: str, key: bytes, fn: Any, **options: Any) -> idemkv.RunResult:
        self.runs.append((key, options.get("fingerprint")))
        return idemkv.RunResult(value=fn(None), replayed=False, token=1)


def test_arguments_that_are_not_plain_json_need_a_key_function() -> None:
    from idemkv._idempotent import decorate

    class Order:  # its repr holds its address: another per delivery
        pass

    fake = _RecordingClient()

    @decorate(fake, "ns")
    def handle(order: Any, tags: Any = ()) -> str:
        return "handled"

    for bad in (Order(), {"a", "b"}, {1: "x"}, [bytearray(b"raw")]):
        with pytest.raises(idemkv.ConfigError, match="key="):
            handle(bad)
    with pytest.raises(idemkv.ConfigError, match=r"tags\[1\]"):
        handle("o-1", tags=["ok", {"sku"}])
    assert fake.runs == []  # nothing was sent
    # Plain JSON arguments: one key, however often (and wherever) called.
    handle({"id": "o-1", "lines": [1, 2.5, None, True]})
    handle({"lines": [1, 2.5, None, True], "id": "o-1"})
    assert len(fake.runs) == 2 and fake.runs[0] == fake.runs[1]
    # bytes (a message's payload, say) are hashed as their repr, the same
    # in every process, as before.
    handle(b"payload-1")
    handle(b"payload-1")
    assert len(fake.runs) == 4 and fake.runs[2] == fake.runs[3] != fake.runs[0]

    @decorate(fake, "ns", key=lambda order, **_: order.__class__.__name__, fingerprint=True)
    def keyed(order: Any) -> str:
        return "handled"

    with pytest.raises(idemkv.ConfigError, match="fingerprint="):
        keyed(Order())
    assert len(fake.runs) == 4
