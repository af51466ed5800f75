"""Accepting connections on a listening socket by readiness.

When accept() fails because the process or system is out of file
descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM), the pending
connection stays in the kernel's backlog and the socket stays readable, so
retrying at once would spin. The listener instead stops watching the socket
for a short delay, logs once per episode, then tries again.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Reactor

logger = logging.getLogger("iomux.reactor")

#: Seconds to stop accepting after running out of fds or memory.
ACCEPT_RETRY_DELAY = 0.1
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The connection died in the backlog: skip it and accept the next.
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

AcceptCallback = Callable[[socket.socket, Any], None]


class Listener:
    """Accepts on one listening socket and hands each connection to a callback."""

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        on_accept: AcceptCallback,
        *,
        batch: int = 128,
        retry_delay: float = ACCEPT_RETRY_DELAY,
    ) -> None:
        self._reactor = reactor
        self._sock = sock
        self._on_accept = on_accept
        self._batch = batch
        self._retry_delay = retry_delay
        self._watching = False
        self._backing_off = False
        self._closed = False
        # Out of resources since the last successful accept (log once per episode).
        self._starved = False
        #: How many times accepting was paused for lack of resources.
        self.resource_pauses = 0

    def start(self) -> None:
        """Watch the socket for incoming connections."""
        if not self._watching and not self._closed and not self._backing_off:
            self._reactor._mux.register(self._sock, 1, self._on_event)
            self._watching = True

    def stop(self) -> None:
        """Stop watching (connections wait in the backlog)."""
        if self._watching:
            self._reactor._mux.unregister(self._sock)
            self._watching = False

    def close(self) -> None:
        """Stop watching and close the socket (Unix socket files are not removed here)."""
        self.stop()
        self._closed = True
        try:
            # Stop listening now even if a driver still holds a reference to
            # the file (an io_uring poll not yet cancelled keeps it open).
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
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
        for _ in range(self._batch):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                if exc.errno in _OUT_OF_RESOURCES:
                    self._back_off(exc)
                else:
                    self._reactor.call_exception_handler(
                        {"message": f"accept() failed on {sock!r}", "exception": exc}
                    )
                return False
            self._starved = False
            self._on_accept(conn, addr)
        return True

    def _back_off(self, exc: OSError) -> None:
        if not self._starved:
            self._starved = True
            logger.warning(
                "accept() on %s failed: %s; pausing accepts for %.0f ms at a time "
                "until it succeeds",
                _describe(self._sock),
                exc.strerror or exc,
                self._retry_delay * 1e3,
            )
        self.resource_pauses += 1
        self.stop()
        self._backing_off = True
        self._reactor.call_later(self._retry_delay, self._retry)

    def _retry(self) -> None:
        if self._closed:
            return
        self._backing_off = False
        self.start()


def _describe(sock: socket.socket) -> str:
    try:
        return repr(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"
