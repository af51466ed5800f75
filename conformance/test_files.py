"""Asynchronous files (:mod:`iomux.files`): the same scenarios on every loop.

Each test runs on stock asyncio (the thread-pool fallback, the reference)
and on iomux's loop over every driver under test (``iomux.new_event_loop``
of the ``driver``: the kernel's io_uring operations on io_uring, the thread
pool elsewhere), through the plugin's ``loop_kind``/``aio_loop`` fixtures,
which also fail a test that leaves fds or threads behind. Results are
compared with the standard library's ``open()`` on the same real files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from iomux import files

from .aio_support import run
from .plugin import LoopKind

Loop = asyncio.AbstractEventLoop
T = TypeVar("T")

TEXT = "first line\nsecond, with ünïcödé\r\nthird\rfourth\n\nlast without newline"


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible random bytes (every value occurs, b"\\n" and NUL too)."""
    return random.Random(seed).randbytes(size)


def on(loop: Loop, main: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Run ``main()`` on ``loop``, bounded."""

    async def wrapped() -> T:
        return await main()

    return run(loop, wrapped(), timeout=timeout)


#: The port operations iomux.files needs to work in the kernel.
KERNEL_OPS = {"OPENAT", "READ", "WRITE", "CLOSE", "STATX"}


def kernel_files(loop: Loop) -> bool:
    """Whether ``loop`` has a completion port with the file operations."""
    port = getattr(loop, "completion_port", None)
    return port is not None and KERNEL_OPS <= port.file_ops


def needs_kernel_files(loop: Loop, kind: LoopKind) -> None:
    """Skip unless the loop under test does file operations in the kernel."""
    if not kernel_files(loop):
        pytest.skip(f"{kind.label} has no io_uring file operations (they run in threads)")


def test_kernel_or_threads(aio_loop: Loop, loop_kind: LoopKind) -> None:
    async def main() -> bool:
        return files.uses_kernel()

    expected = kernel_files(aio_loop)
    assert on(aio_loop, main) is expected
    if loop_kind.driver is None or not loop_kind.driver.load().capabilities.completion:
        assert not expected  # no completion port: the thread pool
    elif loop_kind.driver.label == "io_uring" and not expected:
        pytest.skip("this kernel's io_uring lacks file operations: the thread pool is used")


# -- binary ------------------------------------------------------------------------------


def test_binary_reads_match_the_standard_library(aio_loop: Loop, tmp_path: Path) -> None:
    data = payload(300_000, seed=1).replace(b"\x00", b"\n")  # lines of random length
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as ref:
        ref_lines = ref.readlines()

    async def main() -> None:
        async with files.open(path, "rb") as f:
            assert f.name == str(path) and f.mode == "rb" and not f.closed
            assert f.readable() and not await f.writable() and await f.seekable()
            assert await f.read(10) == data[:10]
            assert await f.read1(5) == data[10:15]
            assert (await f.peek())[:5] == data[15:20]
            assert await f.tell() == 15
            buf = bytearray(100_000)
            assert await f.readinto(buf) == 100_000 and buf == data[15:100_015]
            assert await f.read() == data[100_015:]
            assert await f.read() == b"" and await f.read(10) == b""  # EOF
            await f.seek(0)
            assert await f.readline() == ref_lines[0]
            assert await f.readline(3) == ref_lines[1][:3]
            await f.seek(0)
            assert await f.readlines() == ref_lines
            await f.seek(0)
            assert [line async for line in f] == ref_lines
        assert f.closed
        f2 = await files.open(path, "rb")  # awaitable as well as a context manager
        assert await f2.read() == data
        await f2.close()
        await f2.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            await f2.read()

    on(aio_loop, main)


def test_unbuffered_binary(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    path.write_bytes(b"abc\ndef\nghi")

    async def main() -> None:
        async with files.open(path, "rb", buffering=0) as f:
            assert isinstance(f, files.AsyncRawFile)
            assert await f.read(2) == b"ab"
            assert await f.readline() == b"c\n"
            assert await f.tell() == 4
            assert await f.readall() == b"def\nghi"
        async with files.open(path, "r+b", buffering=0) as f:
            assert await f.write(b"XY") == 2
            assert await f.tell() == 2
        assert path.read_bytes() == b"XYc\ndef\nghi"  # unbuffered: written at once

    on(aio_loop, main)


def test_write_modes(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "w.bin"

    async def main() -> None:
        async with files.open(path, "wb") as f:
            assert f.mode == "wb"
            assert await f.write(b"hello ") == 6
            assert await f.write(memoryview(b"world")) == 5
            await f.writelines([b"!", bytearray(b"\n")])
            assert await f.tell() == 13
            with pytest.raises(io.UnsupportedOperation):
                await f.read()
        assert path.read_bytes() == b"hello world!\n"
        async with files.open(path, "ab") as f:
            assert await f.tell() == 13
            await f.write(b"more")
            await f.flush()
            assert await f.tell() == 17
        assert path.read_bytes() == b"hello world!\nmore"
        async with files.open(path, "r+b") as f:
            assert f.mode == "rb+"
            await f.seek(6)
            await f.write(b"WORLD")
            assert await f.read(1) == b"!"  # the write is flushed before reading
            await f.seek(-4, os.SEEK_END)
            assert await f.read() == b"more"
            assert await f.truncate(5) == 5
            assert await f.tell() == 17  # truncate does not move the position
            await f.fsync()
        assert path.read_bytes() == b"hello"
        async with files.open(path, "w+b") as f:  # truncates
            assert await f.read() == b""
            await f.write(b"x" * 200_000)  # larger than the buffer: straight to the file
            await f.seek(0)
            assert await f.read() == b"x" * 200_000
            await f.seek(300_000)
            await f.write(b"end")  # leaves a hole
        assert path.stat().st_size == 300_003
        with pytest.raises(FileExistsError):
            await files.open(path, "xb")
        async with files.open(tmp_path / "new.bin", "xb") as f:
            await f.write(b"created")
        assert (tmp_path / "new.bin").read_bytes() == b"created"
        assert await files.write_bytes(tmp_path / "whole.bin", b"0123" * 1000) == 4000
        assert await files.read_bytes(tmp_path / "whole.bin") == b"0123" * 1000
        assert await files.write_bytes(tmp_path / "empty.bin", b"") == 0
        assert await files.read_bytes(tmp_path / "empty.bin") == b""

    on(aio_loop, main)


def test_seek_and_tell(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    data = bytes(range(256)) * 40
    path.write_bytes(data)

    async def main() -> None:
        async with files.open(path, "rb") as f:
            assert await f.seek(100) == 100
            assert await f.read(4) == data[100:104]
            assert await f.seek(10, os.SEEK_CUR) == 114
            assert await f.read(2) == data[114:116]
            assert await f.seek(-6, os.SEEK_END) == len(data) - 6
            assert await f.read() == data[-6:]
            assert await f.seek(len(data) + 50) == len(data) + 50
            assert await f.read(10) == b""  # past the end
            await f.seek(0)
            assert await f.read(1) == data[:1]
            with pytest.raises(OSError) as negative:
                await f.seek(-1)
            assert negative.value.errno == errno.EINVAL
            assert await f.tell() == 1  # unchanged by the failed seek
            with pytest.raises(ValueError):
                await f.seek(0, 7)

    on(aio_loop, main)


def test_partial_reads_and_eof(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"0123456789")
    (tmp_path / "empty").write_bytes(b"")

    async def main() -> None:
        async with files.open(path, "rb") as f:
            assert await f.read(0) == b"" and await f.read1(0) == b""
            assert await f.readline(0) == b"" and await f.tell() == 0
            assert await f.read(4) == b"0123"
            assert await f.read(100) == b"456789"  # fewer than asked: the end
            assert await f.read(100) == b""
            assert await f.readline() == b""
            buf = bytearray(8)
            assert await f.readinto(buf) == 0
        async with files.open(tmp_path / "empty", "rb") as f:
            assert await f.read() == b""
            assert [line async for line in f] == []
        fd = os.open(path, os.O_RDONLY)
        try:
            assert await files.pread(fd, 4, 3) == b"3456"
            assert await files.pread(fd, 100, 8) == b"89"
            assert await files.pread(fd, 4, 100) == b""
            buf = bytearray(3)
            assert await files.preadinto(fd, buf, 1) == 3 and buf == b"123"
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # positional: the fd's offset stays
        finally:
            os.close(fd)
        fd = await files.open_fd(tmp_path / "pw.bin", os.O_RDWR | os.O_CREAT, 0o644)
        assert not os.get_inheritable(fd)
        assert await files.pwrite(fd, b"abc", 5) == 3
        assert await files.pread(fd, 10, 0) == b"\0" * 5 + b"abc"
        await files.close_fd(fd)
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF
        async with files.open(path, encoding="ascii") as t:
            assert await t.read(0) == "" and await t.readline(0) == ""
            assert await t.read(3) == "012"

    on(aio_loop, main)


# -- text ----------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [None, "", "\n", "\r", "\r\n"])
def test_text_reads_match_the_standard_library(
    aio_loop: Loop, tmp_path: Path, newline: str | None
) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode("utf-8") * 50)
    with open(path, encoding="utf-8", newline=newline) as ref:
        ref_all = ref.read()
        ref.seek(0)
        ref_lines = ref.readlines()
        ref.seek(0)
        ref_pieces = [ref.read(7), ref.readline(), ref.read(1000), ref.readline(5)]
        ref_newlines = ref.newlines

    async def main() -> None:
        async with files.open(path, encoding="utf-8", newline=newline) as f:
            assert f.mode == "r" and f.encoding == "utf-8" and f.errors == "strict"
            assert await f.read() == ref_all
            await f.seek(0)
            assert await f.readlines() == ref_lines
            await f.seek(0)
            assert [line async for line in f] == ref_lines
            await f.seek(0)
            pieces = [await f.read(7), await f.readline(), await f.read(1000), await f.readline(5)]
            assert pieces == ref_pieces
            assert f.newlines == ref_newlines

    on(aio_loop, main)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-8-sig", "latin-1", "cp1252"])
def test_text_tell_and_seek(aio_loop: Loop, tmp_path: Path, encoding: str) -> None:
    text = TEXT.replace("ü", "u" if encoding in ("latin-1", "cp1252") else "ü") * 30
    path = tmp_path / "t.txt"
    path.write_text(text, encoding=encoding, errors="replace")
    ref_marks = []
    with open(path, encoding=encoding, errors="replace") as ref:
        while True:
            cookie = ref.tell()
            line = ref.readline()
            if not line:
                break
            ref_marks.append((cookie, line, ref.read(3)))
            ref.seek(cookie)
            ref.readline()

    async def main() -> None:
        async with files.open(path, encoding=encoding, errors="replace") as f:
            marks = []
            while True:
                cookie = await f.tell()
                line = await f.readline()
                if not line:
                    break
                marks.append((cookie, line, await f.read(3)))
                await f.seek(cookie)
                assert await f.readline() == line
            assert [(line, more) for _, line, more in marks] == [
                (line, more) for _, line, more in ref_marks
            ]
            for (ours, _, _), (ref, _, _) in zip(marks, ref_marks, strict=True):
                if ref < 1 << 64:  # no decoder state there: a byte offset, the same
                    assert ours == ref
            for cookie, line, _ in reversed(marks):
                await f.seek(cookie)
                assert await f.readline() == line
            await f.seek(0, os.SEEK_END)
            assert await f.read() == ""
            with pytest.raises(io.UnsupportedOperation):
                await f.seek(1, os.SEEK_CUR)

    on(aio_loop, main)


def test_text_writes_match_the_standard_library(aio_loop: Loop, tmp_path: Path) -> None:
    cases: list[tuple[str, str | None, str]] = [
        ("utf-8", None, "strict"),
        ("utf-8", "\r\n", "strict"),
        ("utf-16", "", "strict"),
        ("ascii", "\n", "replace"),
        ("utf-8-sig", "\r", "strict"),
    ]
    text = "\u03b1 line\nsecond\r\nthird \u20ac\n"  # non-ASCII: replaced in ascii

    async def main() -> None:
        for index, (encoding, newline, errors) in enumerate(cases):
            ours, ref = tmp_path / f"ours{index}", tmp_path / f"ref{index}"
            with open(ref, "w", encoding=encoding, newline=newline, errors=errors) as r:
                r.write(text)
                r.write("more")
                r.seek(0, os.SEEK_END)
                r.write("\nend")  # no BOM in the middle
            async with files.open(
                ours, "w", encoding=encoding, newline=newline, errors=errors
            ) as f:
                assert await f.write(text) == len(text)
                await f.writelines(["mo", "re"])
                await f.seek(0, os.SEEK_END)
                await f.write("\nend")
            assert ours.read_bytes() == ref.read_bytes(), (encoding, newline)
        async with files.open(tmp_path / "a.txt", "a", encoding="utf-8") as f:
            await f.write("one\n")
        async with files.open(tmp_path / "a.txt", "a+", encoding="utf-8") as f:
            await f.write("two\n")
            await f.seek(0)
            assert await f.read() == "one\ntwo\n"
        async with files.open(tmp_path / "lb.txt", "w", buffering=1, encoding="utf-8") as f:
            assert f.line_buffering
            await f.write("flushed\n")
            assert (tmp_path / "lb.txt").read_text() == "flushed\n"
        async with files.open(tmp_path / "r+.txt", "w+", encoding="utf-8") as f:
            await f.write("abc\ndef\n")
            await f.seek(0)
            assert await f.readline() == "abc\n"
            assert await f.truncate() == 4
        assert (tmp_path / "r+.txt").read_text() == "abc\n"

    on(aio_loop, main)


def test_decoding_errors(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\n\xff\xfe bad\n")

    async def main() -> None:
        async with files.open(path, encoding="utf-8") as f:
            with pytest.raises(UnicodeDecodeError):
                await f.read()
        async with files.open(path, encoding="utf-8", errors="replace") as f:
            assert await f.read() == open(path, encoding="utf-8", errors="replace").read()
        with pytest.raises(LookupError):
            await files.open(path, encoding="no-such-codec")
        with pytest.raises(ValueError):
            files.open(path, "rb", encoding="utf-8")
        with pytest.raises(ValueError):
            files.open(path, "r", buffering=0)
        with pytest.raises(ValueError):
            files.open(path, "rw")

    on(aio_loop, main)


# -- concurrency, size, errors, cancellation -------------------------------------------------


def test_concurrent_reads_of_one_file(aio_loop: Loop, tmp_path: Path) -> None:
    chunk = 1000
    data = b"".join(i.to_bytes(2, "big") * (chunk // 2) for i in range(64))
    path = tmp_path / "c.bin"
    path.write_bytes(data)

    async def main() -> None:
        async with files.open(path, "rb") as f:  # one file object, many tasks
            got = await asyncio.gather(*(f.read(chunk) for _ in range(64)))
            assert sorted(got) == [data[i : i + chunk] for i in range(0, len(data), chunk)]
            assert await f.tell() == len(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            offsets = list(range(0, len(data), 777))
            parts = await asyncio.gather(*(files.pread(fd, 777, o) for o in offsets))
            assert b"".join(parts) == data
        finally:
            os.close(fd)

        async def whole() -> bytes:
            async with files.open(path, "rb") as g:
                return await g.read()

        assert set(await asyncio.gather(*(whole() for _ in range(16)))) == {data}

    on(aio_loop, main)


def test_file_larger_than_the_memory_budget(
    aio_loop: Loop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 256 * 1024
    monkeypatch.setattr(files, "CHUNK_SIZE", budget)
    size = 32 * budget  # 8 MiB
    path = tmp_path / "big.bin"
    with open(path, "wb") as out:
        for i in range(32):
            out.write(payload(budget, seed=i))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()

    async def main() -> None:
        async with files.open(path, "rb") as f:
            digest = hashlib.sha256()
            buffer = bytearray(budget)  # one buffer, reused
            tracemalloc.start()
            try:
                total = 0
                while n := await f.readinto(buffer):
                    digest.update(memoryview(buffer)[:n])
                    total += n
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert total == size and digest.hexdigest() == expected
            assert peak < budget, f"reading {size} bytes in chunks held {peak} bytes"
            await f.seek(0)
            assert hashlib.sha256(await f.read()).hexdigest() == expected
            await f.seek(12345)
            head = await f.read(3 * budget + 7)  # crosses chunks, straight into the result
            assert head == path.read_bytes()[12345 : 12345 + 3 * budget + 7]
        assert hashlib.sha256(await files.read_bytes(path)).hexdigest() == expected

    on(aio_loop, main)


def test_errors_are_the_standard_librarys(aio_loop: Loop, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    (tmp_path / "file").write_text("x")
    cases: list[tuple[Any, str]] = [
        (missing, "r"),
        (tmp_path, "r"),
        (tmp_path, "rb"),
        (tmp_path, "w"),
        (tmp_path / "file" / "below", "r"),
        (tmp_path / "file", "x"),
    ]

    def reference(path: Any, mode: str) -> OSError:
        try:
            open(path, mode).close()
        except OSError as exc:
            return exc
        raise AssertionError(f"open({path}, {mode!r}) succeeded")

    async def main() -> None:
        for path, mode in cases:
            ref = reference(path, mode)
            with pytest.raises(OSError) as caught:
                await files.open(path, mode)
            assert type(caught.value) is type(ref), (path, mode)
            assert caught.value.errno == ref.errno and caught.value.filename == ref.filename
        for fn in (files.read_bytes, files.stat):
            with pytest.raises(FileNotFoundError) as missing_file:
                await fn(missing)
            assert missing_file.value.filename == str(missing)
        with pytest.raises(IsADirectoryError):
            await files.read_bytes(tmp_path)
        with pytest.raises(OSError) as bad_fd:
            await files.open(987654, "rb")
        assert bad_fd.value.errno == errno.EBADF
        fd = os.open(tmp_path / "file", os.O_RDONLY)
        os.close(fd)
        with pytest.raises(OSError) as closed_fd:
            await files.pread(fd, 1, 0)
        assert closed_fd.value.errno == errno.EBADF
        async with files.open(tmp_path / "file", "r", encoding="utf-8") as f:
            with pytest.raises(io.UnsupportedOperation):
                await f.write("no")
        async with files.open(tmp_path / "file", "rb") as g:
            with pytest.raises(TypeError):
                await g.readinto(b"immutable")
        with pytest.raises(ValueError):
            await g.read()

    on(aio_loop, main)


def test_stat_equals_os_stat(aio_loop: Loop, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"x" * 5000)
    link = tmp_path / "link"
    link.symlink_to(target)
    fields = [
        "st_mode",
        "st_ino",
        "st_dev",
        "st_nlink",
        "st_uid",
        "st_gid",
        "st_size",
        "st_atime",
        "st_mtime",
        "st_ctime",
        "st_atime_ns",
        "st_mtime_ns",
        "st_ctime_ns",
        "st_blksize",
        "st_blocks",
        "st_rdev",
    ]

    def same(ours: os.stat_result, ref: os.stat_result) -> None:
        assert ours == ref
        for name in fields:
            assert getattr(ours, name) == getattr(ref, name), name

    async def main() -> None:
        same(await files.stat(target), os.stat(target))
        same(await files.stat(link), os.stat(link))
        same(await files.stat(link, follow_symlinks=False), os.lstat(link))
        same(await files.stat(tmp_path), os.stat(tmp_path))
        same(await files.stat("/dev/null"), os.stat("/dev/null"))
        fd = os.open(target, os.O_RDONLY)
        try:
            same(await files.stat(fd), os.fstat(fd))
        finally:
            os.close(fd)

    on(aio_loop, main)


def test_cancelled_read_keeps_the_position(aio_loop: Loop, tmp_path: Path) -> None:
    data = payload(500_000, seed=7)
    path = tmp_path / "cancel.bin"
    path.write_bytes(data)

    async def main() -> None:
        async with files.open(path, "rb") as f:
            assert await f.read(10) == data[:10]
            cancelled_while_reading = 0
            for steps in range(4):  # cancel at successive points of a large read
                before = await f.tell()
                reading = asyncio.ensure_future(f.read(300_000))
                for _ in range(steps):
                    await asyncio.sleep(0)
                reading.cancel()
                result = await asyncio.gather(reading, return_exceptions=True)
                after = await f.tell()
                if isinstance(result[0], asyncio.CancelledError):
                    assert after == before  # a cancelled read leaves the position
                    cancelled_while_reading += steps > 0
                else:
                    assert result[0] == data[before : before + 300_000]
                    await f.seek(before)
                assert await f.read(5) == data[before : before + 5]
                await f.seek(before)
            assert cancelled_while_reading  # some cancellations hit a read in flight
        async with files.open(path, encoding="latin-1", newline="") as t:
            first = await t.readline()
            reading_text = asyncio.ensure_future(t.read(200_000))
            await asyncio.sleep(0)
            reading_text.cancel()
            await asyncio.gather(reading_text, return_exceptions=True)
            expected = data.decode("latin-1")
            rest = await t.read()
            assert first + rest == expected  # nothing lost, nothing twice

    on(aio_loop, main)


def test_cancelled_open_and_flush_leak_nothing(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "o.bin"
    path.write_bytes(b"content")

    async def main() -> None:
        for steps in range(6):  # cancel an open at successive points; the fd must not leak
            opening = asyncio.ensure_future(files.open(path, "rb"))
            for _ in range(steps):
                await asyncio.sleep(0)
            opening.cancel()
            done = await asyncio.gather(opening, return_exceptions=True)
            if isinstance(done[0], files.AsyncBinaryFile):
                await done[0].close()
            reading = asyncio.ensure_future(files.read_bytes(path))
            for _ in range(steps):
                await asyncio.sleep(0)
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        out = tmp_path / "flush.bin"
        async with files.open(out, "wb") as f:
            for steps in range(4):
                await f.write(b"%d-" % steps * 1000)
                flushing = asyncio.ensure_future(f.flush())
                for _ in range(steps):
                    await asyncio.sleep(0)
                flushing.cancel()
                await asyncio.gather(flushing, return_exceptions=True)
        assert out.read_bytes() == b"".join(b"%d-" % s * 1000 for s in range(4))  # exactly once
        await asyncio.sleep(0.05)  # let the cancelled operations' cleanups finish

    on(aio_loop, main)


def test_files_of_fds_and_closefd(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "fd.bin"
    path.write_bytes(b"0123456789")

    async def main() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.lseek(fd, 2, os.SEEK_SET)
            async with files.open(fd, "rb", closefd=False) as f:
                assert f.name == fd
                assert await f.read(3) == b"234"
            assert os.lseek(fd, 0, os.SEEK_CUR) == 5  # the logical position is handed back
            os.fstat(fd)  # still open
        finally:
            os.close(fd)
        with pytest.raises(ValueError):
            files.open(path, "rb", closefd=False)

    on(aio_loop, main)


def test_pipes_are_streams(aio_loop: Loop) -> None:
    r, w = os.pipe()

    async def main() -> None:
        async with files.open(r, "rb", closefd=False) as f:
            assert not await f.seekable()
            with pytest.raises(OSError) as no_tell:
                await f.tell()
            assert no_tell.value.errno == errno.ESPIPE
            with pytest.raises(io.UnsupportedOperation):
                await f.seek(0)
            os.write(w, b"one\ntwo\nthr")
            assert await f.readline() == b"one\n"
            assert await f.read(2) == b"tw"
            waiting = asyncio.ensure_future(f.read(6))  # waits for 6 bytes, as BufferedReader
            await asyncio.sleep(0.02)
            assert not waiting.done()
            os.write(w, b"ee\n")
            assert await waiting == b"o\nthre"
            reading = asyncio.ensure_future(f.read(100))
            await asyncio.sleep(0.02)
            reading.cancel()  # its read stays in flight: what it brings is kept
            await asyncio.gather(reading, return_exceptions=True)
            os.write(w, b"four\n")
            assert await f.readline() == b"e\n"
            assert await f.readline() == b"four\n"
        async with files.open(r, "r", encoding="utf-8", closefd=False) as t:
            os.write(w, "é\r\nz\n".encode())
            assert await t.readline() == "é\n"
            with pytest.raises(io.UnsupportedOperation):
                await t.tell()
            os.close(w)
            assert await t.read() == "z\n"

    try:
        on(aio_loop, main)
    finally:
        os.close(r)
        with contextlib.suppress(OSError):
            os.close(w)


# -- io_uring: no thread, no read system call -------------------------------------------------


def test_io_uring_starts_no_thread(aio_loop: Loop, loop_kind: LoopKind, tmp_path: Path) -> None:
    needs_kernel_files(aio_loop, loop_kind)
    path = tmp_path / "nothread.txt"
    before = set(threading.enumerate())

    async def main() -> None:
        async with files.open(path, "w", encoding="utf-8") as f:
            await f.write("line\n" * 10_000)
            await f.flush()
            await f.fsync()
        async with files.open(path, encoding="utf-8") as f:
            assert len([line async for line in f]) == 10_000
        await files.stat(path)
        await files.write_bytes(path, b"x" * 3_000_000)
        assert len(await files.read_bytes(path)) == 3_000_000

    on(aio_loop, main)
    started = set(threading.enumerate()) - before
    assert not started, f"io_uring file operations started threads {started}"
    assert getattr(aio_loop, "_default_executor", None) is None


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import iomux
    from iomux import files

    async def main(path):
        async with files.open(path, "rb") as f:
            data = await f.read()
            await f.seek(0)
            buf = bytearray(4096)
            while await f.readinto(buf):
                pass
        async with files.open(path, encoding="latin-1", newline="") as f:
            lines = [line async for line in f]
        whole = await files.read_bytes(path)
        assert whole == data and "".join(lines).encode("latin-1") == data
        print(len(data), files.uses_kernel())

    backend = sys.argv[2]
    loop = asyncio.new_event_loop() if backend == "asyncio" else iomux.new_event_loop(backend)
    loop.run_until_complete(main(sys.argv[1]))
    loop.close()
    """
)


def _traced_reads(tmp_path: Path, backend: str) -> list[str]:
    """The read system calls a child reading a file makes on it, with ``strace -y``."""
    target = tmp_path / f"traced-{backend}.bin"
    target.write_bytes(payload(200_000, seed=3))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / f"strace-{backend}.txt"
    calls = "read,pread64,readv,preadv,preadv2"
    command = ["strace", "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", str(log)]
    command += [sys.executable, str(script), str(target), backend]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["200000", str(backend == "io_uring")]
    return [line for line in log.read_text().splitlines() if f"<{target}>" in line]


def test_io_uring_makes_no_read_system_call(
    aio_loop: Loop, loop_kind: LoopKind, tmp_path: Path
) -> None:
    needs_kernel_files(aio_loop, loop_kind)
    if loop_kind.driver is None or loop_kind.driver.label != "io_uring":
        pytest.skip(f"the child process runs the built-in io_uring backend, not {loop_kind.label}")
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    assert _traced_reads(tmp_path, "io_uring") == []
    # The method sees reads where there are some: the thread pool's pread64.
    assert _traced_reads(tmp_path, "epoll")
