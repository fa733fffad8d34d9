"""TLS, bearer tokens, and the refusals only a configured node gives:
UNAUTHENTICATED, PERMISSION_DENIED, OVERLOADED (retried, then raised) and
NOSPACE. Against a one-node cluster run with TLS, --auth-tokens, one Await
per namespace and a data quota of a few KB."""

from __future__ import annotations

import threading
from typing import Dict

import pytest

import idemkv


def secure_client(s: Dict[str, str], token: str = None, **kw) -> idemkv.Client:
    return idemkv.Client(f"https://{s['endpoint']}", token=token, tls=idemkv.TLS(ca=s["ca"]), **kw)


def test_tls_and_a_token_from_the_environment(secure, ns: str, monkeypatch) -> None:
    monkeypatch.setenv("IDEMKV_ENDPOINTS", f"https://{secure['endpoint']}")
    monkeypatch.setenv("IDEMKV_TLS_CA", secure["ca"])
    monkeypatch.setenv("IDEMKV_AUTH_TOKEN", secure["token"])
    monkeypatch.delenv("IDEMKV_TLS_CERT", raising=False)
    monkeypatch.delenv("IDEMKV_TLS_KEY", raising=False)
    with idemkv.Client.from_env() as c:
        r = c.run_once(ns, "k", lambda claim: b"over tls")
        assert r.value == b"over tls" and c.run_once(ns, "k", lambda claim: b"x").replayed


def test_no_token_is_unauthenticated_and_a_foreign_namespace_is_denied(secure, ns: str) -> None:
    with secure_client(secure) as c:
        with pytest.raises(idemkv.Unauthenticated) as e:
            c.claim(ns, "k")
        assert e.value.message
    with secure_client(secure, token=secure["limited_token"]) as c:
        with pytest.raises(idemkv.PermissionDenied) as e:
            c.claim(ns, "k")
        assert ns in e.value.message
        assert isinstance(c.claim("other", ns), idemkv.Acquired)


def test_an_untrusted_certificate_fails_at_once(secure, ns: str) -> None:
    with idemkv.Client(f"https://{secure['endpoint']}", token=secure["token"]) as c:  # system roots
        with pytest.raises(idemkv.Unavailable):
            c.claim(ns, "k")


def test_overloaded_is_retried_then_raised(secure, ns: str) -> None:
    with secure_client(secure, token=secure["token"]) as c:
        got = c.claim(ns, "held", lease=30)
        first = {}
        holder = threading.Thread(target=lambda: first.update(r=c.wait(ns, "held", timeout=20)))
        holder.start()  # takes the namespace's one Await slot
        impatient = idemkv.RetryOptions(retry_for=0.3)
        with secure_client(secure, token=secure["token"], retry=impatient) as quick:
            for _ in range(100):
                try:
                    quick.wait(ns, "held", timeout=0.05)  # the holder is not waiting yet
                except idemkv.Overloaded as e:
                    assert e.reason == "OVERLOADED" and "await" in e.message.lower()
                    break
            else:
                pytest.fail("never refused as overloaded")
        # A patient caller retries until the slot frees, then gets its answer.
        patient = {}
        waiter = threading.Thread(target=lambda: patient.update(r=c.wait(ns, "held", timeout=5)))
        waiter.start()
        c.complete(ns, "held", got.token, b"done")
        holder.join()
        waiter.join()
        assert first["r"].record.result == b"done"
        assert patient["r"].record.result == b"done"


def test_a_full_quota_is_no_space_until_room_is_made(secure, ns: str) -> None:
    with secure_client(secure, token=secure["token"]) as c:
        big = c.claim(ns, "big")
        c.complete(ns, "big", big.token, b"x" * 8000)  # over the 6000-byte quota
        assert "NOSPACE" in c.status().alarms
        with pytest.raises(idemkv.NoSpace) as e:
            c.claim(ns, "new")
        assert isinstance(e.value, idemkv.ResourceExhausted) and e.value.reason == "NOSPACE"
        assert c.run_once(ns, "big", lambda claim: b"").replayed  # replays still work
        assert c.delete(ns, "big", token=big.token)
        assert isinstance(c.claim(ns, "new"), idemkv.Acquired)
