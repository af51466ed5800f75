"""What every iomux transport shares: write flow control, and the stream transport base.

:class:`FlowControlMixin` is asyncio's write flow control: the transport
calls ``protocol.pause_writing()`` when its write buffer grows above the
high-water mark and ``resume_writing()`` when it drains to the low-water
mark (64 KiB and a quarter of that by default, as asyncio).

:class:`StreamTransport` is the base of the two stream transports, the
readiness one (:mod:`iomux.reactor.readiness`: the loop waits for the
socket to be readable or writable, then calls ``recv``/``send``) and the
completion one (:mod:`iomux.reactor.completion`: io_uring receives and
sends for it). It holds what does not depend on how bytes move: the
protocol and the context its callbacks run in, the extra information, the
closing states, fatal errors, and the connection's deadlines.

Protocol callbacks run as asyncio runs them: ``connection_made`` and
``connection_lost`` as callbacks of their own, the others in one
:mod:`contextvars` context copied when the transport was made.

Closing. ``close()`` stops reading and lets the write buffer drain;
``abort()`` (and a deadline, and a fatal error) closes at once. Either way
``connection_lost`` runs as a callback afterwards, exactly once, and the
socket is closed after it. A transport that drops bytes ``write()``
accepted (``abort()`` with a non-empty buffer) resets the connection (TCP
RST) instead of ending it cleanly, so the peer cannot take a truncated
stream for a complete one.

Deadlines. Each transport with an idle timeout or a deadline holds at most
one timer. Activity does not touch the timer: the transport records when
it last moved a byte, and when the timer fires it either closes the
connection (``connection_lost(IdleTimeout(...))`` or
``DeadlineExceeded``) or re-arms itself for the new expiry, so a busy
connection costs one attribute store per read or write, not a heap
operation.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import struct
import warnings
import weakref
from asyncio import trsock
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .base import aio_logger
from .errors import DeadlineExceeded, IdleTimeout

if TYPE_CHECKING:
    from .server import Server

#: Default write-buffer high-water mark, as in asyncio.
HIGH_WATER = 64 * 1024
_LOW_WATER = HIGH_WATER // 4
#: Writes after the connection was lost are dropped; from this many on, each logs.
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
#: The extra info a stream transport finds on its socket.
_SOCKET_INFO = ("socket", "sockname", "peername")
# The extra info of a transport made without any, shared until the first
# lookup of a socket name gives the transport a dict of its own.
_NO_EXTRA: dict[str, Any] = {}
# SO_LINGER on, 0 s: close() resets the connection instead of ending it cleanly.
LINGER_RESET = struct.pack("ii", 1, 0)


def check_seconds(name: str, value: float | None) -> float | None:
    """Validate a limit given in seconds (None disables it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return seconds


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class WeakMap(Generic[_K, _V]):
    """key -> object, without keeping the object alive.

    What the loop keeps per connection (the transport of each fd). Each
    entry is the object's plain ``weakref.ref``, which CPython shares among
    everyone who asks for one (a ``WeakValueDictionary`` makes one of its
    own, with a callback). Entries of collected objects read as absent and
    are swept as the map grows.
    """

    __slots__ = ("_refs", "_sweep_at")

    def __init__(self) -> None:
        self._refs: dict[_K, weakref.ReferenceType[Any]] = {}
        self._sweep_at = 64

    def add(self, key: _K, obj: _V) -> None:
        """Map ``key`` to ``obj`` (replacing what it mapped to)."""
        refs = self._refs
        refs[key] = weakref.ref(obj)
        if len(refs) >= self._sweep_at:
            for dead in [k for k, ref in refs.items() if ref() is None]:
                del refs[dead]
            self._sweep_at = max(64, 2 * len(refs))

    def get(self, key: _K) -> _V | None:
        """The object ``key`` maps to, or None."""
        ref = self._refs.get(key)
        return None if ref is None else ref()

    def discard(self, key: _K, obj: _V) -> None:
        """Forget ``key`` if it maps to ``obj`` (or to a collected object)."""
        ref = self._refs.get(key)
        if ref is not None:
            target = ref()
            if target is None or target is obj:
                del self._refs[key]

    def __iter__(self) -> Iterator[_V]:
        """The objects alive, one at a time, from a snapshot of the map."""
        for ref in list(self._refs.values()):
            obj = ref()
            if obj is not None:
                yield obj


class FlowControlMixin(asyncio.Transport):
    """Write flow control: ``pause_writing``/``resume_writing`` around two water marks."""

    __slots__ = ("_high_water", "_loop", "_low_water", "_protocol", "_protocol_paused")
    _extra: dict[str, Any]  # asyncio.BaseTransport's (typeshed does not declare it)

    def __init__(self, extra: dict[str, Any] | None, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol: Any = None
        self._protocol_paused = False
        self._high_water = HIGH_WATER
        self._low_water = _LOW_WATER

    def _maybe_pause_protocol(self) -> None:
        if self._protocol_paused or self.get_write_buffer_size() <= self._high_water:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": "protocol.pause_writing() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler(
                    {
                        "message": "protocol.resume_writing() failed",
                        "exception": exc,
                        "transport": self,
                        "protocol": self._protocol,
                    }
                )

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """Return ``(low, high)``."""
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the buffer sizes at which ``pause_writing``/``resume_writing`` fire."""
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low
        self._maybe_pause_protocol()

    def get_write_buffer_size(self) -> int:
        """Bytes accepted by ``write()`` and not yet handed to the kernel."""
        raise NotImplementedError


class Deadlines:
    """The idle timeout and absolute deadline of one stream transport."""

    __slots__ = ("_timer", "_transport", "deadline", "idle", "last_io")

    def __init__(self, transport: StreamTransport) -> None:
        self._transport = transport
        #: When a byte was last received or sent, on the loop's clock. The
        #: transport tracks it only while it has limits: it starts now.
        self.last_io = transport._loop.time()
        #: Close after this many seconds without a byte received or sent.
        self.idle: float | None = None
        #: Close at this time on the loop's clock (``loop.time()``).
        self.deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """(Re)schedule the timer for the earliest limit; cancel it if none."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        due = self.deadline
        if self.idle is not None:
            idle_due = self.last_io + self.idle
            due = idle_due if due is None else min(due, idle_due)
        if due is not None and not transport._closing:
            self._timer = transport._loop.call_at(due, self._fire)

    def cancel(self) -> None:
        """Drop the timer (the connection is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport._closing:
            return
        now = transport._loop.time()
        if self.deadline is not None and now >= self.deadline:
            lived = self.deadline - transport._opened
            transport.abort_with(
                DeadlineExceeded(
                    f"connection closed: it reached its deadline ({lived:g} s after it opened)",
                    lived,
                )
            )
        elif self.idle is not None and now >= self.last_io + self.idle:
            transport.abort_with(
                IdleTimeout(
                    f"connection closed: no byte received or sent for {self.idle:g} s "
                    "(idle timeout)",
                    self.idle,
                )
            )
        else:
            self.arm()


class StreamTransport(FlowControlMixin):
    """The base of iomux's stream (TCP and Unix) transports: see the module docstring.

    It has asyncio's ``Transport`` interface, so an ``asyncio.Protocol`` or
    ``asyncio.BufferedProtocol`` is served unchanged, plus
    :meth:`set_idle_timeout` and :meth:`set_deadline`.
    """

    __slots__ = (
        "__weakref__",
        "_buffered",
        "_closing",
        "_conn_lost",
        "_context",
        "_deadlines",
        "_eof",
        "_on_lost",
        "_opened",
        "_paused",
        "_protocol_connected",
        "_server",
        "_sock",
        "_sock_fd",
    )
    #: ``loop.start_tls()`` may wrap this transport.
    _start_tls_compatible = True
    #: How ``loop.sendfile()`` may use this transport (set by subclasses).
    _sendfile_compatible: Any = None

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> None:
        super().__init__(extra or _NO_EXTRA, loop)
        # "socket", "sockname" and "peername" are looked up when first asked
        # for (see get_extra_info), not kept for every connection.
        self._sock: socket.socket | None = sock
        self._sock_fd = sock.fileno()
        self._context = contextvars.copy_context()
        self._protocol_connected = False
        self._buffered = False
        self.set_protocol(protocol)
        self._server = server
        self._on_lost: Callable[[StreamTransport], None] | None = None
        self._closing = False
        self._paused = False
        self._eof = False
        self._conn_lost = 0
        self._deadlines: Deadlines | None = None
        self._opened = loop.time()
        if server is not None:
            server.attach(self)

    def fileno(self) -> int:
        """The fd number of this transport's socket (kept after the socket closed).

        The loop keys its map of connections by it.
        """
        return self._sock_fd

    @property
    def server(self) -> Server | None:
        """The server that accepted this connection (None for a client's, or once it is over)."""
        return self._server

    # -- extra info -------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """asyncio's extra info: ``socket``, ``sockname``, ``peername``, and what was given.

        The socket's names are asked of the kernel the first time they are
        wanted (and, if nobody asked, kept when the socket is closed), as
        uvloop does, so that an idle connection does not carry them.
        """
        info = self._extra
        if name in info:
            return info[name]
        if name not in _SOCKET_INFO or self._sock is None:
            return default
        return self._socket_info(name)

    def _socket_info(self, name: str) -> Any:
        sock = self._sock
        assert sock is not None
        info = self._extra
        if info is _NO_EXTRA:
            info = self._extra = {}
        value: Any
        if name == "socket":
            value = trsock.TransportSocket(sock)
        else:
            try:
                value = sock.getsockname() if name == "sockname" else sock.getpeername()
            except OSError:
                value = None
        info[name] = value
        return value

    def _keep_socket_info(self) -> None:
        """The socket is about to close: keep the names nobody asked for yet."""
        if self._sock is None:
            return
        for name in _SOCKET_INFO:
            if name not in self._extra:
                self._socket_info(name)

    # -- the protocol -----------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol."""
        self._protocol = protocol
        self._protocol_connected = True
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        return self._protocol  # type: ignore[no-any-return]

    def _connection_made(self, waiter: asyncio.Future[Any] | None) -> None:
        """Schedule ``connection_made``, then (after it) the waiter's result."""
        loop = self._loop
        loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)

    def _start_reading(self) -> None:
        """Begin receiving (called right after ``connection_made``)."""
        raise NotImplementedError

    # -- state --------------------------------------------------------------------

    def is_closing(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` was called or the connection ended."""
        return self._closing

    def is_reading(self) -> bool:
        """Whether the transport is receiving (not paused and not closing)."""
        return not self._closing and not self._paused

    def can_write_eof(self) -> bool:
        """Stream sockets can always half-close."""
        return True

    def _check_write(self, data: Any) -> bool:
        """Validate what ``write()`` got; False when it is to be dropped silently."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return False
        if self._conn_lost:
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                aio_logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return False
        return True

    def writelines(self, list_of_data: Any) -> None:
        """Write every buffer of an iterable, in order, as one write."""
        if self._eof:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        self.write(b"".join(list_of_data))

    # -- closing ------------------------------------------------------------------

    def abort(self) -> None:
        """Close at once, dropping buffered data; ``connection_lost(None)`` follows.

        If written data is dropped, the connection is reset (TCP RST) rather
        than ended, so the peer sees an error instead of a truncated stream.
        """
        self._force_close(None)

    def abort_with(self, exc: BaseException) -> None:
        """Close at once, as :meth:`abort`, and report ``exc`` to ``connection_lost``.

        This is how a deadline (:class:`IdleTimeout`, :class:`DeadlineExceeded`)
        or a graceful shutdown's drain timeout ends a connection.
        """
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        """Close now, dropping the write buffer; ``connection_lost(exc)`` follows."""
        raise NotImplementedError

    def _reset_if_dropping(self) -> None:
        """About to drop accepted bytes: make the close a reset (SO_LINGER 0)."""
        sock = self._sock
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass  # not a socket that can linger (or broken already): close anyway

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        # OSErrors (the peer reset, the network broke) are the connection's
        # fate, logged in debug mode only; anything else is a bug to report.
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                aio_logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _lost(self, exc: BaseException | None) -> None:
        """Schedule ``connection_lost(exc)`` (once): the connection is over."""
        self._conn_lost += 1
        if self._deadlines is not None:
            self._deadlines.cancel()
        # In the context of the protocol's other callbacks (asyncio's
        # transports end from those callbacks, or from their own handlers).
        self._loop.call_soon(self._call_connection_lost, exc, context=self._context)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._release()
            self._protocol = None
            server, self._server = self._server, None
            if server is not None:
                server.detach(self)
            on_lost, self._on_lost = self._on_lost, None
            if on_lost is not None:
                on_lost(self)

    def on_lost(self, callback: Callable[[StreamTransport], None] | None) -> None:
        """Call ``callback(transport)`` once the connection is over and the protocol was told.

        One callback per transport (the loop's, to track its connections);
        setting another replaces it.
        """
        self._on_lost = callback

    def _release(self) -> None:
        """The protocol was told: close the socket (subclasses may defer it)."""
        self._keep_socket_info()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    # -- deadlines ------------------------------------------------------------------

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Close the connection with :class:`IdleTimeout` after ``seconds`` without I/O."""
        seconds = check_seconds("idle timeout", seconds)
        dl = self._deadlines or Deadlines(self)
        self._deadlines = dl
        dl.idle = seconds
        dl.arm()

    def set_deadline(self, when: float | None) -> None:
        """Close the connection with :class:`DeadlineExceeded` at ``when`` (``loop.time()``)."""
        if when is not None and (isinstance(when, bool) or not isinstance(when, (int, float))):
            raise TypeError(f"the deadline must be a loop time (a number) or None, not {when!r}")
        dl = self._deadlines or Deadlines(self)
        self._deadlines = dl
        dl.deadline = None if when is None else float(when)
        dl.arm()

    def get_idle_timeout(self) -> float | None:
        """The idle timeout in seconds, or None."""
        return self._deadlines.idle if self._deadlines else None

    def get_deadline(self) -> float | None:
        """The absolute deadline on the loop's clock, or None."""
        return self._deadlines.deadline if self._deadlines else None

    # -- graceful shutdown ------------------------------------------------------------

    def shutdown_requested(self) -> None:
        """A graceful shutdown began: tell a protocol with ``shutdown_requested()``."""
        hook = getattr(self._protocol, "shutdown_requested", None)
        if hook is None or self._closing:
            return
        try:
            self._context.run(hook)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": "exception in protocol.shutdown_requested()",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "closing" if self._closing else "open"
        return (
            f"<{type(self).__name__} fd={self._sock_fd} {state} "
            f"bufsize={self.get_write_buffer_size()}>"
        )


def _set_result_unless_cancelled(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)
