"""The completion strategy: the reactor's I/O as io_uring operations.

Instead of waiting for readiness and then calling ``accept``/``recv``/``send``,
the strategy queues operations on the io_uring driver's ring: a multishot
accept per listening socket, a multishot receive per connection into one
shared provided-buffer group, and at most one send per connection (writes
made meanwhile are batched into the next). Everything queued during a loop
iteration reaches the kernel with the driver's next ``poll()``: one
``io_uring_enter`` per iteration submits the operations and collects the
new completions, which the reactor hands to
:meth:`CompletionStrategy.complete` in one list; the buffers of a batch go
back to the kernel together, in one call, once their bytes are copied out.

Each operation's ``user_data`` is ``COMPLETION_TAG | ident << 3 | kind``,
where ``ident`` numbers listeners and connections and is never reused, so a
completion is dispatched by one dict lookup and completions of a closed
connection are recognised whatever happened to its fd number.

``Reactor(strategy=None)`` picks this strategy when the driver declares
``capabilities.completion`` (io_uring); ``Reactor(strategy="readiness")``,
the environment variable ``IOMUX_IO=readiness`` or an explicit ``trigger``
force readiness I/O, ``"completion"`` forces this one.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from iomux.errors import IomuxError
from iomux.multiplexer import Multiplexer, Trigger

from .completion_transport import (
    BUFFER_SHIFT,
    F_BUFFER,
    F_MORE,
    KIND_ACCEPT,
    KIND_BITS,
    KIND_CANCEL,
    CompletionTransport,
    error,
    uring,
)
from .listener import _OUT_OF_RESOURCES, _TRANSIENT, ACCEPT_RETRY_DELAY, AcceptCallback, Listener
from .strategy import ReadinessStrategy, TransportStrategy

if TYPE_CHECKING:
    from .loop import Reactor
    from .server import Server

#: Buffers in the provided-buffer group (a power of two) and their size. A
#: buffer is held only from the kernel's fill until the next enter, so the
#: group needs to cover one loop iteration's receives, not every connection
#: (running out costs a re-armed receive, not data). The kernel cycles
#: through all of them, so all become resident: 2 MiB. A fast sender can
#: fill many in one enter; a connection paused meanwhile holds copies of
#: those, so the group size also bounds what a pause can leave held.
BUFFERS = 512
BUFFER_SIZE = 4096
#: The buffer group id the strategy registers on the ring.
GROUP_ID = 0x1F0
#: The environment variable that chooses the strategy: readiness, completion, auto.
ENV = "IOMUX_IO"
CHOICES = ("auto", "readiness", "completion")

# Set in the user_data of completion operations (see iomux.drivers.io_uring).
_TAG = 1 << 61
_ECANCELED = -errno.ECANCELED
_EALREADY = -errno.EALREADY

# handler(res, flags); res is the received bytes when flags has F_BUFFER.
Handler = Callable[[Any, int], None]
StrategyChoice = str | Callable[["Reactor"], TransportStrategy] | None


class CompletionUnsupported(IomuxError, ValueError):
    """The completion strategy was asked for on a driver or kernel that cannot run it."""


def completion_unsupported(mux: Multiplexer) -> str | None:
    """Why the completion strategy cannot run on ``mux``, or None if it can."""
    if not mux.capabilities.completion:
        return f"the {mux.name} driver declares no capability completion"
    if uring is None:
        return "the io_uring layer (iomux.drivers) cannot be imported"
    if not isinstance(getattr(mux, "ring", None), uring.Ring) or not hasattr(mux, "completions"):
        return f"the {mux.name} driver has no io_uring ring to queue operations on"
    release = os.uname().release.split("-", 1)[0].split(".")
    try:
        version = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        version = (0, 0)
    if version < (6, 0):
        return f"multishot receive needs Linux 6.0 or newer, this is {os.uname().release}"
    return None


def choose_strategy(
    reactor: Reactor, strategy: StrategyChoice, trigger: Trigger | None
) -> TransportStrategy:
    """The reactor's strategy from its arguments and ``IOMUX_IO`` (see the module docstring)."""
    if strategy is None:
        strategy = "readiness" if trigger is not None else os.environ.get(ENV) or "auto"
        where = f"{ENV}={strategy!r}" if trigger is None else "trigger"
    else:
        where = f"strategy={strategy!r}"
    if not isinstance(strategy, str):
        return strategy(reactor)
    if strategy not in CHOICES:
        raise ValueError(f"{where}: the strategy must be one of {', '.join(CHOICES)}")
    if strategy == "readiness":
        return ReadinessStrategy(reactor, trigger=trigger)
    if trigger is not None:
        raise ValueError(f"trigger={trigger} applies to the readiness strategy only")
    if strategy == "auto" and completion_unsupported(reactor._mux) is not None:
        return ReadinessStrategy(reactor)
    return CompletionStrategy(reactor)


class CompletionStrategy(TransportStrategy):
    """Multishot accept, multishot receive into provided buffers, batched sends.

    Needs the io_uring driver (see :func:`completion_unsupported`).
    ``buffers`` (a power of two) and ``buffer_size`` size the shared
    provided-buffer group, registered when the first connection starts.
    """

    name = "completion"

    def __init__(
        self, reactor: Reactor, *, buffers: int = BUFFERS, buffer_size: int = BUFFER_SIZE
    ) -> None:
        super().__init__(reactor)
        reason = completion_unsupported(reactor._mux)
        if reason is not None:
            raise CompletionUnsupported(f"the completion strategy cannot run: {reason}")
        if buffers < 1 or buffers & (buffers - 1) or buffer_size < 1:
            raise ValueError("buffers must be a power of two and buffer_size positive")
        self._driver: Any = cast(Any, reactor._mux)  # an IoUringDriver (checked above)
        #: The driver's ring, on which every operation is queued.
        self.ring: Any = self._driver.ring
        #: Set in the user_data of every operation.
        self.tag = _TAG
        #: user_data -> ``handler(res, flags)`` for every operation that may complete
        #: (see :meth:`complete`).
        self.handlers: dict[int, Handler] = {}
        #: ident -> socket kept open until its cancelled operations completed.
        self.dying: dict[int, socket.socket] = {}
        #: A new connection or listener number (never reused).
        self.new_ident: Callable[[], int] = itertools.count(1).__next__
        self._buffers = buffers
        self._size = buffer_size
        self._group: Any = None
        self._mem: Any = None
        self._queued = False  # an operation was queued: the ring cannot be replaced
        #: Set once a host loop waits on fileno(): see :meth:`kick`.
        self.eager = False

    # -- the buffer group ----------------------------------------------------------

    def group(self) -> Any:
        """The provided-buffer group receives use (registered on first use)."""
        group = self._group
        if group is None:
            group = self.ring.buffer_group(GROUP_ID, self._buffers, self._size)
            # The mmap behind every buffer: slicing it makes a bytes in one step.
            self._mem = group.view(0, self._size).obj
            self._group = group
            self._queued = True
        return group

    # -- TransportStrategy -------------------------------------------------------------

    def listen(self, sock: socket.socket, on_accept: AcceptCallback) -> CompletionListener:
        """A listener with a multishot accept."""
        return CompletionListener(self, sock, on_accept)

    def transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        server: Server | None = None,
        peername: Any = None,
    ) -> CompletionTransport:
        """A :class:`CompletionTransport` over ``sock``."""
        self._queued = True
        return CompletionTransport(self, sock, protocol, server=server, peername=peername)

    def complete(self, batch: list[tuple[int, int, int]]) -> None:
        """Dispatch one loop iteration's completions ``(user_data, res, flags)``.

        Each goes to ``handlers[user_data](res, flags)``, except that a
        completion that filled a provided buffer passes the received bytes in
        place of ``res``: they are copied out here and the batch's buffers
        go back to the kernel together, in one call.
        """
        handlers = self.handlers
        mem, size = self._mem, self._size
        bids: list[int] = []
        try:
            for user_data, res, flags in batch:
                handler = handlers.get(user_data)
                got: Any = res
                if flags & F_BUFFER:
                    bid = flags >> BUFFER_SHIFT
                    bids.append(bid)
                    if res > 0:
                        start = bid * size
                        got = mem[start : start + res]
                    else:
                        flags &= ~F_BUFFER
                if handler is None:
                    continue  # a late completion of something already released
                try:
                    handler(got, flags)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.reactor.call_exception_handler(
                        {
                            "message": f"exception in completion handler {handler!r}",
                            "exception": exc,
                        }
                    )
        finally:
            if bids:
                self._group.recycle(bids)

    def fileno(self) -> int:
        """The ring's fd, for a host loop (before any connection or listener started)."""
        ring = self.ring
        if "DEFER_TASKRUN" in ring.setup_flag_names and (self._queued or self.reactor._transports):
            # The driver re-creates the ring to make it pollable; operations
            # and buffers on the old one cannot move.
            raise RuntimeError(
                "with the completion strategy, call Reactor.fileno() before creating "
                "servers or connections (or use Reactor(strategy='readiness'))"
            )
        fd = self._driver.fileno()
        self.ring = self._driver.ring
        self.eager = True
        return int(fd)

    def kick(self) -> None:
        """Submit now what was queued outside a reactor iteration, for a host loop.

        A host waiting on :meth:`fileno` runs the reactor only when the fd
        turns readable, which operations still queued in user space never make it.
        """
        if self.eager and not self.reactor._running:
            self._driver.submit()

    def close(self) -> None:
        """The reactor is closing: close sockets still waiting for their cancellations."""
        for sock in self.dying.values():
            sock.close()
        self.dying.clear()


class CompletionListener(Listener):
    """Accepts with one multishot accept; pauses on EMFILE like :class:`Listener`.

    A multishot accept that fails (out of fds, memory...) ends: the listener
    re-arms it after ``retry_delay``, so a full fd table costs one
    completion per delay, not a busy loop. :meth:`accept_pending` accepts
    synchronously, as the readiness listener does.
    """

    def __init__(
        self,
        strategy: CompletionStrategy,
        sock: socket.socket,
        on_accept: AcceptCallback,
        *,
        retry_delay: float = ACCEPT_RETRY_DELAY,
    ) -> None:
        super().__init__(strategy.reactor, sock, on_accept, retry_delay=retry_delay)
        self._strategy = strategy
        self._ident = ident = strategy.new_ident()
        base = strategy.tag | ident << KIND_BITS
        self._accept_ud = base | KIND_ACCEPT
        self._cancel_ud = base | KIND_CANCEL
        self._armed = False  # an accept is on the ring until its last completion
        self._kind = (sock.family, sock.type, sock.proto)
        strategy.handlers[self._accept_ud] = self._on_complete
        strategy.handlers[self._cancel_ud] = self._on_cancel_failed

    def start(self) -> None:
        """Arm the multishot accept."""
        if self._watching or self._closed or self._backing_off:
            return
        self._watching = True
        if not self._armed:
            self._arm()

    def _arm(self) -> None:
        self._strategy._queued = True
        self._strategy.ring.accept(self._sock.fileno(), self._accept_ud)
        self._armed = True
        self._strategy.kick()

    def stop(self) -> None:
        """Cancel the accept (connections wait in the backlog)."""
        if not self._watching:
            return
        self._watching = False
        if self._armed:
            self._strategy.ring.cancel(self._accept_ud, self._cancel_ud, skip_success=True)
            self._strategy.kick()

    def close(self) -> None:
        """Stop accepting; the socket closes once the accept's cancellation completed."""
        self.stop()
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # refuse new connections now
        except OSError:
            pass
        if self._armed:
            self._strategy.dying[self._ident] = self._sock
        else:
            self._forget()

    def _forget(self) -> None:
        handlers = self._strategy.handlers
        handlers.pop(self._accept_ud, None)
        handlers.pop(self._cancel_ud, None)
        self._strategy.dying.pop(self._ident, None)
        self._sock.close()

    def _on_complete(self, res: int, flags: int) -> None:
        if not flags & F_MORE:
            self._armed = False
            self._ended(res)
        if res >= 0:
            family, type_, proto = self._kind
            self._starved = False
            conn = socket.socket(family, type_, proto, fileno=res)
            try:
                # A multishot accept gives no address; accept() would have.
                addr = conn.getpeername()
            except OSError:
                addr = None  # reset in the backlog: the first receive reports it
            self._on_accept(conn, addr)

    def _ended(self, res: int) -> None:
        """The multishot accept ended: re-arm, back off, or finish closing."""
        if self._closed:
            self._forget()
        elif res >= 0 or res == _ECANCELED or -res in _TRANSIENT:
            if self._watching:
                self._arm()
        elif -res in _OUT_OF_RESOURCES:
            self._back_off(error(res))
        else:
            self._reactor.call_exception_handler(
                {"message": f"accept failed on {self._sock!r}", "exception": error(res)}
            )
            # Retry later rather than at once: the error may persist.
            self.stop()
            self._backing_off = True
            self._reactor.call_later(self._retry_delay, self._retry)

    def _on_cancel_failed(self, res: int, flags: int) -> None:
        # Only failures complete (SKIP_SUCCESS); EALREADY: try again.
        if res == _EALREADY and self._armed and not self._watching:
            self._strategy.ring.cancel(self._accept_ud, self._cancel_ud, skip_success=True)
