"""Readiness-based stream transports (TCP and Unix sockets).

The transport reacts to readiness events: it reads when the socket is
readable and flushes its write buffer when it is writable. ``write()``
first tries ``send()`` directly, as asyncio does, so a reply that fits in
the socket buffer never touches the buffer or the multiplexer.

Two registration modes, chosen per driver by the reactor:

* LEVEL (the default): the registration follows what the transport wants,
  READ while reading and WRITE while the buffer holds data. One read per
  event; an echo-style exchange never changes the registration.
* EDGE (``Reactor(trigger=Trigger.EDGE)`` where the driver has it): the
  socket is registered once for READ|WRITE and never modified. Each event
  reads until EAGAIN, because a short read does not prove the socket is
  drained: an EOF that arrived with the data would bring no new edge. After
  a few reads the rest is left to a callback, for fairness. Pausing only
  sets a flag; resuming schedules a read.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from typing import TYPE_CHECKING, Any

from iomux.multiplexer import Trigger

from .deadlines import Deadlines, check_seconds

if TYPE_CHECKING:
    from .loop import Reactor
    from .server import Server

#: Default write-buffer high-water mark, as in asyncio.
HIGH_WATER = 64 * 1024
#: Bytes asked of one ``recv()``. Larger sizes make glibc malloc use mmap for
#: each read's bytes object, which costs more than the read itself.
READ_SIZE = 64 * 1024

_READ = 1
_WRITE = 2
_BOTH = 3
# EDGE mode: reads per event before the rest is left to a callback.
_EDGE_READS = 4
# Errors that mean the peer went away: reported to connection_lost only.
_PEER_GONE = (ConnectionError, TimeoutError)
# SO_LINGER on, 0 s: close() resets the connection instead of ending it cleanly.
_LINGER_RESET = struct.pack("ii", 1, 0)


class SocketTransport(asyncio.Transport):
    """A stream transport over a connected non-blocking socket.

    It has asyncio's ``Transport`` interface, so an ``asyncio.Protocol`` (or
    ``asyncio.BufferedProtocol``) is served unchanged, plus
    :meth:`set_idle_timeout` and :meth:`set_deadline`.
    """

    __slots__ = (
        "_buffered",
        "_closed",
        "_closing",
        "_deadlines",
        "_edge",
        "_eof",
        "_eof_pending",
        "_fd",
        "_high",
        "_last_io",
        "_low",
        "_mux",
        "_paused",
        "_peername",
        "_protocol",
        "_reactor",
        "_reading",
        "_reg",
        "_server",
        "_sock",
        "_sockname",
        "_started",
        "_wbuf",
        "_writing_paused",
    )

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        edge: bool,
        server: Server | None = None,
        peername: Any = None,
    ) -> None:
        super().__init__(None)
        self._reactor = reactor
        self._mux = reactor._mux
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._edge = edge
        self._server = server
        self._peername = peername
        self._sockname: Any = None
        self._wbuf = bytearray()
        self._high = HIGH_WATER
        self._low = HIGH_WATER // 4
        self._closing = False
        self._closed = False
        self._paused = False
        self._reading = True
        self._eof = False
        self._eof_pending = False
        self._writing_paused = False
        self._deadlines: Deadlines | None = None
        self._started = self._last_io = reactor.time()
        self._reg = 0
        if edge:
            self._mux.register(sock, _BOTH, self._on_event, trigger=Trigger.EDGE)
            self._reg = _BOTH
        else:
            self._mux.register(sock, _READ, self._on_event)
            self._reg = _READ
        reactor._transports.add(self)

    def _start(self) -> None:
        """Tell the protocol the connection is made (after deadlines are set)."""
        try:
            self._protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._protocol_failed(exc, "connection_made")

    # -- events -----------------------------------------------------------

    def _on_event(self, mask: int) -> None:
        # mask is 1 (READ), 2 (WRITE) or 3; int comparisons are the cheap test.
        if mask != _WRITE and self._reading:
            if self._edge:
                self._read_more()
            elif self._buffered:
                self._read_buffered()
            else:
                self._read()
        if mask >= _WRITE and self._wbuf:
            self._flush()

    def _read(self) -> bool:
        """Read once; return whether a further read may find more."""
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._io_failed(exc, "recv")
            return False
        if not data:
            self._read_eof()
            return False
        self._last_io = self._reactor._now
        try:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._protocol_failed(exc, "data_received")
            return False
        return True

    def _read_buffered(self) -> bool:
        """Read once into the protocol's buffer; return whether more may follow."""
        protocol: asyncio.BufferedProtocol = self._protocol  # type: ignore[assignment]
        try:
            buf = protocol.get_buffer(-1)
            size = len(buf)  # type: ignore[arg-type]
            if not size:
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._protocol_failed(exc, "get_buffer")
            return False
        try:
            n = self._sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._io_failed(exc, "recv_into")
            return False
        if not n:
            self._read_eof()
            return False
        self._last_io = self._reactor._now
        try:
            protocol.buffer_updated(n)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._protocol_failed(exc, "buffer_updated")
            return False
        return True

    def _read_more(self) -> None:
        """EDGE mode: read until EAGAIN, deferring to a callback after a few reads."""
        read = self._read_buffered if self._buffered else self._read
        for _ in range(_EDGE_READS):
            if not self._reading or not read():
                return
        if self._reading:
            self._reactor.call_soon(self._read_more)

    def _read_eof(self) -> None:
        self._eof = True
        self._reading = False
        self._update()
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._protocol_failed(exc, "eof_received")
            return
        if not keep_open:
            self.close()

    def _flush(self) -> None:
        wbuf = self._wbuf
        try:
            n = self._sock.send(wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._io_failed(exc, "send")
            return
        if n:
            del wbuf[:n]
            self._last_io = self._reactor._now
        if self._writing_paused and len(wbuf) <= self._low:
            self._writing_paused = False
            self._call_protocol("resume_writing")
        if not wbuf:
            self._update()
            if self._closing:
                self._finish(None)
            elif self._eof_pending:
                self._shutdown_write()

    def _update(self) -> None:
        """LEVEL mode: make the registration match what the transport wants."""
        if self._edge or self._closed:
            return
        want = (_READ if self._reading else 0) | (_WRITE if self._wbuf else 0)
        have = self._reg
        if want == have:
            return
        if not have:
            self._mux.register(self._fd, want, self._on_event)
        elif not want:
            self._mux.unregister(self._fd)
        else:
            self._mux.modify(self._fd, want, self._on_event)
        self._reg = want

    # -- writing ------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, buffering what the socket does not take at once."""
        if type(data) is not bytes or self._wbuf or self._closing or self._eof_pending:
            self._write_slow(data)
            return
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._io_failed(exc, "send")
            return
        if n:
            self._last_io = self._reactor._now
            if n == len(data):
                return
        self._buffer(memoryview(data)[n:])

    def _writable(
        self, data: bytes | bytearray | memoryview
    ) -> bytes | bytearray | memoryview | None:
        """Check what write() was given; None when there is nothing to send."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data must be bytes, bytearray or memoryview, not {type(data).__name__}"
            )
        if self._eof_pending:
            raise RuntimeError("cannot call write() after write_eof()")
        if self._closing:
            return None  # as asyncio: writes after close() are dropped
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else data
        return view if view else None

    def _write_slow(self, data: bytes | bytearray | memoryview) -> None:
        view = self._writable(data)
        if view is None:
            return
        if self._wbuf:
            self._wbuf += view
            self._maybe_pause()
            return
        try:
            n = self._sock.send(view)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._io_failed(exc, "send")
            return
        if n:
            self._last_io = self._reactor._now
            if n == len(view):
                return
        self._buffer(memoryview(view)[n:])

    def _buffer(self, rest: memoryview) -> None:
        self._wbuf += rest
        self._update()
        self._maybe_pause()

    def writelines(self, list_of_data: Any) -> None:
        """Write every buffer of an iterable, in order, as one write."""
        self.write(b"".join(list_of_data))

    def _maybe_pause(self) -> None:
        if not self._writing_paused and len(self._wbuf) > self._high:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def write_eof(self) -> None:
        """Shut down the sending side once the buffer is flushed."""
        if self._closing or self._eof_pending:
            return
        self._eof_pending = True
        if not self._wbuf:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._io_failed(exc, "shutdown")

    def can_write_eof(self) -> bool:
        """Stream sockets can always half-close."""
        return True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the buffer sizes at which ``pause_writing``/``resume_writing`` fire."""
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """Return ``(low, high)``."""
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by ``write()`` and not yet taken by the kernel."""
        return len(self._wbuf)

    # -- reading control ------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading`."""
        if self._closing or self._paused:
            return
        self._paused = True
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        if self._closing or not self._paused:
            return
        self._paused = False
        if not self._eof:
            self._reading = True
            self._update()
            if self._edge:
                # Data that arrived while paused brings no new edge.
                self._reactor.call_soon(self._read_more)

    def is_reading(self) -> bool:
        """Whether the transport is receiving (not paused, closing or at EOF)."""
        return not self._paused and not self._closing

    # -- deadlines --------------------------------------------------------------

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Close the connection with :class:`IdleTimeout` after ``seconds`` without I/O."""
        seconds = check_seconds("idle timeout", seconds)
        dl = self._deadlines or Deadlines(self)
        self._deadlines = dl
        dl.idle = seconds
        dl.arm()

    def set_deadline(self, when: float | None) -> None:
        """Close the connection with :class:`DeadlineExceeded` at ``when`` (``Reactor.time()``)."""
        dl = self._deadlines or Deadlines(self)
        self._deadlines = dl
        dl.deadline = None if when is None else float(when)
        dl.arm()

    def get_idle_timeout(self) -> float | None:
        """The idle timeout in seconds, or None."""
        return self._deadlines.idle if self._deadlines else None

    def get_deadline(self) -> float | None:
        """The absolute deadline on the reactor clock, or None."""
        return self._deadlines.deadline if self._deadlines else None

    def _expire(self, exc: BaseException) -> None:
        self._drop(exc)

    # -- closing ------------------------------------------------------------------

    def is_closing(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called or the connection ended."""
        return self._closing

    def close(self) -> None:
        """Stop reading, flush the write buffer, then close and call ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._reading = False
        if self._wbuf:
            self._update()
        else:
            self._finish(None)

    def abort(self) -> None:
        """Close at once, dropping buffered data; ``connection_lost(None)`` follows.

        If written data is dropped, the connection is reset (TCP RST) rather
        than ended, so the peer sees an error instead of a clean but
        truncated stream.
        """
        self._drop(None)

    def _drop(self, exc: BaseException | None) -> None:
        """Close now; reset the connection if data accepted by write() is dropped."""
        if self._wbuf and not self._closed:
            self._wbuf.clear()
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # not a socket that can linger (or already broken): close anyway
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._reading = False
        if self._reg:
            try:
                self._mux.unregister(self._fd)
            except (KeyError, OSError):
                pass
            self._reg = 0
        self._sock.close()
        if self._deadlines is not None:
            self._deadlines.cancel()
        reactor = self._reactor
        reactor._transports.discard(self)
        if self._server is not None:
            self._server._detach(self)
        reactor.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self._reactor.call_exception_handler(
                {
                    "message": "exception in protocol.connection_lost()",
                    "exception": error,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _io_failed(self, exc: OSError, op: str) -> None:
        self._wbuf.clear()
        if not isinstance(exc, _PEER_GONE) and exc.errno not in (errno.EPIPE, errno.ESHUTDOWN):
            self._reactor.call_exception_handler(
                {
                    "message": f"socket {op}() failed on {self!r}",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._finish(exc)

    def _protocol_failed(self, exc: BaseException, callback: str) -> None:
        self._reactor.call_exception_handler(
            {
                "message": f"exception in protocol.{callback}(); closing the connection",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
        self._drop(exc)

    def _call_protocol(self, callback: str) -> None:
        try:
            getattr(self._protocol, callback)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._reactor.call_exception_handler(
                {
                    "message": f"exception in protocol.{callback}()",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _shutdown_requested(self) -> None:
        """A graceful shutdown began: let a protocol that cares wind down."""
        hook = getattr(self._protocol, "shutdown_requested", None)
        if hook is not None and not self._closing:
            self._call_protocol("shutdown_requested")

    # -- information --------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``socket``, ``sockname``, ``peername``; ``default`` for anything else."""
        if name == "socket":
            return self._sock
        if name == "sockname":
            if self._sockname is None and not self._closed:
                self._sockname = self._sock.getsockname()
            return default if self._sockname is None else self._sockname
        if name == "peername":
            if self._peername is None and not self._closed:
                try:
                    self._peername = self._sock.getpeername()
                except OSError:
                    return default
            return default if self._peername is None else self._peername
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol."""
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        return self._protocol

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<SocketTransport fd={self._fd} {state} buffered={len(self._wbuf)}>"
