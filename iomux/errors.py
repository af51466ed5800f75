"""Exception types raised by iomux.

Each type also derives from the built-in exception that code written for
:mod:`selectors` already catches (``KeyError``, ``ValueError``,
``RuntimeError``, ``OSError``), so switching to iomux does not change which
``except`` clauses fire.
"""

from __future__ import annotations

import errno


class IomuxError(Exception):
    """Base class of every exception defined by iomux."""


class MultiplexerClosed(IomuxError, RuntimeError):
    """The multiplexer was used after :meth:`Multiplexer.close`."""


class InvalidFileObject(IomuxError, TypeError, ValueError):
    """The object passed as a file is neither an int fd nor has ``fileno()``."""


class UnsupportedTrigger(IomuxError, ValueError):
    """The driver cannot deliver the requested :class:`~iomux.Trigger` honestly."""

    def __init__(self, driver: str, trigger: object, supported: object) -> None:
        super().__init__(
            f"the {driver} driver does not support trigger {trigger}; it supports {supported}"
        )
        self.driver = driver
        self.trigger = trigger


class FdOutOfRange(IomuxError, ValueError):
    """The fd number is beyond what the driver can watch (select's FD_SETSIZE)."""

    def __init__(self, driver: str, fd: int, limit: int) -> None:
        super().__init__(
            f"fd {fd} is out of range for the {driver} driver: it can only watch "
            f"fds below {limit}; use the poll, epoll or io_uring backend instead"
        )
        self.fd = fd
        self.limit = limit


class UnwatchableFile(IomuxError, OSError):
    """The kernel refuses to watch this kind of file (epoll and regular files)."""

    def __init__(self, driver: str, fd: int, why: str) -> None:
        super().__init__(errno.EPERM, f"the {driver} driver cannot watch fd {fd}: {why}")
        self.fd = fd


class BackendUnavailable(IomuxError, RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"backend {name!r} is unavailable: {reason}")
        self.name = name
        self.reason = reason


class UnknownBackend(IomuxError, ValueError):
    """A backend name that no built-in or installed driver answers to."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown backend {name!r}; known backends: {', '.join(known)} "
            "(or 'auto', or a comma-separated preference list)"
        )
        self.name = name
        self.known = known


class ForkedError(IomuxError, RuntimeError):
    """A multiplexer created in a parent process was used in a forked child."""

    def __init__(self, driver: str, owner_pid: int, pid: int) -> None:
        super().__init__(
            f"this {driver} multiplexer belongs to process {owner_pid} and cannot be "
            f"used in forked child {pid}; close it and open a new one in the child"
        )
