"""Opening client connections without blocking the reactor."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .futures import Future
    from .loop import Reactor
    from .transport import SocketTransport

AddrInfo = tuple[int, int, int, Any]
Connected = tuple["SocketTransport", asyncio.BaseProtocol]


def is_numeric_host(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 literal (resolving it cannot block)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.partition("%")[0])
        except OSError:
            continue
        return True
    return False


def resolve(
    reactor: Reactor, host: str | None, port: int, family: int, flags: int = 0
) -> Future[list[AddrInfo]]:
    """getaddrinfo for stream sockets; in a helper thread unless ``host`` is numeric."""
    done: Future[list[AddrInfo]] = reactor.create_future()

    def lookup() -> list[AddrInfo]:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags)
        return [(f, t, p, addr) for f, t, p, _, addr in infos]

    if host is None or is_numeric_host(host):
        try:
            done.set_result(lookup())
        except OSError as exc:
            done.set_exception(exc)
        return done

    def in_thread() -> None:
        try:
            result = lookup()
        except OSError as exc:
            reactor.call_soon_threadsafe(_settle, done, None, exc)
        else:
            reactor.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=in_thread, name="iomux-resolve", daemon=True).start()
    return done


def _settle(fut: Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class Connector:
    """Tries each address in turn until one connects; settles ``future``."""

    def __init__(
        self,
        reactor: Reactor,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        future: Future[Connected],
        *,
        local_addr: Any = None,
        setup: Callable[[SocketTransport], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._factory = protocol_factory
        self.future = future
        self._local_addr = local_addr
        self._setup = setup
        self._candidates: list[AddrInfo] = []
        self._errors: list[OSError] = []
        self._sock: socket.socket | None = None
        self._addr: Any = None
        future.add_done_callback(self._on_future_done)

    def start(self, candidates: list[AddrInfo]) -> None:
        """Begin with the first address."""
        if not candidates:
            self.future.set_exception(OSError(errno.EADDRNOTAVAIL, "no address to connect to"))
            return
        self._candidates = list(candidates)
        self._try_next()

    def _try_next(self) -> None:
        while self._candidates and not self.future.done():
            family, type_, proto, addr = self._candidates.pop(0)
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                if self._local_addr is not None:
                    sock.bind(self._local_addr)
                err = sock.connect_ex(addr)
                if err == 0:
                    self._connected(sock, addr)
                    return
                if err == errno.EINPROGRESS:
                    self._sock, self._addr = sock, addr
                    self._reactor._mux.register(sock, 2, self._on_writable)
                    return
                raise _connect_error(err, addr)
            except OSError as exc:
                sock.close()
                self._errors.append(exc)
        if not self.future.done():
            self.future.set_exception(_combine(self._errors))

    def _on_writable(self, mask: int) -> None:
        sock = self._sock
        assert sock is not None
        self._reactor._mux.unregister(sock)
        self._sock = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self._errors.append(_connect_error(err, self._addr))
            self._try_next()
            return
        self._connected(sock, self._addr)

    def _connected(self, sock: socket.socket, addr: Any) -> None:
        reactor = self._reactor
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            protocol = self._factory()
            transport = reactor._strategy.transport(sock, protocol, peername=addr)
        except BaseException as exc:
            sock.close()
            self.future.set_exception(exc)
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                raise
            return
        if self._setup is not None:
            self._setup(transport)
        transport._start()
        self.future.set_result((transport, protocol))

    def _on_future_done(self, future: Future[Connected]) -> None:
        if future.cancelled() and self._sock is not None:
            self._reactor._mux.unregister(self._sock)
            self._sock.close()
            self._sock = None


def _connect_error(err: int, addr: Any) -> OSError:
    # OSError(errno, ...) builds the matching subclass (ConnectionRefusedError ...).
    return OSError(err, f"connect to {addr!r} failed: {os.strerror(err)}")


def _combine(errors: list[OSError]) -> OSError:
    first = errors[0]
    if len(errors) == 1 or all(e.errno == first.errno for e in errors):
        return first
    return OSError(f"every address failed: {'; '.join(str(e) for e in errors)}")
