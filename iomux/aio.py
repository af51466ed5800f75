"""asyncio on an iomux backend.

``new_event_loop(backend)`` returns a ``SelectorEventLoop`` whose selector
is :class:`iomux.Selector` over the chosen driver. On Python 3.12 and later
pass it to ``asyncio.run``::

    asyncio.run(main(), loop_factory=lambda: iomux.new_event_loop("io_uring"))

On every version, ``iomux.run(main(), backend="io_uring")`` does the same,
and ``asyncio.set_event_loop_policy(iomux.EventLoopPolicy("epoll"))`` makes
every new loop use the backend.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from .selector import Selector

T = TypeVar("T")


def new_event_loop(backend: str | None = None, **options: Any) -> asyncio.AbstractEventLoop:
    """Return a new asyncio event loop running on ``backend`` (see ``open_multiplexer``).

    The loop's ``backend`` attribute names the backend it runs on.
    """
    selector = Selector(backend, **options)
    loop = asyncio.SelectorEventLoop(selector)
    loop.backend = selector.backend  # type: ignore[attr-defined]
    return loop


def run(
    main: Coroutine[Any, Any, T], *, backend: str | None = None, debug: bool | None = None
) -> T:
    """Run a coroutine to completion on a new loop on ``backend``, like ``asyncio.run``."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=lambda: new_event_loop(backend)) as runner:
            return runner.run(main)
    with _Runner(backend, debug) as legacy:  # pragma: no cover - Python 3.10
        return legacy.run(main)


class _Runner:
    """``asyncio.Runner`` for Python 3.10, which lacks it."""

    def __init__(self, backend: str | None, debug: bool | None) -> None:
        self._loop = new_event_loop(backend)
        if debug is not None:
            self._loop.set_debug(debug)

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        asyncio.set_event_loop(self._loop)
        return self._loop.run_until_complete(coro)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event-loop policy whose new loops run on ``backend``."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self._backend = backend

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """Return a new loop on this policy's backend."""
        return new_event_loop(self._backend)
