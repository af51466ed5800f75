"""The epoll(7) driver.

epoll keeps the interest list in the kernel, so a wait costs O(ready), and
it triggers on levels, edges or once. Its surprises: the registration
belongs to the open file description, not the fd number, so a dup'd fd
that was closed without being unregistered can stay in the set and keep
reporting under the old number; and it refuses regular files (they are
always ready) with EPERM.
"""

from __future__ import annotations

import select

from iomux.errors import UnwatchableFile
from iomux.multiplexer import Capabilities, Trigger

from .pollable import PollLikeDriver


class EpollDriver(PollLikeDriver):
    """Readiness through ``select.epoll``."""

    name = "epoll"
    capabilities = Capabilities(
        triggers=frozenset({Trigger.LEVEL, Trigger.EDGE, Trigger.ONESHOT}),
        wait_cost="O(ready)",
        threadsafe_register=True,
        pollable_fd=True,
    )
    flaws = (
        "a registration follows the open file description: close a dup'd fd "
        "without unregistering it and it may keep reporting",
        "cannot watch regular files (EPERM)",
        "one epoll_ctl system call per registration change",
    )
    _poller_factory = select.epoll
    _EVENT_READ = select.EPOLLIN
    _EVENT_WRITE = select.EPOLLOUT
    _TRIGGER_FLAGS = {
        Trigger.LEVEL: 0,
        Trigger.EDGE: select.EPOLLET,
        Trigger.ONESHOT: select.EPOLLONESHOT,
    }
    _TIMEOUT_SCALE = 1.0
    _CHECKS_FDS = True

    def _register(self, fd: int, flags: int) -> None:
        try:
            self._poller.register(fd, flags)
        except FileExistsError:
            # Still in the set under a dup of a closed fd: take it over.
            self._poller.modify(fd, flags)
        except PermissionError:
            raise UnwatchableFile(
                self.name,
                fd,
                "epoll cannot watch regular files or directories "
                "(they are always ready); read them directly or use the poll backend",
            ) from None

    def _modify(self, fd: int, flags: int) -> None:
        try:
            self._poller.modify(fd, flags)
        except FileNotFoundError:
            self._register(fd, flags)

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        # CPython caps maxevents at FD_SETSIZE - 1 unless told otherwise.
        return self._poller.poll(timeout, len(self._map) + 1)  # type: ignore[no-any-return]

    def fileno(self) -> int:
        """The epoll fd: readable when a wait would return events."""
        return int(self._poller.fileno())
