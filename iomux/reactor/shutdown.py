"""Graceful shutdown: stop accepting, let connections finish, then close them.

Phases:

1. Every server stops accepting. Connections already in the backlog are
   accepted first (their clients completed the handshake and may have sent
   data the kernel acknowledged). Protocols with a ``shutdown_requested()``
   method are told, so they can finish the current exchange and close.
2. Connections keep being served until they close by themselves or
   ``grace`` seconds pass.
3. The rest are closed with ``close()``: reading stops and what was written
   is flushed. A connection whose peer does not take its data within
   ``drain`` more seconds is aborted with :class:`ShutdownTimeout`.

Nothing accepted by ``write()`` is dropped unless the peer refuses it for
the whole drain time. The shutdown is event-driven: each connection that
ends tells it (:meth:`GracefulShutdown.connection_closed`), which reads a
count of the connections left (so that ending N connections costs O(N),
not O(N^2)), and two timers mark the ends of the grace and drain periods;
nothing polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .errors import ShutdownTimeout

if TYPE_CHECKING:
    from .server import Server


class GracefulShutdown:
    """One graceful shutdown in progress; :attr:`done` completes when it is over."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        servers: Iterable[Server],
        connections: Callable[[], Iterable[Any]],
        count: Callable[[], int],
        grace: float,
        drain: float,
    ) -> None:
        if grace < 0 or drain < 0:
            raise ValueError(f"grace ({grace!r}) and drain ({drain!r}) must be >= 0 seconds")
        self._loop = loop
        self._servers = list(servers)
        self._connections = connections
        #: How many connections have not ended yet (their connection_lost did not run).
        self._count = count
        self._grace = grace
        self._drain = drain
        self._timers: list[asyncio.TimerHandle] = []
        #: Done (with None) when no connection is left.
        self.done: asyncio.Future[None] = loop.create_future()

    def start(self) -> None:
        """Phase 1, and the timers of phases 2 and 3."""
        for server in self._servers:
            server.begin_shutdown(self)
        for transport in list(self._connections()):
            transport.shutdown_requested()
        loop = self._loop
        self._timers = [
            loop.call_later(self._grace, self._close_remaining),
            loop.call_later(self._grace + self._drain, self._abort_remaining),
        ]
        self.connection_closed()

    def connection_closed(self) -> None:
        """A connection ended: finish if it was the last one."""
        if self.done.done() or self._count() > 0:
            return
        self._finish()

    def _finish(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self.done.set_result(None)

    def _finish_unless_alive(self) -> None:
        # A transport collected without being closed never ends, so it stays
        # counted: once the aborted connections were told, look for real ones.
        if self.done.done():
            return
        for _ in self._connections():
            return
        self._finish()

    def _close_remaining(self) -> None:
        for transport in list(self._connections()):
            transport.close()

    def _abort_remaining(self) -> None:
        total = self._grace + self._drain
        for transport in list(self._connections()):
            transport.abort_with(
                ShutdownTimeout(
                    f"connection aborted: it did not finish within the {self._grace:g} s grace "
                    f"period nor flush its data within {self._drain:g} s more",
                    total,
                )
            )
        # After the connection_lost calls the aborts scheduled.
        self._loop.call_soon(self._finish_unless_alive)


def graceful_shutdown(
    loop: asyncio.AbstractEventLoop,
    servers: Iterable[Server],
    grace: float,
    drain: float,
) -> asyncio.Future[None]:
    """Run the phases above for ``servers`` and the connections they accepted."""
    servers = list(servers)

    def connections() -> Iterable[Any]:
        for server in servers:
            yield from server.connections

    def count() -> int:
        return sum(server.connection_count for server in servers)

    shutdown = GracefulShutdown(loop, servers, connections, count, grace, drain)
    shutdown.start()
    return shutdown.done
