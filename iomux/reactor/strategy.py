"""How the reactor moves bytes: the transport-strategy interface.

A strategy makes the listeners and transports of one reactor. The
*readiness* strategy (here) waits for the multiplexer to say a socket is
ready and then calls ``accept``/``recv``/``send`` itself; it works on every
driver. The *completion* strategy (:mod:`iomux.reactor.completion`), for drivers
whose ``capabilities.completion`` is True (io_uring), instead submits
operations (multishot accept, multishot recv into a provided buffer ring,
batched sends) and reacts to their completions, which the reactor hands to
:meth:`TransportStrategy.complete` once per loop iteration. Transports must
offer the :class:`~iomux.reactor.transport.SocketTransport` interface
(asyncio's ``Transport`` plus deadlines and the reactor's hooks).
"""

from __future__ import annotations

import asyncio
import socket
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from iomux.multiplexer import Trigger

from .listener import AcceptCallback, Listener
from .transport import SocketTransport

if TYPE_CHECKING:
    from .loop import Reactor
    from .server import Server


class ListenerLike(Protocol):
    """What a server needs of a strategy's listener."""

    def start(self) -> None:
        """Begin accepting."""

    def stop(self) -> None:
        """Stop accepting (connections wait in the backlog)."""

    def close(self) -> None:
        """Stop accepting and close the socket."""

    def accept_pending(self) -> None:
        """Accept every connection already in the backlog, now."""


class TransportStrategy(ABC):
    """Makes the listeners and transports of one reactor."""

    #: A short name for logs and ``repr``.
    name = "abstract"

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor

    @abstractmethod
    def listen(self, sock: socket.socket, on_accept: AcceptCallback) -> ListenerLike:
        """Return a (not yet started) listener calling ``on_accept(conn, addr)``."""

    @abstractmethod
    def transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        server: Server | None = None,
        peername: Any = None,
    ) -> SocketTransport:
        """Wrap a connected non-blocking socket; the caller then calls ``_start()``."""

    def complete(self, batch: list[tuple[int, int, int]]) -> None:  # noqa: B027
        """Handle the completions ``(user_data, res, flags)`` of one loop iteration."""

    def fileno(self) -> int:
        """The fd a host loop waits on (see :meth:`Reactor.fileno`)."""
        return self.reactor._mux.fileno()

    def close(self) -> None:  # noqa: B027
        """The reactor is closing, after its transports and before its multiplexer."""


class ReadinessStrategy(TransportStrategy):
    """Readiness I/O on any driver (LEVEL registrations unless EDGE is asked for)."""

    name = "readiness"

    def __init__(self, reactor: Reactor, *, trigger: Trigger | None = None) -> None:
        super().__init__(reactor)
        triggers = reactor._mux.capabilities.triggers
        if trigger is None:
            # LEVEL costs no extra system call per event; EDGE must read until
            # EAGAIN (see iomux.reactor.transport).
            trigger = Trigger.LEVEL
        if trigger not in (Trigger.EDGE, Trigger.LEVEL):
            raise ValueError(f"the readiness strategy uses EDGE or LEVEL, not {trigger}")
        if trigger not in triggers:
            raise ValueError(
                f"the {reactor._mux.name} driver does not support {trigger}; "
                f"it supports {', '.join(sorted(str(t) for t in triggers))}"
            )
        #: The trigger transports register with.
        self.trigger = trigger
        self._edge = trigger is Trigger.EDGE

    def listen(self, sock: socket.socket, on_accept: AcceptCallback) -> Listener:
        """A readiness :class:`~iomux.reactor.listener.Listener`."""
        return Listener(self.reactor, sock, on_accept)

    def transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        server: Server | None = None,
        peername: Any = None,
    ) -> SocketTransport:
        """A :class:`SocketTransport` registered with the reactor's multiplexer."""
        return SocketTransport(
            self.reactor, sock, protocol, edge=self._edge, server=server, peername=peername
        )
