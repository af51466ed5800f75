"""asyncio compatibility: Unix stream sockets (paths, given sockets, abstract
namespace, what happens to the socket file)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import uuid
from pathlib import Path

import pytest

from .aio_support import (
    PY313,
    PYVER,
    Recorder,
    ServerRecorders,
    close_server,
    needs_python,
    run,
    wait_until,
)

Loop = asyncio.AbstractEventLoop


def _path(tmp_path: Path) -> str:
    return str(tmp_path / "s.sock")


async def _echo_once(loop: Loop, message: bytes, **where: object) -> Recorder:
    client = Recorder(loop)
    transport, _ = await loop.create_unix_connection(lambda: client, **where)  # type: ignore[arg-type]
    transport.write(message)
    await client.wait_data(len(message))
    assert bytes(client.data) == message
    transport.close()
    await client.lost
    return client


def test_unix_server_and_connection_by_path(aio_loop: Loop, tmp_path: Path) -> None:
    path = _path(tmp_path)

    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_unix_server(factory, path)
        assert server.is_serving()
        [sock] = server.sockets
        assert sock.family == socket.AF_UNIX and sock.getsockname() == path
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_unix_connection(lambda: client, path)
        assert transport.get_extra_info("peername") == path
        assert transport.get_extra_info("socket").family == socket.AF_UNIX
        transport.write(b"over unix")
        assert await client.wait_data(9) == b"over unix"
        accepted = await factory.first()
        assert accepted.tr.get_extra_info("sockname") == path
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


def test_unix_half_close_callback_order(aio_loop: Loop, tmp_path: Path) -> None:
    path = _path(tmp_path)

    async def main() -> None:
        factory = ServerRecorders(aio_loop, close_on_eof=False)
        server = await aio_loop.create_unix_server(factory, path)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_unix_connection(lambda: client, path)
        assert transport.can_write_eof()
        transport.write(b"question")
        transport.write_eof()
        accepted = await factory.first()
        await accepted.eof
        accepted.tr.write(b"answer")
        accepted.tr.close()
        assert await client.lost is None and await accepted.lost is None
        assert bytes(accepted.data) == b"question" and bytes(client.data) == b"answer"
        expected = ["connection_made", "data_received", "eof_received", "connection_lost"]
        assert accepted.sequence() == expected and client.sequence() == expected
        await close_server(server)

    run(aio_loop, main())


def test_unix_server_and_connection_with_sock(aio_loop: Loop, tmp_path: Path) -> None:
    path = _path(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)

    async def main() -> None:
        with pytest.raises(ValueError):
            await aio_loop.create_unix_server(asyncio.Protocol, path, sock=listener)
        server = await aio_loop.create_unix_server(
            lambda: Recorder(aio_loop, echo=True), sock=listener
        )
        assert server.sockets[0].getsockname() == path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await aio_loop.sock_connect(sock, path)
        await _echo_once(aio_loop, b"given socket", sock=sock)
        assert sock.fileno() == -1
        await close_server(server)
        assert listener.fileno() == -1
        with pytest.raises(ValueError):
            udp = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                await aio_loop.create_unix_connection(asyncio.Protocol, sock=udp)
            finally:
                udp.close()

    try:
        run(aio_loop, main())
    finally:
        listener.close()


def test_unix_abstract_namespace(aio_loop: Loop) -> None:
    name = f"\0iomux-{uuid.uuid4().hex}"
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.bind(name)
    except OSError as exc:  # pragma: no cover - Linux has it
        pytest.skip(f"abstract Unix sockets are not supported here: {exc}")

    async def main() -> None:
        server = await aio_loop.create_unix_server(lambda: Recorder(aio_loop, echo=True), name)
        assert server.sockets[0].getsockname() == name.encode()
        await _echo_once(aio_loop, b"abstract", path=name)
        await close_server(server)

    run(aio_loop, main())


def test_unix_socket_file_after_close(aio_loop: Loop, tmp_path: Path) -> None:
    """From 3.13 closing the server removes its socket file; before, it stays."""
    path = _path(tmp_path)

    async def main() -> None:
        server = await aio_loop.create_unix_server(asyncio.Protocol, path)
        await close_server(server)
        if PY313:
            assert not os.path.exists(path), f"the socket file stays after close ({PYVER})"
        else:
            assert os.path.exists(path), f"the socket file was removed by close ({PYVER})"

    run(aio_loop, main())


@needs_python((3, 13), "create_unix_server(cleanup_socket=...)")
def test_unix_cleanup_socket_false_keeps_the_file(aio_loop: Loop, tmp_path: Path) -> None:
    path = _path(tmp_path)

    async def main() -> None:
        server = await aio_loop.create_unix_server(asyncio.Protocol, path, cleanup_socket=False)  # type: ignore[call-arg, unused-ignore]
        await close_server(server)
        assert os.path.exists(path)

    run(aio_loop, main())


def test_unix_server_replaces_a_stale_socket_but_not_a_file(aio_loop: Loop, tmp_path: Path) -> None:
    stale = _path(tmp_path)
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(stale)  # left behind: a socket file nobody listens on
    regular = str(tmp_path / "regular")
    Path(regular).write_text("not a socket")

    async def main() -> None:
        server = await aio_loop.create_unix_server(lambda: Recorder(aio_loop, echo=True), stale)
        await _echo_once(aio_loop, b"replaced", path=stale)
        await close_server(server)
        with pytest.raises(OSError) as info:
            await aio_loop.create_unix_server(asyncio.Protocol, regular)
        assert info.value.errno == errno.EADDRINUSE
        assert Path(regular).read_text() == "not a socket"

    run(aio_loop, main())


def test_unix_connection_errors(aio_loop: Loop, tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await aio_loop.create_unix_connection(asyncio.Protocol, str(tmp_path / "none"))
        path = _path(tmp_path)
        with socket.socket(socket.AF_UNIX) as unbound:
            unbound.bind(path)  # a socket file, nobody listening
            with pytest.raises(ConnectionRefusedError):
                await aio_loop.create_unix_connection(asyncio.Protocol, path)

    run(aio_loop, main())


def test_many_unix_connections(aio_loop: Loop, tmp_path: Path) -> None:
    path = _path(tmp_path)

    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_unix_server(factory, path)
        clients = await asyncio.gather(
            *(_echo_once(aio_loop, f"unix {i}".encode(), path=path) for i in range(100))
        )
        assert len(clients) == 100
        await wait_until(lambda: all(p.lost.done() for p in factory.protocols), what="all closed")
        await close_server(server)

    run(aio_loop, main())
