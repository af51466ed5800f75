"""Signal handlers that run as loop callbacks, as asyncio's.

A no-op Python handler is installed for each signal, and
``signal.set_wakeup_fd`` makes the C-level handler write the signal number
to a socket the loop watches. The loop reads the numbers and runs the
callbacks in its own iteration, never inside the interrupted code.
Removing a handler restores the signal's default disposition
(``default_int_handler`` for SIGINT), as asyncio does.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from collections.abc import Callable
from typing import Any

from .base import aio_logger


def _noop(signum: int, frame: object) -> None:
    """The Python-level handler: the work happens in the loop."""


class SignalHandlers:
    """The signal handlers of one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # signal -> (callback, args, context), scheduled on each arrival.
        self._handlers: dict[int, asyncio.Handle] = {}
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None

    @staticmethod
    def _check(sig: object) -> int:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")
        return sig

    def add(self, sig: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Run ``callback(*args)`` in the loop each time ``sig`` arrives."""
        self._check(sig)
        opened = self._rsock is None
        if opened:
            self._rsock, self._wsock = socket.socketpair()
            self._rsock.setblocking(False)
            self._wsock.setblocking(False)
        try:
            # Raises ValueError outside the main thread: a loop running in
            # another thread cannot take signals over.
            signal.set_wakeup_fd(self._wsock.fileno())  # type: ignore[union-attr]
        except (ValueError, OSError) as exc:
            if opened:
                self._close_socket()
            raise RuntimeError(str(exc)) from None
        if opened:
            assert self._rsock is not None
            self._loop.add_reader(self._rsock, self._on_readable)
        self._handlers[sig] = asyncio.Handle(callback, args, self._loop, None)
        try:
            signal.signal(sig, _noop)
            signal.siginterrupt(sig, False)  # SA_RESTART: fewer EINTRs
        except OSError as exc:
            del self._handlers[sig]
            if not self._handlers:
                self._reset_wakeup_fd()
                self._close_socket()
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise

    def remove(self, sig: int) -> bool:
        """Stop handling ``sig`` and restore its default; return whether it was handled."""
        self._check(sig)
        if self._handlers.pop(sig, None) is None:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise
        if not self._handlers:
            self._reset_wakeup_fd()
            self._close_socket()
        return True

    def close(self) -> None:
        """Remove every handler (the loop is closing)."""
        for sig in list(self._handlers):
            try:
                self.remove(sig)
            except (RuntimeError, ValueError) as exc:  # not the main thread any more
                aio_logger.info("removing the handler of signal %d failed: %s", sig, exc)
                self._handlers.pop(sig, None)
        self._close_socket()

    def _reset_wakeup_fd(self) -> None:
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError) as exc:
            aio_logger.info("set_wakeup_fd(-1) failed: %s", exc)

    def _close_socket(self) -> None:
        rsock, wsock = self._rsock, self._wsock
        self._rsock = self._wsock = None
        if rsock is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(rsock)
            rsock.close()
        if wsock is not None:
            wsock.close()

    def _on_readable(self) -> None:
        rsock = self._rsock
        if rsock is None:
            return
        try:
            data = rsock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            handle = self._handlers.get(signum)
            if handle is None:
                continue
            if handle.cancelled():
                self.remove(signum)
            else:
                # Each arrival runs the handler once, in its own context.
                self._loop.call_soon(handle._run)
