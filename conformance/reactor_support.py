"""What the reactor sections of the suite share: a loop in each I/O mode, and bounded waits.

Every reactor test runs once per *mode* on every driver:

``level``
    readiness I/O, stream transports registered level-triggered;
``edge``
    readiness I/O, registered edge-triggered (a skip naming the capability
    on drivers without ``Trigger.EDGE``);
``completion``
    completion I/O through the driver's completion port (a skip naming the
    capability on drivers that do not declare ``completion``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from iomux.multiplexer import Multiplexer, Trigger
from iomux.reactor import Reactor

from .plugin import require, require_completion

T = TypeVar("T")

#: The I/O modes every reactor test runs in (the ids of its parameter).
MODES = ("level", "edge", "completion")


def require_mode(driver: type[Multiplexer], mode: str) -> None:
    """Skip the calling test, naming the capability, if ``driver`` cannot run ``mode``."""
    if mode == "completion":
        require_completion(driver)
    elif mode == "edge":
        require(driver, Trigger.EDGE)
    elif mode != "level":
        raise ValueError(f"unknown reactor mode {mode!r}; choose one of {', '.join(MODES)}")


def mode_options(mode: str) -> dict[str, Any]:
    """The ``Reactor`` keyword arguments of ``mode``."""
    if mode == "completion":
        return {"io": "completion"}
    return {"trigger": Trigger.LEVEL if mode == "level" else Trigger.EDGE}


def new_reactor(driver: type[Multiplexer], mode: str) -> Reactor:
    """A loop on ``driver`` in ``mode``; skips, naming the capability, if the driver lacks it."""
    require_mode(driver, mode)
    reactor = Reactor(driver, **mode_options(mode))
    expected = "completion" if mode == "completion" else "readiness"
    if reactor.io != expected or reactor.backend != driver.name:
        reactor.close()
        raise AssertionError(f"Reactor({driver.__name__}, {mode}) runs {reactor!r}")
    return reactor


def wait(reactor: Reactor, awaitable: Awaitable[T], timeout: float) -> T:
    """Run the loop until ``awaitable`` is done; fail with TimeoutError after ``timeout`` s.

    A future is shielded: the timeout does not cancel it (a protocol may still
    set its result afterwards).
    """

    async def bounded() -> T:
        inner: Awaitable[T] = awaitable
        if asyncio.isfuture(awaitable):
            inner = asyncio.shield(awaitable)
        return await asyncio.wait_for(inner, timeout)

    return reactor.run_until_complete(bounded())


def run_until(
    reactor: Reactor, condition: Callable[[], object], timeout: float, step: float = 0.01
) -> None:
    """Run loop iterations until ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        reactor.run_once(step)


def close_reactor(reactor: Reactor) -> None:
    """Abort what a test left open (servers, connections), then close the loop."""
    if reactor.is_closed() or reactor.is_running():
        return
    try:
        wait(reactor, reactor.shutdown(grace=0, drain=0), 5.0)
    finally:
        reactor.close()
