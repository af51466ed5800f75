"""Completion-based stream transports: io_uring operations instead of readiness.

A :class:`CompletionTransport` keeps at most three operations on the ring:

* one multishot receive into the strategy's provided-buffer group. Each
  completion names a buffer; the strategy copies its bytes out as a
  ``bytes`` (what asyncio protocols expect) and gives the buffers of the
  whole batch back to the kernel at once. The receive is re-armed when the
  kernel ends it (out of buffers, completion queue overflow);
* one send. Writes made while it is in flight are appended to a bytearray
  that becomes the next send as a whole, so a burst of writes costs one
  operation. The ring keeps each buffer alive until its completion;
* one poll for the peer's end (RDHUP, ERR, HUP), which restarts the
  receive, as a multishot receive can miss that wake-up.

``pause_reading`` cancels the receive; bytes that complete before the
cancellation takes effect are held and delivered after ``resume_reading``,
which re-arms the receive once the old one has ended (two receives on one
socket could deliver out of order).

Closing cancels the socket's operations (``cancel_fd``) and closes the
socket only when their last completions arrived, so no operation can ever
run on a reused fd number. The user_data of every operation carries a
per-connection id that is never reused, so completions of a closed
connection are recognised whatever happened to its fd.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from .transport import HIGH_WATER, SocketTransport

if TYPE_CHECKING:
    from .completion import CompletionStrategy
    from .loop import Reactor
    from .server import Server

# The io_uring layer, imported by name: the drivers are a package of their
# own (iomux.drivers), which iomux itself only loads through the registry.
# Without the drivers (a source checkout imported without being installed)
# the completion strategy is unavailable, but the reactor still imports.
uring: Any
try:
    uring = importlib.import_module("iomux.drivers._uring")
except ImportError:
    uring = None
F_MORE = 2  # IORING_CQE_F_MORE
F_BUFFER = 1  # IORING_CQE_F_BUFFER
BUFFER_SHIFT = 16  # IORING_CQE_BUFFER_SHIFT
# The guard poll: the peer ended its side or the connection broke
# (POLLRDHUP | POLLERR | POLLHUP).
_ENDED = 0x2000 | 0x8 | 0x10

# user_data layout: COMPLETION_TAG | ident << KIND_BITS | kind.
KIND_BITS = 3
KIND_ACCEPT = 1
KIND_RECV = 2
KIND_SEND = 3
KIND_CANCEL = 4
KIND_GUARD = 5

# States of the receive.
_IDLE = 0
_ARMED = 1
_CANCELLING = 2

_ENOBUFS = -errno.ENOBUFS
_ECANCELED = -errno.ECANCELED
_EALREADY = -errno.EALREADY
# SO_LINGER on, 0 s: close() resets the connection instead of ending it cleanly.
_LINGER_RESET = struct.pack("ii", 1, 0)


def error(res: int) -> OSError:
    """The OSError subclass for a negative completion result."""
    return OSError(-res, os.strerror(-res))


class CompletionTransport(SocketTransport):
    """A stream transport driven by ring completions (see the module docstring).

    Same interface and protocol callbacks as :class:`SocketTransport`; the
    write buffer size counts bytes in flight in the kernel's send too.
    """

    __slots__ = (
        "_cancel_ud",
        "_guard",
        "_guard_ud",
        "_held",
        "_held_end",
        "_ident",
        "_inflight",
        "_recv_state",
        "_recv_ud",
        "_ring",
        "_send_ud",
        "_strategy",
    )

    def __init__(
        self,
        strategy: CompletionStrategy,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        server: Server | None = None,
        peername: Any = None,
    ) -> None:
        asyncio.Transport.__init__(self, None)
        reactor: Reactor = strategy.reactor
        self._reactor = reactor
        self._mux = reactor._mux
        self._strategy = strategy
        self._ring = strategy.ring
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._edge = False
        self._server = server
        self._peername = peername
        self._sockname: Any = None
        self._wbuf = bytearray()
        self._inflight = 0  # bytes of the send in flight (0: none)
        self._high = HIGH_WATER
        self._low = self._high // 4
        self._closing = False
        self._closed = False
        self._paused = False
        self._reading = True
        self._eof = False
        self._eof_pending = False
        self._writing_paused = False
        self._deadlines = None
        self._started = self._last_io = reactor.time()
        self._reg = 0
        self._held: deque[bytes] = deque()
        self._held_end: int | None = None  # 0 (EOF) or -errno met while paused
        self._recv_state = _IDLE
        self._ident = ident = strategy.new_ident()
        base = strategy.tag | ident << KIND_BITS
        self._recv_ud = base | KIND_RECV
        self._send_ud = base | KIND_SEND
        self._cancel_ud = base | KIND_CANCEL
        self._guard_ud = base | KIND_GUARD
        self._guard = False  # the guard poll is on the ring
        handlers = strategy.handlers
        handlers[self._recv_ud] = self._on_recv
        handlers[self._send_ud] = self._on_send
        handlers[self._cancel_ud] = self._on_cancel_failed
        handlers[self._guard_ud] = self._on_guard
        reactor._transports.add(self)

    def _start(self) -> None:
        """Call ``connection_made``, then start receiving unless it paused or closed."""
        super()._start()
        if self._closed:
            return
        self._ring.poll_add(self._fd, _ENDED, self._guard_ud)
        self._guard = True
        if self._reading and self._recv_state == _IDLE:
            self._arm_recv()

    def _on_guard(self, res: int, flags: int) -> None:
        # A multishot receive can miss the wake-up of a peer's reset or end
        # of stream (a kernel race, cf. liburing#1549) and then wait forever.
        # When the peer is done, restart the receive: a fresh one reads what
        # is left, then reports the end. (Costs nothing per request.)
        self._guard = False
        if self._closed:
            self._maybe_release()
        elif self._recv_state == _ARMED:
            self._cancel_recv()  # its last completion re-arms it

    def _update(self) -> None:
        """Nothing to do: there is no readiness registration to keep in step."""

    # -- receiving --------------------------------------------------------------

    def _arm_recv(self) -> None:
        self._ring.recv(self._fd, self._strategy.group(), self._recv_ud)
        self._recv_state = _ARMED
        if self._strategy.eager:
            self._strategy.kick()

    def _cancel_recv(self) -> None:
        if self._recv_state == _ARMED:
            self._ring.cancel(self._recv_ud, self._cancel_ud, skip_success=True)
            self._recv_state = _CANCELLING
            if self._strategy.eager:
                self._strategy.kick()

    def _on_recv(self, got: Any, flags: int) -> None:
        # got: the bytes received if flags has F_BUFFER (see
        # CompletionStrategy.complete), else the result (0: end of stream).
        if flags & F_BUFFER:
            data: bytes = got
            if self._reading:
                self._last_io = self._reactor._now
                if self._buffered:
                    self._feed_buffered(data)
                else:
                    try:
                        self._protocol.data_received(data)  # type: ignore[attr-defined]
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:
                        self._protocol_failed(exc, "data_received")
            elif not self._closed:
                self._held.append(data)
            if flags & F_MORE:
                return
            got = 1  # ended after data: neither end of stream nor an error
        self._recv_ended(got)

    def _recv_ended(self, res: int) -> None:
        """The receive ended (no F_MORE): end of stream, error, or re-arm."""
        self._recv_state = _IDLE
        if self._closed:
            self._maybe_release()
            return
        if res == 0 or (res < 0 and res != _ENOBUFS and res != _ECANCELED):
            if self._reading:
                if res == 0:
                    self._read_eof()
                else:
                    self._io_failed(error(res), "recv")
            else:
                self._held_end = res  # delivered after resume_reading
            return
        # Out of buffers, cancelled by a pause, or ended by the kernel.
        if self._reading and not self._held:
            self._arm_recv()

    def _feed_buffered(self, data: bytes) -> None:
        """Copy ``data`` into a BufferedProtocol's buffers; hold what a pause leaves."""
        protocol: asyncio.BufferedProtocol = self._protocol  # type: ignore[assignment]
        view = memoryview(data)
        while view:
            try:
                buf = memoryview(protocol.get_buffer(len(view))).cast("B")
                n = min(len(buf), len(view))
                if not n:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                buf[:n] = view[:n]
                protocol.buffer_updated(n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._protocol_failed(exc, "get_buffer/buffer_updated")
                return
            view = view[n:]
            if view and not self._reading:
                if not self._closed:
                    self._held.appendleft(bytes(view))
                return

    def _deliver_held(self) -> None:
        """After resume_reading: what arrived while paused, then receive again."""
        held = self._held
        while held and self._reading:
            data = held.popleft()
            if self._buffered:
                self._feed_buffered(data)
                continue
            try:
                self._protocol.data_received(data)  # type: ignore[attr-defined]
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._protocol_failed(exc, "data_received")
        if held or not self._reading:
            return  # paused again (or closed): resume_reading comes back here
        end = self._held_end
        if end is not None:
            self._held_end = None
            if end == 0:
                self._read_eof()
            else:
                self._io_failed(error(end), "recv")
        elif self._recv_state == _IDLE:
            self._arm_recv()

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading` (cancels the receive)."""
        if self._closing or self._paused:
            return
        self._paused = True
        self._reading = False
        self._cancel_recv()

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._eof:
            return
        self._reading = True
        if self._held or self._held_end is not None:
            self._reactor.call_soon(self._deliver_held)
        elif self._recv_state == _IDLE:
            self._arm_recv()
        # _CANCELLING: the old receive's last completion re-arms it.

    # -- writing ----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` with the next ring enter (or after the send in flight)."""
        if type(data) is not bytes or self._closing or self._eof_pending:
            self._write_slow(data)
            return
        if self._inflight:
            self._wbuf += data
        elif data:
            self._ring.send(self._fd, data, self._send_ud)
            self._inflight = len(data)
            if self._strategy.eager:
                self._strategy.kick()
        else:
            return
        if not self._writing_paused and len(self._wbuf) + self._inflight > self._high:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def _write_slow(self, data: bytes | bytearray | memoryview) -> None:
        view = self._writable(data)
        if view is None:
            return
        if self._inflight:
            self._wbuf += view
        else:
            chunk = bytes(view)  # the caller may reuse its buffer at once
            self._ring.send(self._fd, chunk, self._send_ud)
            self._inflight = len(chunk)
            self._strategy.kick()
        self._maybe_pause()

    def _on_send(self, res: int, flags: int) -> None:
        buf = self._ring.send_done(self._send_ud)
        if self._closed:
            self._inflight = 0
            self._maybe_release()
            return
        if res < 0:
            self._inflight = 0
            self._io_failed(error(res), "send")
            return
        if res:
            self._last_io = self._reactor._now
        if res < len(buf):
            rest = memoryview(buf)[res:]
            self._ring.send(self._fd, rest, self._send_ud)
            self._inflight = len(rest)
        elif self._wbuf:
            # Swap, do not copy: the whole buffer becomes the next send.
            buf, self._wbuf = self._wbuf, bytearray()
            self._ring.send(self._fd, buf, self._send_ud)
            self._inflight = len(buf)
        else:
            self._inflight = 0
        if self._writing_paused and len(self._wbuf) + self._inflight <= self._low:
            self._writing_paused = False
            self._call_protocol("resume_writing")
        if not self._inflight and not self._closed:
            if self._closing:
                self._finish(None)
            elif self._eof_pending:
                self._shutdown_write()

    def _maybe_pause(self) -> None:
        if not self._writing_paused and len(self._wbuf) + self._inflight > self._high:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by ``write()`` that the kernel has not confirmed sending."""
        return len(self._wbuf) + self._inflight

    def write_eof(self) -> None:
        """Shut down the sending side once every write is sent."""
        if self._closing or self._eof_pending:
            return
        self._eof_pending = True
        if not self._inflight:
            self._shutdown_write()

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading, flush the writes, then close and call ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._reading = False
        self._held.clear()
        self._held_end = None
        if self._inflight:
            self._cancel_recv()
        else:
            self._finish(None)

    def abort(self) -> None:
        """Close at once, dropping unsent data; ``connection_lost(None)`` follows.

        If written data is dropped, the connection is reset (TCP RST), so the
        peer sees an error rather than a clean but truncated stream.
        """
        self._drop(None)

    def _expire(self, exc: BaseException) -> None:
        self._drop(exc)

    def _drop(self, exc: BaseException | None) -> None:
        """Close now; reset the connection if data accepted by write() is dropped."""
        if (self._wbuf or self._inflight) and not self._closed:
            self._wbuf.clear()
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # not a socket that can linger: close anyway
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._reading = False
        self._held.clear()
        self._held_end = None
        if self._recv_state != _IDLE or self._inflight or self._guard:
            # The socket stays open until the cancelled operations completed.
            self._ring.cancel_fd(self._fd, self._cancel_ud, skip_success=True)
            self._strategy.dying[self._ident] = self._sock
            self._strategy.kick()
        else:
            self._release()
        if self._deadlines is not None:
            self._deadlines.cancel()
        reactor = self._reactor
        reactor._transports.discard(self)
        if self._server is not None:
            self._server._detach(self)
        reactor.call_soon(self._call_connection_lost, exc)

    def _maybe_release(self) -> None:
        if self._recv_state == _IDLE and not self._inflight and not self._guard:
            self._strategy.dying.pop(self._ident, None)
            self._release()

    def _release(self) -> None:
        """No operation is left on the ring: forget the tags, close the socket."""
        handlers = self._strategy.handlers
        handlers.pop(self._recv_ud, None)
        handlers.pop(self._send_ud, None)
        handlers.pop(self._cancel_ud, None)
        handlers.pop(self._guard_ud, None)
        self._sock.close()

    def _on_cancel_failed(self, res: int, flags: int) -> None:
        # Only failures complete (SKIP_SUCCESS). EALREADY: the operation was
        # running; it completes soon, but a multishot one may go on: retry.
        if res != _EALREADY:
            return
        if self._closed:
            if self._recv_state != _IDLE or self._inflight or self._guard:
                self._ring.cancel_fd(self._fd, self._cancel_ud, skip_success=True)
        elif self._recv_state == _CANCELLING:
            self._ring.cancel(self._recv_ud, self._cancel_ud, skip_success=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        size = self.get_write_buffer_size()
        return f"<CompletionTransport fd={self._fd} {state} buffered={size}>"
