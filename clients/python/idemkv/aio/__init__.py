"""The asyncio client: ``idemkv.aio.Client``, the same calls as
:class:`idemkv.Client` as coroutines (on ``grpc.aio``), with ``run_once``
renewing its lease in an asyncio task. Results and exceptions are the ones
in :mod:`idemkv` (``idemkv.LeaseLost``, ``idemkv.Acquired``, ...)."""

from ._client import Client
from ._run_once import AsyncClaim

__all__ = ["Client", "AsyncClaim"]
