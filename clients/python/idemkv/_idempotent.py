"""``@client.idempotent(namespace, key=...)``: a function that runs once per
key, its return value replayed to every later call with the same key.

In the spirit of AWS Powertools' ``@idempotent``, on idemkv's claims: a
lease renewed while the function runs, a fencing token the function can
hand to its downstream writes (``pass_claim=True``, or
:func:`idemkv.current_claim`), and duplicates that wait for the first
call's result (``wait_for_duplicate``) instead of running again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import inspect
import json
import threading
from typing import Any, Callable, Dict, Optional, Tuple, Union

from . import _convert as cv
from .errors import ConfigError

KeyFn = Callable[..., Any]


def _as_key(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).encode("utf-8")
    raise ConfigError(f"key: the key function returned {type(value).__name__}; return str, bytes or int")


def _not_json(value: Any, path: str, seen: Tuple[int, ...] = ()) -> Optional[str]:
    """Where ``value`` is not plain JSON — str, int, float, bool, None,
    bytes (hashed as their ``repr``, which every process writes alike), and
    lists, tuples and str-keyed dicts of them — or None if it all is. Only
    those have one text in every process: another object's ``repr`` may
    hold its address, a set's order changes with the process's hash seed."""
    if value is None or isinstance(value, (str, int, float, bytes)):  # bool is an int
        return None
    if id(value) in seen:
        return f"{path} (a circular reference)"
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            bad = _not_json(item, f"{path}[{i}]", seen + (id(value),))
            if bad:
                return bad
        return None
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                return f"{path} (a key of type {type(k).__name__})"
            bad = _not_json(item, f"{path}[{k!r}]", seen + (id(value),))
            if bad:
                return bad
        return None
    return f"{path} (a {type(value).__name__})"


def _bytes_text(value: Any) -> str:
    """JSON's fallback for the one non-JSON type a digest takes: bytes, as
    their ``repr`` (what earlier versions hashed, so keys stay the same)."""
    if isinstance(value, bytes):
        return repr(value)
    raise TypeError(f"{type(value).__name__} is not plain JSON")


def _digest(args: Dict[str, Any], fn_name: Optional[str], option: str) -> str:
    """A hash of the call's arguments (with ``fn_name``, for a default key)
    as JSON; a :class:`ConfigError` before anything is sent when they are
    not plain JSON, since their text, and so the key, could differ per
    delivery and the work would run every time."""
    for name, value in args.items():
        bad = _not_json(value, name)
        if bad:
            raise ConfigError(
                f"{option}: the argument {bad} is not plain JSON (str, int, float, bool, None, "
                f"lists and str-keyed dicts of them), so its hash is not the same in every process; "
                f"pass {option}= a function of the arguments"
            )
    parts: Any = [fn_name, args] if fn_name is not None else args
    text = json.dumps(parts, sort_keys=True, default=_bytes_text, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


async def _in_thread(fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """Run a blocking call in a thread of its own, not the loop's shared
    executor: duplicates blocked in a long Await must never starve the call
    that completes the key they wait for."""
    fut: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn(*a, **kw))
        except BaseException as e:  # handed to the awaiting coroutine
            fut.set_exception(e)

    threading.Thread(target=run, name="idemkv-call", daemon=True).start()
    return await asyncio.wrap_future(fut)


class _ThreadedAsync:
    """The sync client's calls as coroutines (each in a thread), so the
    async ``run_once`` can drive it for ``async def`` functions."""

    def __init__(self, client: Any) -> None:
        self._c = client

    async def claim(self, *a: Any, **kw: Any) -> Any:
        return await _in_thread(self._c.claim, *a, **kw)

    async def wait(self, *a: Any, **kw: Any) -> Any:
        return await _in_thread(self._c.wait, *a, **kw)

    async def complete(self, *a: Any, **kw: Any) -> Any:
        return await _in_thread(self._c.complete, *a, **kw)

    async def release(self, *a: Any, **kw: Any) -> Any:
        return await _in_thread(self._c.release, *a, **kw)

    async def _call(self, *a: Any, **kw: Any) -> Any:
        return await _in_thread(self._c._call, *a, **kw)


def decorate(
    client: Any,
    namespace: str,
    *,
    key: Optional[KeyFn] = None,
    fingerprint: Union[None, bool, KeyFn] = None,
    lease: cv.Duration = 30.0,
    wait_for_duplicate: Optional[cv.Duration] = None,
    max_attempts: int = 0,
    retention: Optional[cv.Duration] = None,
    serializer: Any = json,
    pass_claim: bool = False,
    owner: Optional[str] = None,
    safety_margin: Optional[cv.Duration] = None,
    asyncio_only: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    from .aio import _run_once as aio_run_once

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        is_async = inspect.iscoroutinefunction(fn)
        if asyncio_only and not is_async:
            raise TypeError(
                f"idemkv.aio.Client.idempotent decorates async functions; {fn.__qualname__} is not "
                "(use idemkv.Client.idempotent for plain functions)"
            )
        name = f"{fn.__module__}.{fn.__qualname__}"

        sig = inspect.signature(fn)

        def named(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
            # Every argument by its parameter name, defaults filled in, so
            # `key=lambda order_id, **_: order_id` sees order_id however the
            # call passed it, and f(1, b=2) and f(a=1, b=2) are one key.
            bound = sig.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            out: Dict[str, Any] = {}
            for pname, value in bound.arguments.items():
                if sig.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
                    out.update(value)
                else:
                    out[pname] = value
            if pass_claim:
                out.pop("claim", None)
            return out

        def key_and_fp(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[bytes, Optional[bytes]]:
            a = named(args, kwargs)
            k = _as_key(key(**a)) if key is not None else _digest(a, name, "key").encode()
            if fingerprint is None or fingerprint is False:
                fp = None
            elif fingerprint is True:
                fp = hashlib.sha256(_digest(a, None, "fingerprint").encode()).digest()
            else:
                fp = _as_key(fingerprint(**a))
            return k, fp

        def with_claim(kwargs: Dict[str, Any], claim: Any) -> Dict[str, Any]:
            return {**kwargs, "claim": claim} if pass_claim else kwargs

        options = dict(
            lease=lease,
            wait_for_duplicate=wait_for_duplicate,
            max_attempts=max_attempts,
            retention=retention,
            serializer=serializer,
            owner=owner,
            safety_margin=safety_margin,
        )

        if is_async:

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                k, fp = key_and_fp(args, kwargs)
                api = client if asyncio_only else _ThreadedAsync(client)

                async def work(claim: Any) -> Any:
                    return await fn(*args, **with_claim(kwargs, claim))

                r = await aio_run_once.run_once(api, namespace, k, work, fingerprint=fp, **options)
                return r.value

            return run_async

        @functools.wraps(fn)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            k, fp = key_and_fp(args, kwargs)
            r = client.run_once(
                namespace, k, lambda claim: fn(*args, **with_claim(kwargs, claim)), fingerprint=fp, **options
            )
            return r.value

        return run_sync

    return wrap
