"""Sans-I/O plumbing: the client's logic written once, as generators of
steps, and run by a blocking driver (:func:`drive`) or an asyncio one
(:func:`adrive`).

A step is ``(fn, args, kwargs)``: "call this and send me what it gives".
The blocking driver calls ``fn(*args, **kwargs)``; the asyncio driver
awaits it. An exception from a step is thrown into the generator at its
``yield``, so the logic handles failures with plain ``try``/``except``;
what the generator returns (or raises) is what the driver returns (or
raises). The retry loop, leader discovery, ``run_once`` and the lease
renewer are written this way, so the sync and asyncio flavours differ only
in the functions their steps name (a blocking stub, ``time.sleep``, a
``threading.Event``; a ``grpc.aio`` stub, ``asyncio.sleep``, an
``asyncio.Event``) and in ``await``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generator, Optional, Tuple, TypeVar

T = TypeVar("T")

#: One step: a function to call (and, in asyncio, await) with its arguments.
Step = Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]
#: A piece of logic: yields steps, gets their results back, returns a T.
Steps = Generator[Step, Any, T]


def step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Step:
    """The step "call ``fn(*args, **kwargs)``"."""
    return fn, args, kwargs


class _Run:
    """A generator being driven: the step it waits on, or its result."""

    __slots__ = ("_gen", "done", "value", "step")

    def __init__(self, gen: "Steps[Any]") -> None:
        self._gen = gen
        self.done = False
        self.value: Any = None
        self.step: Optional[Step] = None
        self._resume(gen.send, None)

    def _resume(self, how: Callable[[Any], Step], arg: Any) -> None:
        try:
            self.step = how(arg)
        except StopIteration as finished:
            self.done, self.value = True, finished.value

    def _call(self) -> Any:
        assert self.step is not None
        fn, args, kwargs = self.step
        return fn(*args, **kwargs)

    def settle(self) -> None:
        """Blocking: take the step, resume the generator with what came of it."""
        try:
            reply = self._call()
        except BaseException as e:  # noqa: BLE001 - handed to the generator
            return self._resume(self._gen.throw, e)
        self._resume(self._gen.send, reply)

    async def asettle(self) -> None:
        """asyncio: await the step, resume the generator with what came of it."""
        try:
            reply = await self._call()
        except BaseException as e:  # noqa: BLE001 - cancellation included
            return self._resume(self._gen.throw, e)
        self._resume(self._gen.send, reply)


def drive(gen: "Steps[T]") -> T:
    """Run ``gen`` to its end, calling each step in this thread."""
    run = _Run(gen)
    while not run.done:
        run.settle()
    return run.value


async def adrive(gen: "Steps[T]") -> T:
    """Run ``gen`` to its end, awaiting each step."""
    run = _Run(gen)
    while not run.done:
        await run.asettle()
    return run.value
