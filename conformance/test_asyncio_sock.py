"""asyncio compatibility: loop.sock_* , sendfile, add_reader / add_writer,
and a loop that goes on after a cancelled sock_sendall's socket is closed."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from .aio_support import (
    Recorder,
    close_server,
    echo_server,
    nonblocking_pair,
    payload,
    run,
    sha,
    unused_port,
    wait_until,
)

Loop = asyncio.AbstractEventLoop
MiB = 1024 * 1024


async def _connected_tcp(loop: Loop) -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking TCP sockets made with sock_connect / sock_accept."""
    with socket.socket() as listener:
        listener.setblocking(False)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.socket()
        client.setblocking(False)
        connecting = loop.create_task(loop.sock_connect(client, listener.getsockname()))
        conn, addr = await loop.sock_accept(listener)
        await connecting
        assert addr == client.getsockname()
        return client, conn


def test_sock_recv_recv_into_and_sendall(aio_loop: Loop) -> None:
    a, b = nonblocking_pair()

    async def main() -> None:
        receiving = aio_loop.create_task(aio_loop.sock_recv(a, 100))
        await asyncio.sleep(0.01)
        assert not receiving.done()  # it waits for data
        await aio_loop.sock_sendall(b, b"first")
        assert await receiving == b"first"
        buf = bytearray(8)
        await aio_loop.sock_sendall(b, bytearray(b"second"))
        nbytes = await aio_loop.sock_recv_into(a, buf)
        assert bytes(buf[:nbytes]) == b"second"
        await aio_loop.sock_sendall(b, memoryview(b"third"))
        assert await aio_loop.sock_recv(a, 100) == b"third"
        b.shutdown(socket.SHUT_WR)
        assert await aio_loop.sock_recv(a, 100) == b""  # EOF
        nbytes = await aio_loop.sock_recv_into(a, buf)
        assert nbytes == 0

    with a, b:
        run(aio_loop, main())


def test_sock_methods_refuse_blocking_sockets_in_debug_mode(aio_loop: Loop) -> None:
    a, b = socket.socketpair()  # blocking
    aio_loop.set_debug(True)

    async def main() -> None:
        with pytest.raises(ValueError, match="non-blocking"):
            await aio_loop.sock_recv(a, 1)
        with pytest.raises(ValueError, match="non-blocking"):
            await aio_loop.sock_sendall(a, b"x")

    with a, b:
        run(aio_loop, main())


def test_sock_sendall_large_payload_to_a_slow_reader(aio_loop: Loop) -> None:
    data = payload(8 * MiB, seed=12)

    async def main() -> None:
        client, conn = await _connected_tcp(aio_loop)
        with client, conn:
            got = bytearray()

            async def slow_reader() -> None:
                await asyncio.sleep(0.05)  # let the kernel buffers fill first
                while chunk := await aio_loop.sock_recv(conn, 128 * 1024):
                    got.extend(chunk)
                    await asyncio.sleep(0.0005)

            reading = aio_loop.create_task(slow_reader())
            await aio_loop.sock_sendall(client, data)
            client.shutdown(socket.SHUT_WR)
            await reading
            assert len(got) == len(data) and sha(got) == sha(data)

    run(aio_loop, main(), timeout=30)


def test_sock_connect_and_refusal(aio_loop: Loop) -> None:
    async def main() -> None:
        server, _, address = await echo_server(aio_loop)
        sock = socket.socket()
        sock.setblocking(False)
        with sock:
            await aio_loop.sock_connect(sock, ("localhost", address[1]))  # resolved by the loop
            assert sock.getpeername() == address
            await aio_loop.sock_sendall(sock, b"echo")
            assert await aio_loop.sock_recv(sock, 10) == b"echo"
        refused = socket.socket()
        refused.setblocking(False)
        with refused:
            with pytest.raises(ConnectionRefusedError):
                await aio_loop.sock_connect(refused, ("127.0.0.1", unused_port()))
        await close_server(server)

    run(aio_loop, main())


def test_sock_accept(aio_loop: Loop) -> None:
    async def main() -> None:
        client, conn = await _connected_tcp(aio_loop)
        with client, conn:
            assert conn.gettimeout() == 0  # accepted sockets are non-blocking
            await aio_loop.sock_sendall(conn, b"accepted")
            assert await aio_loop.sock_recv(client, 100) == b"accepted"

    run(aio_loop, main())


def test_sock_sendfile_with_offset_and_count(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    content = payload(3 * MiB + 123, seed=13)
    path.write_bytes(content)

    async def main() -> None:
        client, conn = await _connected_tcp(aio_loop)
        with client, conn, open(path, "rb") as fh:
            receiving = aio_loop.create_task(_recv_exactly(aio_loop, conn, 1000))
            assert await aio_loop.sock_sendfile(client, fh, offset=10, count=1000) == 1000
            assert fh.tell() == 1010  # the file position is updated
            assert await receiving == content[10:1010]
            fh.seek(0)
            receiving = aio_loop.create_task(_recv_exactly(aio_loop, conn, len(content)))
            assert await aio_loop.sock_sendfile(client, fh) == len(content)
            assert sha(await receiving) == sha(content)
            assert fh.tell() == len(content)

    run(aio_loop, main(), timeout=30)


async def _recv_exactly(loop: Loop, sock: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await loop.sock_recv(sock, size - len(got))
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


def test_loop_sendfile_on_a_tcp_transport(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    content = payload(2 * MiB + 7, seed=14)
    path.write_bytes(content)

    async def main() -> None:
        server, _, address = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        with open(path, "rb") as fh:
            sent = await aio_loop.sendfile(transport, fh, offset=100, count=MiB)
            assert sent == MiB and fh.tell() == 100 + MiB
            sent = await aio_loop.sendfile(transport, fh)  # offset defaults to 0
            assert sent == len(content) and fh.tell() == len(content)
        transport.write(b"and after")  # the transport is usable again
        expected = content[100 : 100 + MiB] + content + b"and after"
        received = await client.wait_data(len(expected), timeout=20)
        assert sha(received) == sha(expected)
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main(), timeout=30)


def test_add_reader_and_remove_reader(aio_loop: Loop) -> None:
    a, b = nonblocking_pair()
    calls: list[tuple[str, Any]] = []

    def first(arg: str) -> None:
        calls.append(("first", arg))

    def second(arg: str, sock: socket.socket) -> None:
        calls.append(("second", (arg, sock.recv(100))))

    async def main() -> None:
        assert aio_loop.remove_reader(a) is False  # nothing registered
        aio_loop.add_reader(a, first, "x")
        aio_loop.add_reader(a.fileno(), second, "y", a)  # replaces, by fd number or object
        b.send(b"data")
        await wait_until(lambda: bool(calls), what="the reader callback")
        assert calls == [("second", ("y", b"data"))]
        b.send(b"more")
        await wait_until(lambda: len(calls) == 2, what="the reader again")
        assert aio_loop.remove_reader(a) is True
        assert aio_loop.remove_reader(a.fileno()) is False
        b.send(b"ignored")
        await asyncio.sleep(0.05)
        assert len(calls) == 2 and a.recv(100) == b"ignored"

    with a, b:
        run(aio_loop, main())


def test_add_reader_is_level_triggered(aio_loop: Loop) -> None:
    a, b = nonblocking_pair()
    count = [0]

    def not_reading() -> None:
        count[0] += 1  # reads nothing: readiness persists

    async def main() -> None:
        aio_loop.add_reader(a, not_reading)
        b.send(b"x")
        await wait_until(lambda: count[0] >= 3, what="three reports of the same data")
        assert aio_loop.remove_reader(a)

    with a, b:
        run(aio_loop, main())


def test_add_writer_and_remove_writer(aio_loop: Loop) -> None:
    a, b = nonblocking_pair()
    calls: list[str] = []

    async def main() -> None:
        assert aio_loop.remove_writer(a) is False
        aio_loop.add_writer(a, calls.append, "first")
        aio_loop.add_writer(a, calls.append, "second")  # replaces
        await wait_until(lambda: len(calls) >= 2, what="the writer callback")
        assert set(calls) == {"second"}
        assert aio_loop.remove_writer(a) is True
        assert aio_loop.remove_writer(a) is False
        n = len(calls)
        await asyncio.sleep(0.02)
        assert len(calls) == n

        # a reader and a writer on the same fd are independent
        both: list[str] = []
        aio_loop.add_reader(a, both.append, "r")
        aio_loop.add_writer(a, both.append, "w")
        await wait_until(lambda: "w" in both, what="the writer")
        assert "r" not in both
        b.send(b"x")
        await wait_until(lambda: "r" in both, what="the reader")
        assert aio_loop.remove_writer(a) and aio_loop.remove_reader(a)

    with a, b:
        run(aio_loop, main())


def test_add_reader_refuses_an_fd_used_by_a_transport(aio_loop: Loop) -> None:
    async def main() -> None:
        server, _, address = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        fd = transport.get_extra_info("socket").fileno()
        for call in (
            lambda: aio_loop.add_reader(fd, print),
            lambda: aio_loop.add_writer(fd, print),
            lambda: aio_loop.remove_reader(fd),
            lambda: aio_loop.remove_writer(fd),
        ):
            with pytest.raises(RuntimeError, match="is used by transport"):
                call()
        transport.write(b"still fine")
        await client.wait_data(10)
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


def test_add_reader_on_a_closed_fd_or_bad_object(aio_loop: Loop) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    a.close()
    b.close()
    with pytest.raises(OSError):
        aio_loop.add_reader(fd, print)
    with pytest.raises(ValueError):
        aio_loop.add_reader(-1, print)
    with pytest.raises((TypeError, ValueError)):
        aio_loop.add_reader("not a file", print)  # type: ignore[arg-type]


async def _loop_still_works(loop: Loop) -> None:
    """Timers fire, a new connection echoes, and a reader is served."""
    fired = loop.create_future()
    loop.call_later(0.01, fired.set_result, "timer")
    assert await asyncio.wait_for(fired, 5) == "timer"
    server, _, address = await echo_server(loop)
    client = Recorder(loop)
    transport, _ = await loop.create_connection(lambda: client, *address)
    transport.write(b"alive")
    assert await client.wait_data(5) == b"alive"
    transport.close()
    await client.lost
    await close_server(server)


@pytest.mark.parametrize("order", ["await-then-close", "close-at-once"])
def test_cancelled_sock_sendall_then_closed_socket_leaves_the_loop_working(
    aio_loop: Loop, order: str
) -> None:
    """Regression (reported on the select backend, where it killed the loop): cancel
    a sock_sendall to a peer that does not read, close the socket, go on."""

    async def main() -> None:
        client, conn = await _connected_tcp(aio_loop)
        with conn:
            sending = aio_loop.create_task(aio_loop.sock_sendall(client, b"x" * (64 * MiB)))
            await asyncio.sleep(0.05)
            assert not sending.done()  # the peer does not read: it waits to write
            sending.cancel()
            if order == "await-then-close":
                with pytest.raises(asyncio.CancelledError):
                    await sending
                client.close()
            else:
                client.close()  # before the cancellation has even been processed
                with pytest.raises(asyncio.CancelledError):
                    await sending
            for _ in range(3):
                await asyncio.sleep(0.01)
            await _loop_still_works(aio_loop)
            # the same fd number, reused by new sockets, works too
            a, b = nonblocking_pair()
            with a, b:
                await aio_loop.sock_sendall(a, b"reuse")
                assert await aio_loop.sock_recv(b, 10) == b"reuse"

    run(aio_loop, main())
