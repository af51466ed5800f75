"""Completion I/O: stream connections whose bytes the driver moves (io_uring).

Instead of waiting for readiness and then calling ``recv``/``send``, the
loop's completion transports ask the driver's completion port
(:mod:`iomux.completion`) for operations on their connection's *slot*:
receive, pause, send, shut down, close. The requests of one loop
iteration reach the kernel together, in the one system call of the
multiplexer's next ``poll()``, which also reaps every completion; the port
then hands the loop one array of events, and :meth:`CompletionIO.dispatch`
makes one step per event: ``data_received`` for each received message,
found by slot in a list. Sends cost nothing per completion in Python: the
port keeps what is not sent yet and reports only what flow control needs.

Listeners accept with the port too (a multishot accept per socket), and
pause for a while when the process runs out of fds, as readiness listeners
do. A slot's socket is closed only after the port reported it ``CLOSED``,
when no operation can still use its fd.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from iomux import completion as port_events
from iomux.completion import SEND_PAIR, CompletionPort
from iomux.multiplexer import Multiplexer

from .readiness import _OUT_OF_RESOURCES, _TRANSIENT, ACCEPT_BATCH, AcceptBackoff
from .speedups import install_write, speedups
from .transport import StreamTransport

if TYPE_CHECKING:
    from .server import Server

_DATA = port_events.DATA
_EOF = port_events.EOF
_ERROR = port_events.ERROR
_SENT = port_events.SENT
_DRAINED = port_events.DRAINED
_CLOSED = port_events.CLOSED
_ACCEPTED = port_events.ACCEPTED
_ACCEPT_END = port_events.ACCEPT_END
_BACKLOG = port_events.BACKLOG
_send_pair = SEND_PAIR.pack
#: write() pauses the protocol at once, before the kernel had its chance,
#: only when this much (or 16 high-water marks) waits to be sent: a writer
#: that never yields to the loop must still be stopped.
HARD_BACKLOG = 4 * 1024 * 1024
#: Bytes of held data delivered per loop iteration after resume_reading (what
#: the port delivers to one connection per iteration at most).
HELD_PER_ITERATION = 64 * 1024
_SendfileMode = asyncio.constants._SendfileMode


def _looked_up(protocol: Any, data: bytes) -> object:
    return protocol.data_received(data)


def _data_received_of(protocol: Any) -> Callable[[Any, bytes], object]:
    """``protocol.data_received`` as a function of ``(protocol, data)``.

    Where it is a method bound to the protocol (the usual case), its
    function: shared by every connection of the class, where a bound method
    kept per connection costs 64 bytes. Anything else (a function the
    instance holds, a static method, a C method) is looked up at each call.
    """
    method = getattr(protocol, "data_received", None)
    func = getattr(method, "__func__", None)
    if func is None or getattr(method, "__self__", None) is not protocol:
        return _looked_up
    return func  # type: ignore[no-any-return]


def _data_received_failed(transport: CompletionStreamTransport, exc: BaseException) -> None:
    transport._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")


def _error(res: int) -> OSError:
    """The OSError subclass for a negative result."""
    return OSError(-res, os.strerror(-res))


class CompletionIO:
    """The loop's completion I/O on one multiplexer (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mux: Multiplexer,
        wait_writable: Callable[[int], Awaitable[None]],
    ) -> None:
        self._loop = loop
        self._mux = mux
        #: ``await wait_writable(fd)``: until ``fd`` is writable (for sendfile).
        self.wait_writable = wait_writable
        self._port: CompletionPort | None = None
        #: slot -> the transport or listener using it (None: see _weak).
        self._slots: list[Any] = []
        #: slot -> weak reference to an idle transport (see _idle).
        self._weak: dict[int, weakref.ReferenceType[Any]] = {}
        #: slot -> fd of a collected transport, closed once the slot is CLOSED.
        self._orphans: dict[int, int] = {}
        #: Set when the loop closed (the ring, and every operation, went with it).
        self.closed = False
        #: The data area of the events being dispatched.
        self._data: Any = b""
        self._dispatcher: Callable[[Any, Any], None] | None = None
        built = speedups()
        if built is not None:
            self._dispatcher = built.Dispatcher(
                CompletionStreamTransport, self._slots, self._handle, _data_received_failed
            )

    def port(self) -> CompletionPort:
        """The driver's completion port (asked for on first use)."""
        port = self._port
        if port is None:
            port = self._port = self._mux.completion_port()
        return port

    def _take(self, slot: int, owner: Any) -> None:
        slots = self._slots
        while len(slots) <= slot:
            slots.append(None)
        slots[slot] = owner

    def _closed(self, slot: int) -> None:
        self._slots[slot] = None
        self.port().free(slot)

    def _idle(self, slot: int, owner: Any) -> None:
        """``owner`` waits for nothing from the kernel: hold it weakly, as asyncio's
        loop holds a transport that neither reads nor writes, so that an
        abandoned one is collected (and warns that it was not closed)."""
        self._slots[slot] = None
        self._weak[slot] = weakref.ref(owner)

    def _busy(self, slot: int, owner: Any) -> None:
        """``owner`` waits for the kernel again: hold it strongly."""
        self._weak.pop(slot, None)
        self._slots[slot] = owner

    def _orphan(self, slot: int, fd: int) -> None:
        """A transport was collected without being closed: end its slot, then close ``fd``."""
        self._weak.pop(slot, None)
        self._orphans[slot] = fd
        self.port().close(slot, abort=True)

    def _unowned(self, slot: int, kind: int, res: int) -> None:
        owner = self._weak.get(slot)
        target = owner() if owner is not None else None
        if target is not None:
            self._busy(slot, target)  # an event for it: it is needed again
            target._event(kind, res, 0)
            return
        if kind == _CLOSED:
            fd = self._orphans.pop(slot, None)
            if fd is not None:
                os.close(fd)
            self._slots[slot] = None
            self.port().free(slot)

    # -- what the loop calls ------------------------------------------------------

    def transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None,
        extra: dict[str, Any] | None,
        server: Server | None,
    ) -> CompletionStreamTransport:
        """A completion transport over a connected non-blocking socket."""
        return CompletionStreamTransport(self, sock, protocol, waiter, extra, server)

    def listener(self, server: Server, sock: socket.socket) -> CompletionListener:
        """A listener accepting with the port."""
        return CompletionListener(self, server, sock)

    def dispatch(self) -> None:
        """Handle the port's events of the last ``poll()``: one step each, in order."""
        port = self._port
        if port is None:
            return
        dispatcher = self._dispatcher
        if dispatcher is not None:
            records, self._data = port.packed_events()
            if records:
                dispatcher(records, self._data)
        else:
            events, self._data = port.events()
            handle = self._handle
            for slot, kind, res, off in events:
                handle(slot, kind, res, off)
        try:
            port.run_done()  # file operations' callbacks
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {"message": "exception in a file operation's callback", "exception": exc}
            )

    def _handle(self, slot: int, kind: int, res: int, off: int) -> None:
        """One event (the C dispatcher's fast path does most ``DATA`` events itself)."""
        owner = self._slots[slot]
        if owner is None:
            self._unowned(slot, kind, res)
            return
        try:
            if kind == _DATA and owner._reading:
                if (deadlines := owner._deadlines) is not None:
                    deadlines.last_io = self._loop.time()
                data = self._data[off : off + res]
                if owner._buffered:
                    owner._feed_buffered(data)
                else:
                    owner._context.run(owner._data_received, owner._protocol, data)
            elif kind == _DATA:
                owner._hold(self._data[off : off + res])
            else:
                owner._event(kind, res, off)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if kind == _DATA and isinstance(owner, CompletionStreamTransport):
                _data_received_failed(owner, exc)
            else:
                self._loop.call_exception_handler(
                    {"message": f"exception handling a completion of {owner!r}", "exception": exc}
                )

    def submit(self) -> None:
        """Hand queued requests to the kernel now (a host loop is about to wait)."""
        if self._port is not None:
            self._port.submit()
        else:
            self._mux.submit()

    def fileno(self) -> int:
        """The ring's fd, for a host loop (before any connection or listener started)."""
        if self._port is not None and self._slots:
            raise RuntimeError(
                "with completion I/O, call fileno() before creating servers or "
                "connections (or use io='readiness')"
            )
        fd = self._mux.fileno()
        self._port = None  # the driver re-created its ring: ask again
        return fd

    def close(self) -> None:
        """The loop is closing: the ring, and every operation on it, goes with the
        multiplexer, so the fds kept open for those operations can close now."""
        owners = [o for o in self._slots if o is not None]
        owners += [o for o in (ref() for ref in self._weak.values()) if o is not None]
        for owner in owners:
            owner._loop_closing()
        fds = list(self._orphans.values())
        self._slots.clear()
        self._weak.clear()
        self._orphans.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass  # closed already (at interpreter exit)
        self._port = None
        self.closed = True


class CompletionStreamTransport(StreamTransport):
    """A TCP or Unix stream transport whose bytes the completion port moves."""

    __slots__ = (
        "_acked",
        "_backlogged",
        "_blocked",
        "_data_received",
        "_detached",
        "_held",
        "_held_end",
        "_io",
        "_pause_above",
        "_port",
        "_reading",
        "_release_wanted",
        "_sendfile",
        "_sends",
        "_sent_waiter",
        "_slot",
        "_slot_closed",
        "_stage",
        "_stage_max",
        "_written",
    )
    _sendfile_compatible = _SendfileMode.TRY_NATIVE

    def __init__(
        self,
        io: CompletionIO,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None,
        extra: dict[str, Any] | None,
        server: Server | None,
    ) -> None:
        self._reading = False
        self._data_received: Any = None
        super().__init__(io._loop, sock, protocol, extra, server)
        self._io = io
        port = self._port = io.port()
        self._written = 0  # bytes write() accepted, ever
        self._acked = 0  # bytes the kernel confirmed sending, as last read from the port
        self._backlogged = False  # the kernel refused bytes lately: pause as readiness does
        self._pause_above = max(HARD_BACKLOG, 16 * self._high_water)
        # Set once writes cannot take the fast path (write_eof, lost, sendfile).
        self._blocked = False
        self._stage = port.stage
        self._stage_max = port.stage_max
        self._sends = port.sends
        # Created when data is first held: an empty deque costs 600 bytes,
        # which idle connections should not pay.
        self._held: deque[bytes] | None = None
        self._held_end: int | None = None  # 0 (EOF) or -errno met while paused
        self._slot_closed = False
        self._release_wanted = False
        self._detached = -1
        self._sendfile = False
        self._sent_waiter: asyncio.Future[None] | None = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._slot = port.open(sock.fileno())
        io._take(self._slot, self)
        self._connection_made(waiter)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol."""
        super().set_protocol(protocol)
        self._data_received = _data_received_of(protocol)

    def _start_reading(self) -> None:
        if not self._closing and not self._paused and self._held_end is None:
            self._reading = True
            self._port.read(self._slot)

    # -- receiving ----------------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        """Data that arrived while paused (or after close): kept for resume_reading."""
        if not self._closing:
            if self._held is None:
                self._held = deque()
            self._held.append(data)

    def _feed_buffered(self, data: bytes) -> None:
        """Copy ``data`` into a BufferedProtocol's buffers; hold what a pause leaves."""
        protocol = self._protocol
        context = self._context
        view = memoryview(data)
        while view:
            try:
                buf = memoryview(context.run(protocol.get_buffer, len(view))).cast("B")
                n = min(len(buf), len(view))
                if not n:
                    raise RuntimeError("get_buffer() returned an empty buffer")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
                return
            buf[:n] = view[:n]
            try:
                context.run(protocol.buffer_updated, n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            view = view[n:]
            if view and not self._reading:
                self._hold(bytes(view))
                return

    def _deliver_held(self) -> None:
        """After resume_reading: what arrived while paused, then receive again.

        At most :data:`HELD_PER_ITERATION` bytes per loop iteration, as the port
        delivers them: a protocol that writes what it reads learns of its
        backlog before it has read much more.
        """
        if self._paused or self._closing:
            return  # paused again meanwhile: the next resume_reading comes back here
        self._reading = True
        held = self._held
        budget = HELD_PER_ITERATION
        while held and self._reading:
            if budget <= 0:
                self._reading = False  # new data is held behind the rest meanwhile
                self._loop.call_soon(self._deliver_held)
                return
            data = held.popleft()
            budget -= len(data)
            if self._buffered:
                self._feed_buffered(data)
                continue
            try:
                self._context.run(self._data_received, self._protocol, data)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
                return
        if held or not self._reading:
            return  # paused again (or closed): resume_reading comes back here
        self._held = None
        end, self._held_end = self._held_end, None
        if end is not None:
            self._reading = False
            self._ended(end)
        else:
            self._port.read(self._slot)

    def _ended(self, res: int) -> None:
        """The receiving side ended: end of stream (0) or an error."""
        if res == 0:
            self._on_eof()
        else:
            self._fatal_error(_error(res), "Fatal read error on socket transport")

    def _on_eof(self) -> None:
        try:
            keep_open = self._context.run(self._protocol.eof_received)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def _event(self, kind: int, res: int, off: int) -> None:
        if kind == _EOF or (kind == _ERROR and off == port_events.FAILED_RECV):
            if self._conn_lost:
                return
            end = 0 if kind == _EOF else res
            if self._paused or self._held:
                self._held_end = end  # delivered after resume_reading
                return
            self._reading = False
            self._ended(end)
            if not self._closing and self._written == self._port.sent(self._slot):
                self._io._idle(self._slot, self)
        elif kind == _ERROR:
            if not self._conn_lost:
                self._fatal_error(_error(res), "Fatal write error on socket transport")
        elif kind == _BACKLOG or kind == _SENT:
            if self._conn_lost:
                return
            waiter = self._sent_waiter
            if kind == _SENT and waiter is not None and not waiter.done():
                if self._port.sent(self._slot) >= self._written:
                    waiter.set_result(None)
            self._acked = self._port.sent(self._slot)
            if kind == _BACKLOG:
                self._set_backlogged(True)
                self._maybe_pause_protocol()
            else:
                if self._acked == self._written:
                    self._set_backlogged(False)  # the kernel took everything again
                self._maybe_resume_protocol()
            self._want_notify()
        elif kind == _DRAINED:
            if not self._conn_lost:
                self._lost(None)
        elif kind == _CLOSED:
            self._slot_closed = True
            self._io._closed(self._slot)
            if self._release_wanted:
                self._close_socket()

    # -- writing ----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` with the loop's next system call (after what was written before)."""
        if type(data) is not bytes or self._blocked or not 0 < (n := len(data)) < self._stage_max:
            self._write_slow(data)
            return
        # The port's fast path: the bytes go to its stage, (slot, length) to
        # its send pairs; one C call per loop iteration takes them all.
        self._stage += data
        self._sends += _send_pair(self._slot, n)
        written = self._written = self._written + n
        if (deadlines := self._deadlines) is not None:
            deadlines.last_io = self._loop.time()
        if written - self._acked > self._pause_above and not self._protocol_paused:
            self._check_pause()

    def _write_slow(self, data: Any) -> None:
        if self._sendfile and isinstance(data, (bytes, bytearray, memoryview)):
            raise RuntimeError("unable to write; sendfile is in progress")
        if not self._check_write(data):
            return
        # A copy: the caller may reuse its buffer at once.
        data = data if isinstance(data, bytes) else bytes(memoryview(data).cast("B"))
        self._port.send(self._slot, data)
        self._written += len(data)
        if (deadlines := self._deadlines) is not None:
            deadlines.last_io = self._loop.time()
        if self._written - self._acked > self._pause_above and not self._protocol_paused:
            self._check_pause()

    def _check_pause(self) -> None:
        # Flow control. While the kernel takes everything, the port reports
        # BACKLOG once it refuses bytes; only a writer that never lets the
        # loop run is paused here (above HARD_BACKLOG). Once it refused
        # (backlogged), writes pause the protocol above the high-water mark
        # at once, as readiness transports do.
        self._acked = self._port.sent(self._slot)
        if self._written - self._acked > self._pause_above:
            self._maybe_pause_protocol()
            self._want_notify()

    def _set_backlogged(self, backlogged: bool) -> None:
        self._backlogged = backlogged
        high = self._high_water
        self._pause_above = high if backlogged else max(HARD_BACKLOG, 16 * high)

    def _lost(self, exc: BaseException | None) -> None:
        self._blocked = True  # writes go the slow way: they are dropped now
        super()._lost(exc)

    def _want_notify(self) -> None:
        """While writing is paused, ask to be told when the buffer drains to low water."""
        if self._protocol_paused and not self._conn_lost:
            self._port.notify_sent(self._slot, self._written - self._low_water)

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by ``write()`` that the kernel has not confirmed sending."""
        if self._conn_lost:
            return 0
        if not self._slot_closed:
            self._acked = self._port.sent(self._slot)
        return self._written - self._acked

    def write_eof(self) -> None:
        """Shut down the sending side once everything written is sent."""
        if self._closing or self._eof:
            return
        self._eof = True
        self._blocked = True
        self._keep_socket_info()
        self._port.shutdown_write(self._slot)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the buffer sizes at which ``pause_writing``/``resume_writing`` fire."""
        super().set_write_buffer_limits(high, low)
        self._set_backlogged(self._backlogged)
        if not self._slot_closed:
            self._port.limit_backlog(self._slot, self._high_water)
        self._want_notify()

    # -- reading control ----------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading`."""
        if self._closing or self._paused:
            return
        self._paused = True
        if self._reading:
            self._reading = False
            self._port.pause(self._slot)

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._held or self._held_end is not None:
            # What was held goes first: until it is delivered, new data is
            # held behind it (_reading stays False).
            self._loop.call_soon(self._deliver_held)
        else:
            self._reading = True
            self._port.read(self._slot)

    # -- sendfile -------------------------------------------------------------------

    async def _sendfile_native(self, file: Any, offset: int, count: int | None) -> int:
        """Send ``file`` by splicing it into the socket once everything written is sent."""
        port = self._port
        if "SPLICE" not in port.file_ops:
            raise asyncio.SendfileNotAvailableError("this kernel's io_uring has no SPLICE")
        from .splice import sendfile_splice

        resume = self.is_reading()
        self.pause_reading()
        self._sendfile = self._blocked = True  # write() refuses meanwhile
        try:
            if port.sent(self._slot) < self._written:
                self._sent_waiter = self._loop.create_future()
                port.notify_sent(self._slot, self._written)
                await self._sent_waiter
            if self._closing or self._sock is None:
                raise ConnectionError("the connection closed before sendfile could start")
            fd = self._sock.fileno()
            sent = await sendfile_splice(
                self._loop,
                port,
                fd,
                file,
                offset,
                count,
                wait_writable=lambda: self._io.wait_writable(fd),
            )
            # Bytes that left through the pipe count as written and sent.
            return sent
        finally:
            self._sent_waiter = None
            self._sendfile = False
            self._blocked = bool(self._eof or self._conn_lost)
            if resume:
                self.resume_reading()

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading, send what was written, then ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._reading = False
        self._held = None
        self._keep_socket_info()  # before the port shuts the socket down
        if self._written == self._port.sent(self._slot):
            self._port.close(self._slot, abort=True)  # nothing left to send
            self._lost(None)
        else:
            self._port.close(self._slot)  # DRAINED once everything is sent

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        if not self._slot_closed and self._written != self._port.sent(self._slot):
            self._reset_if_dropping()
        self._closing = True
        self._reading = False
        self._held = None
        self._keep_socket_info()
        if not self._slot_closed:
            self._port.close(self._slot, abort=True)
        self._lost(exc)

    def _release(self) -> None:
        # The protocol was told. The socket object is closed now, as asyncio's
        # transports close it, but its fd only once the port let go of it:
        # until then an operation may still run on that fd number.
        self._keep_socket_info()
        if self._slot_closed:
            self._close_socket()
            return
        self._release_wanted = True
        sock, self._sock = self._sock, None
        if sock is not None:
            self._detached = sock.detach()

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        fd, self._detached = self._detached, -1
        if fd >= 0:
            os.close(fd)

    def _loop_closing(self) -> None:
        # The ring goes: an fd kept for its operations closes now. A transport
        # still open stays so (as asyncio's do when their loop closes).
        if not self._slot_closed:
            self._acked = self._port.sent(self._slot)  # what stays unsent
        self._slot_closed = True
        fd, self._detached = self._detached, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        sock = self._sock
        if sock is None:
            return
        _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
        self._sock = None
        if self._slot_closed or self._io.closed:
            sock.close()  # nothing can run on its fd any more
        else:
            self._io._orphan(self._slot, sock.detach())


install_write(CompletionStreamTransport, "StageWriteMethod", CompletionStreamTransport._check_pause)


class CompletionListener:
    """Accepts with one multishot accept on the port; pauses on EMFILE as readiness does.

    An accept that ends (out of fds, memory...) is asked again after the
    back-off delay, so a full fd table costs one completion per delay, not a
    busy loop. :meth:`accept_pending` accepts synchronously.
    """

    def __init__(self, io: CompletionIO, server: Server, sock: socket.socket) -> None:
        self._io = io
        self._loop = io._loop
        self._server = server
        self._sock = sock
        self._fd = sock.fileno()
        self._kind = (sock.family, sock.type, sock.proto)
        self._slot: int | None = None
        self._fd_held = -1
        self._closed = False
        self._backing_off = False
        self.backoff = AcceptBackoff(io._loop)

    def start(self) -> None:
        """Begin accepting."""
        if self._slot is None and not self._closed:
            port = self._io.port()
            self._slot = port.listen(self._fd)
            self._io._take(self._slot, self)

    def close(self) -> None:
        """Stop accepting; the socket closes once the accept's cancellation is through."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # refuse new connections now
        except OSError:
            pass
        if self._slot is None:
            self._sock.close()
        else:
            # The socket object closes now; its fd once the accept is cancelled.
            self._fd_held = self._sock.detach()
            self._io.port().close(self._slot)

    def accept_pending(self) -> None:
        """Accept every connection already waiting in the backlog, now."""
        accepted = self._server.accepted
        for _ in range(ACCEPT_BATCH * 64):
            if self._closed:
                return
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                return
            accepted(conn, addr)

    def _event(self, kind: int, res: int, off: int) -> None:
        if kind == _ACCEPTED:
            family, type_, proto = self._kind
            conn = socket.socket(family, type_, proto, fileno=res)
            if self._closed:
                conn.close()  # accepted while the server was closing
                return
            self.backoff.succeeded()
            # A multishot accept gives no address: the transport asks for it when wanted.
            self._server.accepted(conn, None)
        elif kind == _ACCEPT_END:
            if self._closed:
                return
            err = -res
            if res == 0 or err in (errno.ECANCELED,) or err in _TRANSIENT:
                self._again()
            elif err in _OUT_OF_RESOURCES:
                self._backing_off = True
                self.backoff.failed(_error(res), self._sock, self._retry)
            else:
                self._loop.call_exception_handler(
                    {
                        "message": "socket.accept() failed",
                        "exception": _error(res),
                        "socket": asyncio.trsock.TransportSocket(self._sock),
                    }
                )
                self._backing_off = True
                self._loop.call_later(self.backoff.delay, self._retry)
        elif kind == _CLOSED:
            assert self._slot is not None
            self._io._closed(self._slot)
            self._slot = None
            fd, self._fd_held = self._fd_held, -1
            if fd >= 0:
                os.close(fd)

    def _loop_closing(self) -> None:
        fd, self._fd_held = self._fd_held, -1
        if fd >= 0:
            os.close(fd)

    def _again(self) -> None:
        if self._slot is not None and not self._closed:
            self._io.port().accept(self._slot, self._fd)

    def _retry(self) -> None:
        self._backing_off = False
        self._again()

    def __repr__(self) -> str:
        return f"<CompletionListener fd={self._fd} slot={self._slot}>"
