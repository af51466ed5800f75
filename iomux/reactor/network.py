"""The loop's network API, whatever moves the bytes.

:class:`NetworkReactor` adds to the core (:mod:`iomux.reactor.base`) what
asyncio's ``BaseEventLoop`` and Unix loop offer on top of sockets:
``create_connection`` (with Happy Eyeballs), ``create_server``, their Unix
twins, ``connect_accepted_socket``, ``create_datagram_endpoint``,
``start_tls``, ``sendfile``/``sock_sendfile``, pipes, subprocesses and
signal handlers. It decides *what* to connect and listen on, and leaves
*how* to the I/O layers below it: they provide the socket transports, the
listeners and the ``sock_*`` coroutines.

iomux's own options are keyword arguments of ``create_server`` (and
``create_unix_server``): ``idle_timeout`` and ``lifetime``, applied to
every accepted connection; and of ``create_connection`` (and
``create_unix_connection``, ``connect_accepted_socket``): ``idle_timeout``
and ``deadline`` (an absolute ``loop.time()``). See
:meth:`~iomux.reactor.transport.StreamTransport.set_idle_timeout`.
"""

from __future__ import annotations

import asyncio
import collections.abc
import errno
import functools
import itertools
import logging
import os
import socket
import stat
import sys
import weakref
from asyncio import constants as aio_constants
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import pipes, subprocess
from .base import BaseReactor, aio_logger
from .server import Listener, ProtocolFactory, Server
from .shutdown import GracefulShutdown
from .signals import SignalHandlers
from .transport import StreamTransport, WeakMap, check_seconds

if TYPE_CHECKING:
    import ssl as ssl_module

logger = logging.getLogger("iomux.reactor")

_HAS_IPV6 = socket.has_ipv6
_SSL_SHUTDOWN_TIMEOUT = sys.version_info >= (3, 11)
_SendfileMode = aio_constants._SendfileMode
#: Bytes read per step when sendfile falls back to reading and writing.
SENDFILE_FALLBACK_SIZE = 256 * 1024
Connected = tuple[asyncio.BaseTransport, asyncio.BaseProtocol]


def _ipaddr_info(
    host: Any, port: Any, family: int, type_: int, proto: int, flowinfo: int = 0, scopeid: int = 0
) -> tuple[Any, ...] | None:
    """The address info of a numeric host, without calling getaddrinfo (None: not numeric)."""
    if proto not in (0, socket.IPPROTO_TCP, socket.IPPROTO_UDP) or host is None:
        return None
    if type_ == socket.SOCK_STREAM:
        proto = socket.IPPROTO_TCP
    elif type_ == socket.SOCK_DGRAM:
        proto = socket.IPPROTO_UDP
    else:
        return None
    if port is None or port in (b"", ""):
        port = 0
    else:
        try:
            port = int(port)
        except (TypeError, ValueError):
            return None
    families = [socket.AF_INET, socket.AF_INET6] if family == socket.AF_UNSPEC else [family]
    if not _HAS_IPV6:
        families = [f for f in families if f != socket.AF_INET6]
    if isinstance(host, bytes):
        host = host.decode("idna")
    if "%" in host:
        return None
    for af in families:
        try:
            socket.inet_pton(af, host)
        except (OSError, ValueError):
            continue
        if af == socket.AF_INET6:
            return af, type_, proto, "", (host, port, flowinfo, scopeid)
        return af, type_, proto, "", (host, port)
    return None


def _interleave(infos: list[Any], first_family_count: int = 1) -> list[Any]:
    """Alternate address families, starting with ``first_family_count`` of the first."""
    by_family: dict[int, list[Any]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    lists = list(by_family.values())
    ordered: list[Any] = []
    if first_family_count > 1:
        ordered.extend(lists[0][: first_family_count - 1])
        del lists[0][: first_family_count - 1]
    ordered.extend(
        a for a in itertools.chain.from_iterable(itertools.zip_longest(*lists)) if a is not None
    )
    return ordered


def _check_ssl_socket(sock: Any) -> None:
    import ssl

    if isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


class NetworkReactor(BaseReactor):
    """The network API of an iomux loop (see the module docstring)."""

    #: The driver's fd ceiling (select: FD_SETSIZE), None if only RLIMIT_NOFILE.
    _max_fd: int | None = None

    def __init__(self) -> None:
        super().__init__()
        #: fd -> the transport using it: every stream transport until its
        #: connection is lost, and every datagram transport until it closes.
        #: add_reader and friends refuse these fds, as asyncio's do.
        self._transports: WeakMap[int, Any] = WeakMap()
        #: Stream transports made whose connection_lost has not run yet.
        self._stream_count = 0
        # One bound method for every transport's on_lost, not one each.
        self._on_stream_lost = self._stream_lost
        # The graceful shutdowns waiting for the stream transports.
        self._shutdowns: list[GracefulShutdown] = []
        self._all_servers: weakref.WeakSet[Server] = weakref.WeakSet()
        self._signals = SignalHandlers(self)

    # -- what the I/O layers provide ----------------------------------------------

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> StreamTransport:
        raise NotImplementedError

    def _make_datagram_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.DatagramTransport:
        raise NotImplementedError

    def _listen(self, server: Server, sock: socket.socket) -> Listener:
        raise NotImplementedError

    async def _sock_sendfile_native(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        raise asyncio.SendfileNotAvailableError("no native sendfile on this loop")

    # -- stream transports ----------------------------------------------------------

    def _stream_made(self, transport: StreamTransport) -> None:
        """A stream transport was made: track it until its connection is lost."""
        self._transports.add(transport.fileno(), transport)
        self._stream_count += 1
        transport.on_lost(self._on_stream_lost)

    @property
    def connections(self) -> frozenset[StreamTransport]:
        """The stream transports (of every server and client) whose connection is not over."""
        return frozenset(self._streams())

    def _streams(self) -> Iterator[StreamTransport]:
        """The stream transports alive, one at a time (it stops as soon as the caller does)."""
        for transport in self._transports:
            if isinstance(transport, StreamTransport):
                yield transport

    def _clients_of(self, server: Server) -> Iterator[StreamTransport]:
        """The stream transports of the connections ``server`` accepted."""
        for transport in self._streams():
            if transport.server is server:
                yield transport

    def _stream_lost(self, transport: StreamTransport) -> None:
        self._transports.discard(transport.fileno(), transport)
        self._stream_count -= 1
        for shutdown in list(self._shutdowns):
            shutdown.connection_closed()

    def _make_ssl_transport(
        self,
        rawsock: socket.socket,
        protocol: asyncio.BaseProtocol,
        sslcontext: Any,
        waiter: asyncio.Future[Any],
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.BaseTransport, StreamTransport]:
        """asyncio's SSL protocol over one of this loop's transports: (app, raw)."""
        options: dict[str, Any] = {"ssl_handshake_timeout": ssl_handshake_timeout}
        if _SSL_SHUTDOWN_TIMEOUT:
            options["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname, **options
        )
        raw = self._make_socket_transport(rawsock, ssl_protocol, None, extra, server)
        return ssl_protocol._app_transport, raw

    async def _create_connection_transport(
        self,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        ssl: Any,
        server_hostname: str | None,
        *,
        server_side: bool = False,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        idle_timeout: float | None = None,
        deadline: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Connected:
        sock.setblocking(False)
        protocol = protocol_factory()
        waiter = self.create_future()
        transport: asyncio.BaseTransport
        if ssl:
            sslcontext = None if isinstance(ssl, bool) else ssl
            transport, raw = self._make_ssl_transport(
                sock,
                protocol,
                sslcontext,
                waiter,
                server_side=server_side,
                server_hostname=server_hostname,
                extra=extra,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        else:
            transport = raw = self._make_socket_transport(sock, protocol, waiter, extra)
        if idle_timeout is not None:
            raw.set_idle_timeout(idle_timeout)
        if deadline is not None:
            raw.set_deadline(deadline)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    # -- resolving ----------------------------------------------------------------------

    async def _ensure_resolved(
        self,
        address: Any,
        *,
        family: int = 0,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        host, port = address[:2]
        info = _ipaddr_info(host, port, family, type, proto, *address[2:])
        if info is not None:
            return [info]  # a numeric address: no lookup
        return await self.getaddrinfo(
            host, port, family=family, type=type, proto=proto, flags=flags
        )

    # -- connecting -----------------------------------------------------------------------

    async def _connect_sock(
        self,
        exceptions: list[list[OSError]],
        addr_info: Any,
        local_addr_infos: list[Any] | None = None,
    ) -> socket.socket:
        """Create, bind and connect one socket."""
        mine: list[OSError] = []
        exceptions.append(mine)
        family, type_, proto, _, address = addr_info
        sock = None
        try:
            sock = socket.socket(family=family, type=type_, proto=proto)
            sock.setblocking(False)
            if local_addr_infos is not None:
                for lfamily, _, _, _, laddr in local_addr_infos:
                    if lfamily != family:
                        continue
                    try:
                        sock.bind(laddr)
                        break
                    except OSError as exc:
                        reason = (exc.strerror or str(exc)).lower()
                        mine.append(
                            OSError(
                                exc.errno,
                                f"error while attempting to bind on address {laddr!r}: {reason}",
                            )
                        )
                else:
                    if mine:
                        raise mine.pop()
                    raise OSError(f"no matching local address with family={family!r} found")
            await self.sock_connect(sock, address)
            return sock
        except OSError as exc:
            mine.append(exc)
            if sock is not None:
                sock.close()
            raise
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    async def _happy_eyeballs(
        self, attempts: list[Callable[[], Awaitable[socket.socket]]], delay: float
    ) -> socket.socket | None:
        """Start the attempts in turn, the next one ``delay`` s after the last began
        or as soon as one fails; the first connected socket wins, the others are
        cancelled (RFC 8305). Returns None if every attempt failed."""
        running: set[asyncio.Task[socket.socket]] = set()
        remaining = list(attempts)
        winner: socket.socket | None = None
        start_next = True
        try:
            while winner is None:
                if start_next and remaining:
                    running.add(self.create_task(remaining.pop(0)()))  # type: ignore[arg-type]
                if not running:
                    return None
                done, _ = await asyncio.wait(
                    running,
                    timeout=delay if remaining else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                start_next = True  # after a failure, or when the delay ran out
                for task in done:
                    running.discard(task)
                    if task.cancelled() or task.exception() is not None:
                        continue
                    if winner is None:
                        winner = task.result()
                    else:
                        task.result().close()
            return winner
        finally:
            for task in running:
                task.cancel()
            if running:
                results = await asyncio.gather(*running, return_exceptions=True)
                for result in results:
                    if isinstance(result, socket.socket):
                        result.close()

    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | None = None,
        port: int | str | None = None,
        *,
        ssl: Any = None,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        sock: socket.socket | None = None,
        local_addr: tuple[str, int] | None = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        happy_eyeballs_delay: float | None = None,
        interleave: int | None = None,
        all_errors: bool = False,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Connected:
        """Connect to a TCP server; return ``(transport, protocol)``.

        As asyncio's, plus ``idle_timeout`` (seconds) and ``deadline`` (an
        absolute ``loop.time()``), set before ``connection_made``.
        """
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl:
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        check_seconds("idle_timeout", idle_timeout)
        if sock is not None:
            _check_ssl_socket(sock)
        if happy_eyeballs_delay is not None and interleave is None:
            interleave = 1
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            infos = await self._ensure_resolved(
                (host, port), family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
            )
            if not infos:
                raise OSError("getaddrinfo() returned empty list")
            laddr_infos = None
            if local_addr is not None:
                laddr_infos = await self._ensure_resolved(
                    local_addr, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
                )
                if not laddr_infos:
                    raise OSError("getaddrinfo() returned empty list")
            if interleave:
                infos = _interleave(infos, interleave)
            exceptions: list[list[OSError]] = []
            if happy_eyeballs_delay is None:
                for info in infos:
                    try:
                        sock = await self._connect_sock(exceptions, info, laddr_infos)
                        break
                    except OSError:
                        continue
            else:
                sock = await self._happy_eyeballs(
                    [
                        functools.partial(self._connect_sock, exceptions, info, laddr_infos)
                        for info in infos
                    ],
                    happy_eyeballs_delay,
                )
            if sock is None:
                flat = [exc for sub in exceptions for exc in sub]
                if all_errors and sys.version_info >= (3, 11):
                    raise ExceptionGroup("create_connection failed", flat)  # noqa: F821
                if len(flat) == 1:
                    raise flat[0]
                model = str(flat[0])
                if all(str(exc) == model for exc in flat):
                    raise flat[0]
                raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in flat)}")
        else:
            if sock is None:
                raise ValueError("host and port was not specified and no sock specified")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            idle_timeout=idle_timeout,
            deadline=deadline,
        )

    async def create_unix_connection(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        path: str | None = None,
        *,
        ssl: Any = None,
        sock: socket.socket | None = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Connected:
        """Connect to a Unix stream socket; return ``(transport, protocol)``."""
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        check_seconds("idle_timeout", idle_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)
        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            idle_timeout=idle_timeout,
            deadline=deadline,
        )

    async def connect_accepted_socket(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        sock: socket.socket,
        *,
        ssl: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Connected:
        """Serve a connection accepted elsewhere; return ``(transport, protocol)``."""
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        check_seconds("idle_timeout", idle_timeout)
        _check_ssl_socket(sock)
        return await self._create_connection_transport(
            sock,
            protocol_factory,
            ssl,
            "",
            server_side=True,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            idle_timeout=idle_timeout,
            deadline=deadline,
        )

    # -- serving --------------------------------------------------------------------------

    def _accept_connection(self, server: Server, conn: socket.socket, addr: Any) -> None:
        """Serve one connection a listener of ``server`` accepted."""
        max_fd = self._max_fd
        if max_fd is not None and conn.fileno() >= max_fd:
            server.refused_out_of_range += 1
            logger.warning(
                "closing connection from %r: its fd %d is beyond what this loop's driver "
                "can watch (max_fd %d); use the poll, epoll or io_uring backend",
                addr,
                conn.fileno(),
                max_fd,
            )
            conn.close()
            return
        conn.setblocking(False)
        try:
            protocol = server.protocol_factory()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            conn.close()
            self.call_exception_handler(
                {
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc,
                }
            )
            return
        # The peer's address is asked of the socket when wanted (see
        # StreamTransport.get_extra_info): an idle connection does not keep it.
        extra = None
        if server.ssl:
            waiter = self.create_future()
            app, raw = self._make_ssl_transport(
                conn,
                protocol,
                server.ssl,
                waiter,
                server_side=True,
                extra=extra,
                server=server,
                ssl_handshake_timeout=server.ssl_handshake_timeout,
                ssl_shutdown_timeout=server.ssl_shutdown_timeout,
            )
            waiter.add_done_callback(functools.partial(self._ssl_accepted, app))
        else:
            raw = self._make_socket_transport(conn, protocol, None, extra, server)
        if server.idle_timeout is not None:
            raw.set_idle_timeout(server.idle_timeout)
        if server.lifetime is not None:
            raw.set_deadline(self.time() + server.lifetime)

    def _ssl_accepted(self, transport: asyncio.BaseTransport, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled() or waiter.exception() is None:
            return
        transport.close()
        if self._debug:
            self.call_exception_handler(
                {
                    "message": "Error on transport creation for incoming connection",
                    "exception": waiter.exception(),
                }
            )

    def _new_server(
        self,
        sockets: list[socket.socket],
        protocol_factory: ProtocolFactory,
        *,
        backlog: int,
        ssl: Any,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
        idle_timeout: float | None,
        lifetime: float | None,
        unix_path: str | None = None,
    ) -> Server:
        for sock in sockets:
            sock.setblocking(False)
        server = Server(
            self,
            sockets,
            protocol_factory,
            listen=self._listen,
            accept=self._accept_connection,
            clients=self._clients_of,
            backlog=backlog,
            ssl=ssl,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            idle_timeout=idle_timeout,
            lifetime=lifetime,
            unix_path=unix_path,
        )
        self._all_servers.add(server)
        return server

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | Iterable[str] | None = None,
        port: int | str | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: ssl_module.SSLContext | None = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        keep_alive: bool | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
    ) -> Server:
        """Listen on TCP ``host:port`` (every address it resolves to); return the Server.

        As asyncio's, plus ``idle_timeout`` and ``lifetime`` (seconds) for
        every accepted connection.
        """
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and ssl is None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and ssl is None:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        check_seconds("idle_timeout", idle_timeout)
        check_seconds("lifetime", lifetime)
        if sock is not None:
            _check_ssl_socket(sock)
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if reuse_address is None:
                reuse_address = True
            if host == "":
                hosts: list[Any] = [None]
            elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
                hosts = [host]
            else:
                hosts = list(host)
            resolved = await asyncio.gather(
                *[self._server_addresses(h, port, family, flags) for h in hosts]
            )
            infos = set(itertools.chain.from_iterable(resolved))
            sockets: list[socket.socket] = []
            completed = False
            try:
                for af, socktype, proto_, _, sa in infos:
                    try:
                        lsock = socket.socket(af, socktype, proto_)
                    except OSError:
                        if self._debug:
                            aio_logger.warning(
                                "create_server() failed to create socket.socket(%r, %r, %r)",
                                af,
                                socktype,
                                proto_,
                                exc_info=True,
                            )
                        continue
                    sockets.append(lsock)
                    if reuse_address:
                        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
                    if reuse_port:
                        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, True)
                    if keep_alive:
                        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
                    if af == socket.AF_INET6:
                        # Without this, [::] would also claim the IPv4 port bound next.
                        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
                    try:
                        lsock.bind(sa)
                    except OSError as err:
                        msg = (
                            f"error while attempting to bind on address {sa!r}: {str(err).lower()}"
                        )
                        if err.errno == errno.EADDRNOTAVAIL:
                            sockets.pop()
                            lsock.close()
                            if self._debug:
                                aio_logger.warning(msg)
                            continue
                        raise OSError(err.errno, msg) from None
                if not sockets:
                    raise OSError(
                        f"could not bind on any address out of {[info[4] for info in infos]!r}"
                    )
                completed = True
            finally:
                if not completed:
                    for lsock in sockets:
                        lsock.close()
        else:
            if sock is None:
                raise ValueError("Neither host/port nor sock were specified")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
            sockets = [sock]
        server = self._new_server(
            sockets,
            protocol_factory,
            backlog=backlog,
            ssl=ssl,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            idle_timeout=idle_timeout,
            lifetime=lifetime,
        )
        if start_serving:
            await server.start_serving()
        return server

    async def _server_addresses(
        self, host: str | None, port: Any, family: int, flags: int
    ) -> list[Any]:
        infos = await self._ensure_resolved(
            (host, port), family=family, type=socket.SOCK_STREAM, flags=flags
        )
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        return infos

    async def create_unix_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        path: str | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
        cleanup_socket: bool = True,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
    ) -> Server:
        """Listen on a Unix stream socket at ``path`` (a stale socket file is replaced)."""
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        check_seconds("idle_timeout", idle_timeout)
        check_seconds("lifetime", lifetime)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if path[:1] not in ("\0", ""):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    aio_logger.error(
                        "Unable to check or remove stale UNIX socket %r: %r", path, err
                    )
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            if cleanup_socket:
                try:
                    path = sock.getsockname()
                except OSError:
                    path = None
        server = self._new_server(
            [sock],
            protocol_factory,
            backlog=backlog,
            ssl=ssl,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            idle_timeout=idle_timeout,
            lifetime=lifetime,
            unix_path=path if cleanup_socket and isinstance(path, str) else None,
        )
        if start_serving:
            await server.start_serving()
        return server

    # -- datagrams ------------------------------------------------------------------------

    async def create_datagram_endpoint(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        local_addr: Any = None,
        remote_addr: Any = None,
        *,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        reuse_port: bool | None = None,
        allow_broadcast: bool | None = None,
        sock: socket.socket | None = None,
    ) -> tuple[asyncio.DatagramTransport, asyncio.BaseProtocol]:
        """Create a datagram endpoint; return ``(transport, protocol)``."""
        r_addr = None
        if sock is not None:
            if sock.type != socket.SOCK_DGRAM:
                raise ValueError(f"A UDP Socket was expected, got {sock!r}")
            if (
                local_addr
                or remote_addr
                or family
                or proto
                or flags
                or reuse_port
                or allow_broadcast
            ):
                opts = {
                    "local_addr": local_addr,
                    "remote_addr": remote_addr,
                    "family": family,
                    "proto": proto,
                    "flags": flags,
                    "reuse_port": reuse_port,
                    "allow_broadcast": allow_broadcast,
                }
                problems = ", ".join(f"{k}={v}" for k, v in opts.items() if v)
                raise ValueError(
                    "socket modifier keyword arguments can not be used "
                    f"when sock is specified. ({problems})"
                )
            sock.setblocking(False)
        else:
            sock, r_addr = await self._datagram_socket(
                local_addr, remote_addr, family, proto, flags, reuse_port, allow_broadcast
            )
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_datagram_transport(sock, protocol, r_addr, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def _datagram_socket(
        self,
        local_addr: Any,
        remote_addr: Any,
        family: int,
        proto: int,
        flags: int,
        reuse_port: bool | None,
        allow_broadcast: bool | None,
    ) -> tuple[socket.socket, Any]:
        if not (local_addr or remote_addr):
            if family == 0:
                raise ValueError("unexpected address family")
            pairs: list[Any] = [((family, proto), (None, None))]
        elif family == socket.AF_UNIX:
            for addr in (local_addr, remote_addr):
                if addr is not None and not isinstance(addr, str):
                    raise TypeError("string is expected")
            if local_addr and local_addr[0] not in (0, "\x00"):
                try:
                    if stat.S_ISSOCK(os.stat(local_addr).st_mode):
                        os.remove(local_addr)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    aio_logger.error(
                        "Unable to check or remove stale UNIX socket %r: %r", local_addr, err
                    )
            pairs = [((family, proto), (local_addr, remote_addr))]
        else:
            by_key: dict[tuple[int, int], list[Any]] = {}
            for idx, addr in ((0, local_addr), (1, remote_addr)):
                if addr is None:
                    continue
                if not (isinstance(addr, tuple) and len(addr) == 2):
                    raise TypeError("2-tuple is expected")
                infos = await self._ensure_resolved(
                    addr, family=family, type=socket.SOCK_DGRAM, proto=proto, flags=flags
                )
                if not infos:
                    raise OSError("getaddrinfo() returned empty list")
                for fam, _, pro, _, address in infos:
                    by_key.setdefault((fam, pro), [None, None])[idx] = address
            pairs = [
                (key, pair)
                for key, pair in by_key.items()
                if not ((local_addr and pair[0] is None) or (remote_addr and pair[1] is None))
            ]
            if not pairs:
                raise ValueError("can not get address information")
        exceptions: list[OSError] = []
        for (fam, pro), (local_address, remote_address) in pairs:
            sock = None
            try:
                sock = socket.socket(family=fam, type=socket.SOCK_DGRAM, proto=pro)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if allow_broadcast:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.setblocking(False)
                if local_addr:
                    sock.bind(local_address)
                r_addr = None
                if remote_addr:
                    if not allow_broadcast:
                        await self.sock_connect(sock, remote_address)
                    r_addr = remote_address
                return sock, r_addr
            except OSError as exc:
                if sock is not None:
                    sock.close()
                exceptions.append(exc)
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
        raise exceptions[0]

    # -- TLS ------------------------------------------------------------------------------

    async def start_tls(  # type: ignore[override]
        self,
        transport: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        sslcontext: ssl_module.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.BaseTransport:
        """Upgrade ``transport`` to TLS; return the new transport."""
        import ssl

        if not isinstance(sslcontext, ssl.SSLContext):
            raise TypeError(
                f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
            )
        if not getattr(transport, "_start_tls_compatible", False):
            raise TypeError(f"transport {transport!r} is not supported by start_tls()")
        waiter = self.create_future()
        options: dict[str, Any] = {
            "ssl_handshake_timeout": ssl_handshake_timeout,
            "call_connection_made": False,
        }
        if _SSL_SHUTDOWN_TIMEOUT:
            options["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname, **options
        )
        transport.pause_reading()  # type: ignore[attr-defined]
        transport.set_protocol(ssl_protocol)
        made = self.call_soon(ssl_protocol.connection_made, transport)
        resumed = self.call_soon(transport.resume_reading)  # type: ignore[attr-defined]
        try:
            await waiter
        except BaseException:
            transport.close()
            made.cancel()
            resumed.cancel()
            raise
        return ssl_protocol._app_transport

    # -- sendfile -------------------------------------------------------------------------

    @staticmethod
    def _check_sendfile_params(sock: Any, file: Any, offset: Any, count: Any) -> None:
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if sock is not None and sock.type != socket.SOCK_STREAM:
            raise ValueError("only SOCK_STREAM type sockets are supported")
        if count is not None:
            if not isinstance(count, int):
                raise TypeError(f"count must be a positive integer (got {count!r})")
            if count <= 0:
                raise ValueError(f"count must be a positive integer (got {count!r})")
        if not isinstance(offset, int):
            raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
        if offset < 0:
            raise ValueError(f"offset must be a non-negative integer (got {offset!r})")

    async def sock_sendfile(
        self,
        sock: socket.socket,
        file: Any,
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool | None = True,
    ) -> int:
        """Send ``file`` on ``sock`` (os.sendfile, or reading and sending); return bytes sent."""
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        _check_ssl_socket(sock)
        self._check_sendfile_params(sock, file, offset, count)
        try:
            return await self._sock_sendfile_native(sock, file, offset, count)
        except asyncio.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sock_sendfile_fallback(sock, file, offset, count)

    async def _sock_sendfile_fallback(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        if offset:
            file.seek(offset)
        block = min(count, SENDFILE_FALLBACK_SIZE) if count else SENDFILE_FALLBACK_SIZE
        buf = bytearray(block)
        total = 0
        try:
            while True:
                if count:
                    block = min(count - total, block)
                    if block <= 0:
                        break
                view = memoryview(buf)[:block]
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    break
                await self.sock_sendall(sock, view[:read])
                total += read
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)

    async def sendfile(
        self,
        transport: asyncio.WriteTransport,
        file: Any,
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool = True,
    ) -> int:
        """Send ``file`` over ``transport``; return bytes sent (as asyncio's)."""
        if transport.is_closing():
            raise RuntimeError("Transport is closing")
        mode = getattr(transport, "_sendfile_compatible", None) or _SendfileMode.UNSUPPORTED
        if mode is _SendfileMode.UNSUPPORTED:
            raise RuntimeError(f"sendfile is not supported for transport {transport!r}")
        if mode is _SendfileMode.TRY_NATIVE:
            try:
                native = transport._sendfile_native  # type: ignore[attr-defined]
                self._check_sendfile_params(None, file, offset, count)
                return int(await native(file, offset, count))
            except asyncio.SendfileNotAvailableError:
                if not fallback:
                    raise
        if not fallback:
            raise RuntimeError(
                f"fallback is disabled and native sendfile is not supported for "
                f"transport {transport!r}"
            )
        self._check_sendfile_params(None, file, offset, count)
        return await self._sendfile_fallback(transport, file, offset, count)

    async def _sendfile_fallback(
        self, transport: asyncio.WriteTransport, file: Any, offset: int, count: int | None
    ) -> int:
        file.seek(offset)  # from offset, as the native path, whatever the file position
        block = min(count, 16384) if count else 16384
        buf = bytearray(block)
        total = 0
        proto = _SendfileFallbackProtocol(transport)
        try:
            while True:
                if count:
                    block = min(count - total, block)
                    if block <= 0:
                        return total
                view = memoryview(buf)[:block]
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    return total
                await proto.drain()
                transport.write(view[:read])
                total += read
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)
            await proto.restore()

    # -- pipes and subprocesses -----------------------------------------------------------

    async def connect_read_pipe(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], pipe: Any
    ) -> tuple[asyncio.ReadTransport, asyncio.BaseProtocol]:
        """Read from ``pipe`` (a pipe, socket or character device) through a protocol."""
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = pipes.ReadPipeTransport(self, pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def connect_write_pipe(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], pipe: Any
    ) -> tuple[asyncio.WriteTransport, asyncio.BaseProtocol]:
        """Write to ``pipe`` (a pipe, socket or character device) through a transport."""
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = pipes.WritePipeTransport(self, pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def subprocess_exec(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        program: Any,
        *args: Any,
        stdin: Any = -1,
        stdout: Any = -1,
        stderr: Any = -1,
        universal_newlines: bool = False,
        shell: bool = False,
        bufsize: int = 0,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol]:
        """Run ``program`` with ``args``; return ``(transport, protocol)``."""
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if shell:
            raise ValueError("shell must be False")
        if bufsize != 0:
            raise ValueError("bufsize must be 0")
        if text:
            raise ValueError("text must be False")
        if encoding is not None:
            raise ValueError("encoding must be None")
        if errors is not None:
            raise ValueError("errors must be None")
        return await subprocess.start(
            self, protocol_factory, (program, *args), False, stdin, stdout, stderr, kwargs
        )

    async def subprocess_shell(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        cmd: bytes | str,
        *,
        stdin: Any = -1,
        stdout: Any = -1,
        stderr: Any = -1,
        universal_newlines: bool = False,
        shell: bool = True,
        bufsize: int = 0,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol]:
        """Run ``cmd`` in the shell; return ``(transport, protocol)``."""
        if not isinstance(cmd, (bytes, str)):
            raise ValueError("cmd must be a string")
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if not shell:
            raise ValueError("shell must be True")
        if bufsize != 0:
            raise ValueError("bufsize must be 0")
        if text:
            raise ValueError("text must be False")
        if encoding is not None:
            raise ValueError("encoding must be None")
        if errors is not None:
            raise ValueError("errors must be None")
        return await subprocess.start(
            self, protocol_factory, cmd, True, stdin, stdout, stderr, kwargs
        )

    # -- signals --------------------------------------------------------------------------

    def add_signal_handler(  # type: ignore[override]
        self, sig: int, callback: Callable[..., object], *args: Any
    ) -> None:
        """Run ``callback(*args)`` in the loop whenever signal ``sig`` arrives (main thread)."""
        if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        if self._closed:
            self._raise_closed()
        self._signals.add(sig, callback, args)

    def remove_signal_handler(self, sig: int) -> bool:
        """Stop handling ``sig`` (its default disposition comes back); whether it was handled."""
        return self._signals.remove(sig)

    # -- graceful shutdown ----------------------------------------------------------------

    def shutdown(self, grace: float = 10.0, drain: float = 5.0) -> asyncio.Future[None]:
        """Gracefully end every server and stream connection of this loop.

        Servers stop accepting (after accepting their backlog); connections
        are served until they close or ``grace`` seconds pass, then closed
        with their write buffers flushed; any still unflushed ``drain``
        seconds later are aborted with :class:`~iomux.reactor.ShutdownTimeout`.
        See :mod:`iomux.reactor.shutdown`. The future is done when no
        connection is left.
        """
        servers = [server for server in self._all_servers if server.sockets]
        shutdown = GracefulShutdown(
            self, servers, self._streams, lambda: self._stream_count, grace, drain
        )
        self._shutdowns.append(shutdown)
        shutdown.done.add_done_callback(lambda _: self._shutdowns.remove(shutdown))
        shutdown.start()
        return shutdown.done

    def install_shutdown_handlers(
        self,
        signals: tuple[int, ...] = (2, 15),
        *,
        grace: float = 10.0,
        drain: float = 5.0,
    ) -> None:
        """On SIGINT/SIGTERM (or ``signals``): :meth:`shutdown`, then :meth:`stop`.

        A second signal during the shutdown stops the loop at once.
        """
        state: dict[str, asyncio.Future[None]] = {}

        def on_signal() -> None:
            if "shutdown" in state:
                self.stop()
                return
            done = state["shutdown"] = self.shutdown(grace, drain)
            done.add_done_callback(lambda _: self.stop())

        for sig in signals:
            self.add_signal_handler(sig, on_signal)


class _SendfileFallbackProtocol(asyncio.Protocol):
    """Takes a transport's protocol role while sendfile writes the file through it."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._proto = transport.get_protocol()
        self._resume_reading = transport.is_reading()  # type: ignore[attr-defined]
        self._resume_writing = bool(getattr(transport, "_protocol_paused", False))
        transport.pause_reading()  # type: ignore[attr-defined]
        transport.set_protocol(self)
        loop = asyncio.get_running_loop()
        self._write_ready: asyncio.Future[Any] | None = (
            loop.create_future() if self._resume_writing else None
        )

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionError("Connection closed by peer")
        fut = self._write_ready
        if fut is not None:
            await fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raise RuntimeError("Invalid state: connection should have been established already.")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._write_ready is not None:
            self._write_ready.set_exception(exc or ConnectionError("Connection is closed by peer"))
        self._proto.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._write_ready is None:
            self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None:
            self._write_ready.set_result(False)
            self._write_ready = None

    def data_received(self, data: bytes) -> None:
        raise RuntimeError("Invalid state: reading should be paused")

    def eof_received(self) -> bool | None:
        raise RuntimeError("Invalid state: reading should be paused")

    async def restore(self) -> None:
        self._transport.set_protocol(self._proto)
        if self._resume_reading:
            self._transport.resume_reading()  # type: ignore[attr-defined]
        if self._write_ready is not None:
            self._write_ready.cancel()
        if self._resume_writing:
            self._proto.resume_writing()
