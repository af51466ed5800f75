"""Exception types of the reactor.

Each derives from :class:`iomux.IomuxError` and from the built-in exception
that generic code already catches (``TimeoutError``, ``RuntimeError``,
``OSError``), so callers written for asyncio keep working.
"""

from __future__ import annotations

import io

from iomux.errors import IomuxError


class ReactorClosed(IomuxError, RuntimeError):
    """The reactor was used after :meth:`Reactor.close`."""


class ReactorRunning(IomuxError, RuntimeError):
    """The reactor is already running (or asked to close while running)."""


class ConnectionTimeout(IomuxError, TimeoutError):
    """Base of the reasons a connection is closed by one of its deadlines."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        #: The limit that expired, in seconds.
        self.seconds = seconds


class IdleTimeout(ConnectionTimeout):
    """No byte was received or sent for the connection's idle timeout.

    Passed to ``protocol.connection_lost()`` when the reactor closes an idle
    connection.
    """


class DeadlineExceeded(ConnectionTimeout):
    """The connection outlived its absolute deadline (or its server's lifetime).

    Passed to ``protocol.connection_lost()`` when the reactor closes it.
    """


class ShutdownTimeout(ConnectionTimeout):
    """The connection did not finish within a graceful shutdown's grace period
    and could not flush what it had written within the drain time."""


class EmbeddingUnsupported(IomuxError, io.UnsupportedOperation):
    """The driver has no single pollable fd, so :meth:`Reactor.fileno` cannot work.

    select and poll watch a set of fds that no single fd stands for; run the
    reactor in a thread of its own instead (see :mod:`iomux.reactor.embed`).
    """
