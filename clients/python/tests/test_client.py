"""Every call of the client against a real three-node cluster: each claim
outcome, each error type with the server's message, endpoint forms,
from_env, and leader following."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest

import idemkv
from conftest import leader_and_followers


def test_claim_outcomes_acquired_in_progress_completed(client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "order-1", lease=timedelta(seconds=30), owner="worker-a")
    assert isinstance(got, idemkv.Acquired)
    assert got.token > 0 and got.attempt == 1 and got.previous_owner is None

    busy = client.claim(ns, "order-1", lease=30.0, owner="worker-b")
    assert isinstance(busy, idemkv.InProgress)
    assert busy.owner == "worker-a"
    assert 0 < busy.lease_remaining <= 30.0

    done = client.complete(ns, "order-1", got.token, b"\x00receipt\xff", code=201)
    assert done.expires_at_ms > done.completed_at_ms > 0

    again = client.claim(ns, b"order-1", owner="worker-c")
    assert again == idemkv.Completed(
        result=b"\x00receipt\xff", completed_at_ms=done.completed_at_ms, token=got.token, code=201
    )
    assert again.completed_at is not None

    rec = client.get(ns, "order-1")
    assert rec is not None and rec.state is idemkv.RecordState.COMPLETED
    assert (rec.token, rec.result, rec.code) == (got.token, b"\x00receipt\xff", 201)
    local = client.get(ns, "order-1", consistency=idemkv.Consistency.SERIALIZABLE)
    assert local is None or local.result == rec.result  # a follower may lag
    assert client.get(ns, "never-claimed") is None


def test_release_makes_it_available_then_failed_after_max_attempts(client: idemkv.Client, ns: str) -> None:
    first = client.claim(ns, "job", owner="w1", max_attempts=2)
    assert isinstance(first, idemkv.Acquired)
    rel = client.release(ns, "job", first.token, error="disk full")
    assert rel == idemkv.ReleaseResult(state=idemkv.RecordState.AVAILABLE, attempts=1)

    second = client.claim(ns, "job", owner="w2", max_attempts=2)
    assert isinstance(second, idemkv.Acquired)
    assert second.attempt == 2 and second.previous_owner == "w1" and second.token > first.token
    rel = client.release(ns, "job", second.token, error="still full")
    assert rel.state is idemkv.RecordState.FAILED

    dead = client.claim(ns, "job", owner="w3", max_attempts=2)
    assert dead == idemkv.Failed(attempts=2, last_error="still full")


def test_rule_errors_carry_reason_and_message(client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "k", owner="holder", fingerprint=b"payload-1")
    assert isinstance(got, idemkv.Acquired)

    with pytest.raises(idemkv.LeaseLost) as e:
        client.complete(ns, "k", got.token + 1000, b"x")
    assert e.value.reason == "LEASE_LOST" and "holder" in e.value.message
    assert isinstance(e.value, idemkv.RuleError)

    with pytest.raises(idemkv.FingerprintMismatch) as e:
        client.claim(ns, "k", owner="other", fingerprint=b"payload-2")
    assert e.value.reason == "FINGERPRINT_MISMATCH"

    client.complete(ns, "k", got.token, b"ok")
    client.complete(ns, "k", got.token, b"ok")  # the same again: a retry, fine
    with pytest.raises(idemkv.AlreadyCompleted) as e:
        client.complete(ns, "k", got.token, b"different")
    assert e.value.message.startswith("ALREADY_COMPLETED")
    assert client.get(ns, "k").result == b"ok"


def test_bad_input_is_invalid_argument_naming_the_field(client: idemkv.Client, ns: str) -> None:
    for call, field in [
        (lambda: client.claim(ns, b""), "key"),
        (lambda: client.claim("has space", "k"), "namespace"),
        (lambda: client.claim(ns, "k", lease=0), "lease_ms"),
        (lambda: client.claim(ns, "k", owner="x" * 300), "owner"),
    ]:
        with pytest.raises(idemkv.InvalidArgument) as e:
            call()
        assert field in e.value.message, e.value.message
        assert e.value.reason is None
    with pytest.raises(idemkv.ConfigError):
        client.claim(ns, "k", lease=-1)
    assert client.get(ns, "k") is None  # nothing was written


def test_a_result_over_the_limit_is_too_large(client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "big")
    with pytest.raises(idemkv.TooLarge) as e:
        client.complete(ns, "big", got.token, b"x" * (1024 * 1024 + 1))
    assert "result" in e.value.message
    assert client.get(ns, "big").state is idemkv.RecordState.IN_PROGRESS


def test_wait_returns_when_the_holder_finishes_and_not_found_when_absent(client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "w", lease=30)
    timed = client.wait(ns, "w", timeout=0.2)
    assert timed.timed_out and timed.record.state is idemkv.RecordState.IN_PROGRESS
    client.complete(ns, "w", got.token, b"done")
    res = client.wait(ns, "w", timeout=timedelta(seconds=5))
    assert not res.timed_out and res.record.result == b"done"
    with pytest.raises(idemkv.NotFound):
        client.wait(ns, "absent", timeout=1)


def test_renew_keeps_the_claim_and_stores_the_checkpoint(client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "r", lease=0.5)
    r = client.renew(ns, "r", got.token, lease=30, checkpoint=b"page-3")
    assert r.lease_deadline_ms > got.lease_deadline_ms
    rec = client.get(ns, "r")
    assert rec.checkpoint == b"page-3" and rec.lease_deadline_ms == r.lease_deadline_ms


def test_batch_claims_each_item_and_all_or_nothing_changes_nothing(client: idemkv.Client, ns: str) -> None:
    b = client.claim_batch(ns, ["a", "b", "c"], lease=30)
    assert b.applied and all(isinstance(i, idemkv.Acquired) for i in b.items)
    tokens = [i.token for i in b.items]
    assert tokens == sorted(set(tokens))

    refused = client.claim_batch(ns, ["c", "d"], all_or_nothing=True, owner="someone-else")
    assert not refused.applied
    assert isinstance(refused.items[0], idemkv.InProgress)
    assert client.get(ns, "d") is None

    client.claim(ns, "fp", fingerprint="one")
    mixed = client.claim_batch(ns, ["fp", "e"], fingerprints=["two", None])
    assert isinstance(mixed.items[0], idemkv.ItemError) and mixed.items[0].reason == "FINGERPRINT_MISMATCH"
    assert isinstance(mixed.items[1], idemkv.Acquired)


def test_delete_fenced_and_unfenced(client: idemkv.Client, ns: str) -> None:
    old = client.claim(ns, "d", lease=0.2, owner="old")
    newer = None
    deadline = time.monotonic() + 5
    while not isinstance(newer, idemkv.Acquired):  # until the 0.2 s lease has run out
        assert time.monotonic() < deadline
        newer = client.claim(ns, "d", owner="new")
    with pytest.raises(idemkv.LeaseLost):
        client.delete(ns, "d", token=old.token)
    assert client.get(ns, "d").owner == "new"
    assert client.delete(ns, "d", token=newer.token) is True
    assert client.delete(ns, "d", token=newer.token) is False
    client.claim(ns, "u")
    assert client.delete(ns, "u") is True
    assert client.get(ns, "u") is None


def _dead_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def test_unreachable_cluster_is_unavailable_after_retries(ns: str) -> None:
    retry = idemkv.RetryOptions(request_timeout=0.5, retry_for=0.6, backoff_initial=0.05)
    with idemkv.Client([_dead_endpoint(), _dead_endpoint()], retry=retry) as dead:
        started = time.monotonic()
        with pytest.raises(idemkv.Unavailable) as e:
            dead.claim(ns, "k")
        took = time.monotonic() - started
    assert e.value.code is not None and e.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert 0.05 <= took < 3, took  # retried with backoff, then gave up


def test_a_dead_endpoint_first_in_the_list_is_skipped(endpoints, ns: str) -> None:
    with idemkv.Client([_dead_endpoint()] + list(endpoints), follow_leader=False) as c:
        got = c.claim(ns, "k")
        assert isinstance(got, idemkv.Acquired)
        assert c.preferred_endpoint in endpoints


def test_endpoint_forms(endpoints, ns: str) -> None:
    with idemkv.Client(",".join(f"http://{e}/" for e in endpoints)) as c:
        assert isinstance(c.claim(ns, "k"), idemkv.Acquired)
    for bad in ["", "127.0.0.1", "ftp://127.0.0.1:21", "http://127.0.0.1:1/v3", "127.0.0.1:99999", "user@h:1"]:
        with pytest.raises(idemkv.ConfigError) as e:
            idemkv.Client(bad)
        assert "host:port, http://host:port or https://host:port" in str(e.value)
    with pytest.raises(idemkv.ConfigError, match="plaintext but TLS"):
        idemkv.Client(f"http://{endpoints[0]}", tls=idemkv.TLS(ca=b"pem"))


def test_from_env_reads_the_rust_clients_variables(endpoints, ns: str, monkeypatch) -> None:
    monkeypatch.setenv("IDEMKV_ENDPOINTS", ",".join(endpoints))
    monkeypatch.delenv("IDEMKV_TLS_CA", raising=False)
    monkeypatch.delenv("IDEMKV_AUTH_TOKEN", raising=False)
    with idemkv.Client.from_env() as c:
        assert c.endpoints[:3] == endpoints
        assert isinstance(c.claim(ns, "k"), idemkv.Acquired)
    monkeypatch.setenv("IDEMKV_TLS_CERT", "/nonexistent.pem")
    with pytest.raises(idemkv.ConfigError, match="IDEMKV_TLS_CA"):
        idemkv.Client.from_env()


def test_the_client_follows_the_leader(client: idemkv.Client, ns: str) -> None:
    leader, followers = leader_and_followers(client)
    assert followers
    # Given only a follower, the client learns the leader's address and
    # sends its calls there.
    with idemkv.Client([followers[0]]) as c:
        assert isinstance(c.claim(ns, "k"), idemkv.Acquired)
        assert c.preferred_endpoint == leader
        assert leader in c.endpoints
    # Without following, it stays where it was told (followers forward).
    with idemkv.Client([followers[0]], follow_leader=False) as c:
        assert isinstance(c.claim(ns, "k2"), idemkv.Acquired)
        assert c.endpoints == [followers[0]]
