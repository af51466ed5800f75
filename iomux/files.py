"""Asynchronous files: in the kernel on io_uring, in a thread pool on every other loop.

``iomux.files.open`` has the interface of ``aiofiles.open``, so code written
for aiofiles switches by changing its import::

    from iomux import files

    async with files.open("data.txt", encoding="utf-8") as f:
        async for line in f:
            ...

On an iomux event loop whose backend is io_uring (``loop.completion_port``
is a :class:`iomux.completion.CompletionPort` with file operations), opening,
reading, writing, ``fsync``, ``statx`` and closing are ring operations,
submitted with the loop's one ``io_uring_enter`` per iteration and batched
with everything else: no thread is used. On every other loop (stock asyncio,
uvloop, iomux on epoll, poll or select) each operation runs in the loop's
default executor (``loop.run_in_executor``). Both paths share the code that
keeps positions, buffers, decodes and reports errors, so their results are
identical.

How it works, and where it differs from the standard library:

- Reads and writes are positional (``pread``/``pwrite`` at a position this
  module keeps), except on files that cannot seek (pipes, ttys) and for
  writes in append mode. The kernel's file offset of the descriptor is not
  moved by reads and writes; ``close()`` with ``closefd=False`` sets it to
  the logical position, so the owner of the descriptor carries on from there.
- One kernel operation moves at most :data:`CHUNK_SIZE` bytes: a large
  ``read(n)`` or ``readinto`` goes straight into the caller's memory chunk
  by chunk (on io_uring up to :data:`READ_WINDOW` chunks in flight at
  once), so ``readinto`` reads a file of any size with one reused buffer.
  ``read()`` of a whole file allocates the file's size once, plus one copy
  to make it ``bytes`` (the standard library reads into the ``bytes``
  itself): prefer ``readinto`` for large files. The read buffer holds
  ``buffering`` bytes (:data:`DEFAULT_BUFFER_SIZE` by default, larger than
  the standard library's because every refill is a round trip through the
  loop).
- Cancellation: a cancelled call leaves the position where it was before the
  call (a read's bytes are read again by the next call; a cancelled flush
  keeps the bytes it did not confirm, and writes them again at the same
  place, so they reach the file once). Operations already in the kernel or
  a thread finish on their own; the file waits for them before its next
  operation, so nothing overlaps, and a cancelled ``open`` closes the
  descriptor it would have returned. On a stream (a pipe) the bytes a
  cancelled read brings are kept for the next read.
- Text mode decodes and encodes in Python with an incremental decoder, like
  ``io.TextIOWrapper`` (the algorithm of ``_pyio``): the same encodings,
  errors, newline translation, BOM handling and opaque ``tell()`` cookies
  (a plain byte offset wherever the decoder holds no state, as in CPython;
  with stateful decoders the cookie may differ from CPython's for the same
  position, but ``seek(cookie)`` returns there). ``tell()`` works during
  ``async for`` (aiofiles iterates with ``readline`` too).
- ``truncate`` is an ``ftruncate(2)`` in the loop's thread on io_uring (the
  port has no truncate operation); an ``opener`` is arbitrary blocking code
  and runs in the executor on every loop.
- Methods that aiofiles runs in its executor are coroutines here too
  (``await f.seekable()``, ``await f.tell()``); ``fileno()``, binary
  ``readable()`` and text ``detach()`` are plain methods, as in aiofiles.
  Binary files have no ``raw`` or ``detach()`` (there is no separate raw
  layer); files add ``fsync()``. Several tasks may use one file: its calls
  run one after another, in the order they were made.

Besides :func:`open`: :func:`read_bytes`, :func:`write_bytes`, :func:`stat`
(an ``os.stat_result`` equal to ``os.stat``'s, from ``statx`` on io_uring),
and positional I/O on descriptors, :func:`open_fd` (any flags, e.g.
``O_DIRECT``), :func:`pread`, :func:`preadinto`, :func:`pwrite`,
:func:`close_fd`.
"""

from __future__ import annotations

import asyncio
import codecs
import errno as _errno
import functools
import io
import os
import stat as _stat
import struct
import warnings
import weakref
from collections.abc import Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, Union, overload

if TYPE_CHECKING:
    from .completion import CompletionPort

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_BUFFER_SIZE",
    "AsyncBinaryFile",
    "AsyncFile",
    "AsyncRawFile",
    "AsyncTextFile",
    "FileContextManager",
    "close_fd",
    "open",
    "open_fd",
    "pread",
    "preadinto",
    "pwrite",
    "read_bytes",
    "stat",
    "uses_kernel",
    "write_bytes",
]

#: The most bytes one kernel read or write moves (a large request is split).
CHUNK_SIZE = 1 << 20
#: The read/write buffer of a buffered file when ``buffering`` is -1.
DEFAULT_BUFFER_SIZE = 64 * 1024
#: How many CHUNK_SIZE reads of one large read are in the kernel at once (io_uring).
READ_WINDOW = 8
#: What text mode asks the binary layer for at a time (as CPython's TextIOWrapper).
TEXT_CHUNK_SIZE = 8192

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_STATX_BASIC_STATS = 0x7FF
_RING_OPS = frozenset({"OPENAT", "READ", "WRITE", "CLOSE", "STATX"})

# struct statx (linux/stat.h): mask, blksize, attributes, nlink, uid, gid, mode, (pad),
# ino, size, blocks, attributes_mask, atime, btime, ctime, mtime ({sec, nsec, pad}),
# rdev major/minor, dev major/minor.
_STATX = struct.Struct("=IIQIIIH2xQQQQ" + "qIi" * 4 + "IIII")

Result = TypeVar("Result")
FileT = TypeVar("FileT")
BinaryT = TypeVar("BinaryT", bound="AsyncBinaryFile")
Apply = Callable[[int], object]
StrOrBytesPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
FileArg = Union[StrOrBytesPath, int]  # noqa: UP007


def _error(res: int, name: object = None) -> OSError:
    """The OSError subclass Python raises for ``-res`` (FileNotFoundError, ...)."""
    code = -res
    if name is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), name)


def _closed_error() -> ValueError:
    return ValueError("I/O operation on closed file.")


def _stat_result(raw: bytes | bytearray | memoryview) -> os.stat_result:
    """An ``os.stat_result`` equal to ``os.stat``'s from a ``struct statx``."""
    (
        _mask,
        blksize,
        _attrs,
        nlink,
        uid,
        gid,
        mode,
        ino,
        size,
        blocks,
        _attrs_mask,
        a_sec,
        a_nsec,
        _a_pad,
        _b_sec,
        _b_nsec,
        _b_pad,
        c_sec,
        c_nsec,
        _c_pad,
        m_sec,
        m_nsec,
        _m_pad,
        rdev_major,
        rdev_minor,
        dev_major,
        dev_minor,
    ) = _STATX.unpack_from(raw)
    extra = {
        "st_atime": a_sec + a_nsec * 1e-9,
        "st_mtime": m_sec + m_nsec * 1e-9,
        "st_ctime": c_sec + c_nsec * 1e-9,
        "st_atime_ns": a_sec * 1_000_000_000 + a_nsec,
        "st_mtime_ns": m_sec * 1_000_000_000 + m_nsec,
        "st_ctime_ns": c_sec * 1_000_000_000 + c_nsec,
        "st_blksize": blksize,
        "st_blocks": blocks,
        "st_rdev": os.makedev(rdev_major, rdev_minor),
    }
    values = (
        mode,
        ino,
        os.makedev(dev_major, dev_minor),
        nlink,
        uid,
        gid,
        size,
        a_sec,
        m_sec,
        c_sec,
    )
    return os.stat_result(values, extra)


# -- in-flight operations ------------------------------------------------------------


class _Tracker:
    """The operations of one file still in the kernel or a thread.

    A call that is cancelled while its operation runs leaves the operation
    to finish; the file's next call waits for it with :meth:`settle`.
    """

    __slots__ = ("_idle", "_when_idle", "inflight")

    def __init__(self) -> None:
        self.inflight = 0
        self._idle: asyncio.Future[None] | None = None
        self._when_idle: list[Callable[[], object]] | None = None

    def end(self) -> None:
        """One operation finished."""
        self.inflight -= 1
        if self.inflight:
            return
        idle = self._idle
        if idle is not None:
            self._idle = None
            if not idle.done():
                idle.set_result(None)
        callbacks = self._when_idle
        if callbacks:
            self._when_idle = None
            for callback in callbacks:
                callback()

    async def settle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until no operation is in flight."""
        while self.inflight:
            idle = self._idle
            if idle is None or idle.done():
                idle = self._idle = loop.create_future()
            await idle

    def call_when_idle(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` now if nothing is in flight, else once nothing is."""
        if not self.inflight:
            callback()
        elif self._when_idle is None:
            self._when_idle = [callback]
        else:
            self._when_idle.append(callback)


# -- the two ways of doing the operations ----------------------------------------------


class _Backend:
    """File operations on one loop; each returns a future of ``n``, an fd, or ``-errno``."""

    #: Whether operations run in the kernel (io_uring) rather than in threads.
    kernel = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def valid(self) -> bool:
        """Whether this backend still serves its loop."""
        return True

    def open(self, path: bytes, flags: int, mode: int, dir_fd: int) -> asyncio.Future[int]:
        """Open; if the caller is cancelled, the fd that comes is closed."""
        raise NotImplementedError

    def stat(self, path: bytes, flags: int, dir_fd: int) -> asyncio.Future[os.stat_result | int]:
        """``statx``/``fstatat`` (``path`` b"" with AT_EMPTY_PATH: the fd ``dir_fd``)."""
        raise NotImplementedError

    def read(
        self, fd: int, buf: Any, offset: int, tracker: _Tracker | None, apply: Apply | None
    ) -> asyncio.Future[int]:
        """Read into ``buf``; ``apply(result)`` runs when it completes, even if cancelled."""
        raise NotImplementedError

    def write(
        self, fd: int, data: Any, offset: int, tracker: _Tracker | None, apply: Apply | None
    ) -> asyncio.Future[int]:
        """Write ``data``; ``apply(result)`` runs when it completes, even if cancelled."""
        raise NotImplementedError

    def fsync(self, fd: int, datasync: bool, tracker: _Tracker | None) -> asyncio.Future[int]:
        """``fsync``/``fdatasync``."""
        raise NotImplementedError

    def truncate(self, fd: int, size: int, tracker: _Tracker | None) -> asyncio.Future[int]:
        """``ftruncate``."""
        raise NotImplementedError

    def close(self, fd: int) -> asyncio.Future[int]:
        """Close ``fd`` (the close happens even if the caller is cancelled)."""
        raise NotImplementedError

    def close_now(self, fd: int) -> None:
        """Close ``fd`` without waiting (cleanup after a cancellation)."""
        self.close(fd)

    async def read_to_end(
        self, fd: int, offset: int, hint: int, tracker: _Tracker | None, name: object
    ) -> bytes:
        """Everything from ``offset`` (-1: the file position) to the end of the file."""
        raise NotImplementedError

    async def read_full(
        self, fd: int, view: memoryview, offset: int, tracker: _Tracker | None, name: object
    ) -> int:
        """Read into ``view`` from ``offset`` until it is full or a read gives 0 (the end)."""
        raise NotImplementedError

    async def open_stat(
        self, path: bytes, flags: int, mode: int, name: object
    ) -> tuple[int, os.stat_result]:
        """Open ``path`` and ``fstat`` the fd; close it again on failure or cancellation."""
        fd = await _opened(self, self.open(path, flags, mode, _AT_FDCWD), name)
        try:
            res = await self.stat(b"", _AT_EMPTY_PATH, fd)
        except BaseException:
            self.close_now(fd)
            raise
        if isinstance(res, int):
            self.close_now(fd)
            raise _error(res, name)
        return fd, res


async def _opened(backend: _Backend, fut: asyncio.Future[Result], name: object) -> Result:
    """Await an open; a caller cancelled after the fd came (but before it ran) closes it.

    (An open cancelled while still running closes its fd when it completes:
    see the backends' ``open``.) A negative result raises its OSError.
    """
    try:
        res = await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            got: Any = fut.result()
            fd = got[0] if isinstance(got, tuple) else got
            if fd >= 0:
                backend.close_now(fd)
        raise
    if isinstance(res, int) and res < 0:
        raise _error(res, name)
    return res


def _noop(_res: int) -> None:
    pass


class _RingBackend(_Backend):
    """Operations on the loop's io_uring completion port (no thread)."""

    kernel = True

    def __init__(self, loop: asyncio.AbstractEventLoop, port: CompletionPort) -> None:
        super().__init__(loop)
        self.port = port
        self.has_fsync = "FSYNC" in port.file_ops
        self._threads = _ThreadBackend(loop)

    def valid(self) -> bool:
        """The loop may re-create its port (see ``Reactor.fileno``)."""
        try:
            return getattr(self.loop, "completion_port", None) is self.port
        except RuntimeError:
            return False

    def _run(
        self,
        start: Callable[[Callable[[int], None]], None],
        tracker: _Tracker | None,
        apply: Apply | None,
    ) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = self.loop.create_future()

        def done(res: int) -> None:
            if tracker is not None:
                tracker.end()
            if apply is not None:
                apply(res)
            if not fut.done():
                fut.set_result(res)

        start(done)
        if tracker is not None:
            tracker.inflight += 1
        return fut

    def open(self, path: bytes, flags: int, mode: int, dir_fd: int) -> asyncio.Future[int]:
        """``openat`` on the ring."""
        fut: asyncio.Future[int] = self.loop.create_future()
        port = self.port

        def done(res: int) -> None:
            if fut.done():  # cancelled: nobody will close it
                if res >= 0:
                    port.close_file(res, _noop)
            else:
                fut.set_result(res)

        port.open_file(path, flags, mode, done, dir_fd=dir_fd)
        return fut

    def stat(self, path: bytes, flags: int, dir_fd: int) -> asyncio.Future[os.stat_result | int]:
        """``statx`` on the ring."""
        fut: asyncio.Future[os.stat_result | int] = self.loop.create_future()
        buf = bytearray(256)

        def done(res: int) -> None:
            if not fut.done():
                fut.set_result(res if res < 0 else _stat_result(buf))

        self.port.statx_file(path, flags, _STATX_BASIC_STATS, buf, done, dir_fd=dir_fd)
        return fut

    def read(
        self, fd: int, buf: Any, offset: int, tracker: _Tracker | None, apply: Apply | None
    ) -> asyncio.Future[int]:
        """``read`` on the ring."""
        port = self.port
        return self._run(lambda done: port.read_file(fd, buf, offset, done), tracker, apply)

    def write(
        self, fd: int, data: Any, offset: int, tracker: _Tracker | None, apply: Apply | None
    ) -> asyncio.Future[int]:
        """``write`` on the ring."""
        port = self.port
        return self._run(lambda done: port.write_file(fd, data, offset, done), tracker, apply)

    def fsync(self, fd: int, datasync: bool, tracker: _Tracker | None) -> asyncio.Future[int]:
        """``fsync`` on the ring (in a thread if this kernel's ring has none)."""
        if not self.has_fsync:
            return self._threads.fsync(fd, datasync, tracker)
        port = self.port
        return self._run(lambda done: port.fsync_file(fd, done, datasync=datasync), tracker, None)

    def truncate(self, fd: int, size: int, tracker: _Tracker | None) -> asyncio.Future[int]:
        """``ftruncate`` in the loop's thread: the ring has no such operation here."""
        fut: asyncio.Future[int] = self.loop.create_future()
        fut.set_result(_t_truncate(fd, size))
        return fut

    def close(self, fd: int) -> asyncio.Future[int]:
        """``close`` on the ring."""
        port = self.port
        return self._run(lambda done: port.close_file(fd, done), None, None)

    def close_now(self, fd: int) -> None:
        """Queue a close on the ring."""
        self.port.close_file(fd, _noop)

    async def read_to_end(
        self, fd: int, offset: int, hint: int, tracker: _Tracker | None, name: object
    ) -> bytes:
        """Read into one buffer of the expected size, CHUNK_SIZE per operation."""
        buf = bytearray(hint + 1 if hint > 0 else DEFAULT_BUFFER_SIZE)
        filled = 0
        while True:
            view = memoryview(buf)[filled:]
            n = await self.read_full(
                fd, view, offset + filled if offset >= 0 else -1, tracker, name
            )
            view.release()
            filled += n
            if filled < len(buf):
                break
            buf += bytes(max(len(buf) // 2, DEFAULT_BUFFER_SIZE))  # it grew
        del buf[filled:]
        return bytes(buf)

    async def read_full(
        self, fd: int, view: memoryview, offset: int, tracker: _Tracker | None, name: object
    ) -> int:
        """Up to READ_WINDOW reads of CHUNK_SIZE in flight at once, counted in order."""
        want = len(view)
        got = 0
        window = READ_WINDOW if offset >= 0 else 1
        while got < want:
            pending: list[tuple[int, asyncio.Future[int]]] = []
            at = got
            while at < want and len(pending) < window:
                part = view[at : at + CHUNK_SIZE]
                where = offset + at if offset >= 0 else -1
                pending.append((len(part), self.read(fd, part, where, tracker, _releaser(part))))
                at += len(part)
            results = [(size, await fut) for size, fut in pending]  # all done: views free
            for size, res in results:
                if res < 0:
                    raise _error(res, name)
                got += res
                if res < size:  # the end, or a short read: go on from there
                    if res == 0:
                        return got
                    break
        return got


def _releaser(view: memoryview) -> Apply:
    """An ``apply`` that releases ``view`` once the operation is over."""

    def release(_res: int) -> None:
        view.release()

    return release


# The thread backend's workers: each returns its result or -errno, like the ring.


def _t_open(path: bytes, flags: int, mode: int, dir_fd: int) -> int:
    try:
        return os.open(path, flags, mode, dir_fd=None if dir_fd == _AT_FDCWD else dir_fd)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def _t_open_stat(path: bytes, flags: int, mode: int) -> tuple[int, os.stat_result] | int:
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)
    try:
        return fd, os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        return -(exc.errno or _errno.EIO)


def _t_stat(path: bytes, flags: int, dir_fd: int) -> os.stat_result | int:
    try:
        if flags & _AT_EMPTY_PATH and not path:
            return os.fstat(dir_fd)
        return os.stat(
            path,
            dir_fd=None if dir_fd == _AT_FDCWD else dir_fd,
            follow_symlinks=not flags & _AT_SYMLINK_NOFOLLOW,
        )
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def _t_read(fd: int, buf: Any, offset: int) -> int:
    try:
        if offset < 0:
            return os.readv(fd, [buf])
        return os.preadv(fd, [buf], offset)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def _t_write(fd: int, data: Any, offset: int) -> int:
    try:
        if offset < 0:
            return os.write(fd, data)
        return os.pwrite(fd, data, offset)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def _t_fsync(fd: int, datasync: bool) -> int:
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)
    return 0


def _t_truncate(fd: int, size: int) -> int:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)
    return 0


def _t_close(fd: int) -> int:
    try:
        os.close(fd)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)
    return 0


def _t_read_full(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    want = len(view)
    try:
        while got < want:
            part = view[got : got + CHUNK_SIZE]
            n = os.preadv(fd, [part], offset + got) if offset >= 0 else os.readv(fd, [part])
            part.release()
            if not n:
                break
            got += n
    except OSError as exc:
        return -(exc.errno or _errno.EIO)
    return got


def _t_read_to_end(fd: int, offset: int, hint: int) -> bytes | int:
    chunks = []
    want = hint + 1 if hint > 0 else DEFAULT_BUFFER_SIZE
    total = 0
    try:
        while True:
            n = min(max(want - total, 1), CHUNK_SIZE)
            data = os.pread(fd, n, offset + total) if offset >= 0 else os.read(fd, n)
            if not data:
                break
            chunks.append(data)
            total += len(data)
            if total >= want:
                want = total + max(total // 2, DEFAULT_BUFFER_SIZE)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)
    return b"".join(chunks)


class _ThreadBackend(_Backend):
    """Operations in the loop's default executor (``loop.run_in_executor``)."""

    def _run(
        self,
        fn: Callable[..., Result],
        args: tuple[Any, ...],
        tracker: _Tracker | None,
        apply: Apply | None,
        orphan: Callable[[Result], object] | None = None,
    ) -> asyncio.Future[Result]:
        loop = self.loop
        fut: asyncio.Future[Result] = loop.create_future()
        inner = loop.run_in_executor(None, fn, *args)
        if tracker is not None:
            tracker.inflight += 1

        def done(f: asyncio.Future[Result]) -> None:
            if tracker is not None:
                tracker.end()
            if f.cancelled():
                if apply is not None:
                    apply(-_errno.ECANCELED)
                if not fut.done():
                    fut.cancel()
                return
            exc = f.exception()
            if exc is not None:
                if apply is not None:
                    apply(-_errno.EIO)
                if not fut.done():
                    fut.set_exception(exc)
                return
            res = f.result()
            if apply is not None:
                apply(res)  # type: ignore[arg-type]
            if not fut.done():
                fut.set_result(res)
            elif orphan is not None:
                orphan(res)

        inner.add_done_callback(done)
        return fut

    def open(self, path: bytes, flags: int, mode: int, dir_fd: int) -> asyncio.Future[int]:
        """``open`` in a thread."""
        return self._run(_t_open, (path, flags, mode, dir_fd), None, None, self._orphan_fd)

    @staticmethod
    def _orphan_fd(res: object) -> None:
        if isinstance(res, int) and res >= 0:
            os.close(res)
        elif isinstance(res, tuple):
            os.close(res[0])

    def stat(self, path: bytes, flags: int, dir_fd: int) -> asyncio.Future[os.stat_result | int]:
        """``stat`` in a thread."""
        return self._run(_t_stat, (path, flags, dir_fd), None, None)

    def read(
        self, fd: int, buf: Any, offset: int, tracker: _Tracker | None, apply: Apply | None
    ) -> asyncio.Future[int]:
        """``preadv`` in a thread."""
        return self._run(_t_read, (fd, buf, offset), tracker, apply)

    def write(
        self, fd: int, data: Any, offset: int, tracker: _Tracker | None, apply: Apply | None
    ) -> asyncio.Future[int]:
        """``pwrite`` in a thread."""
        return self._run(_t_write, (fd, data, offset), tracker, apply)

    def fsync(self, fd: int, datasync: bool, tracker: _Tracker | None) -> asyncio.Future[int]:
        """``fsync`` in a thread."""
        return self._run(_t_fsync, (fd, datasync), tracker, None)

    def truncate(self, fd: int, size: int, tracker: _Tracker | None) -> asyncio.Future[int]:
        """``ftruncate`` in a thread."""
        return self._run(_t_truncate, (fd, size), tracker, None)

    def close(self, fd: int) -> asyncio.Future[int]:
        """``close`` in a thread."""
        return self._run(_t_close, (fd,), None, None)

    def close_now(self, fd: int) -> None:
        """Close in the loop's thread (a close of a regular file does not wait)."""
        _t_close(fd)

    async def read_to_end(
        self, fd: int, offset: int, hint: int, tracker: _Tracker | None, name: object
    ) -> bytes:
        """The whole read in one thread job."""
        res = await self._run(_t_read_to_end, (fd, offset, hint), tracker, None)
        if isinstance(res, int):
            raise _error(res, name)
        return res

    async def read_full(
        self, fd: int, view: memoryview, offset: int, tracker: _Tracker | None, name: object
    ) -> int:
        """The whole read in one thread job."""
        res = await self._run(_t_read_full, (fd, view, offset), tracker, None)
        if res < 0:
            raise _error(res, name)
        return res

    async def open_stat(
        self, path: bytes, flags: int, mode: int, name: object
    ) -> tuple[int, os.stat_result]:
        """Open and ``fstat`` in one thread job."""
        fut = self._run(_t_open_stat, (path, flags, mode), None, None, self._orphan_fd)
        res = await _opened(self, fut, name)
        if isinstance(res, int):
            raise _error(res, name)
        return res


_BACKENDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Backend] = (
    weakref.WeakKeyDictionary()
)


def _backend(loop: asyncio.AbstractEventLoop | None = None) -> _Backend:
    if loop is None:
        loop = asyncio.get_running_loop()
    backend = _BACKENDS.get(loop)
    if backend is not None and backend.valid():
        return backend
    port = getattr(loop, "completion_port", None)
    if port is not None and _RING_OPS <= port.file_ops:
        backend = _RingBackend(loop, port)
    else:
        backend = _ThreadBackend(loop)
    _BACKENDS[loop] = backend
    return backend


def uses_kernel(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Whether file operations on ``loop`` (default: the running one) are io_uring operations.

    True on an iomux loop whose backend is io_uring with a kernel that has
    the file operations; False where they run in the loop's executor.
    """
    return _backend(loop).kernel


# -- files ---------------------------------------------------------------------------


def _fspath(file: StrOrBytesPath) -> bytes:
    return os.fsencode(file)


class AsyncBinaryFile:
    """A buffered binary file (``open(path, "rb")``, ``"wb"``, ``"r+b"``...).

    The interface of aiofiles' buffered files (``io.BufferedReader``,
    ``BufferedWriter`` and ``BufferedRandom`` run in threads), with the
    operations done as the module docstring says.
    """

    _buffered = True

    def __init__(
        self,
        backend: _Backend,
        fd: int,
        *,
        name: Any,
        mode: str,
        readable: bool,
        writable: bool,
        append: bool,
        closefd: bool,
        seekable: bool,
        position: int,
        size: int,
        buffer_size: int,
    ) -> None:
        self._backend = backend
        self._fd = fd
        self._name = name
        self._mode = mode
        self._readable = readable
        self._writable = writable
        self._append = append
        self._closefd = closefd
        self._seekable = seekable
        self._closed = False
        self._lock = asyncio.Lock()
        self._tracker = _Tracker()
        self._buffer_size = buffer_size
        #: The logical position (a count of bytes consumed, for files that cannot seek).
        self._pos = position
        self._size_hint = size
        # Read buffer: bytes [_bstart, _bstart + _blen) of the file are in _buf.
        self._buf: bytearray | None = None
        self._bstart = 0
        self._blen = 0
        # Write buffer: bytes to write at _wstart; the first _wsent are confirmed written.
        self._wbuf = bytearray()
        self._wstart = position
        self._wsent = 0

    # -- plain attributes ------------------------------------------------------------

    @property
    def name(self) -> Any:
        """The name given to :func:`open` (a path as given, or the fd)."""
        return self._name

    @property
    def mode(self) -> str:
        """The mode as ``io.FileIO`` reports it (``"rb"``, ``"rb+"``, ``"wb"``, ``"ab"``...)."""
        return self._mode

    @property
    def closed(self) -> bool:
        """Whether the file is closed."""
        return self._closed

    def fileno(self) -> int:
        """The file descriptor."""
        if self._closed:
            raise _closed_error()
        return self._fd

    def readable(self) -> bool:
        """Whether the file was opened for reading."""
        if self._closed:
            raise _closed_error()
        return self._readable

    async def writable(self) -> bool:
        """Whether the file was opened for writing."""
        if self._closed:
            raise _closed_error()
        return self._writable

    async def seekable(self) -> bool:
        """Whether the file can seek (regular files and devices, not pipes or ttys)."""
        if self._closed:
            raise _closed_error()
        return self._seekable

    async def isatty(self) -> bool:
        """Whether the file is a terminal."""
        if self._closed:
            raise _closed_error()
        return os.isatty(self._fd)

    def __repr__(self) -> str:
        kind = type(self).__name__
        state = " closed" if self._closed else ""
        return f"<iomux.files.{kind} name={self._name!r} mode={self._mode!r}{state}>"

    # -- helpers ------------------------------------------------------------------------

    def _check_read(self) -> None:
        if self._closed:
            raise _closed_error()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")

    def _check_write(self) -> None:
        if self._closed:
            raise _closed_error()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")

    def _io(self) -> _Backend:
        backend = self._backend
        loop = asyncio.get_running_loop()
        if backend.loop is not loop or not backend.valid():
            backend = self._backend = _backend(loop)
        return backend

    async def _enter(self) -> _Backend:
        """Under the lock: wait for operations a cancelled call left behind."""
        backend = self._io()
        if self._tracker.inflight:
            await self._tracker.settle(backend.loop)
        if self._closed:
            raise _closed_error()
        return backend

    def _offset(self, position: int) -> int:
        """The offset for an operation at ``position`` (-1: the file's own position)."""
        return position if self._seekable else -1

    def _available(self, position: int) -> int:
        """How many bytes from ``position`` on are in the read buffer."""
        i = position - self._bstart
        if 0 <= i < self._blen:
            return self._blen - i
        return 0

    async def _fill(self, backend: _Backend, position: int) -> int:
        """Read into the buffer from ``position``; return the bytes read (0: end of file).

        A seekable file's buffer is replaced (what it held can be read again).
        A stream's keeps every byte from the logical position on, which a
        cancelled call did not consume, and the new bytes follow them.
        """
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray(self._buffer_size)
        if self._seekable:
            self._blen = 0
            start = 0
        else:
            used = self._pos - self._bstart
            if used >= self._blen:  # everything was consumed
                self._blen = 0
            elif used > 0:  # drop what was consumed, keep the rest in front
                buf[: self._blen - used] = buf[used : self._blen]
                self._blen -= used
            self._bstart = self._pos
            if len(buf) - self._blen < self._buffer_size:
                buf += bytes(self._buffer_size)
            start = self._blen
        view = memoryview(buf)[start:]
        seekable = self._seekable

        def apply(res: int) -> None:
            view.release()
            if res > 0:
                if seekable:
                    self._bstart = position
                    self._blen = res
                else:
                    self._blen += res

        res = await backend.read(self._fd, view, self._offset(position), self._tracker, apply)
        if res < 0:
            raise _error(res, self._name)
        return res

    async def _read_into(self, backend: _Backend, view: memoryview, position: int) -> int:
        """Read into ``view`` from ``position`` until it is full or the file ends.

        Serves what the read buffer holds, reads large remainders straight
        into ``view`` (CHUNK_SIZE at a time) and small ones through the buffer.
        Does not move the position.
        """
        want = len(view)
        got = 0
        while got < want:
            avail = self._available(position + got)
            if avail:
                assert self._buf is not None
                i = position + got - self._bstart
                n = min(avail, want - got)
                view[got : got + n] = self._buf[i : i + n]
                got += n
                continue
            if want - got >= self._buffer_size and self._seekable:
                part = view[got:]
                try:
                    got += await backend.read_full(
                        self._fd, part, position + got, self._tracker, self._name
                    )
                finally:
                    part.release()
                break
            if not await self._fill(backend, position + got):
                break
        return got

    async def _flush_writes(self, backend: _Backend) -> None:
        """Write the write buffer out (CHUNK_SIZE per operation)."""
        wbuf = self._wbuf
        while self._wsent < len(wbuf):
            start = self._wsent
            part = memoryview(wbuf)[start : start + CHUNK_SIZE]

            def apply(res: int, part: memoryview = part) -> None:
                part.release()
                if res > 0:
                    self._wsent += res

            at = -1 if self._append or not self._seekable else self._wstart + start
            res = await backend.write(self._fd, part, at, self._tracker, apply)
            if res < 0:
                raise _error(res, self._name)
            if res == 0:
                raise OSError(_errno.EIO, "the kernel wrote no bytes", self._name)
        self._wbuf = bytearray()
        self._wsent = 0
        if self._append:
            self._pos = os.lseek(self._fd, 0, os.SEEK_CUR)
        self._wstart = self._pos

    async def _write_all(self, backend: _Backend, data: memoryview, position: int) -> None:
        """Write ``data`` at ``position`` straight from the caller's memory."""
        done = 0
        while done < len(data):
            part = data[done : done + CHUNK_SIZE]
            res = await backend.write(
                self._fd, part, position + done, self._tracker, _releaser(part)
            )
            if res < 0:
                raise _error(res, self._name)
            if res == 0:
                raise OSError(_errno.EIO, "the kernel wrote no bytes", self._name)
            done += res

    def _take(self, position: int, n: int) -> bytes:
        """``n`` buffered bytes from ``position`` (they must be there)."""
        if not n:
            return b""
        assert self._buf is not None
        i = position - self._bstart
        return bytes(self._buf[i : i + n])

    # -- reading ---------------------------------------------------------------------

    async def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all to the end of the file if negative or None)."""
        self._check_read()
        size = -1 if size is None else size.__index__()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            return await self._read(backend, size)

    async def _read(self, backend: _Backend, size: int) -> bytes:
        pos = self._pos
        if size < 0:
            return await self._readall(backend)
        avail = self._available(pos)
        if size <= avail:
            data = self._take(pos, size)
            self._pos = pos + size
            return data
        if self._buffered and avail == 0 and size < self._buffer_size:
            # The common small read: one refill, then from the buffer.
            n = await self._fill(backend, pos)
            n = min(n, size)
            if n == size or not n:
                data = self._take(pos, n) if n else b""
                self._pos = pos + n
                return data
        # Allocate what the file can still give (its size when opened, as a hint), not size.
        if self._seekable:
            hint = min(size, max(self._size_hint - pos, 0) + 1)
        else:
            hint = min(size, self._buffer_size)
        out = bytearray(max(hint, 1))
        got = 0
        while got < size:
            if got == len(out):
                out += bytes(min(size - got, max(len(out), DEFAULT_BUFFER_SIZE)))
            view = memoryview(out)[got:]
            try:
                n = await self._read_into(backend, view, pos + got)
            finally:
                view.release()
            got += n
            if got < len(out):  # the end of the file
                break
        del out[got:]
        self._pos = pos + got
        return bytes(out)

    async def _readall(self, backend: _Backend) -> bytes:
        pos = self._pos
        avail = self._available(pos)
        head = self._take(pos, avail) if avail else b""
        hint = max(self._size_hint - pos - avail, 0)
        rest = await backend.read_to_end(
            self._fd, self._offset(pos + avail), hint, self._tracker, self._name
        )
        self._pos = pos + avail + len(rest)
        return head + rest if head else rest

    async def read1(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes with at most one operation (buffered bytes first)."""
        self._check_read()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            return await self._read1(backend, size)

    async def _read1(self, backend: _Backend, size: int) -> bytes:
        if size < 0:
            size = self._buffer_size
        if size == 0:
            return b""
        pos = self._pos
        avail = self._available(pos)
        if not avail:
            if size > self._buffer_size and self._seekable:
                out = bytearray(min(size, CHUNK_SIZE))
                view = memoryview(out)
                res = await backend.read(self._fd, view, pos, self._tracker, _releaser(view))
                if res < 0:
                    raise _error(res, self._name)
                del out[res:]
                self._pos = pos + res
                return bytes(out)
            avail = await self._fill(backend, pos)
        n = min(avail, size)
        data = self._take(pos, n) if n else b""
        self._pos = pos + n
        return data

    async def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` (any writable bytes-like object) until full or end of file.

        Large reads go straight into ``buffer`` (CHUNK_SIZE per operation),
        so one buffer can be reused to read a file of any size.
        """
        self._check_read()
        view = memoryview(buffer).cast("B")
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            pos = self._pos
            n = await self._read_into(backend, view, pos)
            self._pos = pos + n
            return n

    async def peek(self, size: int = 0) -> bytes:
        """Buffered bytes from the position on, without moving it (one refill if none)."""
        self._check_read()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            pos = self._pos
            avail = self._available(pos)
            if not avail:
                avail = await self._fill(backend, pos)
            return self._take(pos, avail) if avail else b""

    async def readline(self, size: int | None = -1) -> bytes:
        """Read one line (up to and including ``b"\\n"``), at most ``size`` bytes if given."""
        self._check_read()
        limit = -1 if size is None else size.__index__()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            return await self._readline(backend, limit)

    async def _readline(self, backend: _Backend, limit: int) -> bytes:
        if not self._buffered and self._seekable:
            self._blen = 0  # unbuffered: read afresh (ahead, but only the line is consumed)
        pos = self._pos
        avail = self._available(pos)
        buf = self._buf
        if avail and buf is not None:
            i = pos - self._bstart
            end = i + (avail if limit < 0 else min(avail, limit))
            j = buf.find(b"\n", i, end)
            if j >= 0 or (limit >= 0 and end - i == limit):
                stop = j + 1 if j >= 0 else end
                self._pos = pos + stop - i
                return bytes(buf[i:stop])
        out = bytearray()
        cur = pos
        while limit < 0 or len(out) < limit:
            avail = self._available(cur)
            if not avail:
                if not await self._fill(backend, cur):
                    break
                continue
            buf = self._buf
            assert buf is not None
            i = cur - self._bstart
            take = avail if limit < 0 else min(avail, limit - len(out))
            j = buf.find(b"\n", i, i + take)
            if j >= 0:
                out += buf[i : j + 1]
                cur += j + 1 - i
                break
            out += buf[i : i + take]
            cur += take
        self._pos = cur
        if not self._buffered and self._seekable:
            self._blen = 0
        return bytes(out)

    async def readlines(self, hint: int | None = -1) -> list[bytes]:
        """Read lines until the end of the file, or until they total ``hint`` bytes."""
        self._check_read()
        limit = -1 if hint is None else hint.__index__()
        lines: list[bytes] = []
        total = 0
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            while True:
                line = await self._readline(backend, -1)
                if not line:
                    break
                lines.append(line)
                total += len(line)
                if 0 < limit <= total:
                    break
        return lines

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    def __aiter__(self) -> AsyncBinaryFile:
        return self

    # -- writing ---------------------------------------------------------------------

    async def write(self, data: Any) -> int:
        """Write ``data`` (any bytes-like object); return its length in bytes.

        Small writes are buffered; ones as large as the buffer go straight
        from ``data`` to the file. ``flush()`` or ``close()`` writes the buffer.
        """
        self._check_write()
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        view = memoryview(data).cast("B")
        async with self._lock:
            backend = await self._enter()
            return await self._write(backend, view)

    async def _write(self, backend: _Backend, view: memoryview) -> int:
        n = len(view)
        if self._seekable:
            self._blen = 0  # what was read ahead may be overwritten
        pos = self._pos
        self._size_hint = max(self._size_hint, pos + n)
        if self._wbuf and self._wstart + len(self._wbuf) != pos:
            await self._flush_writes(backend)
        if not self._wbuf:
            self._wstart = pos
        if len(self._wbuf) + n < self._buffer_size:
            self._wbuf += view
            self._pos = pos + n
            return n
        await self._flush_writes(backend)
        if self._seekable and not self._append:
            await self._write_all(backend, view, pos)
            self._pos = self._wstart = pos + n
        else:
            self._wbuf += view
            self._pos = pos + n
            await self._flush_writes(backend)
        return n

    async def writelines(self, lines: Iterable[Any]) -> None:
        """Write every bytes-like object of ``lines``."""
        for line in lines:
            await self.write(line)

    async def flush(self) -> None:
        """Write the write buffer out (no ``fsync``: see :meth:`fsync`)."""
        if self._closed:
            raise ValueError("flush of closed file")
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)

    async def fsync(self, *, datasync: bool = False) -> None:
        """Flush, then ``fsync`` (``fdatasync`` with ``datasync``) the file to storage."""
        if self._closed:
            raise _closed_error()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            res = await backend.fsync(self._fd, datasync, self._tracker)
            if res < 0:
                raise _error(res, self._name)

    async def truncate(self, size: int | None = None) -> int:
        """Resize the file to ``size`` bytes (default: the position); the position stays."""
        self._check_write()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            if size is None:
                size = self._pos
            size = size.__index__()
            if size < 0:
                raise OSError(_errno.EINVAL, os.strerror(_errno.EINVAL), self._name)
            res = await backend.truncate(self._fd, size, self._tracker)
            if res < 0:
                raise _error(res, self._name)
            self._blen = 0
            self._size_hint = size
            return size

    # -- position --------------------------------------------------------------------

    async def tell(self) -> int:
        """The position."""
        if self._closed:
            raise _closed_error()
        if not self._seekable:
            raise OSError(_errno.ESPIPE, os.strerror(_errno.ESPIPE), self._name)
        return self._pos

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move to ``offset`` from the start, the position or the end (``whence`` 0, 1, 2).

        ``SEEK_DATA`` and ``SEEK_HOLE`` are asked of the kernel. Return the
        new position.
        """
        if self._closed:
            raise _closed_error()
        if not self._seekable:
            raise io.UnsupportedOperation("File or stream is not seekable.")
        offset = offset.__index__()
        async with self._lock:
            backend = await self._enter()
            if self._wbuf:
                await self._flush_writes(backend)
            if whence == os.SEEK_SET:
                target = offset
            elif whence == os.SEEK_CUR:
                target = self._pos + offset
            elif whence == os.SEEK_END:
                res = await backend.stat(b"", _AT_EMPTY_PATH, self._fd)
                if isinstance(res, int):
                    raise _error(res, self._name)
                self._size_hint = res.st_size
                target = res.st_size + offset
            elif whence in (getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)):
                target = os.lseek(self._fd, offset, whence)
            else:
                raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
            if target < 0:
                raise OSError(_errno.EINVAL, os.strerror(_errno.EINVAL), self._name)
            self._pos = self._wstart = target
            return target

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        """Flush and close (idempotent); the descriptor is closed even if the flush fails."""
        if self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            backend = self._io()
            try:
                if self._tracker.inflight:
                    await self._tracker.settle(backend.loop)
                if self._wbuf:
                    await self._flush_writes(backend)
            finally:
                self._closed = True
                self._buf = None
                await self._release_fd(backend)

    async def _release_fd(self, backend: _Backend) -> None:
        fd = self._fd
        if not self._closefd:
            if self._seekable:
                os.lseek(fd, self._pos, os.SEEK_SET)
            return
        if self._tracker.inflight:  # a cancelled flush or settle left operations behind
            self._tracker.call_when_idle(lambda: backend.close_now(fd))
            return
        res = await backend.close(fd)
        if res < 0:
            raise _error(res, self._name)

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        warnings.warn(f"unclosed file {self!r}", ResourceWarning, stacklevel=2, source=self)
        if self._closefd:
            self._tracker.call_when_idle(functools.partial(_t_close, self._fd))

    async def __aenter__(self: BinaryT) -> BinaryT:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncRawFile(AsyncBinaryFile):
    """An unbuffered binary file (``open(path, "rb", buffering=0)``), like ``io.FileIO``.

    ``read(n)`` is one operation (it may return fewer bytes), ``write`` one
    operation per call (it returns the bytes written).
    """

    _buffered = False

    async def read(self, size: int | None = -1) -> bytes:
        """One read of up to ``size`` bytes (all to the end of the file if negative)."""
        self._check_read()
        size = -1 if size is None else size.__index__()
        async with self._lock:
            backend = await self._enter()
            if size < 0:
                return await self._readall(backend)
            pos = self._pos
            avail = self._available(pos)
            if avail and not self._seekable:  # a stream's bytes a readline read ahead
                n = min(avail, size)
                self._pos = pos + n
                return self._take(pos, n)
            out = bytearray(size)
            view = memoryview(out)
            res = await backend.read(
                self._fd, view, self._offset(pos), self._tracker, _releaser(view)
            )
            if res < 0:
                raise _error(res, self._name)
            del out[res:]
            self._pos = pos + res
            return bytes(out)

    async def readall(self) -> bytes:
        """Read to the end of the file."""
        self._check_read()
        async with self._lock:
            backend = await self._enter()
            return await self._readall(backend)

    async def readinto(self, buffer: Any) -> int:
        """One read into ``buffer``; return the bytes read."""
        self._check_read()
        view = memoryview(buffer).cast("B")
        async with self._lock:
            backend = await self._enter()
            pos = self._pos
            avail = self._available(pos)
            if avail and not self._seekable:  # a stream's bytes a readline read ahead
                n = min(avail, len(view))
                view[:n] = self._take(pos, n)
                self._pos = pos + n
                return n
            part = view[:]
            res = await backend.read(
                self._fd, part, self._offset(pos), self._tracker, _releaser(part)
            )
            if res < 0:
                raise _error(res, self._name)
            self._pos = pos + res
            return res

    async def write(self, data: Any) -> int:
        """One write of ``data``; return the bytes written (possibly fewer)."""
        self._check_write()
        if isinstance(data, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        view = memoryview(data).cast("B")
        async with self._lock:
            backend = await self._enter()
            pos = self._pos
            part = view[: min(len(view), CHUNK_SIZE)]
            at = -1 if self._append or not self._seekable else pos
            res = await backend.write(self._fd, part, at, self._tracker, _releaser(part))
            if res < 0:
                raise _error(res, self._name)
            if self._seekable:
                self._blen = 0
            self._pos = os.lseek(self._fd, 0, os.SEEK_CUR) if self._append else pos + res
            return res


class AsyncTextFile:
    """A text file (``open(path)``, ``"w"``, ``"r+"``...) over an :class:`AsyncBinaryFile`.

    Decodes and encodes as ``io.TextIOWrapper`` does (see the module docstring).
    """

    def __init__(
        self,
        buffer: AsyncBinaryFile,
        *,
        mode: str,
        encoding: str,
        errors: str | None,
        newline: str | None,
        line_buffering: bool,
    ) -> None:
        if newline is not None and not isinstance(newline, str):
            raise TypeError(f"illegal newline type: {type(newline)!r}")
        if newline not in (None, "", "\n", "\r", "\r\n"):
            raise ValueError(f"illegal newline value: {newline!r}")
        if not isinstance(encoding, str):
            raise ValueError(f"invalid encoding: {encoding!r}")
        if not codecs.lookup(encoding)._is_text_encoding:
            raise LookupError(
                f"{encoding!r} is not a text encoding; use codecs.open() to handle arbitrary codecs"
            )
        if errors is None:
            errors = "strict"
        elif not isinstance(errors, str):
            raise ValueError(f"invalid errors: {errors!r}")
        self._buffer: AsyncBinaryFile | None = buffer
        self._mode = mode
        self._encoding = encoding
        self._errors = errors
        self._line_buffering = line_buffering
        self._readuniversal = not newline
        self._readtranslate = newline is None
        self._readnl = newline
        self._writetranslate = newline != ""
        self._writenl = newline or os.linesep
        self._encoder: Any = None
        self._decoder: Any = None
        self._decoded_chars = ""
        self._decoded_chars_used = 0
        # None, or (decoder flags, the bytes fed since): see _pyio.TextIOWrapper.
        self._snapshot: tuple[int, bytes] | None = None
        self._b2cratio = 0.0
        self._seekable = buffer._seekable
        if self._seekable and buffer._writable and buffer._pos != 0:
            try:
                self._get_encoder().setstate(0)  # no BOM in the middle of a file
            except LookupError:
                pass

    # -- plain attributes ------------------------------------------------------------

    @property
    def buffer(self) -> AsyncBinaryFile:
        """The binary file underneath."""
        if self._buffer is None:
            raise ValueError("underlying buffer has been detached")
        return self._buffer

    @property
    def name(self) -> Any:
        """The name given to :func:`open`."""
        return self.buffer.name

    @property
    def mode(self) -> str:
        """The mode given to :func:`open`."""
        return self._mode

    @property
    def closed(self) -> bool:
        """Whether the file is closed."""
        return self.buffer.closed

    @property
    def encoding(self) -> str:
        """The encoding."""
        return self._encoding

    @property
    def errors(self) -> str:
        """The error handler of the encoding."""
        return self._errors

    @property
    def line_buffering(self) -> bool:
        """Whether each write that contains a newline flushes."""
        return self._line_buffering

    @property
    def newlines(self) -> Any:
        """The newlines met so far in universal-newline reading (as TextIOWrapper)."""
        return getattr(self._decoder, "newlines", None)

    def fileno(self) -> int:
        """The file descriptor."""
        return self.buffer.fileno()

    def detach(self) -> AsyncBinaryFile:
        """Separate the binary file from this one and return it (nothing is pending here)."""
        buffer = self.buffer
        self._buffer = None
        return buffer

    async def readable(self) -> bool:
        """Whether the file was opened for reading."""
        return self.buffer.readable()

    async def writable(self) -> bool:
        """Whether the file was opened for writing."""
        return await self.buffer.writable()

    async def seekable(self) -> bool:
        """Whether the file can seek."""
        return await self.buffer.seekable()

    async def isatty(self) -> bool:
        """Whether the file is a terminal."""
        return await self.buffer.isatty()

    def __repr__(self) -> str:
        name = self._buffer.name if self._buffer is not None else None
        return (
            f"<iomux.files.AsyncTextFile name={name!r} mode={self._mode!r} "
            f"encoding={self._encoding!r}>"
        )

    # -- decoder state (as _pyio.TextIOWrapper) --------------------------------------

    def _get_encoder(self) -> Any:
        self._encoder = codecs.getincrementalencoder(self._encoding)(self._errors)
        return self._encoder

    def _get_decoder(self) -> Any:
        decoder: Any = codecs.getincrementaldecoder(self._encoding)(self._errors)
        if self._readuniversal:
            decoder = io.IncrementalNewlineDecoder(decoder, self._readtranslate)
        self._decoder = decoder
        return decoder

    def _set_decoded_chars(self, chars: str) -> None:
        self._decoded_chars = chars
        self._decoded_chars_used = 0

    def _get_decoded_chars(self, n: int | None = None) -> str:
        offset = self._decoded_chars_used
        if n is None:
            chars = self._decoded_chars[offset:]
        else:
            chars = self._decoded_chars[offset : offset + n]
        self._decoded_chars_used += len(chars)
        return chars

    def _pending_chars(self) -> int:
        return len(self._decoded_chars) - self._decoded_chars_used

    async def _read_chunk(self, buffer: AsyncBinaryFile, backend: _Backend) -> bool:
        """Decode one more chunk, appending to the decoded characters not yet used.

        Unlike _pyio (which replaces them), characters not yet used stay, so
        a call cancelled while it reads loses nothing: the snapshot then
        covers every byte fed since its point. Return False at end of file.
        """
        decoder = self._decoder
        fresh = not self._pending_chars()
        if fresh:
            dec_buffer, dec_flags = decoder.getstate()
        chunk = await buffer._read1(backend, TEXT_CHUNK_SIZE)
        eof = not chunk
        decoded = decoder.decode(chunk, eof)
        if fresh:
            self._set_decoded_chars(decoded)
            if self._seekable:
                self._snapshot = (dec_flags, dec_buffer + chunk)
        else:
            self._decoded_chars += decoded
            if self._snapshot is not None:
                flags, fed = self._snapshot
                self._snapshot = (flags, fed + chunk)
        if self._decoded_chars and self._snapshot is not None:
            self._b2cratio = len(self._snapshot[1]) / len(self._decoded_chars)
        else:
            self._b2cratio = 0.0
        return not eof

    @staticmethod
    def _pack_cookie(
        position: int,
        dec_flags: int = 0,
        bytes_to_feed: int = 0,
        need_eof: bool = False,
        chars_to_skip: int = 0,
    ) -> int:
        return (
            position
            | (dec_flags << 64)
            | (bytes_to_feed << 128)
            | (chars_to_skip << 192)
            | (bool(need_eof) << 256)
        )

    @staticmethod
    def _unpack_cookie(bigint: int) -> tuple[int, int, int, bool, int]:
        rest, position = divmod(bigint, 1 << 64)
        rest, dec_flags = divmod(rest, 1 << 64)
        rest, bytes_to_feed = divmod(rest, 1 << 64)
        need_eof, chars_to_skip = divmod(rest, 1 << 64)
        return position, dec_flags, bytes_to_feed, bool(need_eof), chars_to_skip

    def _check_open(self) -> AsyncBinaryFile:
        buffer = self.buffer
        if buffer._closed:
            raise _closed_error()
        return buffer

    # -- reading ---------------------------------------------------------------------

    async def read(self, size: int | None = -1) -> str:
        """Read up to ``size`` characters (everything if negative or None)."""
        buffer = self._check_open()
        if not buffer._readable:
            raise io.UnsupportedOperation("not readable")
        size = -1 if size is None else size.__index__()
        async with buffer._lock:
            backend = await buffer._enter()
            if buffer._wbuf:
                await buffer._flush_writes(backend)
            decoder = self._decoder or self._get_decoder()
            if size < 0:
                raw = await buffer._read(backend, -1)
                result: str = self._get_decoded_chars() + decoder.decode(raw, final=True)
                self._set_decoded_chars("")
                self._snapshot = None
                return result
            while self._pending_chars() < size:
                if not await self._read_chunk(buffer, backend):
                    break
            return self._get_decoded_chars(size)

    async def readline(self, size: int | None = -1) -> str:
        """Read one line (newline as ``newline`` says), at most ``size`` characters."""
        buffer = self._check_open()
        if not buffer._readable:
            raise io.UnsupportedOperation("not readable")
        limit = -1 if size is None else size.__index__()
        async with buffer._lock:
            backend = await buffer._enter()
            if buffer._wbuf:
                await buffer._flush_writes(backend)
            return await self._readline(buffer, backend, limit)

    def _line_end(self, line: str, start: int) -> int:
        """The end of the first line in ``line`` from ``start``, or -1."""
        if self._readtranslate:
            pos = line.find("\n", start)
            return pos + 1 if pos >= 0 else -1
        if self._readuniversal:
            nlpos = line.find("\n", start)
            crpos = line.find("\r", start)
            if crpos == -1:
                return nlpos + 1 if nlpos >= 0 else -1
            if nlpos == -1 or nlpos > crpos + 1:
                return crpos + 1
            if nlpos < crpos:
                return nlpos + 1
            return crpos + 2  # \r\n
        assert self._readnl is not None
        pos = line.find(self._readnl, start)
        return pos + len(self._readnl) if pos >= 0 else -1

    async def _readline(self, buffer: AsyncBinaryFile, backend: _Backend, limit: int) -> str:
        if self._decoder is None:
            self._get_decoder()
        start = self._decoded_chars_used
        searched = start
        while True:
            chars = self._decoded_chars
            end = self._line_end(chars, searched)
            if end >= 0:
                break
            if limit >= 0 and len(chars) - start >= limit:
                end = start + limit
                break
            # With newline="\r\n", a "\r" at the end may begin the line's end.
            searched = max(start, len(chars) - 1)
            fresh = not self._pending_chars()
            more = await self._read_chunk(buffer, backend)
            if fresh:
                start = searched = 0  # the decoded characters started afresh
            if not more and self._pending_chars() == 0:
                self._set_decoded_chars("")
                self._snapshot = None
                return ""
            if not more:
                chars = self._decoded_chars
                end = self._line_end(chars, searched)
                if end < 0:
                    end = len(chars)
                break
        if limit >= 0 and end - start > limit:
            end = start + limit
        line = self._decoded_chars[start:end]
        self._decoded_chars_used = end
        return line

    async def readlines(self, hint: int | None = -1) -> list[str]:
        """Read lines to the end of the file, or until they total ``hint`` characters."""
        buffer = self._check_open()
        if not buffer._readable:
            raise io.UnsupportedOperation("not readable")
        limit = -1 if hint is None else hint.__index__()
        lines: list[str] = []
        total = 0
        async with buffer._lock:
            backend = await buffer._enter()
            if buffer._wbuf:
                await buffer._flush_writes(backend)
            while True:
                line = await self._readline(buffer, backend, -1)
                if not line:
                    break
                lines.append(line)
                total += len(line)
                if 0 < limit <= total:
                    break
        return lines

    async def __anext__(self) -> str:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    def __aiter__(self) -> AsyncTextFile:
        return self

    # -- writing ---------------------------------------------------------------------

    async def write(self, s: str) -> int:
        """Write ``s``, translating ``"\\n"`` as ``newline`` says; return ``len(s)``."""
        buffer = self._check_open()
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not buffer._writable:
            raise io.UnsupportedOperation("not writable")
        length = len(s)
        haslf = (self._writetranslate or self._line_buffering) and "\n" in s
        if haslf and self._writetranslate and self._writenl != "\n":
            s = s.replace("\n", self._writenl)
        encoder = self._encoder or self._get_encoder()
        data = encoder.encode(s)
        async with buffer._lock:
            backend = await buffer._enter()
            await buffer._write(backend, memoryview(data))
            if self._line_buffering and (haslf or "\r" in s):
                await buffer._flush_writes(backend)
            self._set_decoded_chars("")
            self._snapshot = None
            if self._decoder is not None:
                self._decoder.reset()
        return length

    async def writelines(self, lines: Iterable[str]) -> None:
        """Write every string of ``lines``."""
        for line in lines:
            await self.write(line)

    async def flush(self) -> None:
        """Write what is buffered."""
        await self.buffer.flush()

    async def fsync(self, *, datasync: bool = False) -> None:
        """Flush, then ``fsync`` (``fdatasync`` with ``datasync``) the file to storage."""
        await self.buffer.fsync(datasync=datasync)

    async def truncate(self, pos: int | None = None) -> int:
        """Resize the file to ``pos`` bytes (default: the position, as ``tell()``)."""
        await self.flush()
        if pos is None:
            pos = await self.tell()
        return await self.buffer.truncate(pos)

    async def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._buffer is not None:
            await self._buffer.close()

    async def __aenter__(self) -> AsyncTextFile:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- position (the cookies of _pyio.TextIOWrapper) -------------------------------

    async def tell(self) -> int:
        """An opaque cookie for :meth:`seek` (a byte offset where no decoder state is held)."""
        buffer = self._check_open()
        if not self._seekable:
            raise io.UnsupportedOperation("underlying stream is not seekable")
        async with buffer._lock:
            backend = await buffer._enter()
            if buffer._wbuf:
                await buffer._flush_writes(backend)
            return self._tell(buffer._pos)

    def _tell(self, position: int) -> int:
        decoder = self._decoder
        if decoder is None or self._snapshot is None:
            if self._pending_chars():
                raise AssertionError("pending decoded text")
            return position
        dec_flags, next_input = self._snapshot
        position -= len(next_input)
        chars_to_skip = self._decoded_chars_used
        if chars_to_skip == 0:
            return self._pack_cookie(position, dec_flags)
        saved_state = decoder.getstate()
        try:
            skip_bytes = int(self._b2cratio * chars_to_skip)
            skip_back = 1
            skip_bytes = min(skip_bytes, len(next_input))
            while skip_bytes > 0:
                decoder.setstate((b"", dec_flags))
                n = len(decoder.decode(next_input[:skip_bytes]))
                if n <= chars_to_skip:
                    b, d = decoder.getstate()
                    if not b:
                        dec_flags = d
                        chars_to_skip -= n
                        break
                    skip_bytes -= len(b)
                    skip_back = 1
                else:
                    skip_bytes -= skip_back
                    skip_back = skip_back * 2
            else:
                skip_bytes = 0
                decoder.setstate((b"", dec_flags))
            start_pos = position + skip_bytes
            start_flags = dec_flags
            if chars_to_skip == 0:
                return self._pack_cookie(start_pos, start_flags)
            bytes_fed = 0
            need_eof = False
            chars_decoded = 0
            for i in range(skip_bytes, len(next_input)):
                bytes_fed += 1
                chars_decoded += len(decoder.decode(next_input[i : i + 1]))
                dec_buffer, dec_flags = decoder.getstate()
                if not dec_buffer and chars_decoded <= chars_to_skip:
                    start_pos += bytes_fed
                    chars_to_skip -= chars_decoded
                    start_flags, bytes_fed, chars_decoded = dec_flags, 0, 0
                if chars_decoded >= chars_to_skip:
                    break
            else:
                chars_decoded += len(decoder.decode(b"", final=True))
                need_eof = True
                if chars_decoded < chars_to_skip:
                    raise OSError("can't reconstruct logical file position")
            return self._pack_cookie(start_pos, start_flags, bytes_fed, need_eof, chars_to_skip)
        finally:
            decoder.setstate(saved_state)

    def _reset_encoder(self, position: int) -> None:
        try:
            encoder = self._encoder or self._get_encoder()
        except LookupError:
            return
        if position != 0:
            encoder.setstate(0)
        else:
            encoder.reset()

    async def seek(self, cookie: int, whence: int = os.SEEK_SET) -> int:
        """Go to a :meth:`tell` cookie (``whence`` 0), or to the end (``seek(0, 2)``)."""
        buffer = self._check_open()
        if not self._seekable:
            raise io.UnsupportedOperation("underlying stream is not seekable")
        cookie = cookie.__index__()
        async with buffer._lock:
            backend = await buffer._enter()
            if buffer._wbuf:
                await buffer._flush_writes(backend)
            if whence == os.SEEK_CUR:
                if cookie != 0:
                    raise io.UnsupportedOperation("can't do nonzero cur-relative seeks")
                cookie = self._tell(buffer._pos)
            elif whence == os.SEEK_END:
                if cookie != 0:
                    raise io.UnsupportedOperation("can't do nonzero end-relative seeks")
                res = await backend.stat(b"", _AT_EMPTY_PATH, buffer._fd)
                if isinstance(res, int):
                    raise _error(res, buffer._name)
                buffer._pos = buffer._wstart = position = res.st_size
                self._set_decoded_chars("")
                self._snapshot = None
                if self._decoder is not None:
                    self._decoder.reset()
                self._reset_encoder(position)
                return position
            elif whence != os.SEEK_SET:
                raise ValueError(f"unsupported whence ({whence!r})")
            if cookie < 0:
                raise ValueError(f"negative seek position {cookie!r}")
            start_pos, dec_flags, bytes_to_feed, need_eof, chars_to_skip = self._unpack_cookie(
                cookie
            )
            input_chunk = b""
            if chars_to_skip:
                # Read first: a cancellation here leaves every state as it was.
                saved = buffer._pos
                buffer._pos = start_pos
                try:
                    input_chunk = await buffer._read(backend, bytes_to_feed)
                except BaseException:
                    buffer._pos = saved
                    raise
            buffer._pos = buffer._wstart = start_pos
            self._set_decoded_chars("")
            self._snapshot = None
            if cookie == 0 and self._decoder is not None:
                self._decoder.reset()
            elif self._decoder is not None or dec_flags or chars_to_skip:
                self._decoder = self._decoder or self._get_decoder()
                self._decoder.setstate((b"", dec_flags))
                self._snapshot = (dec_flags, b"")
            if chars_to_skip:
                decoder: Any = self._decoder
                buffer._pos = start_pos + len(input_chunk)
                self._set_decoded_chars(decoder.decode(input_chunk, need_eof))
                self._snapshot = (dec_flags, input_chunk)
                if len(self._decoded_chars) < chars_to_skip:
                    raise OSError("can't restore logical file position")
                self._decoded_chars_used = chars_to_skip
            self._reset_encoder(cookie)
            return cookie


#: What :func:`open` gives.
AsyncFile = Union[AsyncTextFile, AsyncBinaryFile]  # noqa: UP007


class FileContextManager(Generic[FileT]):
    """What :func:`open` returns: await it for the file, or use it with ``async with``."""

    __slots__ = ("_file", "_open")

    def __init__(self, opening: Callable[[], Coroutine[Any, Any, FileT]]) -> None:
        self._open = opening  # the coroutine is made when awaited: none left unawaited
        self._file: FileT | None = None

    def __await__(self) -> Generator[Any, None, FileT]:
        if self._file is None:
            self._file = yield from self._open().__await__()
        assert self._file is not None
        return self._file

    async def __aenter__(self) -> FileT:
        return await self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        file, self._file = self._file, None
        if file is not None:
            await file.close()  # type: ignore[attr-defined]


# -- open ----------------------------------------------------------------------------

OpenTextMode = Literal[
    "r", "w", "a", "x", "r+", "w+", "a+", "x+", "rt", "wt", "at", "xt", "r+t", "w+t", "a+t", "x+t"
]
OpenBinaryMode = Literal[
    "rb", "wb", "ab", "xb", "r+b", "w+b", "a+b", "x+b", "rb+", "wb+", "ab+", "xb+", "br", "bw"
]


def _parse_mode(mode: str) -> tuple[int, bool, bool, bool, bool]:
    """``(flags, binary, readable, writable, append)`` for an ``open()`` mode (as io.open)."""
    if not isinstance(mode, str):
        raise TypeError(f"invalid mode: {mode!r}")
    modes = set(mode)
    if modes - set("axrwb+t") or len(mode) > len(modes):
        raise ValueError(f"invalid mode: {mode!r}")
    creating = "x" in modes
    reading = "r" in modes
    writing = "w" in modes
    appending = "a" in modes
    updating = "+" in modes
    text = "t" in modes
    binary = "b" in modes
    if text and binary:
        raise ValueError("can't have text and binary mode at once")
    if creating + reading + writing + appending != 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    flags = os.O_CLOEXEC
    if updating:
        flags |= os.O_RDWR
    elif reading:
        flags |= os.O_RDONLY
    else:
        flags |= os.O_WRONLY
    if creating:
        flags |= os.O_CREAT | os.O_EXCL
    elif writing:
        flags |= os.O_CREAT | os.O_TRUNC
    elif appending:
        flags |= os.O_CREAT | os.O_APPEND
    return flags, binary, reading or updating, not reading or updating, appending


def _fileio_mode(flags: int, readable: bool, writable: bool, append: bool) -> str:
    """The mode string ``io.FileIO`` reports."""
    if flags & os.O_EXCL:
        return "xb+" if readable else "xb"
    if append:
        return "ab+" if readable else "ab"
    if readable and writable:
        return "rb+"
    return "rb" if readable else "wb"


def _text_encoding(encoding: str | None) -> str:
    encoding = io.text_encoding(encoding)  # type: ignore[attr-defined,unused-ignore]
    if encoding == "locale":
        import locale

        getencoding = getattr(locale, "getencoding", None)
        encoding = getencoding() if getencoding else locale.getpreferredencoding(False)
    return encoding


@overload
def open(
    file: FileArg,
    mode: OpenTextMode = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[[Any, int], int] | None = None,
) -> FileContextManager[AsyncTextFile]: ...
@overload
def open(
    file: FileArg,
    mode: OpenBinaryMode,
    buffering: int = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    closefd: bool = True,
    opener: Callable[[Any, int], int] | None = None,
) -> FileContextManager[AsyncBinaryFile]: ...
@overload
def open(
    file: FileArg,
    mode: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[[Any, int], int] | None = None,
) -> FileContextManager[Any]: ...
def open(
    file: FileArg,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Callable[[Any, int], int] | None = None,
) -> FileContextManager[Any]:
    """Open a file asynchronously; the arguments are those of the built-in ``open()``.

    Returns an object to ``await`` (giving the file) or to use with ``async
    with`` (closing the file at the end), as ``aiofiles.open`` does. The
    file is an :class:`AsyncTextFile`, an :class:`AsyncBinaryFile`, or with
    ``buffering=0`` an :class:`AsyncRawFile`. Errors are the built-in
    ``open()``'s: ``FileNotFoundError``, ``IsADirectoryError``,
    ``PermissionError``, ``ValueError`` for a bad mode...
    """
    flags, binary, readable, writable, append = _parse_mode(mode)
    if not isinstance(buffering, int):
        raise TypeError(f"'{type(buffering).__name__}' object cannot be interpreted as an integer")
    if binary:
        if encoding is not None:
            raise ValueError("binary mode doesn't take an encoding argument")
        if errors is not None:
            raise ValueError("binary mode doesn't take an errors argument")
        if newline is not None:
            raise ValueError("binary mode doesn't take a newline argument")
        if buffering == 1:
            warnings.warn(
                "line buffering (buffering=1) isn't supported in binary mode, "
                "the default buffer size will be used",
                RuntimeWarning,
                stacklevel=2,
            )
    elif buffering == 0:
        raise ValueError("can't have unbuffered text I/O")
    if isinstance(file, bool) or not isinstance(file, (str, bytes, int, os.PathLike)):
        raise TypeError(f"expected str, bytes, os.PathLike object or integer, not {file!r}")
    if isinstance(file, int):
        if file < 0:
            raise ValueError("negative file descriptor")
    elif not closefd:
        raise ValueError("Cannot use closefd=False with file name")
    text_encoding = None if binary else _text_encoding(encoding)
    return FileContextManager(
        functools.partial(
            _open,
            file,
            mode,
            flags,
            binary,
            readable,
            writable,
            append,
            buffering,
            text_encoding,
            errors,
            newline,
            closefd,
            opener,
        )
    )


async def _open(
    file: FileArg,
    mode: str,
    flags: int,
    binary: bool,
    readable: bool,
    writable: bool,
    append: bool,
    buffering: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
    closefd: bool,
    opener: Callable[[Any, int], int] | None,
) -> AsyncFile:
    backend = _backend()
    name: Any
    if isinstance(file, int):
        name = file
        fd = file
        info = await _fstat(backend, fd, name)
    else:
        name = os.fspath(file)
        if opener is not None:
            fd, info = await _open_with(backend, opener, name, flags)
        else:
            fd, info = await backend.open_stat(_fspath(name), flags, 0o666, name)
    try:
        if _stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(_errno.EISDIR, os.strerror(_errno.EISDIR), name)
        if _stat.S_ISREG(info.st_mode) or _stat.S_ISBLK(info.st_mode):
            seekable = True
        else:
            try:
                os.lseek(fd, 0, os.SEEK_CUR)
                seekable = True
            except OSError:
                seekable = False
        position = 0
        if seekable:
            if append:
                position = os.lseek(fd, 0, os.SEEK_END)
            elif isinstance(file, int):
                position = os.lseek(fd, 0, os.SEEK_CUR)
        # 0 (unbuffered) still reads ahead for readline, consuming only the line.
        size = DEFAULT_BUFFER_SIZE if buffering in (-1, 0, 1) or buffering < 0 else buffering
        cls = AsyncRawFile if buffering == 0 else AsyncBinaryFile
        binfile = cls(
            backend,
            fd,
            name=name,
            mode=_fileio_mode(flags, readable, writable, append),
            readable=readable,
            writable=writable,
            append=append,
            closefd=closefd,
            seekable=seekable,
            position=position,
            size=info.st_size,
            buffer_size=size,
        )
    except BaseException:
        if closefd:
            backend.close_now(fd)
        raise
    if binary:
        return binfile
    assert encoding is not None
    try:
        return AsyncTextFile(
            binfile,
            mode=mode,
            encoding=encoding,
            errors=errors,
            newline=newline,
            line_buffering=buffering == 1,
        )
    except BaseException:
        binfile._closed = True
        if closefd:
            backend.close_now(fd)
        raise


async def _fstat(backend: _Backend, fd: int, name: object) -> os.stat_result:
    res = await backend.stat(b"", _AT_EMPTY_PATH, fd)
    if isinstance(res, int):
        raise _error(res, name)
    return res


async def _open_with(
    backend: _Backend, opener: Callable[[Any, int], int], name: Any, flags: int
) -> tuple[int, os.stat_result]:
    """Call a custom opener in the executor (it is arbitrary, maybe blocking, code)."""
    threads = backend if isinstance(backend, _ThreadBackend) else _ThreadBackend(backend.loop)
    fut = threads._run(opener, (name, flags), None, None, threads._orphan_fd)
    fd = await _opened(threads, fut, name)
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"opener returned {fd!r}")
    try:
        return fd, await _fstat(backend, fd, name)
    except BaseException:
        backend.close_now(fd)
        raise


# -- whole files and positional I/O -----------------------------------------------------


async def read_bytes(path: StrOrBytesPath) -> bytes:
    """The contents of the file at ``path`` (as ``pathlib.Path.read_bytes``)."""
    backend = _backend()
    name = os.fspath(path)
    flags = os.O_RDONLY | os.O_CLOEXEC
    fd = await _opened(backend, backend.open(_fspath(name), flags, 0, _AT_FDCWD), name)
    tracker = _Tracker()
    try:
        data = await backend.read_to_end(fd, 0, 0, tracker, name)
    except BaseException:
        tracker.call_when_idle(lambda: backend.close_now(fd))
        raise
    res = await backend.close(fd)
    if res < 0:
        raise _error(res, name)
    return data


async def write_bytes(path: StrOrBytesPath, data: Any) -> int:
    """Replace the file at ``path`` with ``data`` (created 0o666 & ~umask); return its length."""
    view = memoryview(data).cast("B")
    backend = _backend()
    name = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd = await _opened(backend, backend.open(_fspath(name), flags, 0o666, _AT_FDCWD), name)
    tracker = _Tracker()
    try:
        done = 0
        while done < len(view):
            part = view[done : done + CHUNK_SIZE]
            res = await backend.write(fd, part, done, tracker, _releaser(part))
            if res < 0:
                raise _error(res, name)
            if res == 0:
                raise OSError(_errno.EIO, "the kernel wrote no bytes", name)
            done += res
    except BaseException:
        tracker.call_when_idle(lambda: backend.close_now(fd))
        raise
    res = await backend.close(fd)
    if res < 0:
        raise _error(res, name)
    return len(view)


async def stat(
    path: StrOrBytesPath | int, *, dir_fd: int | None = None, follow_symlinks: bool = True
) -> os.stat_result:
    """``os.stat(path)`` (an fd for ``path`` is an ``fstat``), equal to what ``os.stat`` returns."""
    backend = _backend()
    if isinstance(path, int):
        return await _fstat(backend, path, None)
    name = os.fspath(path)
    flags = 0 if follow_symlinks else _AT_SYMLINK_NOFOLLOW
    res = await backend.stat(_fspath(name), flags, _AT_FDCWD if dir_fd is None else dir_fd)
    if isinstance(res, int):
        raise _error(res, name)
    return res


async def open_fd(
    path: StrOrBytesPath, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
) -> int:
    """``os.open(path, flags, mode)`` as an operation; the fd is for :func:`pread` and co.

    Any flags (``O_DIRECT``, ``O_NOATIME``...); ``O_CLOEXEC`` is added, as
    Python makes its fds non-inheritable. Close it with :func:`close_fd`.
    """
    backend = _backend()
    name = os.fspath(path)
    where = _AT_FDCWD if dir_fd is None else dir_fd
    fut = backend.open(_fspath(name), flags | os.O_CLOEXEC, mode, where)
    return await _opened(backend, fut, name)


async def close_fd(fd: int) -> None:
    """Close ``fd`` as an operation (``os.close``)."""
    res = await _backend().close(fd)
    if res < 0:
        raise _error(res)


async def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of ``fd`` at ``offset`` (fewer at the end of the file), as ``os.pread``."""
    if n < 0:
        raise ValueError("negative buffersize in pread")
    out = bytearray(n)
    got = await preadinto(fd, out, offset)
    del out[got:]
    return bytes(out)


async def preadinto(fd: int, buffer: Any, offset: int) -> int:
    """One read of ``fd`` at ``offset`` into ``buffer`` (writable bytes-like); return the count.

    ``buffer`` may be aligned memory (an ``mmap``) for a file opened with
    ``O_DIRECT``.
    """
    if offset < 0:
        raise ValueError("offset must be non-negative")
    backend = _backend()
    view = memoryview(buffer).cast("B")
    part = view[: min(len(view), 1 << 30)]
    res = await backend.read(fd, part, offset, None, _releaser(part))
    if res < 0:
        raise _error(res)
    return res


async def pwrite(fd: int, data: Any, offset: int) -> int:
    """One write of ``data`` to ``fd`` at ``offset``; return the bytes written, as ``os.pwrite``."""
    if offset < 0:
        raise ValueError("offset must be non-negative")
    backend = _backend()
    view = memoryview(data).cast("B")
    part = view[: min(len(view), 1 << 30)]
    res = await backend.write(fd, part, offset, None, _releaser(part))
    if res < 0:
        raise _error(res)
    return res
