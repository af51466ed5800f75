"""``iomux.reactor.splice.sendfile_splice``: a file to a real socket through a pipe on io_uring."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import iomux
from iomux.reactor.splice import sendfile_splice

URING = next((b for b in iomux.backends() if b.name == "io_uring"), None)
pytestmark = pytest.mark.skipif(
    URING is None or not URING.available, reason="io_uring is not available here"
)

Loop = asyncio.AbstractEventLoop


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = iomux.new_event_loop("io_uring")
    try:
        port = loop.completion_port
        if port is None or "SPLICE" not in port.file_ops:
            pytest.skip("this kernel's io_uring has no SPLICE")
        yield loop
    finally:
        loop.close()


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[Any, bytes]]:
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 123)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def receive(loop: Loop, sock: socket.socket, size: int, delay: float = 0.0) -> bytes:
    if delay:
        await asyncio.sleep(delay)
    out = bytearray()
    buf = bytearray(256 * 1024)
    while len(out) < size:
        n = await loop.sock_recv_into(sock, buf)
        if not n:
            break
        out += buf[:n]
    return bytes(out)


def send(loop: Loop, sock: socket.socket, file: Any, offset: int, count: int | None) -> Any:
    port = loop.completion_port  # type: ignore[attr-defined]
    return sendfile_splice(loop, port, sock.fileno(), file, offset, count)


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_whole_file_and_position(loop: Loop, data_file: tuple[Any, bytes], kind: str) -> None:
    f, data = data_file
    a, b = tcp_pair() if kind == "tcp" else socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    threads, before = set(threading.enumerate()), fds()

    async def main() -> tuple[int, bytes]:
        receiving = asyncio.ensure_future(receive(loop, b, len(data)))
        sent = await send(loop, a, f, 0, None)
        return sent, await receiving

    with a, b:
        sent, got = loop.run_until_complete(asyncio.wait_for(main(), 30))
    assert sent == len(data) and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert f.tell() == len(data)  # as sock_sendfile: offset + sent
    assert set(threading.enumerate()) == threads  # no thread
    assert fds() <= before | {str(a.fileno()), str(b.fileno())}  # the pipe is closed


def test_offset_count_and_the_end(loop: Loop, data_file: tuple[Any, bytes]) -> None:
    f, data = data_file
    a, b = tcp_pair()

    async def main() -> None:
        receiving = asyncio.ensure_future(receive(loop, b, 100_000))
        assert await send(loop, a, f, 1000, 100_000) == 100_000
        assert await receiving == data[1000:101_000]
        assert f.tell() == 101_000
        tail = len(data) - 50
        receiving = asyncio.ensure_future(receive(loop, b, 50))
        assert await send(loop, a, f, tail, 10_000) == 50  # count past the end
        assert await receiving == data[tail:]
        f.seek(7)
        assert await send(loop, a, f, len(data), None) == 0  # an empty range
        assert f.tell() == 7  # nothing sent: the position stays

    with a, b:
        loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_waits_while_the_socket_is_full(loop: Loop, data_file: tuple[Any, bytes]) -> None:
    f, data = data_file
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)

    async def main() -> None:
        receiving = asyncio.ensure_future(receive(loop, b, len(data), delay=0.2))
        assert await send(loop, a, f, 0, None) == len(data)
        assert await receiving == data

    with a, b:
        loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_peer_gone_raises_connection_error(loop: Loop, data_file: tuple[Any, bytes]) -> None:
    f, data = data_file
    a, b = tcp_pair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    async def main() -> None:
        received = await asyncio.gather(
            send(loop, a, f, 0, None), close_soon(b), return_exceptions=True
        )
        assert isinstance(received[0], ConnectionError), received
        sent_somewhere = f.tell()
        assert 0 <= sent_somewhere <= len(data)

    async def close_soon(sock: socket.socket) -> None:
        await loop.sock_recv(sock, 1000)
        sock.close()  # with SO_LINGER 0: a reset

    with a:
        loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_not_a_regular_file(loop: Loop, tmp_path: Path) -> None:
    a, b = tcp_pair()
    r, w = os.pipe()

    async def main() -> None:
        with pytest.raises(asyncio.SendfileNotAvailableError, match="regular file"):
            await send(loop, a, io.BytesIO(b"in memory"), 0, None)
        with open(r, "rb", closefd=False) as pipe:
            with pytest.raises(asyncio.SendfileNotAvailableError, match="regular file"):
                await send(loop, a, pipe, 0, None)
        with open(tmp_path / "x", "wb+") as regular:

            class NoSplice:
                file_ops = frozenset({"READ"})

            with pytest.raises(asyncio.SendfileNotAvailableError, match="SPLICE"):
                await sendfile_splice(loop, NoSplice(), a.fileno(), regular, 0, None)  # type: ignore[arg-type]

    try:
        with a, b:
            loop.run_until_complete(asyncio.wait_for(main(), 10))
    finally:
        os.close(r)
        os.close(w)


def test_cancelled_leaves_no_pipe(loop: Loop, data_file: tuple[Any, bytes]) -> None:
    f, data = data_file
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    before = fds()

    async def main() -> None:
        sending = asyncio.ensure_future(send(loop, a, f, 0, None))
        await asyncio.sleep(0.05)  # the socket is full: it waits
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        await asyncio.sleep(0.05)
        assert 0 < f.tell() < len(data)  # where it stopped

    with a, b:
        loop.run_until_complete(asyncio.wait_for(main(), 10))
        assert fds() <= before
