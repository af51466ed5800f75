"""Servers: listening sockets, their connections, and how they stop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .deadlines import check_seconds

if TYPE_CHECKING:
    from .futures import Future
    from .loop import Reactor
    from .transport import SocketTransport

logger = logging.getLogger("iomux.reactor")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Server:
    """Accepts connections on one or more sockets and serves each with a new protocol.

    ``idle_timeout`` and ``lifetime`` (seconds, None for no limit) apply to
    every accepted connection; a transport can change its own afterwards.
    """

    def __init__(
        self,
        reactor: Reactor,
        sockets: Sequence[socket.socket],
        protocol_factory: ProtocolFactory,
        *,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
        unix_paths: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self._sockets = tuple(sockets)
        self._factory = protocol_factory
        self._idle_timeout = check_seconds("idle_timeout", idle_timeout)
        self._lifetime = check_seconds("lifetime", lifetime)
        self._unix_paths = tuple(unix_paths)
        self._connections: set[SocketTransport] = set()
        self._max_fd = reactor._mux.capabilities.max_fd
        self._tcp = tuple(s.family in (socket.AF_INET, socket.AF_INET6) for s in self._sockets)
        self._listeners = [
            reactor._strategy.listen(sock, self._make_on_accept(tcp))
            for sock, tcp in zip(self._sockets, self._tcp, strict=True)
        ]
        self._serving = False
        self._closed = False
        #: Connections refused because their fd was beyond the driver's max_fd.
        self.refused_out_of_range = 0
        reactor._servers.add(self)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once closed)."""
        return () if self._closed else self._sockets

    @property
    def connections(self) -> frozenset[SocketTransport]:
        """The transports of the connections open now."""
        return frozenset(self._connections)

    def port(self) -> int:
        """The port of the first TCP socket (handy after binding port 0)."""
        for sock, tcp in zip(self._sockets, self._tcp, strict=True):
            if tcp:
                return int(sock.getsockname()[1])
        raise ValueError("this server has no TCP socket")

    def start_serving(self) -> None:
        """Begin accepting (``create_server`` does this unless ``start_serving=False``)."""
        if self._closed:
            raise RuntimeError("the server is closed")
        self._serving = True
        for listener in self._listeners:
            listener.start()

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return self._serving and not self._closed

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay.

        Connections that completed their handshake but were still in the
        backlog are accepted first, so a client the kernel already answered
        is served rather than reset.
        """
        if self._closed:
            return
        if self._serving:
            for listener in self._listeners:
                listener.accept_pending()
        self._closed = True
        self._serving = False
        for listener in self._listeners:
            listener.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._reactor._servers.discard(self)

    def shutdown(self, grace: float = 10.0, drain: float = 5.0) -> Future[None]:
        """Stop accepting and end this server's connections gracefully.

        See :meth:`Reactor.shutdown` for the phases; the future is done when
        every connection of this server is closed.
        """
        from .shutdown import graceful_shutdown

        return graceful_shutdown(
            self._reactor, [self], lambda: list(self._connections), grace, drain
        )

    def _make_on_accept(self, tcp: bool) -> Callable[[socket.socket, Any], None]:
        def on_accept(conn: socket.socket, addr: Any) -> None:
            self._accepted(conn, addr, tcp)

        return on_accept

    def _accepted(self, conn: socket.socket, addr: Any, tcp: bool) -> None:
        fd = conn.fileno()
        if self._max_fd is not None and fd >= self._max_fd:
            self.refused_out_of_range += 1
            logger.warning(
                "closing connection from %r: its fd %d is beyond what the %s driver "
                "can watch (max_fd %d); use the poll, epoll or io_uring backend",
                addr,
                fd,
                self._reactor._mux.name,
                self._max_fd,
            )
            conn.close()
            return
        conn.setblocking(False)
        if tcp:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reactor = self._reactor
        try:
            protocol = self._factory()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            conn.close()
            reactor.call_exception_handler(
                {"message": "the server's protocol factory raised", "exception": exc}
            )
            return
        transport = reactor._strategy.transport(conn, protocol, server=self, peername=addr)
        self._connections.add(transport)
        if self._idle_timeout is not None:
            transport.set_idle_timeout(self._idle_timeout)
        if self._lifetime is not None:
            transport.set_deadline(reactor.time() + self._lifetime)
        transport._start()

    def _detach(self, transport: SocketTransport) -> None:
        self._connections.discard(transport)

    def __repr__(self) -> str:
        state = "serving" if self.is_serving() else "closed" if self._closed else "idle"
        return f"<Server {state} sockets={len(self._sockets)} connections={len(self._connections)}>"
