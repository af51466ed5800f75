"""The completion-port contract: stream connections a driver moves bytes for.

A driver whose ``capabilities.completion`` is True (io_uring) offers, from
:meth:`iomux.Multiplexer.completion_port`, a :class:`CompletionPort`: the
interface through which the iomux event loop's completion transports use
the driver's completion operations. Instead of waiting for readiness and
calling ``recv``/``send`` itself, the loop *asks* for operations on a
connection, identified by a small integer *slot*, and gets *events* back.

Requests are queued and reach the kernel with the multiplexer's next
``poll()``, in the same system call that waits; the events of that
``poll()`` are then read with :meth:`CompletionPort.events`, all at once:

- ``DATA`` (``res`` bytes at ``offset`` in the data buffer ``events()``
  returns), ``EOF`` (the peer ended its side), ``ERROR`` (``res`` is
  ``-errno``; ``offset`` says what failed: ``FAILED_RECV``,
  ``FAILED_SEND``, ``FAILED_SHUTDOWN`` or ``FAILED_REQUEST``; the slot must
  then be closed);
- ``BACKLOG`` (``res`` bytes written on the slot are not sent yet, more
  than its limit, after the kernel took what it could; reported once
  until ``SENT`` or the backlog drains), ``SENT`` (the total asked for
  with :meth:`~CompletionPort.notify_sent` was sent), ``DRAINED`` (a
  graceful :meth:`~CompletionPort.close`: everything was sent, the
  connection is over), ``CLOSED`` (nothing of the
  slot is left in the kernel: close the socket; the slot may be reused);
- ``ACCEPTED`` (``res`` is a new connection's fd) and ``ACCEPT_END``
  (``res`` is 0 or ``-errno``: the listener's accepting ended; listen again
  or give up).

The port never closes a file descriptor: the caller owns its sockets and
closes each one after its slot's ``CLOSED`` event, when no operation can
still run on it. Events of one ``poll()`` are valid until the next one.

File operations. The port also reads and writes files asynchronously in
the kernel (no thread): ``open_file``, ``read_file``, ``write_file``,
``fsync_file``, ``statx_file``, ``close_file`` and ``splice`` queue one
operation each, submitted with the next ``poll()``, and call their
``done(result)`` (a count, an fd, or 0; ``-errno`` on failure) from
:meth:`CompletionPort.run_done`, which the event loop calls after each
wait. Buffers passed in are kept alive until then. ``file_ops`` names
the operations this kernel has; the others raise
``io.UnsupportedOperation``.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

#: Event kinds (see the module docstring).
DATA = 1
EOF = 2
ERROR = 3
SENT = 4
DRAINED = 5
CLOSED = 6
ACCEPTED = 7
ACCEPT_END = 8
BACKLOG = 9

#: What an ERROR event's offset says failed.
FAILED_RECV = 0
FAILED_SEND = 1
FAILED_SHUTDOWN = 2
FAILED_REQUEST = 3

#: One event: (slot, kind, result, offset).
Event = tuple[int, int, int, int]
#: One event packed (:meth:`CompletionPort.packed_events`): slot, kind,
#: result, offset, native byte order, 16 bytes.
EVENT_RECORD = struct.Struct("=IIiI")
#: One staged send in :attr:`CompletionPort.sends`: slot, length, native
#: byte order, 8 bytes.
SEND_PAIR = struct.Struct("=II")


class CompletionPort(ABC):
    """Stream connections driven by a driver's completion operations."""

    @abstractmethod
    def open(self, fd: int) -> int:
        """Take a connected socket's fd; return its slot (nothing is received yet)."""

    @abstractmethod
    def listen(self, fd: int) -> int:
        """Accept on a listening socket's fd; return its slot."""

    @abstractmethod
    def accept(self, slot: int, fd: int) -> None:
        """Accept again on listener ``slot`` (of ``fd``) after its ``ACCEPT_END``."""

    @abstractmethod
    def read(self, slot: int) -> None:
        """Receive on ``slot`` (again): ``DATA`` events until ``EOF``, an error or a pause."""

    @abstractmethod
    def pause(self, slot: int) -> None:
        """Stop receiving on ``slot`` (``DATA`` already on its way may still come)."""

    #: The fast path of :meth:`send`, for a caller that inlines it: the bytes of
    #: each send shorter than ``stage_max`` appended to ``stage``, and
    #: ``SEND_PAIR.pack(slot, len(data))`` to ``sends``, in that order.
    #: Longer sends go through :meth:`send`, which does not copy them twice.
    stage: bytearray
    sends: bytearray
    stage_max: int

    @abstractmethod
    def send(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on ``slot`` after everything sent before; the port copies it."""

    @abstractmethod
    def shutdown_write(self, slot: int) -> None:
        """Shut down the sending side of ``slot`` once everything is sent."""

    @abstractmethod
    def close(self, slot: int, *, abort: bool = False) -> None:
        """End ``slot``: at once (``abort``), or once everything is sent (``DRAINED``).

        Either way ``CLOSED`` follows once nothing of it is left in the kernel.
        For a listener, stop accepting (``CLOSED`` follows).
        """

    @abstractmethod
    def notify_sent(self, slot: int, total: int) -> None:
        """Report ``SENT`` once the bytes sent on ``slot`` reach ``total``."""

    @abstractmethod
    def limit_backlog(self, slot: int, limit: int) -> None:
        """Report ``BACKLOG`` when more than ``limit`` bytes are not sent (default 64 KiB)."""

    @abstractmethod
    def sent(self, slot: int) -> int:
        """The total bytes the kernel confirmed sending on ``slot``."""

    @abstractmethod
    def free(self, slot: int) -> None:
        """The caller is done with a ``CLOSED`` slot: the port may give it out again."""

    @property
    @abstractmethod
    def slots_in_use(self) -> int:
        """How many slots :meth:`open` and :meth:`listen` gave out that were not freed."""

    @abstractmethod
    def events(self) -> tuple[Iterable[Event], object]:
        """The events of the last ``poll()`` and the buffer their ``DATA`` bytes are in.

        Slicing the buffer (``buffer[offset:offset + res]``) gives ``bytes``.
        """

    def packed_events(self) -> tuple[bytes | memoryview, object]:
        """The same events as :meth:`events`, packed, and the same data buffer.

        Each event is one :data:`EVENT_RECORD` (slot, kind, result, offset;
        16 bytes), in order; the loop's C dispatcher reads them without
        making a tuple per event. Call one of the two, not both: either
        takes the events. This default packs what :meth:`events` returns; a
        port that keeps its events packed returns a view of them.
        """
        events, data = self.events()
        pack = EVENT_RECORD.pack
        return b"".join([pack(*event) for event in events]), data

    @abstractmethod
    def submit(self) -> None:
        """Hand queued requests to the kernel now (for a host waiting on ``fileno()``)."""

    # -- file operations --------------------------------------------------------------

    #: The file operations this port can do (``"OPENAT"``, ``"READ"``, ...).
    file_ops: frozenset[str] = frozenset()

    @abstractmethod
    def open_file(
        self,
        path: bytes,
        flags: int,
        mode: int,
        done: Callable[[int], object],
        *,
        dir_fd: int = -100,
    ) -> None:
        """Open ``path``; ``done(fd or -errno)``."""

    @abstractmethod
    def read_file(self, fd: int, buffer: Any, offset: int, done: Callable[[int], object]) -> None:
        """Read into ``buffer`` from ``offset`` (-1: the file position); ``done(n or -errno)``."""

    @abstractmethod
    def write_file(self, fd: int, data: Any, offset: int, done: Callable[[int], object]) -> None:
        """Write ``data`` at ``offset`` (-1: the file position); ``done(n or -errno)``."""

    @abstractmethod
    def fsync_file(self, fd: int, done: Callable[[int], object], *, datasync: bool = False) -> None:
        """Flush ``fd`` to storage; ``done(0 or -errno)``."""

    @abstractmethod
    def statx_file(
        self,
        path: bytes,
        flags: int,
        mask: int,
        buffer: Any,
        done: Callable[[int], object],
        *,
        dir_fd: int = -100,
    ) -> None:
        """``statx(2)`` of ``path`` into ``buffer`` (256 bytes); ``done(0 or -errno)``."""

    @abstractmethod
    def close_file(self, fd: int, done: Callable[[int], object]) -> None:
        """Close ``fd`` in the kernel; ``done(0 or -errno)``."""

    @abstractmethod
    def splice(
        self,
        fd_in: int,
        off_in: int,
        fd_out: int,
        off_out: int,
        length: int,
        done: Callable[[int], object],
        *,
        flags: int = 0,
    ) -> None:
        """Move bytes between fds, one a pipe (offset -1: none); ``done(n or -errno)``."""

    @abstractmethod
    def run_done(self) -> None:
        """Call the ``done`` callbacks of the file operations that completed, in order."""
