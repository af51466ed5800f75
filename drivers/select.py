"""The select(2) driver.

select is everywhere and has nothing to set up, but it can only watch fds
below FD_SETSIZE (1024): glibc's fd_set is a fixed bitmap, and in C a larger
fd silently corrupts memory. Python refuses such fds when waiting; this
driver refuses them when registering, naming the limit. Each wait copies and
scans every registered fd: O(registered). One-shot is emulated exactly by
dropping the fd from the sets after one report; there is no edge trigger.

select() fails as a whole with EBADF when one of its fds was closed while
registered (poll(2) reports such an fd as POLLNVAL instead, and epoll
forgets it). The driver then finds the closed fds and reports them as ready
for what they were registered for, so that their owner's next call sees the
EBADF, and goes on watching the others: one closed fd never breaks a wait.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterable

from iomux.errors import FdOutOfRange
from iomux.multiplexer import Capabilities, Interest, Multiplexer, Registration, Trigger

FD_SETSIZE = 1024
_READ = int(Interest.READ)
_WRITE = int(Interest.WRITE)


class SelectDriver(Multiplexer):
    """Readiness through ``select.select``."""

    name = "select"
    capabilities = Capabilities(
        triggers=frozenset({Trigger.LEVEL, Trigger.ONESHOT}),
        max_fd=FD_SETSIZE,
        wait_cost="O(registered)",
        notes={"oneshot": "emulated: dropped from the fd sets after one report"},
    )
    flaws = (
        f"cannot watch fds >= FD_SETSIZE ({FD_SETSIZE})",
        "each wait rebuilds and scans bitmaps of every registered fd: O(registered)",
        "no edge triggering",
        "registrations made from another thread take effect at the next wait",
    )
    emulate_oneshot = True

    def __init__(self) -> None:
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        super().__init__()

    def _control(self, fd: int, old: Registration | None, new: Registration | None) -> None:
        if new is not None and old is None:
            if fd >= FD_SETSIZE:
                raise FdOutOfRange(self.name, fd, FD_SETSIZE)
            os.fstat(fd)  # OSError(EBADF) now rather than at the next wait
        interest = 0 if new is None else int(new.interest)
        for bit, fds in ((_READ, self._readers), (_WRITE, self._writers)):
            if interest & bit:
                fds.add(fd)
            else:
                fds.discard(fd)

    def _wait(self, timeout: float | None) -> Iterable[tuple[int, int]]:
        try:
            readable, writable, _ = select.select(self._readers, self._writers, (), timeout)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            return self._report_closed()
        ready = dict.fromkeys(readable, _READ)
        for fd in writable:
            ready[fd] = ready.get(fd, 0) | _WRITE
        return ready.items()

    def _report_closed(self) -> Iterable[tuple[int, int]]:
        """select() failed with EBADF: report the closed fds, and what else is ready now."""
        closed = set()
        for fd in self._readers | self._writers:
            try:
                os.fstat(fd)
            except OSError:
                closed.add(fd)
        ready = {fd: (_READ | _WRITE) for fd in closed}
        readers, writers = self._readers - closed, self._writers - closed
        if readers or writers:
            readable, writable, _ = select.select(readers, writers, (), 0)
            for fd in readable:
                ready[fd] = _READ
            for fd in writable:
                ready[fd] = ready.get(fd, 0) | _WRITE
        return ready.items()

    def _close(self) -> None:
        self._readers.clear()
        self._writers.clear()
