#!/usr/bin/env python3
"""Drives a running idemkv cluster through stubs generated from the proto.

The only thing this script knows about idemkv is `proto/idemkv/v1/api.proto`
(plus the documented `idemkv-reason` trailer): if it passes, the proto is a
usable contract for a client in another language.

Environment:
  IDEMKV_ENDPOINTS  comma-separated host:port API addresses of the nodes

It uses only the generated stubs the package ships (`idemkv.v1.api_pb2`,
`idemkv.v1.api_pb2_grpc`), none of the client built on them.

Run: pytest clients/python/tests/test_stubs_contract.py
"""

import os
import sys
import time
import unittest
import uuid

import grpc

from idemkv.v1 import api_pb2 as pb
from idemkv.v1 import api_pb2_grpc as pb_grpc

REASON_TRAILER = "idemkv-reason"
LEASE_MS = 30_000
RPC_TIMEOUT_S = 10.0
# A node may briefly answer UNAVAILABLE (e.g. while forwarding to a leader
# it is still learning about); retrying is safe because every write here is
# idempotent (claims carry a claim_id, completes repeat the same result).
RETRY_FOR_S = 15.0

ENDPOINTS = [e.strip() for e in os.environ.get("IDEMKV_ENDPOINTS", "").split(",") if e.strip()]
# One namespace per run, so reruns against a live cluster never collide.
NAMESPACE = "pyclient-" + uuid.uuid4().hex[:12]


def call(method, request):
    """Call `method`, retrying only UNAVAILABLE for a while."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return method(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def reason_of(err):
    """The idemkv rule reason (LEASE_LOST, ...) from an RpcError's trailers."""
    for key, value in err.trailing_metadata() or ():
        if key == REASON_TRAILER:
            return value
    return None


def claim_request(key, owner, lease_ms=LEASE_MS, namespace=None):
    return pb.ClaimRequest(
        namespace=NAMESPACE if namespace is None else namespace,
        key=key,
        owner=owner,
        claim_id=uuid.uuid4().hex,
        lease_ms=lease_ms,
    )


class IdemkvContract(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not ENDPOINTS:
            raise unittest.SkipTest("IDEMKV_ENDPOINTS is not set")
        cls.channels = [grpc.insecure_channel(ep) for ep in ENDPOINTS]
        cls.stubs = [pb_grpc.IdempotencyStub(ch) for ch in cls.channels]
        cls.cluster = [pb_grpc.ClusterStub(ch) for ch in cls.channels]

    @classmethod
    def tearDownClass(cls):
        for ch in cls.channels:
            ch.close()

    def expect_error(self, code, method, request):
        with self.assertRaises(grpc.RpcError) as ctx:
            method(request, timeout=RPC_TIMEOUT_S)
        err = ctx.exception
        self.assertEqual(err.code(), code, f"details: {err.details()!r}")
        return err

    def test_status_names_one_leader_and_followers(self):
        roles = {}
        for ep, stub in zip(ENDPOINTS, self.cluster):
            st = call(stub.Status, pb.StatusRequest())
            roles[ep] = st.role
            self.assertEqual(st.api_addr, ep)
            self.assertTrue(st.HasField("leader_id"), f"{ep} knows no leader")
            self.assertEqual(len(st.members), len(ENDPOINTS))
        self.assertEqual(sorted(roles.values()).count("leader"), 1, roles)
        if len(ENDPOINTS) > 1:
            # So the per-endpoint test below really goes through followers.
            self.assertGreaterEqual(list(roles.values()).count("follower"), 1, roles)

    def test_claim_complete_replay_through_every_endpoint(self):
        # Followers forward writes: the whole lifecycle works on any node.
        for i, (ep, stub) in enumerate(zip(ENDPOINTS, self.stubs)):
            with self.subTest(endpoint=ep):
                key = f"order-{i}".encode()

                first = call(stub.Claim, claim_request(key, "worker-a"))
                self.assertEqual(first.WhichOneof("outcome"), "acquired", first)
                token = first.acquired.token
                self.assertGreater(token, 0)
                self.assertEqual(first.acquired.attempt, 1)
                self.assertGreater(first.acquired.lease_deadline_ms, 0)
                self.assertFalse(first.acquired.HasField("previous_owner"))

                # Another owner, while worker-a holds the lease: told who.
                busy = call(stub.Claim, claim_request(key, "worker-b"))
                self.assertEqual(busy.WhichOneof("outcome"), "in_progress", busy)
                self.assertEqual(busy.in_progress.owner, "worker-a")
                self.assertGreater(busy.in_progress.lease_remaining_ms, 0)
                self.assertLessEqual(busy.in_progress.lease_remaining_ms, LEASE_MS)

                result = b"\x00receipt #42\xff\n" + key
                done = call(
                    stub.Complete,
                    pb.CompleteRequest(
                        namespace=NAMESPACE, key=key, token=token, result=result, code=201
                    ),
                )
                self.assertGreater(done.completed_at_ms, 0)
                self.assertGreater(done.expires_at_ms, done.completed_at_ms)

                # The duplicate request replays the exact result, byte for byte.
                again = call(stub.Claim, claim_request(key, "worker-c"))
                self.assertEqual(again.WhichOneof("outcome"), "completed", again)
                self.assertEqual(again.completed.result, result)
                self.assertEqual(again.completed.token, token)
                self.assertTrue(again.completed.HasField("code"))
                self.assertEqual(again.completed.code, 201)
                self.assertEqual(again.completed.completed_at_ms, done.completed_at_ms)

                # Every node reads the same COMPLETED record.
                for other_ep, other in zip(ENDPOINTS, self.stubs):
                    got = call(other.Get, pb.GetRequest(namespace=NAMESPACE, key=key))
                    rec = got.record
                    self.assertEqual(rec.state, pb.COMPLETED, f"Get via {other_ep}: {rec}")
                    self.assertEqual(rec.namespace, NAMESPACE)
                    self.assertEqual(rec.key, key)
                    self.assertEqual(rec.token, token)
                    self.assertEqual(rec.result, result)
                    self.assertEqual(rec.code, 201)
                    self.assertEqual(pb.RecordState.Name(rec.state), "COMPLETED")

    def test_wrong_token_is_lease_lost(self):
        stub = self.stubs[-1]
        key = b"fenced"
        got = call(stub.Claim, claim_request(key, "worker-a"))
        self.assertEqual(got.WhichOneof("outcome"), "acquired", got)
        token = got.acquired.token

        err = self.expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.Complete,
            pb.CompleteRequest(namespace=NAMESPACE, key=key, token=token + 1000, result=b"x"),
        )
        self.assertEqual(reason_of(err), "LEASE_LOST")
        self.assertTrue(err.details().startswith("LEASE_LOST"), err.details())
        self.assertIn("worker-a", err.details())

        # The refused write changed nothing: still IN_PROGRESS, and the real
        # token still completes.
        rec = call(stub.Get, pb.GetRequest(namespace=NAMESPACE, key=key)).record
        self.assertEqual(rec.state, pb.IN_PROGRESS)
        self.assertEqual(rec.owner, "worker-a")
        self.assertEqual(rec.token, token)
        call(
            stub.Complete,
            pb.CompleteRequest(namespace=NAMESPACE, key=key, token=token, result=b"ok"),
        )

        # Once completed, a stale token is still fenced off ...
        err = self.expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.Complete,
            pb.CompleteRequest(namespace=NAMESPACE, key=key, token=token + 1, result=b"ok"),
        )
        self.assertEqual(reason_of(err), "LEASE_LOST")
        # ... and the right token with a different result is ALREADY_COMPLETED.
        err = self.expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.Complete,
            pb.CompleteRequest(namespace=NAMESPACE, key=key, token=token, result=b"other"),
        )
        self.assertEqual(reason_of(err), "ALREADY_COMPLETED")
        rec = call(stub.Get, pb.GetRequest(namespace=NAMESPACE, key=key)).record
        self.assertEqual(rec.result, b"ok")

    def test_invalid_input_names_the_field(self):
        stub = self.stubs[0]
        cases = [
            ("key", claim_request(b"", "worker-a")),
            ("lease_ms", claim_request(b"bad-lease", "worker-a", lease_ms=0)),
            ("owner", claim_request(b"no-owner", "")),
            ("namespace", claim_request(b"k", "worker-a", namespace="")),
            ("namespace", claim_request(b"k", "worker-a", namespace="has space")),
            # The proto3 default "" is no identity: two processes sharing an
            # owner name would both hold the claim.
            ("claim_id", pb.ClaimRequest(namespace=NAMESPACE, key=b"no-id", owner="w", lease_ms=LEASE_MS)),
        ]
        for field, req in cases:
            with self.subTest(field=field, request=str(req)):
                err = self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.Claim, req)
                self.assertIn(field, err.details())
                self.assertIsNone(reason_of(err))
        err = self.expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.Complete,
            pb.CompleteRequest(namespace=NAMESPACE, key=b"k", token=0, result=b""),
        )
        self.assertIn("token", err.details())

        # A rejected request changed nothing: the key was never created.
        self.expect_error(
            grpc.StatusCode.NOT_FOUND,
            stub.Get,
            pb.GetRequest(namespace=NAMESPACE, key=b"bad-lease"),
        )

    def test_each_batch_item_gets_its_own_token(self):
        stub = self.stubs[0]
        items = [claim_request(f"batch-{i}".encode(), "worker-a") for i in range(3)]
        got = call(stub.ClaimBatch, pb.ClaimBatchRequest(items=items))
        tokens = [item.acquired.token for item in got.items]
        self.assertTrue(all(item.WhichOneof("outcome") == "acquired" for item in got.items), got)
        self.assertEqual(len(set(tokens)), 3, tokens)
        self.assertEqual(tokens, sorted(tokens), tokens)

    def test_fenced_delete(self):
        stub = self.stubs[-1]
        key = b"delete-me"
        first = call(stub.Claim, claim_request(key, "worker-a", lease_ms=200))
        old = first.acquired.token
        time.sleep(0.3)
        newer = call(stub.Claim, claim_request(key, "worker-b"))
        self.assertEqual(newer.WhichOneof("outcome"), "acquired", newer)
        # The old holder's token cannot delete its successor's claim.
        err = self.expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            stub.Delete,
            pb.DeleteRequest(namespace=NAMESPACE, key=key, token=old),
        )
        self.assertEqual(reason_of(err), "LEASE_LOST")
        rec = call(stub.Get, pb.GetRequest(namespace=NAMESPACE, key=key)).record
        self.assertEqual(rec.owner, "worker-b")
        # The holder's own token deletes it, and a retry is harmless.
        req = pb.DeleteRequest(namespace=NAMESPACE, key=key, token=newer.acquired.token)
        self.assertTrue(call(stub.Delete, req).existed)
        self.assertFalse(call(stub.Delete, req).existed)
        self.expect_error(
            grpc.StatusCode.NOT_FOUND, stub.Get, pb.GetRequest(namespace=NAMESPACE, key=key)
        )


if __name__ == "__main__":
    print(f"idemkv endpoints: {ENDPOINTS}, namespace {NAMESPACE}", flush=True)
    prog = unittest.main(exit=False, verbosity=2)
    result = prog.result
    # Skipping everything (no endpoints) must not look like a pass.
    ok = result.wasSuccessful() and result.testsRun > len(result.skipped)
    sys.exit(0 if ok else 1)
