"""The reactor: callbacks, timers and I/O dispatch on one iomux multiplexer.

One iteration waits in ``poll()`` (no longer than until the next timer, not
at all if callbacks are ready), calls the callback registered with each
ready fd, moves due timers to the ready queue and runs the callbacks that
were ready when the iteration began. I/O events are dispatched straight to
the transports, without a handle per event.

Timers are a heap of ``(when, sequence, handle)`` on the monotonic clock; a
timer runs only once ``time.monotonic() >= when`` (never early) and timers
due at the same time run in the order they were scheduled.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from iomux.multiplexer import Multiplexer, Trigger
from iomux.registry import open_multiplexer

from . import connect as _connect
from .completion import StrategyChoice, choose_strategy
from .errors import EmbeddingUnsupported, ReactorClosed, ReactorRunning, RunTimeout
from .futures import Future, Task
from .handles import Handle, TimerHandle
from .server import ProtocolFactory, Server
from .signals import SignalHandlers
from .strategy import TransportStrategy
from .transport import SocketTransport

logger = logging.getLogger("iomux.reactor")

T = TypeVar("T")
ExceptionHandler = Callable[["Reactor", dict[str, Any]], object]
Connected = tuple[SocketTransport, asyncio.BaseProtocol]

# Rebuild the heap when this many cancelled timers are in it (and they are half).
_MIN_CANCELLED_TO_PURGE = 100


class Reactor:
    """An event loop for callbacks, timers and stream connections on any iomux backend.

    ``backend`` is a backend name, comma list, ``"auto"``, a Multiplexer
    subclass (as for :func:`iomux.open_multiplexer`) or an open
    :class:`~iomux.Multiplexer`. ``strategy`` is ``"completion"``,
    ``"readiness"``, ``"auto"`` (completion where the driver declares
    ``capabilities.completion``, the default unless the environment variable
    ``IOMUX_IO`` says otherwise) or a :class:`TransportStrategy` class.
    ``trigger`` implies readiness and forces its registrations to
    ``Trigger.LEVEL`` (the default) or ``Trigger.EDGE``.
    """

    def __init__(
        self,
        backend: str | type[Multiplexer] | Multiplexer | None = None,
        *,
        trigger: Trigger | None = None,
        strategy: StrategyChoice = None,
        **options: Any,
    ) -> None:
        if isinstance(backend, Multiplexer):
            self._mux = backend
        else:
            self._mux = open_multiplexer(backend, **options)
        #: How the backend was chosen (``selection.describe()`` says why), or None.
        self.selection = self._mux.selection
        self._ready: deque[Handle] = deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._cancelled_timers = 0
        self._sequence = itertools.count().__next__
        self._now = time.monotonic()
        self._running = False
        self._stopping = False
        self._closed = False
        self._thread: int | None = None
        self._exception_handler: ExceptionHandler | None = None
        self._transports: set[SocketTransport] = set()
        self._servers: set[Server] = set()
        self._signals = SignalHandlers(self)
        try:
            self._strategy: TransportStrategy = choose_strategy(self, strategy, trigger)
        except BaseException:
            self._mux.close()
            raise
        # Completions of the strategy's operations, collected by each poll().
        self._completions: list[tuple[int, int, int]] | None = getattr(
            self._mux, "completions", None
        )

    # -- properties ---------------------------------------------------------------

    @property
    def multiplexer(self) -> Multiplexer:
        """The multiplexer the reactor waits on."""
        return self._mux

    @property
    def strategy(self) -> TransportStrategy:
        """The transport strategy (completion or readiness)."""
        return self._strategy

    def time(self) -> float:
        """The reactor's clock: ``time.monotonic()``."""
        return time.monotonic()

    # -- callbacks and timers -----------------------------------------------------------

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Handle:
        """Run ``callback(*args)`` in the next iteration, after earlier ones."""
        handle = Handle(callback, args, self)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> Handle:
        """Like :meth:`call_soon`, from any thread: wakes a waiting reactor."""
        self._check_open()
        handle = Handle(callback, args, self)
        self._ready.append(handle)
        self._mux.wakeup()
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` once at least ``delay`` seconds have passed."""
        return self.call_at(time.monotonic() + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` once :meth:`time` reaches ``when``."""
        handle = TimerHandle(when, callback, args, self)
        heapq.heappush(self._timers, (when, self._sequence(), handle))
        return handle

    def _timer_cancelled(self) -> None:
        self._cancelled_timers += 1
        timers = self._timers
        if self._cancelled_timers > _MIN_CANCELLED_TO_PURGE and self._cancelled_timers * 2 > len(
            timers
        ):
            kept = []
            for entry in timers:
                if entry[2]._cancelled:
                    entry[2]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            self._timers = kept
            self._cancelled_timers = 0

    def create_future(self) -> Future[Any]:
        """A new pending :class:`Future` bound to this reactor."""
        return Future(self)

    def create_task(self, coro: Coroutine[Any, Any, T]) -> Task[T]:
        """Run a coroutine that awaits reactor futures; return its :class:`Task`."""
        return Task(self, coro)

    def sleep(self, delay: float, result: T | None = None) -> Future[T | None]:
        """A future that completes with ``result`` after ``delay`` seconds."""
        fut: Future[T | None] = Future(self)
        handle = self.call_later(delay, _set_if_pending, fut, result)
        fut.add_done_callback(lambda f: handle.cancel())
        return fut

    # -- running ------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run until :meth:`stop` is called."""
        self._enter()
        try:
            while not self._stopping:
                self._iterate(None)
        finally:
            self._stopping = False
            self._leave()

    def run_until_complete(
        self, work: Future[T] | Coroutine[Any, Any, T], *, timeout: float | None = None
    ) -> T:
        """Run until ``work`` (a future or coroutine) is done; return its result.

        With ``timeout``, raise :class:`RunTimeout` if it is not done by then
        (the work is left pending). Raises RuntimeError if :meth:`stop` ends
        the run first.
        """
        fut = work if isinstance(work, Future) else self.create_task(work)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._enter()
        try:
            while not fut.done():
                if self._stopping:
                    raise RuntimeError("the reactor was stopped before the work completed")
                if deadline is None:
                    self._iterate(None)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunTimeout(f"{work!r} did not complete within {timeout} s")
                self._iterate(left)
        finally:
            self._stopping = False
            self._leave()
        return fut.result()

    def run_once(self, timeout: float | None = 0) -> None:
        """Run one iteration, waiting at most ``timeout`` seconds for I/O (None: until any).

        For embedding in a host loop: call it when :meth:`fileno` is readable
        or when :meth:`next_timeout` says work is due.
        """
        self._enter()
        try:
            self._iterate(timeout)
            # The host is about to wait on fileno(): hand batched changes over.
            self._mux.submit()
        finally:
            self._stopping = False
            self._leave()

    def stop(self) -> None:
        """Make ``run_forever``/``run_until_complete`` return after this iteration."""
        self._stopping = True

    def is_running(self) -> bool:
        """Whether a run method is executing."""
        return self._running

    def is_closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def next_timeout(self) -> float | None:
        """Seconds until the reactor has work without I/O: 0 if callbacks are
        ready, the time to the next timer, or None if neither."""
        if self._ready:
            return 0.0
        timers = self._timers
        while timers and timers[0][2]._cancelled:
            heapq.heappop(timers)[2]._scheduled = False
            self._cancelled_timers -= 1
        if not timers:
            return None
        return max(0.0, timers[0][0] - time.monotonic())

    def _enter(self) -> None:
        self._check_open()
        if self._running:
            raise ReactorRunning("the reactor is already running")
        self._running = True
        self._thread = threading.get_ident()

    def _leave(self) -> None:
        self._running = False
        self._thread = None

    def _iterate(self, max_wait: float | None) -> None:
        ready = self._ready
        timers = self._timers
        if ready or self._stopping:
            wait: float | None = 0.0
        elif timers:
            wait = timers[0][0] - time.monotonic()
            if wait < 0:
                wait = 0.0
            if max_wait is not None and max_wait < wait:
                wait = max_wait
        else:
            wait = max_wait
        events = self._mux.poll(wait)
        self._now = now = time.monotonic()
        for _fd, mask, callback in events:
            try:
                callback(mask)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.call_exception_handler(
                    {"message": f"exception in I/O callback {callback!r}", "exception": exc}
                )
        completions = self._completions
        if completions:
            try:
                self._strategy.complete(completions)
            finally:
                completions.clear()
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            handle._scheduled = False
            if handle._cancelled:
                self._cancelled_timers -= 1
            else:
                ready.append(handle)
        for _ in range(len(ready)):
            callback_handle = ready.popleft()
            if not callback_handle._cancelled:
                callback_handle._run()

    # -- errors ---------------------------------------------------------------------------

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Call ``handler(reactor, context)`` for errors in callbacks (None: log them)."""
        if handler is not None and not callable(handler):
            raise TypeError(f"the exception handler must be callable or None, not {handler!r}")
        self._exception_handler = handler

    def get_exception_handler(self) -> ExceptionHandler | None:
        """The handler set by :meth:`set_exception_handler`, or None."""
        return self._exception_handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        """Log the context's message and exception to the ``iomux.reactor`` logger."""
        exc = context.get("exception")
        details = "".join(
            f"\n{key}: {value!r}"
            for key, value in context.items()
            if key not in ("message", "exception")
        )
        logger.error(
            "%s%s",
            context.get("message", "unhandled error in the reactor"),
            details,
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
        )

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Report an error: to the handler if one is set, else to the log."""
        handler = self._exception_handler
        if handler is None:
            self.default_exception_handler(context)
            return
        try:
            handler(self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.default_exception_handler(
                {
                    "message": "the exception handler raised",
                    "exception": exc,
                    "context": context,
                }
            )

    # -- connections ------------------------------------------------------------------------

    def create_server(
        self,
        protocol_factory: ProtocolFactory,
        host: str | None = None,
        port: int = 0,
        *,
        family: int = socket.AF_UNSPEC,
        sock: socket.socket | None = None,
        backlog: int = 128,
        reuse_address: bool = True,
        reuse_port: bool = False,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
        start_serving: bool = True,
    ) -> Server:
        """Listen on TCP ``host:port`` (IPv4 and/or IPv6) and serve each connection.

        Unlike asyncio this returns the :class:`Server` at once: binding does
        not wait for anything (a host name is resolved synchronously).
        ``host=None`` listens on every interface, ``port=0`` picks a port.
        """
        from .listening import tcp_sockets

        self._check_open()
        sockets = (
            [_prepare_listener(sock, backlog)]
            if sock is not None
            else tcp_sockets(host, port, family, backlog, reuse_address, reuse_port)
        )
        server = Server(
            self, sockets, protocol_factory, idle_timeout=idle_timeout, lifetime=lifetime
        )
        if start_serving:
            server.start_serving()
        return server

    def create_unix_server(
        self,
        protocol_factory: ProtocolFactory,
        path: str | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 128,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
        start_serving: bool = True,
    ) -> Server:
        """Listen on a Unix stream socket at ``path`` (removed again by ``close()``).

        A stale socket file left at ``path`` is replaced; any other file is an error.
        """
        from .listening import unix_socket

        self._check_open()
        if sock is None:
            if path is None:
                raise ValueError("give a path or a bound socket")
            sock = unix_socket(path, backlog)
            paths = [path]
        else:
            sock = _prepare_listener(sock, backlog)
            paths = []
        server = Server(
            self,
            [sock],
            protocol_factory,
            idle_timeout=idle_timeout,
            lifetime=lifetime,
            unix_paths=paths,
        )
        if start_serving:
            server.start_serving()
        return server

    def create_connection(
        self,
        protocol_factory: ProtocolFactory,
        host: str | None = None,
        port: int | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        local_addr: Any = None,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Future[Connected]:
        """Connect over TCP; the future's result is ``(transport, protocol)``.

        Each resolved address is tried in turn; a refused connection fails
        the future with ConnectionRefusedError. ``idle_timeout`` (seconds)
        and ``deadline`` (reactor time) are set before ``connection_made``.
        """
        self._check_open()
        if host is None or port is None:
            raise ValueError("create_connection needs a host and a port")
        fut: Future[Connected] = Future(self)
        connector = _connect.Connector(
            self, protocol_factory, fut, local_addr=local_addr,
            setup=_deadline_setup(idle_timeout, deadline),
        )  # fmt: skip
        resolved = _connect.resolve(self, host, port, family)
        resolved.add_done_callback(lambda r: _start_connector(connector, r))
        return fut

    def create_unix_connection(
        self,
        protocol_factory: ProtocolFactory,
        path: str,
        *,
        idle_timeout: float | None = None,
        deadline: float | None = None,
    ) -> Future[Connected]:
        """Connect to a Unix stream socket at ``path``; result ``(transport, protocol)``."""
        self._check_open()
        fut: Future[Connected] = Future(self)
        connector = _connect.Connector(
            self, protocol_factory, fut, setup=_deadline_setup(idle_timeout, deadline)
        )
        connector.start([(socket.AF_UNIX, socket.SOCK_STREAM, 0, path)])
        return fut

    def connect_accepted_socket(
        self, protocol_factory: ProtocolFactory, sock: socket.socket
    ) -> Connected:
        """Serve an already connected socket (it is made non-blocking)."""
        self._check_open()
        sock.setblocking(False)
        protocol = protocol_factory()
        transport = self._strategy.transport(sock, protocol)
        transport._start()
        return transport, protocol

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is readable (level-triggered)."""
        self._check_open()
        self._mux.register(fd, 1, lambda mask: callback(*args))

    def remove_reader(self, fd: int) -> bool:
        """Stop watching ``fd``; return whether it was watched."""
        if self._closed or fd not in self._mux:
            return False
        self._mux.unregister(fd)
        return True

    # -- signals and shutdown -------------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` as a reactor callback whenever ``sig`` arrives (main thread)."""
        self._check_open()
        self._signals.add(sig, callback, *args)

    def remove_signal_handler(self, sig: int) -> bool:
        """Restore the previous handling of ``sig``; return whether a handler was set."""
        return self._signals.remove(sig)

    def shutdown(self, grace: float = 10.0, drain: float = 5.0) -> Future[None]:
        """Gracefully end every server and connection of this reactor.

        Servers stop accepting (after accepting their backlog); connections
        are served until they close or ``grace`` seconds pass, then closed
        with their write buffers flushed; any still unflushed ``drain``
        seconds later are aborted with :class:`ShutdownTimeout`. See
        :mod:`iomux.reactor.shutdown`.
        """
        from .shutdown import graceful_shutdown

        return graceful_shutdown(
            self, list(self._servers), lambda: list(self._transports), grace, drain
        )

    def install_shutdown_handlers(
        self,
        signals: tuple[int, ...] = (2, 15),
        *,
        grace: float = 10.0,
        drain: float = 5.0,
    ) -> None:
        """On SIGINT/SIGTERM (or ``signals``): :meth:`shutdown`, then :meth:`stop`.

        A second signal during the shutdown stops the reactor at once.
        """
        state: dict[str, Future[None]] = {}

        def on_signal() -> None:
            if "shutdown" in state:
                self.stop()
                return
            fut = state["shutdown"] = self.shutdown(grace, drain)
            fut.add_done_callback(lambda f: self.stop())

        for sig in signals:
            self.add_signal_handler(sig, on_signal)

    # -- embedding ---------------------------------------------------------------------------

    def fileno(self) -> int:
        """An fd that is readable when the reactor has I/O to handle (epoll, io_uring).

        Watch it in a host loop and call :meth:`run_once` (with timeout 0)
        when it is readable or :meth:`next_timeout` expires. Drivers whose
        fd set no single fd stands for (select, poll) raise
        :class:`EmbeddingUnsupported`: run the reactor in a thread instead.
        """
        self._check_open()
        try:
            return self._strategy.fileno()
        except OSError as exc:
            raise EmbeddingUnsupported(
                f"the {self._mux.name} driver has no pollable fd, so the reactor cannot be "
                "embedded by fd; run it in a thread of its own (see iomux.reactor.embed) "
                "or use the epoll backend"
            ) from exc

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close servers, abort open transports (no protocol callbacks), release the
        multiplexer. Use :meth:`shutdown` first for a graceful end."""
        if self._closed:
            return
        if self._running:
            raise ReactorRunning("cannot close a running reactor; stop() it first")
        for server in list(self._servers):
            server._serving = False
            server.close()
        for transport in list(self._transports):
            # Dropping data that write() accepted resets the connection, so
            # that the peer cannot take a truncated stream for a whole one.
            transport._drop(None)
        self._strategy.close()
        self._signals.close()
        self._ready.clear()
        self._timers.clear()
        self._closed = True
        self._mux.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ReactorClosed("the reactor is closed")

    def __enter__(self) -> Reactor:
        """Return self; the ``with`` block closes the reactor."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the reactor."""
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._running else "idle"
        return (
            f"<Reactor {self._mux.name} {self._strategy.name} {state} "
            f"transports={len(self._transports)}>"
        )


def _set_if_pending(fut: Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _prepare_listener(sock: socket.socket, backlog: int) -> socket.socket:
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"a server needs a stream socket, not {sock!r}")
    sock.setblocking(False)
    sock.listen(backlog)
    return sock


def _deadline_setup(
    idle_timeout: float | None, deadline: float | None
) -> Callable[[SocketTransport], None] | None:
    if idle_timeout is None and deadline is None:
        return None

    def setup(transport: SocketTransport) -> None:
        if idle_timeout is not None:
            transport.set_idle_timeout(idle_timeout)
        if deadline is not None:
            transport.set_deadline(deadline)

    return setup


def _start_connector(connector: _connect.Connector, resolved: Future[Any]) -> None:
    if connector.future.done():
        return
    exc = resolved.exception()
    if exc is not None:
        connector.future.set_exception(exc)
        return
    connector.start(resolved.result())
