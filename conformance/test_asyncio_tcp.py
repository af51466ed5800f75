"""asyncio compatibility: TCP servers, connections and transports.

Each test runs on stock asyncio and on iomux's loop over every driver, and
asserts what stock asyncio does: bytes, protocol callback order, errors.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import sys
from typing import Any

import pytest

import iomux

from .aio_support import (
    PY312,
    PYVER,
    Recorder,
    ServerRecorders,
    close_server,
    echo_server,
    ipv6_loopback_or_skip,
    needs_python,
    payload,
    run,
    sha,
    unused_port,
    wait_until,
)

Loop = asyncio.AbstractEventLoop
MiB = 1024 * 1024


async def raw_listener(loop: Loop, host: str = "127.0.0.1") -> tuple[socket.socket, Any]:
    """A plain non-blocking listening socket, for a peer the test drives by hand."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setblocking(False)
    listener.bind((host, 0))
    listener.listen(16)
    return listener, listener.getsockname()


async def read_all(loop: Loop, sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Read ``sock`` with loop.sock_recv until EOF or an error; return data and error."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = await loop.sock_recv(sock, 1 << 16)
        except OSError as exc:
            return b"".join(chunks), exc
        if not chunk:
            return b"".join(chunks), None
        chunks.append(chunk)


async def fill_until_buffered(transport: asyncio.Transport, chunk: bytes, limit: int) -> int:
    """Write ``chunk`` until the transport buffers more than its high-water mark
    (the peer does not read, the kernel's buffers are full); return bytes written."""
    written = 0
    high = transport.get_write_buffer_limits()[1]
    while written < limit:
        transport.write(chunk)
        written += len(chunk)
        await asyncio.sleep(0.005)
        if transport.get_write_buffer_size() > high:
            await asyncio.sleep(0.02)
            if transport.get_write_buffer_size() > high:
                return written
    raise AssertionError(f"{limit} bytes written and the transport still buffers little")


# --- servers ------------------------------------------------------------------------------


def test_create_server_ipv4_echo_and_server_api(aio_loop: Loop) -> None:
    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        assert server.get_loop() is aio_loop and server.is_serving()
        [sock] = server.sockets
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        client = Recorder(aio_loop)
        transport, proto = await aio_loop.create_connection(lambda: client, host, port)
        assert proto is client and transport is client.transport
        transport.write(b"hello")
        assert await client.wait_data(5) == b"hello"
        transport.close()
        assert await client.lost is None
        server.close()
        assert not server.is_serving() and tuple(server.sockets) == ()
        await server.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            await aio_loop.create_connection(asyncio.Protocol, host, port)

    run(aio_loop, main())


def test_server_as_async_context_manager(aio_loop: Loop) -> None:
    async def main() -> None:
        server = await aio_loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        async with server as entered:
            assert entered is server and server.is_serving()
        assert not server.is_serving()

    run(aio_loop, main())


def test_create_server_ipv6(aio_loop: Loop) -> None:
    ipv6_loopback_or_skip()

    async def main() -> None:
        server, _, address = await echo_server(aio_loop, "::1")
        assert server.sockets[0].family == socket.AF_INET6  # type: ignore[attr-defined]
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, "::1", address[1])
        assert transport.get_extra_info("peername")[:2] == ("::1", address[1])
        transport.write(b"six")
        assert await client.wait_data(3) == b"six"
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


def test_create_server_on_every_interface_and_on_a_list_of_hosts(aio_loop: Loop) -> None:
    async def echo_through(port: int, host: str) -> None:
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, host, port)
        transport.write(host.encode())
        await client.wait_data(len(host))
        transport.close()
        await client.lost

    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        anywhere = await aio_loop.create_server(factory, None, 0)
        families = {s.family for s in anywhere.sockets}
        assert socket.AF_INET in families
        v4 = next(s for s in anywhere.sockets if s.family == socket.AF_INET)
        assert v4.getsockname()[0] == "0.0.0.0"
        await echo_through(v4.getsockname()[1], "127.0.0.1")
        await close_server(anywhere)

        hosts = ["127.0.0.1"]
        try:
            ipv6_loopback_or_skip()
            hosts.append("::1")
        except pytest.skip.Exception:
            pass
        listed = await aio_loop.create_server(factory, hosts, 0)
        names = sorted(s.getsockname()[0] for s in listed.sockets)
        assert names == sorted(hosts)
        for sock in listed.sockets:
            await echo_through(sock.getsockname()[1], sock.getsockname()[0])
        await close_server(listed)

    run(aio_loop, main())


def test_create_server_reuse_port(aio_loop: Loop) -> None:
    async def main() -> None:
        first = await aio_loop.create_server(asyncio.Protocol, "127.0.0.1", 0, reuse_port=True)
        port = first.sockets[0].getsockname()[1]
        second = await aio_loop.create_server(asyncio.Protocol, "127.0.0.1", port, reuse_port=True)
        for server in (first, second):
            sock = server.sockets[0]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) != 0
        with pytest.raises(OSError) as info:
            await aio_loop.create_server(asyncio.Protocol, "127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
        await close_server(first)
        await close_server(second)

    run(aio_loop, main())


def test_create_server_with_sock(aio_loop: Loop) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()

    async def main() -> None:
        with pytest.raises(ValueError):
            await aio_loop.create_server(asyncio.Protocol, "127.0.0.1", 0, sock=sock)  # type: ignore[call-overload]
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, sock=sock)
        assert server.sockets[0].getsockname() == address
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        transport.write(b"sock")
        await client.wait_data(4)
        transport.close()
        await client.lost
        await close_server(server)
        assert sock.fileno() == -1  # the server closed the socket it was given

    try:
        run(aio_loop, main())
    finally:
        sock.close()


def test_start_serving_false_then_start_serving(aio_loop: Loop) -> None:
    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0, start_serving=False)
        address = server.sockets[0].getsockname()
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):  # bound, not listening yet
            await aio_loop.create_connection(asyncio.Protocol, *address)
        await server.start_serving()
        assert server.is_serving()
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        transport.write(b"now")
        await client.wait_data(3)
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


def test_serve_forever(aio_loop: Loop) -> None:
    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0, start_serving=False)
        address = server.sockets[0].getsockname()
        forever = aio_loop.create_task(server.serve_forever())
        await wait_until(server.is_serving, what="serve_forever to start serving")
        with pytest.raises(RuntimeError, match="already being awaited"):
            await server.serve_forever()
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        transport.write(b"forever")
        await client.wait_data(7)
        transport.close()
        await client.lost
        forever.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forever
        assert not server.is_serving() and tuple(server.sockets) == ()
        with pytest.raises(RuntimeError, match="closed"):
            await server.serve_forever()

    run(aio_loop, main())


@pytest.mark.skipif(
    sys.version_info[:3] == (3, 12, 0), reason="Server.wait_closed is broken in Python 3.12.0"
)
def test_wait_closed_and_active_connections(aio_loop: Loop) -> None:
    """Before 3.12 wait_closed() returns at once after close(); from 3.12 it also
    waits for the connections to close."""

    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)
        waiting_open = aio_loop.create_task(server.wait_closed())
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        await factory.first()
        await asyncio.sleep(0.02)
        assert not waiting_open.done()  # the server is open: wait_closed waits
        server.close()
        waiter = aio_loop.create_task(server.wait_closed())
        await asyncio.sleep(0.05)
        if PY312:
            assert not waiter.done(), f"wait_closed returned with a connection open ({PYVER})"
            assert not waiting_open.done()
        else:
            assert waiter.done(), f"wait_closed waits for connections before 3.12 ({PYVER})"
        transport.close()
        await client.lost
        await asyncio.wait_for(asyncio.gather(waiter, waiting_open), 5)

    run(aio_loop, main())


@needs_python((3, 13), "Server.close_clients/abort_clients")
def test_server_close_clients_and_abort_clients(aio_loop: Loop) -> None:
    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)
        clients = [Recorder(aio_loop) for _ in range(2)]
        for client in clients:
            await aio_loop.create_connection(lambda c=client: c, *address)  # type: ignore[misc]
        await wait_until(lambda: len(factory.protocols) == 2, what="two accepted connections")
        for proto in factory.protocols:
            await proto.made
        server.close()
        server.close_clients()  # type: ignore[attr-defined, unused-ignore]
        for client in clients:
            assert await asyncio.wait_for(asyncio.shield(client.lost), 5) is None
        await asyncio.wait_for(server.wait_closed(), 5)

        server2, factory2, address2 = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        await aio_loop.create_connection(lambda: client, *address2)
        accepted = await factory2.first()
        server2.abort_clients()  # type: ignore[attr-defined, unused-ignore]
        assert await asyncio.wait_for(asyncio.shield(accepted.lost), 5) is None
        await client.lost
        await close_server(server2)

    run(aio_loop, main())


# --- connections --------------------------------------------------------------------------


def test_create_connection_with_sock_and_local_addr(aio_loop: Loop) -> None:
    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)
        sock = socket.socket()
        sock.setblocking(False)
        await aio_loop.sock_connect(sock, address)
        with pytest.raises(ValueError):
            await aio_loop.create_connection(asyncio.Protocol, *address, sock=sock)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, sock=sock)
        assert transport.get_extra_info("socket").fileno() == sock.fileno()
        transport.write(b"given sock")
        await client.wait_data(10)
        transport.close()
        await client.lost
        assert sock.fileno() == -1

        port = unused_port()
        bound = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(
            lambda: bound, *address, local_addr=("127.0.0.1", port)
        )
        assert transport.get_extra_info("sockname") == ("127.0.0.1", port)
        await wait_until(lambda: len(factory.protocols) == 2, what="the second connection")
        accepted = factory.protocols[1]
        await accepted.made
        assert accepted.tr.get_extra_info("peername") == ("127.0.0.1", port)
        transport.close()
        await bound.lost
        await close_server(server)

    run(aio_loop, main())


def test_create_connection_refused(aio_loop: Loop) -> None:
    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await aio_loop.create_connection(asyncio.Protocol, "127.0.0.1", unused_port())
        with pytest.raises(OSError):
            await aio_loop.create_connection(asyncio.Protocol, "127.0.0.1", None)  # type: ignore[call-overload]

    run(aio_loop, main())


class _FakeResolver:
    """``socket.getaddrinfo`` for the name ``several.iomux.test``: the addresses given.

    asyncio resolves names with ``socket.getaddrinfo`` (``loop.getaddrinfo``
    is documented as its asynchronous version), so this gives one name
    several addresses without touching /etc/hosts.
    """

    NAME = "several.iomux.test"

    def __init__(self, real: Any, addresses: list[tuple[str, int]]) -> None:
        self.real = real
        self.addresses = addresses
        self.calls = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.NAME:
            return self.real(host, port, *args, **kwargs)
        self.calls += 1
        out: list[tuple[Any, ...]] = []
        for ip, p in self.addresses:
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, p, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p)))
        return out


def test_happy_eyeballs_and_interleave(aio_loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    ipv6_loopback_or_skip()

    async def main() -> None:
        server_a, _, (_, port_a, *_) = await echo_server(aio_loop, "::1")
        server_b, _, (_, port_b) = await echo_server(aio_loop, "127.0.0.1")
        refused = unused_port(socket.AF_INET6)
        resolver = _FakeResolver(
            socket.getaddrinfo, [("::1", refused), ("::1", port_a), ("127.0.0.1", port_b)]
        )
        monkeypatch.setattr(socket, "getaddrinfo", resolver)

        async def peer(**options: Any) -> Any:
            transport, _ = await aio_loop.create_connection(
                asyncio.Protocol, resolver.NAME, 9, **options
            )
            peername = transport.get_extra_info("peername")[:2]
            transport.close()
            return peername

        # in order: the first address refuses, the second (IPv6) connects
        assert await peer() == ("::1", port_a)
        # interleaved by family: ::1 (refused), then 127.0.0.1
        assert await peer(interleave=1) == ("127.0.0.1", port_b)
        # happy eyeballs interleaves too, and moves on as soon as an attempt fails
        assert await peer(happy_eyeballs_delay=0.25) == ("127.0.0.1", port_b)
        assert await peer(happy_eyeballs_delay=0.25, interleave=0) == ("::1", port_a)
        assert resolver.calls == 4
        await close_server(server_a)
        await close_server(server_b)

    run(aio_loop, main())


def test_connection_errors_of_every_address_are_aggregated(
    aio_loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    ipv6_loopback_or_skip()
    resolver = _FakeResolver(
        socket.getaddrinfo,
        [("::1", unused_port(socket.AF_INET6)), ("127.0.0.1", unused_port())],
    )
    monkeypatch.setattr(socket, "getaddrinfo", resolver)

    async def main() -> None:
        with pytest.raises(OSError) as info:
            await aio_loop.create_connection(asyncio.Protocol, resolver.NAME, 9)
        assert str(info.value).startswith("Multiple exceptions: ")
        assert "::1" in str(info.value) and "127.0.0.1" in str(info.value)
        if PY312:
            with pytest.raises(ExceptionGroup) as group:  # type: ignore[name-defined, unused-ignore]  # noqa: F821
                await aio_loop.create_connection(  # type: ignore[call-overload, unused-ignore]
                    asyncio.Protocol, resolver.NAME, 9, all_errors=True
                )
            errors = group.value.exceptions
            assert len(errors) == 2
            assert all(isinstance(e, ConnectionRefusedError) for e in errors)

    run(aio_loop, main())


@needs_python((3, 12), "create_connection(all_errors=True)")  # type: ignore[call-overload, unused-ignore]
def test_all_errors_with_one_address(aio_loop: Loop) -> None:
    async def main() -> None:
        with pytest.raises(ExceptionGroup) as group:  # type: ignore[name-defined, unused-ignore]  # noqa: F821
            await aio_loop.create_connection(  # type: ignore[call-overload, unused-ignore]
                asyncio.Protocol, "127.0.0.1", unused_port(), all_errors=True
            )
        [error] = group.value.exceptions
        assert isinstance(error, ConnectionRefusedError)

    run(aio_loop, main())


def test_connect_accepted_socket(aio_loop: Loop) -> None:
    async def main() -> None:
        listener, address = await raw_listener(aio_loop)
        with listener:
            client = socket.socket()
            client.setblocking(False)
            with client:
                connecting = aio_loop.create_task(aio_loop.sock_connect(client, address))
                conn, _ = await aio_loop.sock_accept(listener)
                await connecting
                proto = Recorder(aio_loop, echo=True)
                transport, got = await aio_loop.connect_accepted_socket(lambda: proto, conn)
                assert got is proto and transport.get_extra_info("socket").fileno() == conn.fileno()
                await aio_loop.sock_sendall(client, b"accepted")
                received = b""
                while len(received) < 8:
                    received += await aio_loop.sock_recv(client, 100)
                assert received == b"accepted"
                client.shutdown(socket.SHUT_WR)
                assert await proto.lost is None
                assert proto.sequence() == [
                    "connection_made",
                    "data_received",
                    "eof_received",
                    "connection_lost",
                ]
                assert await aio_loop.sock_recv(client, 100) == b""

    run(aio_loop, main())


class BufferedEcho(asyncio.BufferedProtocol):
    """A BufferedProtocol that echoes (or collects) what it reads into its own buffer."""

    def __init__(self, loop: Loop, echo: bool) -> None:
        self.echo = echo
        self.buffer = bytearray(64 * 1024)
        self.data = bytearray()
        self.events: list[str] = []
        self.hints: list[int] = []
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("connection_made")

    def get_buffer(self, sizehint: int) -> memoryview:
        self.hints.append(sizehint)
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        assert 0 < nbytes <= len(self.buffer)
        if not self.events or self.events[-1] != "buffer_updated":
            self.events.append("buffer_updated")
        chunk = bytes(self.buffer[:nbytes])
        self.data += chunk
        if self.echo:
            self.transport.write(chunk)

    def eof_received(self) -> None:
        self.events.append("eof_received")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("connection_lost")
        self.lost.set_result(exc)


def test_echo_with_buffered_protocols(aio_loop: Loop) -> None:
    data = payload(2 * MiB, seed=1)

    async def main() -> None:
        servers: list[BufferedEcho] = []

        def factory() -> BufferedEcho:
            servers.append(BufferedEcho(aio_loop, echo=True))
            return servers[-1]

        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        client = BufferedEcho(aio_loop, echo=False)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        transport.write(data)
        await wait_until(lambda: len(client.data) >= len(data), what="the echo")
        assert sha(client.data) == sha(data)
        transport.write_eof()
        assert await servers[0].lost is None  # the server closes at EOF
        assert await client.lost is None
        for proto in (servers[0], client):
            assert proto.events == [
                "connection_made",
                "buffer_updated",
                "eof_received",
                "connection_lost",
            ]
            assert all(isinstance(h, int) for h in proto.hints)
        await close_server(server)

    run(aio_loop, main())


def test_large_transfer_in_both_directions(aio_loop: Loop) -> None:
    data = payload(8 * MiB, seed=2)

    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        transport.write(data)
        received = await client.wait_data(len(data), timeout=20)
        assert len(received) == len(data) and sha(received) == sha(data)
        accepted = await factory.first()
        assert sha(accepted.data) == sha(data)
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main(), timeout=30)


def test_many_concurrent_connections(aio_loop: Loop) -> None:
    count = 300

    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)

        async def one(i: int) -> bytes:
            client = Recorder(aio_loop)
            transport, _ = await aio_loop.create_connection(lambda: client, *address)
            message = f"client {i} ".encode() * 50
            transport.write(message)
            got = await client.wait_data(len(message), timeout=15)
            transport.close()
            await client.lost
            return b"ok" if got == message else got

        results = await asyncio.gather(*(one(i) for i in range(count)))
        assert results == [b"ok"] * count
        assert len(factory.protocols) == count
        await wait_until(
            lambda: all(p.lost.done() for p in factory.protocols), what="every server side closed"
        )
        await close_server(server)

    run(aio_loop, main(), timeout=30)


# --- transports: callback order, half-close, close, abort, reset ---------------------------


def test_half_close_callback_order(aio_loop: Loop) -> None:
    async def main() -> None:
        factory = ServerRecorders(aio_loop, close_on_eof=False)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        assert transport.can_write_eof()
        transport.write(b"request")
        transport.write_eof()
        assert not transport.is_closing()  # half-closed, still reading
        with pytest.raises(RuntimeError):
            transport.write(b"more")
        accepted = await factory.first()
        await accepted.eof
        assert bytes(accepted.data) == b"request" and not accepted.tr.is_closing()
        accepted.tr.write(b"response")  # the other half is still open
        accepted.tr.close()
        assert await client.lost is None
        assert await accepted.lost is None
        assert bytes(client.data) == b"response"
        expected = ["connection_made", "data_received", "eof_received", "connection_lost"]
        assert accepted.sequence() == expected
        assert client.sequence() == expected
        # Nobody asked for the names while the connection was up; both ends
        # shut down (the kernel no longer knows the peer): they are still known.
        client_name = transport.get_extra_info("sockname")
        assert client_name[0] == "127.0.0.1" and client_name[1] > 0
        assert transport.get_extra_info("peername") == address
        assert accepted.tr.get_extra_info("sockname") == address
        assert accepted.tr.get_extra_info("peername") == client_name
        for end in (transport, accepted.tr):
            sock = end.get_extra_info("socket")
            assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            assert end.get_extra_info("no such key", "default") == "default"
        await close_server(server)

    run(aio_loop, main())


def test_close_with_pending_writes_delivers_everything(aio_loop: Loop) -> None:
    chunk = payload(MiB, seed=3)

    async def main() -> None:
        listener, address = await raw_listener(aio_loop)
        with listener:
            client = Recorder(aio_loop)
            transport, _ = await aio_loop.create_connection(lambda: client, *address)
            peer, _ = await aio_loop.sock_accept(listener)
            with peer:
                written = await fill_until_buffered(transport, chunk, 64 * MiB)
                transport.close()
                assert transport.is_closing()
                await asyncio.sleep(0.02)
                assert not client.lost.done()  # the buffer is not flushed yet
                data, error = await read_all(aio_loop, peer)
                assert error is None and len(data) == written
                assert data == chunk * (written // len(chunk))
                assert await client.lost is None
                assert client.sequence() == [
                    "connection_made",
                    "pause_writing",
                    "resume_writing",  # while the buffer drains
                    "connection_lost",
                ]

    run(aio_loop, main(), timeout=30)


def test_abort_drops_buffered_data(aio_loop: Loop) -> None:
    chunk = payload(MiB, seed=4)

    async def main() -> None:
        listener, address = await raw_listener(aio_loop)
        with listener:
            client = Recorder(aio_loop)
            transport, _ = await aio_loop.create_connection(lambda: client, *address)
            peer, _ = await aio_loop.sock_accept(listener)
            with peer:
                written = await fill_until_buffered(transport, chunk, 64 * MiB)
                transport.abort()
                assert transport.is_closing()
                assert transport.get_write_buffer_size() == 0
                assert await client.lost is None
                assert client.sequence() == ["connection_made", "pause_writing", "connection_lost"]
                data, error = await read_all(aio_loop, peer)
                if isinstance(aio_loop, iomux.Reactor):
                    # iomux differs on purpose (README, "differs from asyncio's on
                    # purpose"): dropping bytes write() accepted resets the
                    # connection, so the peer cannot take the prefix for the whole.
                    assert isinstance(error, ConnectionResetError), f"the peer saw {error!r}"
                else:
                    # asyncio drops the unsent buffer and closes the socket normally:
                    # the peer reads a clean prefix, then EOF.
                    assert error is None, f"the peer saw {error!r}"
                assert len(data) < written
                assert data == (chunk * (written // len(chunk)))[: len(data)]

    run(aio_loop, main(), timeout=30)


def test_peer_reset_gives_connection_lost_with_connection_reset_error(aio_loop: Loop) -> None:
    reported: list[dict[str, Any]] = []
    aio_loop.set_exception_handler(lambda loop, ctx: reported.append(ctx))

    async def main() -> None:
        factory = ServerRecorders(aio_loop)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        sock = socket.socket()
        sock.setblocking(False)
        await aio_loop.sock_connect(sock, address)
        accepted = await factory.first()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        exc = await asyncio.wait_for(asyncio.shield(accepted.lost), 5)
        assert isinstance(exc, ConnectionResetError)
        assert accepted.sequence() == ["connection_made", "connection_lost"]
        await close_server(server)

    run(aio_loop, main())
    assert reported == []  # a reset is not an error asyncio reports


def test_pause_and_resume_reading(aio_loop: Loop) -> None:
    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        assert transport.is_reading()
        transport.pause_reading()
        transport.pause_reading()  # idempotent
        assert not transport.is_reading()
        transport.write(b"while paused")
        accepted = await factory.first()
        await accepted.wait_data(12)
        await asyncio.sleep(0.05)
        assert client.data == b""  # the echo waits in the kernel
        transport.resume_reading()
        transport.resume_reading()
        assert transport.is_reading()
        assert await client.wait_data(12) == b"while paused"
        transport.close()
        assert not transport.is_reading()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


def test_write_buffer_flow_control(aio_loop: Loop) -> None:
    chunk = payload(MiB, seed=5)

    async def main() -> None:
        listener, address = await raw_listener(aio_loop)
        with listener:
            client = Recorder(aio_loop)
            transport, _ = await aio_loop.create_connection(lambda: client, *address)
            assert transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)  # the defaults
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=1024, low=4096)
            transport.set_write_buffer_limits(high=4096)
            assert transport.get_write_buffer_limits() == (1024, 4096)
            transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
            assert transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
            peer, _ = await aio_loop.sock_accept(listener)
            with peer:
                written = 0
                while "pause_writing" not in [e for e, _ in client.events]:
                    assert written < 64 * MiB, "pause_writing was never called"
                    transport.write(chunk)
                    written += len(chunk)
                    await asyncio.sleep(0.005)
                assert transport.get_write_buffer_size() > 64 * 1024
                reading = aio_loop.create_task(read_all(aio_loop, peer))
                await wait_until(
                    lambda: "resume_writing" in [e for e, _ in client.events],
                    what="resume_writing",
                )
                assert transport.get_write_buffer_size() <= 16 * 1024
                transport.close()
                data, error = await reading
                assert error is None and len(data) == written
                assert sha(data) == sha(chunk * (written // len(chunk)))
                await client.lost
                flow = [e for e, _ in client.events if e.endswith("_writing")]
                assert flow == ["pause_writing", "resume_writing"]

    run(aio_loop, main(), timeout=30)


def test_writelines_and_write_types(aio_loop: Loop) -> None:
    async def main() -> None:
        server, _, address = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        transport.writelines([b"ab", bytearray(b"cd"), memoryview(b"ef")])
        transport.write(bytearray(b"gh"))
        transport.write(memoryview(b"--ij--")[2:4])
        transport.write(b"")  # nothing
        with pytest.raises(TypeError):
            transport.write("text")  # type: ignore[arg-type]
        assert await client.wait_data(10) == b"abcdefghij"
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


def test_extra_info_and_transport_state(aio_loop: Loop) -> None:
    async def main() -> None:
        server, factory, address = await echo_server(aio_loop)
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: client, *address)
        sock = transport.get_extra_info("socket")
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
        assert transport.get_extra_info("sockname") == sock.getsockname()
        assert transport.get_extra_info("peername") == sock.getpeername() == address
        assert transport.get_extra_info("no such key") is None
        assert transport.get_extra_info("no such key", "default") == "default"
        accepted = await factory.first()
        assert accepted.tr.get_extra_info("peername") == transport.get_extra_info("sockname")
        assert accepted.tr.get_extra_info("sockname") == address
        assert not transport.is_closing()
        transport.close()
        assert transport.is_closing()
        transport.close()  # idempotent
        assert await client.lost is None
        await close_server(server)

    run(aio_loop, main())


class _Tagging(asyncio.Protocol):
    """Answers each message with a tag naming which data_received ran."""

    tag = b"class:"
    transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.tag + data)


class _InstanceMethod(_Tagging):
    def __init__(self) -> None:
        self.data_received = lambda data: self.transport.write(b"instance:" + data)  # type: ignore[method-assign]


_STATIC_TRANSPORTS: list[Any] = []


class _StaticMethod(_Tagging):
    def connection_made(self, transport: Any) -> None:
        _STATIC_TRANSPORTS.append(transport)

    @staticmethod
    def data_received(data: bytes) -> None:
        _STATIC_TRANSPORTS[-1].write(b"static:" + data)


class _Intercepting(_Tagging):
    def __getattribute__(self, name: str) -> Any:
        if name == "data_received":
            transport = object.__getattribute__(self, "transport")
            return lambda data: transport.write(b"intercepted:" + data)
        return object.__getattribute__(self, name)


class _Subclass(_Tagging):
    tag = b"subclass:"


@pytest.mark.parametrize(
    ("protocol", "tag"),
    [
        (_Tagging, b"class:"),
        (_Subclass, b"subclass:"),
        (_InstanceMethod, b"instance:"),
        (_StaticMethod, b"static:"),
        (_Intercepting, b"intercepted:"),
    ],
)
def test_data_received_is_looked_up_as_python_does(
    aio_loop: Loop, protocol: type[asyncio.Protocol], tag: bytes
) -> None:
    # A loop may call a class's method in a cheaper way than a bound method,
    # but whatever ``protocol.data_received`` names is what must run.
    async def main() -> None:
        server = await aio_loop.create_server(protocol, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"ping")
        assert await reader.readexactly(len(tag) + 4) == tag + b"ping"
        writer.close()
        await close_server(server)

    run(aio_loop, main())


def test_set_protocol_and_get_protocol(aio_loop: Loop) -> None:
    async def main() -> None:
        server, _, address = await echo_server(aio_loop)
        first = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(lambda: first, *address)
        assert transport.get_protocol() is first
        transport.write(b"one")
        await first.wait_data(3)
        second = Recorder(aio_loop)
        transport.set_protocol(second)
        assert transport.get_protocol() is second
        transport.write(b"two")
        assert await second.wait_data(3) == b"two"
        transport.close()
        assert await second.lost is None
        assert bytes(first.data) == b"one" and not first.lost.done()
        assert second.sequence() == ["data_received", "connection_lost"]
        await close_server(server)

    run(aio_loop, main())
