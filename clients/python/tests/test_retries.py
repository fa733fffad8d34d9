"""The retry rules: a reply lost on the way back is retried only where SPEC
§3 makes it safe — a claim by its claim_id (the same grant comes back, the
sender is never locked out by its own claim), fenced writes by their token
— and an unfenced delete is reported as of unknown outcome instead."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, List, Optional

import grpc
import pytest

import idemkv
from conftest import leader_and_followers


class LostReply(grpc.RpcError, grpc.Call):
    """What the client sees when a reply is lost: UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "test: the reply was lost on the way back"

    def trailing_metadata(self) -> Any:
        return ()

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Optional[float]:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class NetworkFault(grpc.UnaryUnaryClientInterceptor):
    """Lets calls to ``method`` reach the server, then loses the first
    ``lose`` replies (or delays each reply by ``delay`` seconds); records
    every request sent."""

    def __init__(self, method: str, lose: int = 0, delay: float = 0.0) -> None:
        self.method = method
        self.lose = lose
        self.delay = delay
        self.sent: List[Any] = []
        self.replies: List[Any] = []
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        call = continuation(details, request)
        if not details.method.endswith("/" + self.method):
            return call
        call.result()  # the server has answered
        with self._lock:
            self.sent.append(request)
            self.replies.append(call.result())
            drop = self.lose > 0
            self.lose -= drop
        if self.delay:
            time.sleep(self.delay)
        if drop:
            raise LostReply()
        return call


def faulty(endpoints, fault: NetworkFault) -> idemkv.Client:
    return idemkv.Client(endpoints, interceptors=[fault], follow_leader=False)


def test_a_lost_claim_reply_is_retried_with_the_same_claim_id_and_gets_the_same_grant(endpoints, ns: str) -> None:
    fault = NetworkFault("Claim", lose=1)
    with faulty(endpoints, fault) as c:
        got = c.claim(ns, "order-7", owner="worker-a")
    # Without the claim_id the retry would find worker-a's own claim
    # IN_PROGRESS and the sender would be locked out of its own work.
    assert isinstance(got, idemkv.Acquired), got
    assert len(fault.sent) == 2
    assert fault.sent[0].claim_id == fault.sent[1].claim_id == got.claim_id != ""
    first = fault.replies[0]
    assert first.WhichOneof("outcome") == "acquired"
    assert got.token == first.acquired.token  # the grant the lost reply carried
    with idemkv.Client(endpoints) as other:
        busy = other.claim(ns, "order-7", owner="worker-b")
        assert isinstance(busy, idemkv.InProgress) and busy.owner == "worker-a"


def test_claiming_again_with_a_claim_id_returns_the_same_grant(client: idemkv.Client, ns: str) -> None:
    first = client.claim(ns, "k", owner="w")
    again = client.claim(ns, "k", owner="w", claim_id=first.claim_id)
    assert again == first
    fresh = client.claim(ns, "k", owner="w")
    assert isinstance(fresh, idemkv.InProgress)


def test_a_lost_complete_reply_is_retried_by_its_token(endpoints, client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "k")
    fault = NetworkFault("Complete", lose=2)
    with faulty(endpoints, fault) as c:
        c.complete(ns, "k", got.token, b"result")
    assert len(fault.sent) == 3
    assert client.get(ns, "k").result == b"result"


def test_a_lost_unfenced_delete_is_reported_not_retried(endpoints, client: idemkv.Client, ns: str) -> None:
    client.claim(ns, "k")
    fault = NetworkFault("Delete", lose=1)
    with faulty(endpoints, fault) as c:
        with pytest.raises(idemkv.OutcomeUnknown) as e:
            c.delete(ns, "k")
    assert isinstance(e.value, idemkv.Unavailable)
    assert len(fault.sent) == 1  # a retry could have deleted a newer claim
    assert client.get(ns, "k") is None  # it did happen; the client could not know


def test_a_lost_fenced_delete_is_retried(endpoints, client: idemkv.Client, ns: str) -> None:
    got = client.claim(ns, "k")
    fault = NetworkFault("Delete", lose=1)
    with faulty(endpoints, fault) as c:
        assert c.delete(ns, "k", token=got.token) is False  # the retry: already gone
    assert len(fault.sent) == 2
    assert client.get(ns, "k") is None


def test_a_grant_later_than_its_lease_is_not_used_and_is_given_back(endpoints, client: idemkv.Client, ns: str) -> None:
    # The claim's reply takes 0.3 s; the lease is 0.25 s (valid 0.15 s here).
    fault = NetworkFault("Claim", delay=0.3)
    ran = []
    with faulty(endpoints, fault) as c:
        with pytest.raises(idemkv.GrantExpired) as e:
            c.run_once(ns, "late", ran.append, lease=0.25)
    assert ran == []
    assert e.value.waited >= 0.3
    rec = client.get(ns, "late")
    assert rec.state is idemkv.RecordState.AVAILABLE  # released: claimable at once
    assert isinstance(client.claim(ns, "late"), idemkv.Acquired)


class HeldClaim(grpc.UnaryUnaryClientInterceptor):
    """Holds the first Claim on its way (the client sees it fail, UNAVAILABLE,
    and retries) and lets it reach the cluster late: when the next Await
    has its answer, the held claim is delivered (and granted, the key being
    free by then), and the Await's answer reaches the client ``then``
    seconds later. Records each Claim: (the client's send instant, its
    claim_id, the reply)."""

    def __init__(self, then: float) -> None:
        self.then = then
        self.held: Optional[tuple] = None
        self.holding = True
        self.claims: List[tuple] = []

    def intercept_unary_unary(self, continuation, details, request):
        name = details.method.rsplit("/", 1)[-1]
        if name == "Claim" and self.holding:
            self.holding = False
            self.held = (continuation, details, request, time.monotonic())
            raise LostReply()
        if name == "Claim":
            at = time.monotonic()
            call = continuation(details, request)
            self.claims.append((at, request.claim_id, call.result()))
            return call
        call = continuation(details, request)
        if name == "Await" and self.held is not None:
            call.result()  # the key is free
            cont, det, req, at = self.held
            self.held = None
            self.claims.append((at, req.claim_id, cont(det, req).result()))
            time.sleep(self.then)
        return call


def test_a_claim_granted_late_to_an_earlier_attempt_never_gets_a_fresh_deadline(
    endpoints, client: idemkv.Client, ns: str
) -> None:
    # SPEC §2: the client's lease runs from its instant before sending *the
    # claim that was granted*. The server answers a claim with the same
    # owner and claim_id as the grant it holds with that grant (even expired),
    # so a run_once that reused its claim_id after waiting for a duplicate
    # would take a grant made to its first, delayed attempt as new, and time
    # it from the later send: a client deadline past the server's lease.
    holder = client.claim(ns, "k", owner="holder", lease=30)
    fault = HeldClaim(then=0.6)
    seen = {}

    def work(claim: idemkv.Claim) -> bytes:
        seen.update(token=claim.token, deadline=claim.deadline)
        return b"done"

    out: List[Any] = []
    with idemkv.Client(endpoints, interceptors=[fault], follow_leader=False) as c:
        t = threading.Thread(
            target=lambda: out.append(c.run_once(ns, "k", work, lease=1.0, wait_for_duplicate=10, owner="me"))
        )
        t.start()
        give_up = time.monotonic() + 10
        while not fault.claims and time.monotonic() < give_up:  # the retry met the holder
            time.sleep(0.01)
        client.release(ns, "k", holder.token)
        t.join(20)
    assert out and not out[0].replayed and out[0].token == seen["token"], out
    assert fault.held is None  # the held claim reached the cluster
    # The first send of a claim answered with the work's grant.
    sent = min(
        at
        for at, _, r in fault.claims
        if r.WhichOneof("outcome") == "acquired" and r.acquired.token == seen["token"]
    )
    valid_for = 1.0 - 0.1  # the lease minus the default margin
    assert seen["deadline"] <= sent + valid_for + 1e-6, (
        f"the work's deadline is {seen['deadline'] - sent - valid_for:.3f} s past what its grant allows"
    )


def test_overloaded_and_unavailable_are_retryable_and_rule_errors_are_not() -> None:
    from idemkv._retry import retryable

    class E(LostReply):
        def __init__(self, code, details="", reason=None):
            self._c, self._d, self._r = code, details, reason

        def code(self):
            return self._c

        def details(self):
            return self._d

        def trailing_metadata(self):
            return (("idemkv-reason", self._r),) if self._r else ()

    S = grpc.StatusCode
    assert retryable(E(S.UNAVAILABLE)) and retryable(E(S.DEADLINE_EXCEEDED))
    assert retryable(E(S.RESOURCE_EXHAUSTED, "overloaded", "OVERLOADED"))
    assert not retryable(E(S.RESOURCE_EXHAUSTED, "result too large"))
    assert not retryable(E(S.RESOURCE_EXHAUSTED, "full", "NOSPACE"))
    assert not retryable(E(S.FAILED_PRECONDITION, "LEASE_LOST", "LEASE_LOST"))
    assert not retryable(E(S.UNAVAILABLE, "certificate verify failed"))
    err = idemkv.errors.from_rpc_error(E(S.RESOURCE_EXHAUSTED, "full", "NOSPACE"))
    assert type(err) is idemkv.NoSpace and err.message == "full"
    err = idemkv.errors.from_rpc_error(E(S.FAILED_PRECONDITION, "NEW_RULE: x", "NEW_RULE"))
    assert type(err) is idemkv.RuleError and err.reason == "NEW_RULE"


def _refused_address() -> str:
    """An address where nothing listens: connections there are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_an_unfenced_delete_moves_past_a_node_it_cannot_connect_to(endpoints, client: idemkv.Client, ns: str) -> None:
    dead = _refused_address()
    fast = idemkv.RetryOptions(request_timeout=2.0, retry_for=0.01)
    # The fault took effect: the dead address alone fails at once, and since
    # nothing was sent the delete is not of unknown outcome, just unavailable.
    with idemkv.Client([dead], retry=fast, follow_leader=False) as lone:
        with pytest.raises(idemkv.Unavailable) as e:
            lone.delete(ns, "k")
    assert not isinstance(e.value, idemkv.OutcomeUnknown), e.value
    client.claim(ns, "k")
    # The dead node first, as a user with one node down would have it, and
    # no leader discovery to hide it: the delete goes to the next node.
    with idemkv.Client([dead, *endpoints], follow_leader=False) as c:
        assert c.delete(ns, "k") is True
    assert client.get(ns, "k") is None


def test_a_frozen_node_costs_a_call_seconds_not_its_whole_deadline(client: idemkv.Client, pids, ns: str) -> None:
    _, followers = leader_and_followers(client)
    frozen, live = followers[0], followers[1]
    # The default deadline of an attempt: 10 s.
    assert idemkv.RetryOptions().request_timeout == 10.0
    with idemkv.Client([frozen, live], follow_leader=False) as c:
        assert c.status().id > 0  # connected to the first node
        os.kill(pids[frozen], signal.SIGSTOP)  # frozen: its connection stays open, silent
        try:
            started = time.monotonic()
            got = c.claim(ns, "k")
            took = time.monotonic() - started
            # The fault took effect: the frozen node answers nothing now.
            with idemkv.Client([frozen], follow_leader=False, retry=idemkv.RetryOptions(request_timeout=0.5, retry_for=0.01)) as lone:
                with pytest.raises(idemkv.Unavailable):
                    lone.status()
        finally:
            os.kill(pids[frozen], signal.SIGCONT)
    assert isinstance(got, idemkv.Acquired)
    # Its connection's keepalive pings found the node dead in about 5 s;
    # the claim went on to the live node instead of waiting out 10 s.
    assert took < 8.0, took
