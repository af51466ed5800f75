"""``iomux.Reactor``: an asyncio event loop on any iomux backend.

The loop is assembled from three layers (as asyncio's is from
``base_events``, ``selector_events`` and ``proactor_events``):

* :mod:`iomux.reactor.base`: callbacks, timers, running, tasks, errors;
* :mod:`iomux.reactor.network`: the network API (connections, servers,
  datagrams, TLS, sendfile, pipes, subprocesses, signals);
* :mod:`iomux.reactor.readiness`: readiness I/O on the multiplexer, which
  every backend has;
* :mod:`iomux.reactor.completion`: completion I/O through the driver's
  completion port (io_uring), used for TCP and Unix stream connections
  when the backend offers it.

Which I/O serves stream connections is chosen per loop: ``io="completion"``,
``"readiness"``, or ``"auto"`` (the default unless the environment variable
``IOMUX_IO`` says otherwise): completion where the driver declares
``capabilities.completion``, else readiness. Whatever the completion port
cannot do (datagrams, pipes, ``add_reader``...) is done by readiness on
the same multiplexer, never by switching backend.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, Any

from iomux.errors import IomuxError
from iomux.multiplexer import Multiplexer, Trigger
from iomux.registry import open_multiplexer

from .errors import EmbeddingUnsupported
from .readiness import ReadinessReactor
from .server import Listener, Server
from .transport import LINGER_RESET, StreamTransport

if TYPE_CHECKING:
    from iomux.completion import CompletionPort

    from .completion import CompletionIO

#: The environment variable that chooses the stream I/O: readiness, completion, auto.
IO_ENV = "IOMUX_IO"
IO_CHOICES = ("auto", "readiness", "completion")


class CompletionUnsupported(IomuxError, ValueError):
    """Completion I/O was asked for on a driver or kernel that cannot do it."""


class Reactor(ReadinessReactor):
    """An :class:`asyncio.AbstractEventLoop` on an iomux multiplexer.

    ``backend`` is a backend name, comma list, ``"auto"``, a Multiplexer
    subclass (as for :func:`iomux.open_multiplexer`) or an open
    :class:`~iomux.Multiplexer` (the loop owns and closes it); ``options``
    go to the driver. ``io`` chooses how stream connections move bytes
    (see the module docstring). ``trigger`` (``Trigger.LEVEL``, the
    default, or ``Trigger.EDGE``) is how readiness stream transports
    register; it implies ``io="readiness"``.
    """

    def __init__(
        self,
        backend: str | type[Multiplexer] | Multiplexer | None = None,
        *,
        io: str | None = None,
        trigger: Trigger | None = None,
        **options: Any,
    ) -> None:
        mux = backend if isinstance(backend, Multiplexer) else open_multiplexer(backend, **options)
        try:
            super().__init__(mux, trigger=trigger)
            #: How the backend was chosen (``selection.describe()`` says why), or None.
            self.selection = mux.selection
            self._max_fd = mux.capabilities.max_fd
            self._completion: CompletionIO | None = None
            self._file_port: CompletionPort | None = None
            choice = self._io_choice(io, trigger)
            if choice != "readiness":
                reason = _completion_unsupported(mux)
                if reason is None:
                    from .completion import CompletionIO

                    self._completion = CompletionIO(self, mux, self._wait_writable)
                elif choice == "completion":
                    raise CompletionUnsupported(f"completion I/O cannot run: {reason}")
        except BaseException:
            self._closed = True
            mux.close()
            raise

    @staticmethod
    def _io_choice(io: str | None, trigger: Trigger | None) -> str:
        if io is None:
            if trigger is not None:
                return "readiness"
            io = os.environ.get(IO_ENV) or "auto"
            where = f"{IO_ENV}={io!r}"
        else:
            where = f"io={io!r}"
        if io not in IO_CHOICES:
            raise ValueError(f"{where}: choose one of {', '.join(IO_CHOICES)}")
        if trigger is not None and io == "completion":
            raise ValueError(f"trigger={trigger} applies to readiness I/O only")
        return io

    # -- what it runs on ------------------------------------------------------------

    @property
    def multiplexer(self) -> Multiplexer:
        """The multiplexer the loop waits on."""
        return self._mux

    @property
    def backend(self) -> str:
        """The name of the backend the loop runs on (e.g. ``"io_uring"``)."""
        return self._mux.name

    @property
    def io(self) -> str:
        """How stream connections move bytes: ``"completion"`` or ``"readiness"``."""
        return "completion" if self._completion is not None else "readiness"

    # -- the I/O layers -------------------------------------------------------------

    def _process_io(self, timeout: float | None) -> None:
        # One wait: readiness and completions come out of the same poll().
        ReadinessReactor._process_io(self, timeout)
        completion = self._completion
        if completion is not None:
            completion.dispatch()
        elif self._file_port is not None:
            self._run_port_callbacks(self._file_port)

    def _run_port_callbacks(self, port: Any) -> None:
        try:
            port.run_done()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.call_exception_handler(
                {"message": "exception in a file operation's callback", "exception": exc}
            )

    async def _sock_sendfile_native(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        # On io_uring: the ring splices file -> pipe -> socket, without the
        # loop's thread blocking while the kernel reads the file.
        port = self.completion_port
        if port is not None and "SPLICE" in port.file_ops:
            from .splice import sendfile_splice

            return await sendfile_splice(self, port, sock.fileno(), file, offset, count)
        return await super()._sock_sendfile_native(sock, file, offset, count)

    async def _wait_writable(self, fd: int) -> None:
        """Wait until ``fd`` is writable, even if a transport owns it (sendfile)."""
        fut = self.create_future()
        handle = self._add_writer(fd, _set_if_pending, fut)
        try:
            await fut
        finally:
            if not handle.cancelled():
                self._remove_writer(fd)

    @property
    def completion_port(self) -> CompletionPort | None:
        """The driver's completion port (io_uring), for file operations; None elsewhere.

        The loop runs the port's callbacks in its iteration, after the I/O
        they complete (see :mod:`iomux.completion` and :mod:`iomux.files`).
        """
        if self._closed:
            self._raise_closed()
        if self._completion is not None:
            return self._completion.port()
        if self._file_port is None and _completion_unsupported(self._mux) is None:
            try:
                self._file_port = self._mux.completion_port()
            except OSError:
                return None
        return self._file_port

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Server | None = None,
    ) -> StreamTransport:
        self._ensure_fd_no_transport(sock)
        transport: StreamTransport
        if self._completion is not None:
            transport = self._completion.transport(sock, protocol, waiter, extra, server)
        else:
            transport = self._make_readiness_transport(sock, protocol, waiter, extra, server)
        self._stream_made(transport)
        return transport

    def _listen(self, server: Server, sock: socket.socket) -> Listener:
        if self._completion is not None:
            return self._completion.listener(server, sock)
        return self._listen_by_readiness(server, sock)

    # -- embedding ------------------------------------------------------------------

    def run_once(self, timeout: float | None = 0) -> None:
        """Run one iteration, waiting at most ``timeout`` seconds for I/O (None: until any).

        For a host loop: call it when :meth:`fileno` is readable or when
        :meth:`next_timeout` says work is due.
        """
        # A host asyncio loop may be running in this thread: this loop is the
        # running one while its callbacks run, then the host is again.
        host = asyncio._get_running_loop()
        asyncio._set_running_loop(None)
        try:
            self._enter_run()
            try:
                self._run_once_within(timeout)
                # The host is about to wait on fileno(): hand batched changes over.
                if self._completion is not None:
                    self._completion.submit()
                else:
                    self._mux.submit()
            finally:
                self._leave_run()
        finally:
            asyncio._set_running_loop(host)

    def _run_once_within(self, limit: float | None) -> None:
        if limit is None:
            self._run_once()
            return
        # Bound the wait by scheduling nothing: a timer that ends the wait.
        timer = self.call_later(max(0.0, limit), _nothing)
        try:
            self._run_once()
        finally:
            timer.cancel()

    def fileno(self) -> int:
        """An fd that is readable when the loop has I/O to handle (epoll, io_uring).

        Watch it in a host loop and call :meth:`run_once` (with timeout 0)
        when it is readable or :meth:`next_timeout` expires. Drivers whose
        fd set no single fd stands for (select, poll) raise
        :class:`EmbeddingUnsupported`: run the loop in a thread instead.
        """
        if self._closed:
            self._raise_closed()
        try:
            if self._completion is not None:
                return self._completion.fileno()
            return self._mux.fileno()
        except OSError as exc:
            raise EmbeddingUnsupported(
                f"the {self._mux.name} driver has no pollable fd, so the loop cannot be "
                "embedded by fd; run it in a thread of its own (see iomux.reactor.embed) "
                "or use the epoll backend"
            ) from exc

    # -- closing --------------------------------------------------------------------

    def _close_io(self) -> None:
        # Bytes write() accepted and never sent: when these sockets are
        # eventually closed, reset the connections rather than end them
        # cleanly, so that no peer takes a truncated stream for a whole one.
        for transport in self._streams():
            if transport.get_write_buffer_size():
                sock = transport.get_extra_info("socket")
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except (OSError, AttributeError):
                    pass
        self._signals.close()
        if self._completion is not None:
            self._completion.close()
        super()._close_io()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.is_running() else "idle"
        name = self._mux.name if hasattr(self, "_mux") else "?"
        return f"<Reactor {name} {self.io if hasattr(self, '_completion') else '?'} {state}>"


def _nothing() -> None:
    """A timer callback whose only job is to bound a wait."""


def _set_if_pending(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


def _completion_unsupported(mux: Multiplexer) -> str | None:
    """Why completion I/O cannot run on ``mux``, or None if it can."""
    if not mux.capabilities.completion:
        return f"the {mux.name} driver declares no capability completion"
    try:
        mux.completion_port()
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None
