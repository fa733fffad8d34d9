"""`idemkv gateway` driven the way a Python service's callers drive it: with
`requests`, in front of a small upstream (a `http.server` in this process
that counts the orders it creates and can answer late).

``IDEMKV_TEST_BIN`` (set by ``tests/python_client.rs``) is the idemkv binary.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, List, Optional

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from conftest import _need


class Orders(BaseHTTPRequestHandler):
    """POST /orders: 201 with the order's number; `X-Delay-Ms` answers late."""

    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    calls: List[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with Orders.lock:
            Orders.calls.append(body)
            n = len(Orders.calls)
        time.sleep(int(self.headers.get("X-Delay-Ms") or 0) / 1000)
        out = json.dumps({"order": n, "got": body.decode()}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Location", f"/orders/{n}")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(endpoints: List[str]) -> Iterator[str]:
    """A gateway on a free port in front of the upstream, its records in a
    namespace of its own; its URL."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Orders)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = _free_port()
    proc = subprocess.Popen(
        [
            _need("IDEMKV_TEST_BIN"),
            "gateway",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"http://127.0.0.1:{upstream.server_address[1]}",
            "--endpoints",
            ",".join(endpoints),
            "--namespace",
            "py-gw-" + uuid.uuid4().hex[:8],
            "--require-key",
            "/orders",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the gateway never listened"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.shutdown()


def _calls() -> int:
    with Orders.lock:
        return len(Orders.calls)


def _post(url: str, key: str, body: Dict[str, object], headers: Optional[Dict[str, str]] = None) -> requests.Response:
    return requests.post(url, json=body, headers={"Idempotency-Key": key, **(headers or {})}, timeout=30)


def test_a_retried_post_gets_the_first_response_and_one_order(gateway: str) -> None:
    before = _calls()
    key = str(uuid.uuid4())
    first = _post(f"{gateway}/orders", key, {"sku": "A1"})
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    retry = _post(f"{gateway}/orders", key, {"sku": "A1"})
    assert _calls() == before + 1, "the retry created a second order"
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert (retry.status_code, retry.content) == (first.status_code, first.content)
    assert retry.headers["Location"] == first.headers["Location"]
    assert retry.headers["Content-Type"] == "application/json"


def test_the_key_with_another_body_is_422_and_no_key_is_400(gateway: str) -> None:
    key = str(uuid.uuid4())
    assert _post(f"{gateway}/orders", key, {"sku": "A1"}).status_code == 201
    before = _calls()
    other = _post(f"{gateway}/orders", key, {"sku": "B2"})
    assert other.status_code == 422
    assert other.headers["Content-Type"] == "application/problem+json"
    assert other.json()["status"] == 422
    missing = requests.post(f"{gateway}/orders", json={"sku": "C3"}, timeout=30)
    assert missing.status_code == 400, missing.text
    assert _calls() == before, "a refused request reached the upstream"


def test_a_session_retrying_on_409_gets_the_first_response_of_a_slow_call(gateway: str) -> None:
    """The common client set-up: urllib3's Retry on POST, honouring
    Retry-After. A retry while the first call still runs gets 409 and waits;
    once the first is saved, the retry is its replay."""
    key = str(uuid.uuid4())
    before = _calls()
    slow: Dict[str, requests.Response] = {}
    t = threading.Thread(
        target=lambda: slow.update(r=_post(f"{gateway}/orders", key, {"sku": "D4"}, headers={"X-Delay-Ms": "1500"}))
    )
    t.start()
    deadline = time.monotonic() + 10
    while _calls() == before:
        assert time.monotonic() < deadline, "the first request never reached the upstream"
        time.sleep(0.01)
    session = requests.Session()
    retries = Retry(total=10, backoff_factor=0.1, status_forcelist=[409], allowed_methods=None, respect_retry_after_header=True)
    session.mount("http://", HTTPAdapter(max_retries=retries))
    retried = session.post(f"{gateway}/orders", json={"sku": "D4"}, headers={"Idempotency-Key": key}, timeout=30)
    t.join(30)
    first = slow["r"]
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    assert retried.headers.get("Idempotent-Replayed") == "true", (retried.status_code, retried.text)
    assert retried.raw.retries.history, "the retry never met the running call (no 409)"
    assert retried.raw.retries.history[0].status == 409
    assert retried.content == first.content
    assert _calls() == before + 1
