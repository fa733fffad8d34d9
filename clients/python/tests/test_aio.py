"""idemkv.aio.Client: the same calls, errors and run_once as coroutines."""

from __future__ import annotations

import asyncio
import json

import pytest

import idemkv
import idemkv.aio


def test_claim_complete_replay_and_errors(endpoints, ns: str) -> None:
    async def main() -> None:
        async with idemkv.aio.Client(endpoints) as c:
            await c.wait_ready(30)
            assert set(c.endpoints) >= set(endpoints)
            got = await c.claim(ns, "k", lease=30, owner="a")
            assert isinstance(got, idemkv.Acquired)
            busy = await c.claim(ns, "k", owner="b")
            assert isinstance(busy, idemkv.InProgress) and busy.owner == "a"
            with pytest.raises(idemkv.LeaseLost):
                await c.complete(ns, "k", got.token + 1000, b"x")
            await c.renew(ns, "k", got.token, lease=30, checkpoint=b"half")
            assert (await c.get(ns, "k")).checkpoint == b"half"
            await c.complete(ns, "k", got.token, b"done")
            again = await c.claim(ns, "k")
            assert isinstance(again, idemkv.Completed) and again.result == b"done"
            assert (await c.wait(ns, "k", timeout=1)).record.result == b"done"
            with pytest.raises(idemkv.InvalidArgument):
                await c.claim(ns, b"")
            with pytest.raises(idemkv.NotFound):
                await c.wait(ns, "absent", timeout=1)
            b = await c.claim_batch(ns, ["x", "y"])
            assert [type(i) for i in b.items] == [idemkv.Acquired, idemkv.Acquired]
            r = await c.release(ns, "x", b.items[0].token, "nope")
            assert r.state is idemkv.RecordState.AVAILABLE
            assert await c.delete(ns, "y", token=b.items[1].token) is True
            assert await c.get(ns, "y") is None
            st = await c.status()
            assert st.leader_id is not None and len(st.members) == 3
            assert c.preferred_endpoint == st.leader_api_addr

    asyncio.run(main())


def test_run_once_renews_releases_and_replays(endpoints, ns: str) -> None:
    async def main() -> None:
        async with idemkv.aio.Client(endpoints) as c:

            async def long_job(claim: idemkv.aio.AsyncClaim) -> dict:
                assert await claim.wait_lost(timeout=1.2) is False  # 3 leases: renewed
                claim.save_checkpoint(b"90%")
                await claim.flush_checkpoint(timeout=5)
                return {"rows": 1000}

            r = await c.run_once(ns, "job", long_job, lease=0.4, serializer=json)
            assert r.value == {"rows": 1000} and not r.replayed
            again = await c.run_once(ns, "job", long_job, serializer=json)
            assert again.replayed and again.value == {"rows": 1000}

            async def broken(claim: idemkv.aio.AsyncClaim) -> bytes:
                raise RuntimeError("boom")

            with pytest.raises(RuntimeError):
                await c.run_once(ns, "other", broken)
            assert (await c.get(ns, "other")).state is idemkv.RecordState.AVAILABLE

            async def fenced(claim: idemkv.aio.AsyncClaim) -> bytes:
                await c.delete(ns, "fenced", token=claim.token)
                assert await claim.wait_lost(timeout=5)  # the next renewal is refused
                return b"never saved"

            with pytest.raises(idemkv.LeaseLost) as e:
                await c.run_once(ns, "fenced", fenced, lease=0.3)
            assert e.value.why == "fenced"
            assert await c.get(ns, "fenced") is None

    asyncio.run(main())
