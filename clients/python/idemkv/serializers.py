"""How ``run_once`` and ``idempotent`` turn a work's value into the stored
bytes and back.

A serializer is anything with ``dumps(value) -> bytes | str`` and
``loads(bytes) -> value``: the ``json`` module itself works
(``serializer=json``), as does ``pickle`` for trusted data. ``None`` (the
default) stores ``bytes`` as they are (``str`` as UTF-8) and replays
``bytes``.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol


from .errors import ConfigError


class Serializer(Protocol):
    def dumps(self, value: Any) -> Any: ...

    def loads(self, data: bytes) -> Any: ...


class Raw:
    """bytes in, bytes out (``str`` stored as UTF-8); the default."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str):
            return value.encode("utf-8")
        if value is None:
            return b""
        raise TypeError(
            f"the work returned {type(value).__name__}; without a serializer it must "
            "return bytes or str (pass serializer=json to store other values)"
        )

    @staticmethod
    def loads(data: bytes) -> bytes:
        return data


def resolve(serializer: Optional[Any]) -> Any:
    if serializer is None:
        return Raw
    if not (callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None))):
        raise ConfigError("serializer: needs dumps(value) and loads(bytes), like the json module")
    return serializer


def dumps(serializer: Any, value: Any) -> bytes:
    data = serializer.dumps(value)
    if isinstance(data, str):
        return data.encode("utf-8")
    return bytes(data)
