"""Fixtures for the client tests: a real cluster, named by the environment.

``tests/python_client.rs`` starts the clusters and sets:

- ``IDEMKV_ENDPOINTS``: the three nodes' client ports (comma-separated);
- ``IDEMKV_TEST_PIDS``: their process ids, in the same order (to pause one);
- ``IDEMKV_TEST_SECURE_ENDPOINT``: one more node, alone in its cluster, with
  TLS (``IDEMKV_TEST_CA``), bearer tokens (``IDEMKV_TEST_TOKEN`` for any
  namespace, ``IDEMKV_TEST_LIMITED_TOKEN`` for the namespace ``other``
  only), one Await per namespace at a time, and a data quota of a few KB.

Without them every test fails (never skips): a run that tested nothing must
not look like a pass.
"""

from __future__ import annotations

import os
import uuid
from typing import Dict, Iterator, List

import pytest

import idemkv


def _need(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through `cargo test --release --test python_client`")
    return value


@pytest.fixture(scope="session")
def endpoints() -> List[str]:
    return _need("IDEMKV_ENDPOINTS").split(",")


@pytest.fixture(scope="session")
def pids(endpoints: List[str]) -> Dict[str, int]:
    """Endpoint -> the pid of the node serving it."""
    pids = [int(p) for p in _need("IDEMKV_TEST_PIDS").split(",")]
    assert len(pids) == len(endpoints)
    return dict(zip(endpoints, pids))


@pytest.fixture(scope="session")
def client(endpoints: List[str]) -> Iterator[idemkv.Client]:
    with idemkv.Client(endpoints) as c:
        c.wait_ready(30)
        yield c


@pytest.fixture
def ns() -> str:
    """A namespace of its own for each test."""
    return "py-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def secure() -> Dict[str, str]:
    return {
        "endpoint": _need("IDEMKV_TEST_SECURE_ENDPOINT"),
        "ca": _need("IDEMKV_TEST_CA"),
        "token": _need("IDEMKV_TEST_TOKEN"),
        "limited_token": _need("IDEMKV_TEST_LIMITED_TOKEN"),
    }


def leader_and_followers(client: idemkv.Client) -> "tuple[str, List[str]]":
    seen = client.status_all()
    roles = {ep: s.role for ep, s in seen.items() if isinstance(s, idemkv.Status)}
    leaders = [ep for ep, r in roles.items() if r == "leader"]
    assert len(leaders) == 1, seen
    return leaders[0], [ep for ep, r in roles.items() if r == "follower"]


def pytest_report_header(config) -> str:
    # Which copy of the package is under test (the Rust harness checks it is
    # the one `pip install` put in place, not the source tree).
    return f"idemkv {idemkv.__version__} from {os.path.dirname(idemkv.__file__)}"
