"""Generated stubs of ``proto/idemkv/v1/api.proto`` (regenerate with ``gen.sh``).

``api_pb2`` holds the messages, ``api_pb2_grpc`` the ``IdempotencyStub`` and
``ClusterStub``. The :class:`idemkv.Client` wraps them; use them directly
only for what the client does not cover.
"""
