"""Readiness I/O: the loop waits on the multiplexer, then the transports call the socket.

This is the part of the loop that works on every driver (select, poll,
epoll, and io_uring, whose readiness comes from poll requests on its ring):

* ``add_reader``/``add_writer``/``remove_reader``/``remove_writer``: one
  reader and one writer callback per fd, run as :class:`asyncio.Handle`\\ s
  in the iteration the fd is reported ready, as asyncio does;
* the ``sock_*`` coroutines (``sock_recv``, ``sock_sendall``,
  ``sock_connect``, ``sock_accept``, ``sock_sendfile``...): try the call,
  and on ``EAGAIN`` wait for readiness;
* the readiness stream transport, dispatched straight from the wait's
  results (no handle per event), and the datagram transport.

Stream transports register in one of two modes, chosen per loop:

* LEVEL (the default): the registration follows what the transport wants,
  READ while reading and WRITE while its buffer holds data. One read per
  event; an echo-style exchange never changes the registration.
* EDGE (``Reactor(trigger=Trigger.EDGE)`` where the driver has it): the
  socket is registered once for READ|WRITE and never modified. Each event
  reads until EAGAIN, because a short read does not prove the socket is
  drained: an end of stream that came with the data would bring no new
  edge. After a few reads the rest is left to a callback, for fairness.
  Pausing only sets a flag; resuming schedules a read.

``write()`` first tries ``send()`` directly, as asyncio does, so a reply
that fits in the socket buffer never touches the buffer or the multiplexer.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import socket
import sys
import warnings
from asyncio import constants as aio_constants
from asyncio import trsock
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from iomux.multiplexer import Multiplexer, Trigger

from .base import aio_logger
from .network import NetworkReactor
from .speedups import install_write, speedups
from .transport import FlowControlMixin, StreamTransport

if TYPE_CHECKING:
    from .server import Server

logger = logging.getLogger("iomux.reactor")

#: Bytes asked of one ``recv()``. Larger sizes make glibc malloc use mmap for
#: each read's bytes object, which costs more than the read itself.
READ_SIZE = 64 * 1024
#: Bytes asked of one ``recvfrom()`` of a datagram transport (asyncio's).
DATAGRAM_SIZE = 256 * 1024

_READ = 1
_WRITE = 2
_BOTH = 3
# EDGE mode: reads per event before the rest is left to a callback.
_EDGE_READS = 4
# os.read and os.write on the socket's fd do what recv() and send() without
# flags do, with cheaper argument parsing: the per-message hot path.
_os_read = os.read
_os_write = os.write
_SendfileMode = aio_constants._SendfileMode
#: A stream transport's write buffer while nothing waits (immutable: shared).
_NO_BUFFER = b""


def _read_failed(transport: ReadinessStreamTransport, exc: BaseException) -> None:
    transport._fatal_error(exc, "Fatal read error on socket transport")


def _data_received_failed(transport: ReadinessStreamTransport, exc: BaseException) -> None:
    transport._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")


# asyncio 3.13 sends empty datagrams; earlier versions drop them.
_EMPTY_DATAGRAMS_DROPPED = sys.version_info < (3, 13)
# asyncio 3.13 counts 8 header bytes per queued datagram.
_DATAGRAM_OVERHEAD = 8 if sys.version_info >= (3, 13) else 0


class _Watch:
    """The reader and writer handles of one fd watched with add_reader/add_writer."""

    __slots__ = ("_loop", "fd", "reader", "writer")

    def __init__(self, loop: ReadinessReactor, fd: int) -> None:
        self._loop = loop
        self.fd = fd
        self.reader: asyncio.Handle | None = None
        self.writer: asyncio.Handle | None = None

    def _on_event(self, mask: int) -> None:
        ready = self._loop._ready
        reader, writer = self.reader, self.writer
        if mask & _READ and reader is not None:
            if reader._cancelled:
                self._loop._remove_reader(self.fd)
            else:
                ready.append(reader)
        if mask & _WRITE and writer is not None:
            if writer._cancelled:
                self._loop._remove_writer(self.fd)
            else:
                ready.append(writer)


def _fileno(fileobj: Any) -> int:
    if isinstance(fileobj, int):
        return fileobj
    try:
        return int(fileobj.fileno())
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"Invalid file object: {fileobj!r}") from None


def _check_ssl_socket(sock: Any) -> None:
    import ssl

    if isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


class ReadinessReactor(NetworkReactor):
    """The readiness half of an iomux loop (see the module docstring)."""

    def __init__(self, mux: Multiplexer, *, trigger: Trigger | None = None) -> None:
        super().__init__()
        self._mux = mux
        if trigger is None:
            trigger = Trigger.LEVEL
        if trigger not in (Trigger.LEVEL, Trigger.EDGE):
            raise ValueError(
                f"stream transports register with Trigger.LEVEL or EDGE, not {trigger}"
            )
        if trigger not in mux.capabilities.triggers:
            names = ", ".join(sorted(str(t) for t in mux.capabilities.triggers))
            raise ValueError(
                f"the {mux.name} driver does not support {trigger}; it supports {names}"
            )
        self._edge = trigger is Trigger.EDGE
        self._watches: dict[int, _Watch] = {}
        built = speedups()
        self._ready_dispatcher: Callable[[Any], None] | None = None
        if built is not None:
            self._ready_dispatcher = built.ReadyDispatcher(
                ReadinessStreamTransport,
                self._handle_ready,
                _read_failed,
                _data_received_failed,
                READ_SIZE,
            )
        # fds a transport lends to the sock_* methods meanwhile (sendfile).
        self._lent_fds: set[int] = set()

    @property
    def trigger(self) -> Trigger:
        """How readiness stream transports register: ``Trigger.LEVEL`` or ``Trigger.EDGE``."""
        return Trigger.EDGE if self._edge else Trigger.LEVEL

    # -- waiting ------------------------------------------------------------------

    def _process_io(self, timeout: float | None) -> None:
        # What the loop registers with the multiplexer is the object that
        # handles the fd's events (a watch, a listener, a transport): it is
        # told with its _on_event(mask), so no bound method is kept per fd.
        ready = self._mux.ready(timeout)
        dispatcher = self._ready_dispatcher
        if dispatcher is not None:
            dispatcher(ready)  # plain stream transports' reads in C, the rest in _handle_ready
            return
        handle = self._handle_ready
        for _fd, mask, target in ready:
            handle(target, mask)

    def _handle_ready(self, target: Any, mask: int) -> None:
        try:
            target._on_event(mask)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.call_exception_handler(
                {"message": f"exception handling I/O of {target!r}", "exception": exc}
            )

    def _wake(self) -> None:
        self._mux.wakeup()

    # -- add_reader and friends ---------------------------------------------------

    def _ensure_fd_no_transport(self, fd: Any) -> None:
        fileno = _fileno(fd)
        transport = self._transports.get(fileno)
        if transport is not None and not transport.is_closing() and fileno not in self._lent_fds:
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        """Call ``callback(*args)`` whenever ``fd`` is readable."""
        self._ensure_fd_no_transport(fd)
        self._add_reader(fd, callback, *args)

    def add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:  # type: ignore[override]
        """Call ``callback(*args)`` whenever ``fd`` is writable."""
        self._ensure_fd_no_transport(fd)
        self._add_writer(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        """Stop watching ``fd`` for reading; return whether it was watched."""
        self._ensure_fd_no_transport(fd)
        return self._remove_reader(fd)

    def remove_writer(self, fd: Any) -> bool:
        """Stop watching ``fd`` for writing; return whether it was watched."""
        self._ensure_fd_no_transport(fd)
        return self._remove_writer(fd)

    def _add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> asyncio.Handle:
        return self._add_watch(fd, callback, args, reading=True)

    def _add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> asyncio.Handle:
        return self._add_watch(fd, callback, args, reading=False)

    def _add_watch(
        self, fd: Any, callback: Callable[..., object], args: tuple[Any, ...], *, reading: bool
    ) -> asyncio.Handle:
        if self._closed:
            self._raise_closed()
        fileno = _fileno(fd)
        handle = asyncio.Handle(callback, args, self, None)
        watch = self._watches.get(fileno)
        if watch is None:
            watch = _Watch(self, fileno)
            self._mux.register(fd, _READ if reading else _WRITE, watch)
            self._watches[fileno] = watch
            old = None
        else:
            old = watch.reader if reading else watch.writer
            mask = (_READ if reading or watch.reader else 0) | (
                _WRITE if not reading or watch.writer else 0
            )
            self._mux.modify(fileno, mask, watch)
        if reading:
            watch.reader = handle
        else:
            watch.writer = handle
        if old is not None:
            old.cancel()
        return handle

    def _remove_reader(self, fd: Any) -> bool:
        return self._remove_watch(fd, reading=True)

    def _remove_writer(self, fd: Any) -> bool:
        return self._remove_watch(fd, reading=False)

    def _remove_watch(self, fd: Any, *, reading: bool) -> bool:
        if self._closed:
            return False
        fileno = _fileno(fd)
        watch = self._watches.get(fileno)
        if watch is None:
            return False
        handle = watch.reader if reading else watch.writer
        other = watch.writer if reading else watch.reader
        if reading:
            watch.reader = None
        else:
            watch.writer = None
        if other is None:
            del self._watches[fileno]
            try:
                self._mux.unregister(fileno)
            except KeyError:
                pass
        elif handle is not None:
            self._mux.modify(fileno, _WRITE if reading else _READ, watch)
        if handle is None:
            return False
        handle.cancel()
        return True

    # -- sock_* -------------------------------------------------------------------

    def _check_sock(self, sock: socket.socket) -> None:
        _check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    def _wait_readable(
        self,
        sock: socket.socket,
        attempt: Callable[[], Any],
        *,
        writing: bool = False,
    ) -> asyncio.Future[Any]:
        """A future settled by ``attempt()`` once it stops raising BlockingIOError.

        ``attempt`` runs whenever ``sock`` is ready (readable, or writable
        with ``writing``); the registration goes when the future is done,
        cancelled included.
        """
        fut = self.create_future()
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)

        def ready() -> None:
            if fut.done():
                return
            try:
                result = attempt()
            except (BlockingIOError, InterruptedError):
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                if result is not _AGAIN:
                    fut.set_result(result)

        handle = self._add_writer(fd, ready) if writing else self._add_reader(fd, ready)

        def done(_: asyncio.Future[Any]) -> None:
            if not handle.cancelled():
                if writing:
                    self._remove_writer(fd)
                else:
                    self._remove_reader(fd)

        fut.add_done_callback(done)
        return fut

    async def sock_recv(self, sock: socket.socket, nbytes: int) -> bytes:
        """Receive up to ``nbytes`` from ``sock`` (waiting for readability)."""
        self._check_sock(sock)
        try:
            return sock.recv(nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._wait_readable(sock, lambda: sock.recv(nbytes))  # type: ignore[no-any-return]

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        """Receive into ``buf`` from ``sock``; return the byte count."""
        self._check_sock(sock)
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._wait_readable(sock, lambda: sock.recv_into(buf))  # type: ignore[no-any-return]

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, Any]:
        """Receive a datagram of up to ``bufsize`` bytes; return ``(data, address)``."""
        self._check_sock(sock)
        try:
            return sock.recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._wait_readable(sock, lambda: sock.recvfrom(bufsize))  # type: ignore[no-any-return]

    async def sock_recvfrom_into(
        self, sock: socket.socket, buf: Any, nbytes: int = 0
    ) -> tuple[int, Any]:
        """Receive a datagram into ``buf``; return ``(nbytes, address)``."""
        self._check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        try:
            return sock.recvfrom_into(buf, nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._wait_readable(sock, lambda: sock.recvfrom_into(buf, nbytes))  # type: ignore[no-any-return]

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        """Send all of ``data`` on ``sock``, waiting for writability as needed."""
        self._check_sock(sock)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        if sent == len(view):
            return
        position = [sent]

        def attempt() -> object:
            position[0] += sock.send(view[position[0] :])
            return None if position[0] == len(view) else _AGAIN

        await self._wait_readable(sock, attempt, writing=True)

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        """Send a datagram to ``address``; return the byte count."""
        self._check_sock(sock)
        try:
            return sock.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._wait_readable(sock, lambda: sock.sendto(data, address), writing=True)  # type: ignore[no-any-return]

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        """Connect ``sock`` to ``address`` (resolved first for IP sockets)."""
        self._check_sock(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto
            )
            address = resolved[0][4]
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass

        def connected() -> None:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == errno.EINPROGRESS:
                raise BlockingIOError(err, "still connecting")
            if err != 0:
                raise OSError(err, f"Connect call failed {address}")

        await self._wait_readable(sock, connected, writing=True)

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        """Accept a connection on the listening ``sock``; the new one is non-blocking."""
        self._check_sock(sock)

        def accept() -> tuple[socket.socket, Any]:
            conn, address = sock.accept()
            conn.setblocking(False)
            return conn, address

        try:
            return accept()
        except (BlockingIOError, InterruptedError):
            pass
        return await self._wait_readable(sock, accept)  # type: ignore[no-any-return]

    async def _sock_sendfile_native(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise asyncio.SendfileNotAvailableError("not a regular file") from None
        try:
            size = os.fstat(fileno).st_size
        except OSError:
            raise asyncio.SendfileNotAvailableError("not a regular file") from None
        block = count if count else size
        if not block:
            return 0
        end = offset + count if count else None
        state = {"offset": offset, "sent": 0}

        def attempt() -> object:
            at = state["offset"]
            want = min(block, end - at) if end is not None else block
            if want <= 0:
                return state["sent"]
            try:
                n = os.sendfile(sock.fileno(), fileno, at, want)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    raise BlockingIOError(exc.errno, exc.strerror) from None
                if exc.errno == errno.ENOTSOCK or (
                    state["sent"] == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS)
                ):
                    raise asyncio.SendfileNotAvailableError("os.sendfile call failed") from None
                raise
            if n == 0:
                return state["sent"]  # end of file
            state["offset"] = at + n
            state["sent"] += n
            return _AGAIN

        try:
            while True:
                try:
                    result: object = attempt()
                except BlockingIOError:
                    result = await self._wait_readable(sock, attempt, writing=True)
                if result is not _AGAIN:
                    assert isinstance(result, int)
                    return result
        finally:
            if state["sent"] > 0:
                os.lseek(fileno, state["offset"], os.SEEK_SET)

    # -- transports ---------------------------------------------------------------

    def _make_readiness_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> ReadinessStreamTransport:
        return ReadinessStreamTransport(self, sock, protocol, waiter, extra, server, self._edge)

    def _make_datagram_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> DatagramTransport:
        return DatagramTransport(self, sock, protocol, address, waiter, extra)

    def _listen_by_readiness(self, server: Server, sock: socket.socket) -> ReadinessListener:
        return ReadinessListener(self, server, sock)

    def _close_io(self) -> None:
        for fd in list(self._watches):
            watch = self._watches.pop(fd)
            for handle in (watch.reader, watch.writer):
                if handle is not None:
                    handle.cancel()
        self._mux.close()


# Returned by a sock_* attempt that made progress but is not finished.
_AGAIN = object()
#: Seconds to stop accepting after running out of fds or memory.
ACCEPT_RETRY_DELAY = 0.1
#: Connections accepted per readiness event before the rest wait for the next.
ACCEPT_BATCH = 128
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The connection died in the backlog: skip it and accept the next.
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class AcceptBackoff:
    """What to do when accepting fails for lack of fds or memory (EMFILE and friends).

    The pending connection stays in the kernel's backlog and the socket
    stays readable, so retrying at once would spin. A listener instead stops
    accepting for ``delay`` seconds, logs once per episode, then tries again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float = ACCEPT_RETRY_DELAY) -> None:
        self._loop = loop
        self.delay = delay
        self._starved = False
        #: How many times accepting was paused for lack of resources.
        self.pauses = 0

    def succeeded(self) -> None:
        """An accept worked: the next failure starts a new episode."""
        self._starved = False

    def failed(self, exc: OSError, sock: socket.socket, retry: Callable[[], None]) -> None:
        """Accepting failed with ``exc``: call ``retry`` after the delay."""
        if not self._starved:
            self._starved = True
            logger.warning(
                "accept() on %s failed: %s; pausing accepts for %.0f ms at a time until it "
                "succeeds",
                _describe(sock),
                exc.strerror or exc,
                self.delay * 1e3,
            )
        self.pauses += 1
        self._loop.call_later(self.delay, retry)


def _describe(sock: socket.socket) -> str:
    try:
        return repr(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"


class ReadinessListener:
    """Accepts on one listening socket when it is readable; hands connections to the server."""

    def __init__(self, loop: ReadinessReactor, server: Server, sock: socket.socket) -> None:
        self._loop = loop
        self._server = server
        self._sock = sock
        self._watching = False
        self._closed = False
        self._backing_off = False
        self.backoff = AcceptBackoff(loop)

    def start(self) -> None:
        """Watch the socket for incoming connections."""
        if not self._watching and not self._closed and not self._backing_off:
            self._loop._mux.register(self._sock, _READ, self)
            self._watching = True

    def _stop(self) -> None:
        if self._watching:
            self._watching = False
            try:
                self._loop._mux.unregister(self._sock)
            except KeyError:
                pass

    def close(self) -> None:
        """Stop watching and close the socket."""
        self._stop()
        self._closed = True
        self._sock.close()

    def accept_pending(self) -> None:
        """Accept every connection already waiting in the backlog."""
        while not self._closed and self._accept_some():
            pass

    def _on_event(self, mask: int) -> None:
        self._accept_some()

    def _accept_some(self) -> bool:
        """Accept up to one batch; return True if the backlog may hold more."""
        sock = self._sock
        accepted = self._server.accepted
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                if exc.errno in _OUT_OF_RESOURCES:
                    self._stop()
                    self._backing_off = True
                    self.backoff.failed(exc, sock, self._retry)
                else:
                    self._loop.call_exception_handler(
                        {
                            "message": "socket.accept() failed",
                            "exception": exc,
                            "socket": trsock.TransportSocket(sock),
                        }
                    )
                return False
            self.backoff.succeeded()
            accepted(conn, addr)
        return True

    def _retry(self) -> None:
        self._backing_off = False
        if not self._closed:
            self.start()


class ReadinessStreamTransport(StreamTransport):
    """A TCP or Unix stream transport driven by readiness (see the module docstring)."""

    __slots__ = (
        "_buffer",
        "_edge",
        "_empty_waiter",
        "_io",
        "_mux",
        "_read_eof",
        "_reg",
        "_started",
    )
    _sendfile_compatible = _SendfileMode.TRY_NATIVE

    def __init__(
        self,
        loop: ReadinessReactor,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None,
        extra: dict[str, Any] | None,
        server: Server | None,
        edge: bool,
    ) -> None:
        super().__init__(loop, sock, protocol, extra, server)
        self._io = loop
        self._mux = loop._mux
        # What the socket did not take yet; while nothing waits, the shared
        # empty bytes (an idle connection holds no buffer of its own).
        self._buffer: bytearray | bytes = _NO_BUFFER
        self._edge = edge
        self._reg = 0
        self._started = False
        self._read_eof = False
        self._empty_waiter: asyncio.Future[None] | None = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._connection_made(waiter)

    # -- registration -----------------------------------------------------------

    def _start_reading(self) -> None:
        self._started = True
        if self._sock is None:
            return
        if self._edge:
            if not self._reg:
                self._mux.register(self._sock_fd, _BOTH, self, trigger=Trigger.EDGE)
                self._reg = _BOTH
        else:
            self._update()

    def _update(self) -> None:
        """LEVEL mode: make the registration match what the transport wants."""
        if self._edge or self._sock is None:
            return
        want = (
            _READ
            if self._started and not self._closing and not self._paused and not self._read_eof
            else 0
        ) | (_WRITE if self._buffer else 0)
        have = self._reg
        if want == have:
            return
        if not have:
            self._mux.register(self._sock_fd, want, self)
        elif not want:
            self._mux.unregister(self._sock_fd)
        else:
            self._mux.modify(self._sock_fd, want, self)
        self._reg = want

    # -- events -------------------------------------------------------------------

    def _on_event(self, mask: int) -> None:
        # mask is 1 (READ), 2 (WRITE) or 3; int comparisons are the cheap test.
        if mask != _WRITE and not self._closing and not self._paused and not self._read_eof:
            if self._edge:
                self._read_more()
            elif self._buffered:
                self._read_buffered()
            else:
                self._read()
        if mask >= _WRITE and self._buffer:
            self._write_ready()

    def _read(self) -> bool:
        """Read once; return whether a further read may find more."""
        try:
            data = _os_read(self._sock_fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return False
        if not data:
            self._on_eof()
            return False
        if (deadlines := self._deadlines) is not None:
            deadlines.last_io = self._loop.time()
        try:
            self._context.run(self._protocol.data_received, data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
            return False
        return True

    def _read_buffered(self) -> bool:
        """Read once into the protocol's buffer; return whether more may follow."""
        context = self._context
        protocol = self._protocol
        try:
            buf = context.run(protocol.get_buffer, -1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return False
        try:
            n = self._sock.recv_into(buf)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return False
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return False
        if not n:
            self._on_eof()
            return False
        if (deadlines := self._deadlines) is not None:
            deadlines.last_io = self._loop.time()
        try:
            context.run(protocol.buffer_updated, n)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
            return False
        return True

    def _read_more(self) -> None:
        """EDGE mode: read until EAGAIN, deferring to a callback after a few reads."""
        read = self._read_buffered if self._buffered else self._read
        for _ in range(_EDGE_READS):
            if self._closing or self._paused or self._read_eof or not read():
                return
        if not self._closing and not self._paused and not self._read_eof:
            self._loop.call_soon(self._read_more)

    def _on_eof(self) -> None:
        self._read_eof = True
        self._update()
        try:
            keep_open = self._context.run(self._protocol.eof_received)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    # -- writing --------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, buffering what the socket does not take at once."""
        if (
            type(data) is not bytes
            or self._buffer
            or self._eof
            or self._conn_lost
            or self._empty_waiter is not None
            or not data
        ):
            self._write_slow(data)
            return
        try:
            n = _os_write(self._sock_fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal write error on socket transport")
            return
        if n:
            if (deadlines := self._deadlines) is not None:
                deadlines.last_io = self._loop.time()
            if n == len(data):
                return
        self._buffer_rest(data, n)

    def _buffer_rest(self, data: bytes, sent: int) -> None:
        """The socket took ``sent`` bytes of ``data`` (with nothing buffered): keep the rest."""
        self._buffer = bytearray(memoryview(data)[sent:])
        self._update()
        self._maybe_pause_protocol()

    def _write_slow(self, data: Any) -> None:
        if self._empty_waiter is not None and isinstance(data, (bytes, bytearray, memoryview)):
            raise RuntimeError("unable to write; sendfile is in progress")
        if not self._check_write(data):
            return
        if not self._buffer:
            try:
                n = self._sock.send(data)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            if n and (deadlines := self._deadlines) is not None:
                deadlines.last_io = self._loop.time()
            view = memoryview(data).cast("B")[n:]
            if not view:
                return
            self._buffer = bytearray(view)
            self._update()
        else:
            self._buffer += data  # a bytearray: it holds bytes
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        if self._conn_lost or self._sock is None:
            return
        buffer = self._buffer
        try:
            n = self._sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._buffer = _NO_BUFFER
            self._update()
            self._fatal_error(exc, "Fatal write error on socket transport")
            if self._empty_waiter is not None:
                self._empty_waiter.set_exception(exc)
            return
        if n:
            if n == len(buffer):
                self._buffer = _NO_BUFFER
            else:
                del buffer[:n]  # type: ignore[union-attr]
            if (deadlines := self._deadlines) is not None:
                deadlines.last_io = self._loop.time()
        self._maybe_resume_protocol()  # may write more
        if not self._buffer:
            self._update()
            if self._empty_waiter is not None:
                self._empty_waiter.set_result(None)
            if self._closing:
                self._lost(None)
            elif self._eof:
                self._shutdown_write()

    def _shutdown_write(self) -> None:
        self._keep_socket_info()  # names are gone once both ends shut down
        try:
            self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError as exc:
            self._fatal_error(exc, "Fatal error on socket shutdown")

    def write_eof(self) -> None:
        """Shut down the sending side once the buffer is flushed."""
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._keep_socket_info()
            self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by ``write()`` and not yet taken by the kernel."""
        return len(self._buffer)

    # -- reading control --------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading`."""
        if self._closing or self._paused:
            return
        self._paused = True
        self._update()

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        if self._closing or not self._paused:
            return
        self._paused = False
        self._update()
        if self._edge and self._started:
            # Data that arrived while paused brings no new edge.
            self._loop.call_soon(self._read_more)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading, flush the write buffer, then ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._update()
        if not self._buffer:
            self._lost(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        if self._buffer:
            self._reset_if_dropping()
            self._buffer = _NO_BUFFER
        self._closing = True
        self._update()
        self._lost(exc)

    def _release(self) -> None:
        if self._reg:
            self._reg = 0
            try:
                self._mux.unregister(self._sock_fd)
            except (KeyError, OSError):
                pass
        super()._release()

    # -- sendfile -----------------------------------------------------------------------

    async def _sendfile_native(self, file: Any, offset: int, count: int | None) -> int:
        """Send ``file`` with os.sendfile once the write buffer is empty."""
        io_ = self._io
        resume = self.is_reading()
        self.pause_reading()
        if self._buffer:
            self._empty_waiter = self._loop.create_future()
            try:
                await self._empty_waiter
            finally:
                self._empty_waiter = None
        sock = self._sock
        if sock is None or self._closing:
            raise ConnectionError("the connection closed before sendfile could start")
        registered = self._reg
        if registered:
            self._mux.unregister(self._sock_fd)
            self._reg = 0
        io_._lent_fds.add(self._sock_fd)
        self._empty_waiter = self._loop.create_future()  # write() refuses meanwhile
        try:
            return await io_._sock_sendfile_native(sock, file, offset, count)
        finally:
            self._empty_waiter = None
            io_._lent_fds.discard(self._sock_fd)
            if self._edge and registered and self._sock is not None:
                self._mux.register(self._sock_fd, _BOTH, self, trigger=Trigger.EDGE)
                self._reg = _BOTH
            else:
                self._update()
            if resume:
                self.resume_reading()


def _write_failed(transport: ReadinessStreamTransport, exc: BaseException) -> None:
    transport._fatal_error(exc, "Fatal write error on socket transport")


install_write(
    ReadinessStreamTransport, "WriteMethod", ReadinessStreamTransport._buffer_rest, _write_failed
)


class DatagramTransport(FlowControlMixin, asyncio.DatagramTransport):
    """A UDP (or Unix datagram) transport driven by readiness, as asyncio's."""

    __slots__ = (
        "__weakref__",
        "_address",
        "_buffer",
        "_buffer_size",
        "_closing",
        "_conn_lost",
        "_io",
        "_sock",
        "_sock_fd",
    )

    def __init__(
        self,
        loop: ReadinessReactor,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any,
        waiter: asyncio.Future[Any] | None,
        extra: dict[str, Any] | None,
    ) -> None:
        super().__init__(extra, loop)
        info = self._extra
        info["socket"] = trsock.TransportSocket(sock)
        try:
            info["sockname"] = sock.getsockname()
        except OSError:
            info["sockname"] = None
        if "peername" not in info:
            try:
                info["peername"] = sock.getpeername()
            except OSError:
                info["peername"] = None
        self._io = loop
        self._sock: socket.socket | None = sock
        self._sock_fd = sock.fileno()
        self._protocol = protocol
        self._address = address
        self._buffer: deque[tuple[bytes, Any]] = deque()
        self._buffer_size = 0
        self._closing = False
        self._conn_lost = 0
        loop._transports.add(self._sock_fd, self)
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)

    def _start_reading(self) -> None:
        if not self._closing:
            self._io._add_reader(self._sock_fd, self._read_ready)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        return self._protocol  # type: ignore[no-any-return]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the endpoint to another protocol."""
        self._protocol = protocol

    def is_closing(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called."""
        return self._closing

    def get_write_buffer_size(self) -> int:
        """Bytes of datagrams waiting to be sent."""
        return self._buffer_size

    def _read_ready(self) -> None:
        if self._conn_lost or self._sock is None:
            return
        try:
            data, addr = self._sock.recvfrom(DATAGRAM_SIZE)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._protocol.error_received(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
        else:
            self._protocol.datagram_received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Send ``data`` to ``addr`` (or the connected address)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data and _EMPTY_DATAGRAMS_DROPPED:
            return
        if self._address:
            if addr not in (None, self._address):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = self._address
        if self._conn_lost and self._address:
            if self._conn_lost >= aio_constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                aio_logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        sock = self._sock
        if not self._buffer and sock is not None:
            try:
                if self._extra["peername"]:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._io._add_writer(self._sock_fd, self._sendto_ready)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return
        self._buffer.append((bytes(data), addr))
        self._buffer_size += len(data) + _DATAGRAM_OVERHEAD
        self._maybe_pause_protocol()

    def _sendto_ready(self) -> None:
        sock = self._sock
        while self._buffer and sock is not None:
            data, addr = self._buffer.popleft()
            self._buffer_size -= len(data) + _DATAGRAM_OVERHEAD
            try:
                if self._extra["peername"]:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._buffer.appendleft((data, addr))
                self._buffer_size += len(data) + _DATAGRAM_OVERHEAD
                break
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return
        self._maybe_resume_protocol()
        if not self._buffer:
            self._io._remove_writer(self._sock_fd)
            if self._closing:
                self._call_connection_lost(None)

    def close(self) -> None:
        """Stop receiving; ``connection_lost(None)`` once queued datagrams are sent."""
        if self._closing:
            return
        self._closing = True
        self._io._remove_reader(self._sock_fd)
        if not self._buffer:
            self._conn_lost += 1
            self._io._remove_writer(self._sock_fd)
            self._io.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        """Close at once, dropping queued datagrams."""
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):
            if self._io.get_debug():
                aio_logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._io.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._buffer_size = 0
            self._io._remove_writer(self._sock_fd)
        if not self._closing:
            self._closing = True
            self._io._remove_reader(self._sock_fd)
        self._conn_lost += 1
        self._io.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            sock, self._sock = self._sock, None
            self._io._transports.discard(self._sock_fd, self)
            if sock is not None:
                sock.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "closing" if self._closing else "open"
        return f"<DatagramTransport fd={self._sock_fd} {state}>"


def _set_result_unless_cancelled(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)
