"""Signal handlers that run as reactor callbacks.

As in asyncio: a no-op Python handler is installed for each signal and
``signal.set_wakeup_fd`` makes the C-level handler write the signal number
to a socket the reactor watches. The reactor reads the numbers and runs the
callbacks in its own iteration, never inside the interrupted code.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .handles import Handle

if TYPE_CHECKING:
    from .loop import Reactor


def _noop(signum: int, frame: object) -> None:
    """The Python-level handler: the work happens in the reactor."""


class SignalHandlers:
    """The signal handlers of one reactor."""

    def __init__(self, reactor: Reactor) -> None:
        self._reactor = reactor
        self._handlers: dict[int, Handle] = {}
        self._previous: dict[int, Any] = {}
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._old_wakeup_fd = -1

    def add(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` in the reactor each time ``sig`` arrives."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "signal handlers can only be installed from the main thread "
                "(a Python restriction); run the reactor there or handle signals in it"
            )
        sig = signal.Signals(sig)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{sig.name} cannot be caught")
        if self._rsock is None:
            self._open()
        if sig not in self._previous:
            self._previous[sig] = signal.getsignal(sig)
        self._handlers[sig] = Handle(callback, args, self._reactor)
        signal.signal(sig, _noop)
        signal.siginterrupt(sig, False)

    def remove(self, sig: int) -> bool:
        """Restore the previous disposition of ``sig``; return whether one was set."""
        sig = signal.Signals(sig)
        if self._handlers.pop(sig, None) is None:
            return False
        signal.signal(sig, self._previous.pop(sig))
        if not self._handlers:
            self._close_socket()
        return True

    def close(self) -> None:
        """Remove every handler and restore the previous wakeup fd."""
        for sig in list(self._handlers):
            self.remove(sig)
        self._close_socket()

    def _open(self) -> None:
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        self._old_wakeup_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self._rsock, self._wsock = rsock, wsock
        self._reactor._mux.register(rsock, 1, self._on_event)

    def _close_socket(self) -> None:
        if self._rsock is None or self._wsock is None:
            return
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_wakeup_fd)
        if not self._reactor._mux.closed:
            self._reactor._mux.unregister(self._rsock)
        self._rsock.close()
        self._wsock.close()
        self._rsock = self._wsock = None

    def _on_event(self, mask: int) -> None:
        assert self._rsock is not None
        try:
            data = self._rsock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            handle = self._handlers.get(signum)
            if handle is not None and not handle._cancelled:
                self._reactor._ready.append(handle)
