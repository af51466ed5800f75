"""The iomux event loop: a complete asyncio event loop on any iomux backend.

::

    import asyncio
    import iomux

    class Echo(asyncio.Protocol):
        def connection_made(self, transport): self.transport = transport
        def data_received(self, data): self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 8888, idle_timeout=30)
        async with server:
            await server.serve_forever()

    asyncio.run(main(), loop_factory=iomux.new_event_loop)   # Python 3.12+
    iomux.run(main())                                         # any Python

:class:`Reactor` implements :class:`asyncio.AbstractEventLoop` itself, with
asyncio's Future, Task and Handle, so existing asyncio code (aiohttp,
uvicorn, websockets, asyncpg, anyio...) runs on it. On io_uring, stream
connections use the ring's completion operations
(:mod:`iomux.reactor.completion`); on every backend, readiness
(:mod:`iomux.reactor.readiness`). What iomux adds: per-connection idle
timeouts and deadlines (``connection_lost(IdleTimeout(...))`` or
``DeadlineExceeded``), graceful :meth:`Reactor.shutdown`, a pause in
accepting when the process runs out of fds, and embedding
(:meth:`Reactor.run_once`, :meth:`Reactor.fileno`; see
:mod:`iomux.reactor.embed`).
"""

from __future__ import annotations

from .errors import (
    ConnectionTimeout,
    DeadlineExceeded,
    EmbeddingUnsupported,
    IdleTimeout,
    ReactorClosed,
    ReactorRunning,
    ShutdownTimeout,
)
from .loop import CompletionUnsupported, Reactor
from .server import Server
from .transport import StreamTransport

__all__ = [
    "CompletionUnsupported",
    "ConnectionTimeout",
    "DeadlineExceeded",
    "EmbeddingUnsupported",
    "IdleTimeout",
    "Reactor",
    "ReactorClosed",
    "ReactorRunning",
    "Server",
    "ShutdownTimeout",
    "StreamTransport",
]
