"""asyncio on an iomux backend: the loop factory, ``run`` and the policy.

``new_event_loop(backend)`` returns an :class:`iomux.Reactor`, iomux's own
asyncio event loop. On Python 3.12 and later pass it to ``asyncio.run``::

    asyncio.run(main(), loop_factory=iomux.new_event_loop)            # backend from config
    asyncio.run(main(), loop_factory=lambda: iomux.new_event_loop("io_uring"))

On 3.11, ``asyncio.Runner(loop_factory=iomux.new_event_loop)``; on every
version, ``iomux.run(main(), backend="io_uring")`` does the same, and
``asyncio.set_event_loop_policy(iomux.EventLoopPolicy("epoll"))`` makes
every new loop use the backend. uvicorn takes the factory by name:
``uvicorn app:app --loop iomux:new_event_loop`` (the backend then comes
from ``IOMUX_BACKEND`` or the config file).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from .multiplexer import Multiplexer
from .reactor import Reactor

T = TypeVar("T")


def new_event_loop(
    backend: str | type[Multiplexer] | Multiplexer | None = None, **options: Any
) -> Reactor:
    """Return a new iomux event loop on ``backend`` (see :func:`iomux.open_multiplexer`).

    ``options`` go to :class:`iomux.Reactor` (``io``, ``trigger``) and to the
    driver. The loop's ``backend`` attribute names the backend it runs on.
    """
    return Reactor(backend, **options)


def run(
    main: Coroutine[Any, Any, T],
    *,
    backend: str | type[Multiplexer] | None = None,
    debug: bool | None = None,
    **options: Any,
) -> T:
    """Run a coroutine to completion on a new loop on ``backend``, like ``asyncio.run``."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(
            debug=debug, loop_factory=lambda: new_event_loop(backend, **options)
        ) as runner:
            return runner.run(main)
    with _Runner(new_event_loop(backend, **options), debug) as legacy:  # pragma: no cover
        return legacy.run(main)


class _Runner:
    """``asyncio.Runner`` for Python 3.10, which lacks it."""

    def __init__(self, loop: Reactor, debug: bool | None) -> None:
        self._loop = loop
        if debug is not None:
            loop.set_debug(debug)

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
    """An event-loop policy whose new loops are iomux loops on ``backend``."""

    def __init__(self, backend: str | None = None, **options: Any) -> None:
        super().__init__()
        self._backend = backend
        self._options = options

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """Return a new loop on this policy's backend."""
        return new_event_loop(self._backend, **self._options)
