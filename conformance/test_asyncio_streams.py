"""asyncio compatibility: streams (open_connection / start_server and their
Unix twins) over the loop's transports."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from .aio_support import payload, run, sha, wait_until

Loop = asyncio.AbstractEventLoop
MiB = 1024 * 1024


async def _line_server(
    handler_log: list[str],
) -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                handler_log.append(line.decode())
                writer.write(line.upper())
                await writer.drain()
            handler_log.append("<eof>")
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()


def test_stream_readline_readexactly_read(aio_loop: Loop) -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"first line\nsecond line\n")
            writer.write(b"exact" + b"0123456789")
            writer.write(b"until;rest")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(*address)
        assert writer.get_extra_info("peername") == address
        assert await reader.readline() == b"first line\n"
        assert await reader.readuntil(b"\n") == b"second line\n"
        assert await reader.readexactly(5) == b"exact"
        assert await reader.read(4) == b"0123"
        assert await reader.readexactly(6) == b"456789"
        assert await reader.readuntil(b";") == b"until;"
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await reader.readexactly(10)
        assert info.value.partial == b"rest" and info.value.expected == 10
        assert reader.at_eof()
        assert await reader.read() == b"" and await reader.readline() == b""
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_stream_request_response_and_eof(aio_loop: Loop) -> None:
    async def main() -> None:
        log: list[str] = []
        server, address = await _line_server(log)
        reader, writer = await asyncio.open_connection(*address)
        for word in ("alpha", "beta", "gamma"):
            writer.write(word.encode() + b"\n")
            await writer.drain()
            assert await reader.readline() == word.upper().encode() + b"\n"
        assert writer.can_write_eof()
        writer.write_eof()
        assert await reader.read() == b""  # the server closes after our EOF
        assert reader.at_eof()
        writer.close()
        assert writer.is_closing()
        await writer.wait_closed()
        await wait_until(lambda: "<eof>" in log, what="the handler to see EOF")
        assert log == ["alpha\n", "beta\n", "gamma\n", "<eof>"]
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_stream_limit_overrun(aio_loop: Loop) -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x" * 200 + b"\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(*address, limit=64)
        with pytest.raises(asyncio.LimitOverrunError):
            await reader.readuntil(b"\n")
        with pytest.raises(ValueError):  # readline turns the overrun into ValueError
            await reader.readline()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_drain_waits_for_a_slow_reader(aio_loop: Loop) -> None:
    chunk = payload(MiB, seed=7)
    total = 16 * MiB

    async def main() -> None:
        got = bytearray()
        reading = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reading.wait()  # read nothing at first
            while data := await reader.read(256 * 1024):
                got.extend(data)
                await asyncio.sleep(0.001)
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(*address)
        transport = writer.transport
        high = transport.get_write_buffer_limits()[1]
        blocked = 0
        written = 0
        while written < total:
            writer.write(chunk)
            written += len(chunk)
            drain = aio_loop.create_task(writer.drain())
            await asyncio.sleep(0.01)
            if not drain.done():
                blocked += 1
                if not reading.is_set():
                    # The peer has read nothing yet: only a buffer above the
                    # high mark holds drain() back. (Once it reads, the buffer
                    # may have emptied already while the drain task has yet
                    # to run.)
                    assert transport.get_write_buffer_size() > high
                    reading.set()
            await drain
            assert transport.get_write_buffer_size() <= high  # drain returns at the low mark
        assert blocked > 0, "drain() never waited although the peer did not read"
        writer.write_eof()
        await reader.read()
        writer.close()
        await writer.wait_closed()
        assert len(got) == total and sha(got) == sha(chunk * (total // len(chunk)))
        server.close()
        await server.wait_closed()

    run(aio_loop, main(), timeout=30)


def test_stream_reset_by_peer(aio_loop: Loop) -> None:
    async def main() -> None:
        accepted: asyncio.Future[None] = aio_loop.create_future()
        listener = socket.socket()
        listener.setblocking(False)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with listener:

            async def accept_and_reset() -> None:
                conn, _ = await aio_loop.sock_accept(listener)
                await accepted
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

            resetter = aio_loop.create_task(accept_and_reset())
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            accepted.set_result(None)
            with pytest.raises(ConnectionResetError):
                await reader.read(100)
            await resetter
            writer.close()
            with pytest.raises(ConnectionResetError):
                await writer.wait_closed()  # wait_closed re-raises the connection's error

    run(aio_loop, main())


def test_unix_streams(aio_loop: Loop, tmp_path: Path) -> None:
    path = str(tmp_path / "streams.sock")

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = int((await reader.readline()).decode())
            data = await reader.readexactly(size)
            writer.write(sha(data).encode() + b"\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_unix_server(handle, path)
        data = payload(3 * MiB, seed=8)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(f"{len(data)}\n".encode())
        writer.write(data)
        await writer.drain()
        assert await reader.readline() == sha(data).encode() + b"\n"
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_streams_on_given_sockets(aio_loop: Loop) -> None:
    a, b = socket.socketpair()

    async def main() -> None:
        reader_a, writer_a = await asyncio.open_connection(sock=a)
        reader_b, writer_b = await asyncio.open_unix_connection(sock=b)
        writer_a.write(b"to b\n")
        assert await reader_b.readline() == b"to b\n"
        writer_b.write(b"to a\n")
        assert await reader_a.readline() == b"to a\n"
        writer_a.close()
        assert await reader_b.read() == b""
        writer_b.close()
        await writer_a.wait_closed()
        await writer_b.wait_closed()

    run(aio_loop, main())
