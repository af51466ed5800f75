"""Servers: listening sockets, the connections they accepted, and how they stop.

:class:`Server` is an :class:`asyncio.AbstractServer` with asyncio's
semantics (``start_serving``, ``serve_forever``, ``close``,
``wait_closed``, ``sockets``, ``async with``) plus what iomux adds: an idle
timeout and a lifetime for every accepted connection, the set of open
connections, and a graceful :meth:`Server.shutdown`.

How it accepts is not its business: the loop gives it a *listen* function
that makes a listener (readiness or io_uring completion) for one socket,
an *accept* function that turns an accepted socket into a transport, and
a *clients* function that lists the transports of the connections a server
accepted (the loop tracks every connection); listeners hand each new
connection to :meth:`Server.accepted`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import stat
import sys
from asyncio import trsock
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .transport import check_seconds

if TYPE_CHECKING:
    from .shutdown import GracefulShutdown

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
# asyncio 3.12.1 made wait_closed() wait for the connections too.
_WAIT_FOR_CONNECTIONS = sys.version_info >= (3, 12)
# asyncio 3.13 removes a Unix server's socket file when it closes.
_CLEANUP_UNIX_SOCKET = sys.version_info >= (3, 13)


class Listener(Protocol):
    """What a server needs of the loop's listener on one socket."""

    def start(self) -> None:
        """Begin accepting."""

    def close(self) -> None:
        """Stop accepting and close the socket (at once, or when the kernel let go of it)."""

    def accept_pending(self) -> None:
        """Accept every connection already in the backlog, now."""


class Server(asyncio.AbstractServer):
    """Accepts connections on one or more sockets and serves each with a new protocol.

    ``idle_timeout`` and ``lifetime`` (seconds, None for no limit) apply to
    every accepted connection (see
    :meth:`~iomux.reactor.transport.StreamTransport.set_idle_timeout`); a
    transport can change its own afterwards.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: Sequence[socket.socket],
        protocol_factory: ProtocolFactory,
        *,
        listen: Callable[[Server, socket.socket], Listener],
        accept: Callable[[Server, socket.socket, Any], None],
        clients: Callable[[Server], Iterable[Any]],
        backlog: int = 100,
        ssl: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
        unix_path: str | None = None,
    ) -> None:
        self._loop = loop
        self._sockets: list[socket.socket] | None = list(sockets)
        self.protocol_factory = protocol_factory
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.ssl_shutdown_timeout = ssl_shutdown_timeout
        #: Applied to every accepted connection.
        self.idle_timeout = check_seconds("idle_timeout", idle_timeout)
        self.lifetime = check_seconds("lifetime", lifetime)
        self._listen = listen
        self._accept = accept
        # The loop keeps the connections (weakly, as asyncio's servers: a
        # transport nobody holds must still be able to warn that it was
        # never closed); the server counts its own.
        self._clients = clients
        self._backlog = backlog
        self._listeners: list[Listener] = []
        self._active = 0
        self._waiters: list[asyncio.Future[None]] | None = []
        self._serving = False
        self._serving_forever: asyncio.Future[None] | None = None
        self._unix_path = unix_path
        self._unix_inode: int | None = None
        if unix_path is not None and unix_path[:1] not in ("", "\0"):
            try:
                self._unix_inode = os.stat(unix_path).st_ino
            except OSError:
                pass
        self._shutdown: GracefulShutdown | None = None
        self._context = contextvars.copy_context()
        #: Connections refused because their fd was beyond the driver's max_fd.
        self.refused_out_of_range = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} sockets={self.sockets!r}>"

    # -- what transports and listeners call ----------------------------------------

    def attach(self, transport: Any) -> None:
        """A transport of a connection this server accepted was made (called by it)."""
        self._active += 1

    def detach(self, transport: Any) -> None:
        """That transport's connection is over (called by it)."""
        self._active -= 1
        if self._active == 0 and self._sockets is None:
            self._wake_waiters()
        if self._shutdown is not None:
            self._shutdown.connection_closed()

    def accepted(self, conn: socket.socket, addr: Any) -> None:
        """A listener accepted ``conn`` from ``addr``: serve it.

        As asyncio's, each connection starts in its own copy of the context
        the server started serving in.
        """
        self._context.copy().run(self._accept, self, conn, addr)

    # -- asyncio.AbstractServer -------------------------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return self._serving

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets (empty once closed)."""
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(s) for s in self._sockets)

    def _start_serving(self) -> None:
        if self._serving or self._sockets is None:
            return
        self._serving = True
        self._context = contextvars.copy_context()
        for sock in self._sockets:
            sock.listen(self._backlog)
            listener = self._listen(self, sock)
            self._listeners.append(listener)
            listener.start()

    async def start_serving(self) -> None:
        """Begin accepting connections (if not already)."""
        self._start_serving()
        await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        """Accept connections until cancelled; then close the server."""
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay."""
        self._close(accept_pending=False)

    def _close(self, *, accept_pending: bool) -> None:
        sockets = self._sockets
        if sockets is None:
            return
        if accept_pending and self._serving:
            # A client the kernel already answered is served, not reset.
            for listener in self._listeners:
                listener.accept_pending()
        self._sockets = None
        self._serving = False
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()  # closes its socket, once nothing in the kernel uses it
        if not listeners:
            for sock in sockets:
                sock.close()
        self._remove_unix_socket()
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
            self._serving_forever = None
        if self._active == 0:
            self._wake_waiters()

    def _remove_unix_socket(self) -> None:
        path, self._unix_path = self._unix_path, None
        if path is None or self._unix_inode is None or not _CLEANUP_UNIX_SOCKET:
            return
        try:
            st = os.stat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._unix_inode:
                os.unlink(path)
        except OSError:
            pass

    def close_clients(self) -> None:
        """Close every connection this server accepted (their buffers are flushed)."""
        for transport in list(self._clients(self)):
            transport.close()

    def abort_clients(self) -> None:
        """Abort every connection this server accepted."""
        for transport in list(self._clients(self)):
            transport.abort()

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the server is closed (and, Python 3.12+, its connections are gone)."""
        if _WAIT_FOR_CONNECTIONS:
            if self._waiters is None:
                return
        elif self._sockets is None or self._waiters is None:
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    # -- iomux's additions ----------------------------------------------------------------

    @property
    def connections(self) -> frozenset[Any]:
        """The transports of the connections open now."""
        return frozenset(self._clients(self))

    @property
    def connection_count(self) -> int:
        """How many accepted connections have not ended (``connection_lost`` not run yet)."""
        return self._active

    def port(self) -> int:
        """The port of the first TCP socket (handy after binding port 0)."""
        for sock in self._sockets or ():
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        raise ValueError("this server has no open TCP socket")

    def begin_shutdown(self, shutdown: GracefulShutdown) -> None:
        """Stop accepting for a graceful shutdown (after accepting the backlog)."""
        self._shutdown = shutdown
        self._close(accept_pending=True)

    def shutdown(self, grace: float = 10.0, drain: float = 5.0) -> asyncio.Future[None]:
        """Stop accepting and end this server's connections gracefully.

        See :func:`iomux.reactor.shutdown.graceful_shutdown`; the future is
        done when every connection of this server is closed.
        """
        from .shutdown import graceful_shutdown

        return graceful_shutdown(self._loop, [self], grace, drain)
