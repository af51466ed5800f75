"""Graceful shutdown: stop accepting, let connections finish, then close them.

Phases:

1. Every server stops accepting. Connections already in the backlog are
   accepted first (their clients completed the handshake and may have sent
   data the kernel acknowledged). Protocols with a ``shutdown_requested()``
   method are told, so they can finish the current exchange and close.
2. Connections keep being served until they close by themselves or
   ``grace`` seconds pass.
3. The rest are closed with ``close()``: reading stops and what was written
   is flushed. A connection whose peer does not take its data within
   ``drain`` seconds is aborted with :class:`ShutdownTimeout`.

Nothing accepted by ``write()`` is dropped unless the peer refuses it for
the whole drain time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .errors import ShutdownTimeout

if TYPE_CHECKING:
    from .futures import Future
    from .loop import Reactor
    from .server import Server
    from .transport import SocketTransport

#: Seconds between checks for connections that are still open.
POLL_INTERVAL = 0.01


def graceful_shutdown(
    reactor: Reactor,
    servers: Iterable[Server],
    connections: Callable[[], list[SocketTransport]],
    grace: float,
    drain: float,
) -> Future[None]:
    """Run the phases above; the future is done when no connection is left."""
    if grace < 0 or drain < 0:
        raise ValueError(f"grace ({grace!r}) and drain ({drain!r}) must be >= 0 seconds")
    for server in list(servers):
        server.close()
    for transport in connections():
        transport._shutdown_requested()
    done: Future[None] = reactor.create_future()
    grace_end = reactor.time() + grace
    drain_end = grace_end + drain
    closing = False

    def check() -> None:
        nonlocal closing
        left = connections()
        if not left:
            if not done.done():
                done.set_result(None)
            return
        now = reactor.time()
        if now >= drain_end:
            for transport in left:
                transport._expire(
                    ShutdownTimeout(
                        f"connection aborted: it did not finish within the {grace:g} s grace "
                        f"period nor flush its data within {drain:g} s more",
                        grace + drain,
                    )
                )
        elif now >= grace_end and not closing:
            closing = True
            for transport in left:
                transport.close()
        reactor.call_later(POLL_INTERVAL, check)

    reactor.call_soon(check)
    return done
