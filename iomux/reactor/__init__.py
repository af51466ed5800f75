"""The iomux reactor: an asyncio-protocol-compatible event loop on any iomux backend.

::

    from iomux.reactor import Reactor

    class Echo(asyncio.Protocol):
        def connection_made(self, transport): self.transport = transport
        def data_received(self, data): self.transport.write(data)

    reactor = Reactor("epoll")
    server = reactor.create_server(Echo, "127.0.0.1", 8888)
    reactor.install_shutdown_handlers(grace=5.0)   # SIGINT/SIGTERM: graceful stop
    reactor.run_forever()
    reactor.close()

Protocols are asyncio's (``asyncio.Protocol`` and ``asyncio.BufferedProtocol``).
Connections can have an idle timeout and a deadline; they end with
``connection_lost(IdleTimeout(...))`` or ``connection_lost(DeadlineExceeded(...))``.
See :mod:`iomux.reactor.embed` to run the reactor inside another loop or thread.
"""

from __future__ import annotations

from .completion import CompletionStrategy, CompletionUnsupported
from .errors import (
    ConnectionTimeout,
    DeadlineExceeded,
    EmbeddingUnsupported,
    FutureCancelled,
    IdleTimeout,
    InvalidFutureState,
    ReactorClosed,
    ReactorRunning,
    RunTimeout,
    ShutdownTimeout,
)
from .futures import Future, Task
from .handles import Handle, TimerHandle
from .loop import Reactor
from .server import Server
from .strategy import ReadinessStrategy, TransportStrategy
from .transport import SocketTransport

__all__ = [
    "CompletionStrategy",
    "CompletionUnsupported",
    "ConnectionTimeout",
    "DeadlineExceeded",
    "EmbeddingUnsupported",
    "Future",
    "FutureCancelled",
    "Handle",
    "IdleTimeout",
    "InvalidFutureState",
    "Reactor",
    "ReactorClosed",
    "ReactorRunning",
    "ReadinessStrategy",
    "RunTimeout",
    "Server",
    "ShutdownTimeout",
    "SocketTransport",
    "Task",
    "TimerHandle",
    "TransportStrategy",
]
