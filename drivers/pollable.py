"""The base of the poll-like drivers (poll and epoll).

As in CPython's ``selectors._PollLikeSelector``, the two differ only in the
poller object they wrap, its flag values and its timeout unit, so each
driver is a handful of class attributes over this one class.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from iomux.multiplexer import Interest, Multiplexer, Registration, Trigger

_READ = int(Interest.READ)
_WRITE = int(Interest.WRITE)


class PollMasks:
    """Translation between Interest bits and poll(2)-style event masks."""

    _EVENT_READ: ClassVar[int]
    _EVENT_WRITE: ClassVar[int]
    #: Extra kernel flags per trigger; a trigger missing here is unsupported.
    _TRIGGER_FLAGS: ClassVar[dict[Trigger, int]] = {Trigger.LEVEL: 0}

    def _flags(self, reg: Registration) -> int:
        flags = self._TRIGGER_FLAGS[reg.trigger]
        if reg.interest & _READ:
            flags |= self._EVENT_READ
        if reg.interest & _WRITE:
            flags |= self._EVENT_WRITE
        return flags

    def _translate(self, event: int) -> int:
        # Hang-up and error conditions count as readiness for both
        # directions; the base class keeps only what was registered.
        mask = 0
        if event & ~self._EVENT_WRITE:
            mask |= _READ
        if event & ~self._EVENT_READ:
            mask |= _WRITE
        return mask


class PollLikeDriver(PollMasks, Multiplexer):
    """A driver over an object with ``register``/``modify``/``unregister``/``poll``."""

    _poller_factory: ClassVar[Callable[[], Any]]
    #: Multiply a timeout in seconds by this to get the poller's unit.
    _TIMEOUT_SCALE: ClassVar[float] = 1e3
    #: Whether the poller itself rejects fds that are not open (epoll does).
    _CHECKS_FDS: ClassVar[bool] = False

    def __init__(self) -> None:
        self._poller = type(self)._poller_factory()
        super().__init__()

    def _control(self, fd: int, old: Registration | None, new: Registration | None) -> None:
        if new is None:
            try:
                self._poller.unregister(fd)
            except KeyError:
                pass
            except OSError as exc:
                # The fd was closed first: the kernel already forgot it.
                if exc.errno not in (errno.ENOENT, errno.EBADF, errno.EPERM):
                    raise
        elif old is None:
            if not self._CHECKS_FDS:
                os.fstat(fd)  # OSError(EBADF) now rather than POLLNVAL later
            self._register(fd, self._flags(new))
        else:
            self._modify(fd, self._flags(new))

    def _register(self, fd: int, flags: int) -> None:
        self._poller.register(fd, flags)

    def _modify(self, fd: int, flags: int) -> None:
        self._poller.modify(fd, flags)

    def _wait(self, timeout: float | None) -> Iterable[tuple[int, int]]:
        if timeout is None:
            return self._poll(-1)
        # Round up to whole milliseconds: a wait rounded down to 0 would spin.
        return self._poll(math.ceil(timeout * 1e3) / 1e3 * self._TIMEOUT_SCALE)

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        # -1 blocks for both select.poll (milliseconds) and select.epoll (seconds).
        return self._poller.poll(timeout)  # type: ignore[no-any-return]

    def _close(self) -> None:
        close = getattr(self._poller, "close", None)
        if close is not None:
            close()
