"""Sendfile on io_uring: a regular file to a socket through a pipe, with ``splice``.

:func:`sendfile_splice` moves the file's pages into a pipe and from the
pipe into the socket with the completion port's ``splice`` operations
(file -> pipe -> socket): no thread, and no byte passes through Python.
The event loop calls it from ``sock_sendfile``/``sendfile`` on io_uring,
where ``os.sendfile`` would block the loop's thread while the kernel reads
the file from storage.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from iomux.completion import CompletionPort

__all__ = ["PIPE_SIZE", "sendfile_splice"]

#: The pipe's capacity asked for (the most one splice moves); the kernel may give less.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SPLICE_F_MOVE = 1
_SPLICE_F_MORE = 4


class _InFlight:
    """Splices in the kernel; the pipe is closed only once none is left."""

    def __init__(self) -> None:
        self.count = 0
        self.on_idle: Callable[[], None] | None = None

    def end(self) -> None:
        self.count -= 1
        if not self.count and self.on_idle is not None:
            callback, self.on_idle = self.on_idle, None
            callback()


def _splice(
    loop: asyncio.AbstractEventLoop,
    port: CompletionPort,
    inflight: _InFlight,
    fd_in: int,
    off_in: int,
    fd_out: int,
    length: int,
    flags: int,
) -> asyncio.Future[int]:
    fut: asyncio.Future[int] = loop.create_future()

    def done(res: int) -> None:
        inflight.end()
        if not fut.done():
            fut.set_result(res)

    port.splice(fd_in, off_in, fd_out, -1, length, done, flags=flags)
    inflight.count += 1
    return fut


def _socket_error(res: int) -> OSError:
    code = -res
    if code == errno.ENOTCONN:
        return ConnectionError(errno.ENOTCONN, "socket is not connected")
    return OSError(code, os.strerror(code))


async def sendfile_splice(
    loop: asyncio.AbstractEventLoop,
    port: CompletionPort,
    out_fd: int,
    file: Any,
    offset: int,
    count: int | None,
    *,
    wait_writable: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Send ``count`` bytes (None: to the end) of ``file`` from ``offset`` to socket ``out_fd``.

    Returns the bytes sent. As asyncio's ``sock_sendfile``, the file's
    position is left at ``offset`` plus the bytes sent, and an empty range
    sends nothing. Raises :class:`asyncio.SendfileNotAvailableError` when
    splicing cannot start (``file`` is not a regular file, the kernel's
    ring has no ``SPLICE``, or the first splice fails), so that the caller
    falls back to reading and sending; later failures raise the ``OSError``
    (``ConnectionError`` for a peer that went away). While the socket's
    send buffer is full (``EAGAIN``), ``wait_writable()`` is awaited
    (default: ``loop.add_writer`` on ``out_fd``); a loop whose transport
    owns the socket passes its own.
    """
    if "SPLICE" not in port.file_ops:
        raise asyncio.SendfileNotAvailableError("this kernel's io_uring has no SPLICE operation")
    try:
        fileno = file.fileno()
    except (AttributeError, io.UnsupportedOperation):
        raise asyncio.SendfileNotAvailableError("not a regular file") from None
    try:
        info = os.fstat(fileno)
    except OSError:
        raise asyncio.SendfileNotAvailableError("not a regular file") from None
    if not stat.S_ISREG(info.st_mode):
        raise asyncio.SendfileNotAvailableError("not a regular file")
    if offset < 0 or (count is not None and count <= 0):
        raise ValueError(f"bad range: offset {offset}, count {count}")
    end = offset + count if count else max(info.st_size, offset)
    if end <= offset:
        return 0
    if wait_writable is None:
        wait_writable = _writer_waiter(loop, out_fd)
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        capacity = fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        capacity = fcntl.fcntl(pipe_w, _F_GETPIPE_SZ)
    inflight = _InFlight()
    total = 0
    position = offset
    try:
        while True:
            if position < end:
                want = min(capacity, end - position)
            elif count is None:
                want = capacity  # the file grew: go on to its end
            else:
                break
            filled = await _splice(
                loop, port, inflight, fileno, position, pipe_w, want, _SPLICE_F_MOVE
            )
            if filled < 0:
                if total == 0:
                    raise asyncio.SendfileNotAvailableError(
                        f"splice from the file failed: {os.strerror(-filled)}"
                    )
                raise OSError(-filled, os.strerror(-filled))
            if filled == 0:
                break  # the end of the file
            position += filled
            more = _SPLICE_F_MORE if position < end else 0
            left = filled
            while left:
                sent = await _splice(
                    loop, port, inflight, pipe_r, -1, out_fd, left, _SPLICE_F_MOVE | more
                )
                if sent == -errno.EAGAIN or sent == -errno.EINTR:
                    await wait_writable()
                    continue
                if sent < 0:
                    if total == 0 and -sent in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK):
                        raise asyncio.SendfileNotAvailableError(
                            f"splice to the socket failed: {os.strerror(-sent)}"
                        )
                    raise _socket_error(sent)
                if sent == 0:
                    raise ConnectionError(errno.EPIPE, "the socket took no more bytes")
                left -= sent
                total += sent
        return total
    finally:
        if total > 0:
            os.lseek(fileno, offset + total, os.SEEK_SET)

        def close_pipe() -> None:
            os.close(pipe_r)
            os.close(pipe_w)

        if inflight.count:
            inflight.on_idle = close_pipe  # a cancelled splice still holds the pipe
        else:
            close_pipe()


def _writer_waiter(loop: asyncio.AbstractEventLoop, fd: int) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            loop.remove_writer(fd)

    return wait
