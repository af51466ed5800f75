"""The waker: how :meth:`Multiplexer.wakeup` interrupts a wait from any thread.

An eventfd is registered for reading with the driver like any other fd.
``wake()`` adds 1 to its counter, which makes it readable; the poll loop
drains it and returns. Waking twice before the loop drains costs nothing
more, and a wake that happens before the wait begins is not lost: the
eventfd stays readable until drained.
"""

from __future__ import annotations

import os


class Waker:
    """An eventfd that makes a blocked wait return."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        """The eventfd to watch for READ."""
        return self._fd

    def wake(self) -> None:
        """Make the eventfd readable; safe from any thread and signal handler."""
        try:
            os.eventfd_write(self._fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: it is readable already
        except OSError:
            if self._fd >= 0:
                raise

    def drain(self) -> None:
        """Reset the eventfd so that it stops being readable."""
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close the eventfd; idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
