"""asyncio compatibility: datagram endpoints and loop.sock_sendto / sock_recvfrom."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from .aio_support import (
    PY313,
    PYVER,
    ipv6_loopback_or_skip,
    needs_python,
    run,
    unused_port,
    wait_until,
)

Loop = asyncio.AbstractEventLoop


class Datagrams(asyncio.DatagramProtocol):
    """Records datagrams and errors; with ``echo`` sends each datagram back."""

    def __init__(self, loop: Loop, echo: bool = False) -> None:
        self.echo = echo
        self.events: list[str] = []
        self.received: list[tuple[bytes, Any]] = []
        self.errors: list[Exception] = []
        self.made: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not isinstance-checked: stock asyncio's datagram transport only
        # derives from asyncio.DatagramTransport from 3.13
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.events.append("connection_made")
        self.made.set_result(None)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert isinstance(data, bytes)
        self.events.append("datagram_received")
        self.received.append((data, addr))
        if self.echo:
            assert self.transport is not None
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.events.append("error_received")
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("connection_lost")
        self.lost.set_result(exc)

    @property
    def tr(self) -> asyncio.DatagramTransport:
        assert self.transport is not None
        return self.transport

    async def wait_count(self, count: int) -> None:
        await wait_until(lambda: len(self.received) >= count, what=f"{count} datagrams")


def test_datagram_echo_with_local_and_remote_addr(aio_loop: Loop) -> None:
    async def main() -> None:
        server = Datagrams(aio_loop, echo=True)
        server_tr, got = await aio_loop.create_datagram_endpoint(
            lambda: server, local_addr=("127.0.0.1", 0)
        )
        assert got is server and server_tr is server.transport
        address = server_tr.get_extra_info("sockname")
        assert server_tr.get_extra_info("peername") is None
        client = Datagrams(aio_loop)
        client_tr, _ = await aio_loop.create_datagram_endpoint(lambda: client, remote_addr=address)
        assert client_tr.get_extra_info("peername") == address
        client_address = client_tr.get_extra_info("sockname")
        for message in (b"one", b"two", b"three"):
            client_tr.sendto(message)
        await client.wait_count(3)
        assert [d for d, _ in server.received] == [b"one", b"two", b"three"]
        assert all(addr == client_address for _, addr in server.received)
        assert [d for d, _ in client.received] == [b"one", b"two", b"three"]
        assert all(addr == address for _, addr in client.received)
        with pytest.raises(ValueError):
            client_tr.sendto(b"elsewhere", ("127.0.0.1", 9))  # connected: only its peer
        client_tr.sendto(b"explicit", address)  # the peer itself is allowed
        await client.wait_count(4)
        with pytest.raises(TypeError):
            client_tr.sendto("text")  # type: ignore[arg-type]
        client_tr.close()
        assert client_tr.is_closing()
        assert await client.lost is None
        server_tr.close()
        assert await server.lost is None
        assert client.events[0] == "connection_made" and client.events[-1] == "connection_lost"

    run(aio_loop, main())


def test_empty_datagrams(aio_loop: Loop) -> None:
    """From 3.13 sendto(b"") sends an empty datagram; before, it sends nothing."""

    async def main() -> None:
        server = Datagrams(aio_loop)
        server_tr, _ = await aio_loop.create_datagram_endpoint(
            lambda: server, local_addr=("127.0.0.1", 0)
        )
        client_tr, _ = await aio_loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=server_tr.get_extra_info("sockname")
        )
        client_tr.sendto(b"")
        client_tr.sendto(b"after")
        await wait_until(lambda: any(d == b"after" for d, _ in server.received), what="after")
        expected = [b"", b"after"] if PY313 else [b"after"]
        assert [d for d, _ in server.received] == expected, PYVER
        client_tr.close()
        server_tr.close()
        await server.lost

    run(aio_loop, main())


def test_datagram_endpoint_ipv6(aio_loop: Loop) -> None:
    ipv6_loopback_or_skip()

    async def main() -> None:
        server = Datagrams(aio_loop, echo=True)
        server_tr, _ = await aio_loop.create_datagram_endpoint(
            lambda: server, local_addr=("::1", 0)
        )
        client = Datagrams(aio_loop)
        client_tr, _ = await aio_loop.create_datagram_endpoint(
            lambda: client, remote_addr=server_tr.get_extra_info("sockname")[:2]
        )
        client_tr.sendto(b"six")
        await client.wait_count(1)
        assert client.received[0][0] == b"six"
        assert client_tr.get_extra_info("socket").family == socket.AF_INET6
        client_tr.close()
        server_tr.close()
        await server.lost

    run(aio_loop, main())


def test_datagram_endpoint_with_sock_and_large_datagrams(aio_loop: Loop) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        server = Datagrams(aio_loop, echo=True)
        server_tr, _ = await aio_loop.create_datagram_endpoint(lambda: server, sock=sock)
        assert server_tr.get_extra_info("sockname") == sock.getsockname()
        assert server_tr.get_extra_info("socket").fileno() == sock.fileno()
        client = Datagrams(aio_loop)
        client_tr, _ = await aio_loop.create_datagram_endpoint(
            lambda: client, local_addr=("127.0.0.1", 0)
        )
        big = bytes(range(256)) * 240  # 61,440 bytes in one datagram
        client_tr.sendto(big, sock.getsockname())
        await client.wait_count(1)
        assert client.received[0][0] == big
        client_tr.close()
        server_tr.close()
        await server.lost
        assert sock.fileno() == -1

    run(aio_loop, main())


def test_datagram_allow_broadcast_and_reuse_port(aio_loop: Loop) -> None:
    async def main() -> None:
        tr, _ = await aio_loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), allow_broadcast=True
        )
        sock = tr.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) != 0
        tr.close()
        first, _ = await aio_loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), reuse_port=True
        )
        port = first.get_extra_info("sockname")[1]
        second, _ = await aio_loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", port), reuse_port=True
        )
        for t in (first, second):
            reuse = t.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            assert reuse != 0
        with pytest.raises(OSError):
            await aio_loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", port)
            )
        first.close()
        second.close()
        await asyncio.sleep(0)

    run(aio_loop, main())


def test_error_received_on_refusal_for_a_connected_endpoint(aio_loop: Loop) -> None:
    async def main() -> None:
        client = Datagrams(aio_loop)
        transport, _ = await aio_loop.create_datagram_endpoint(
            lambda: client, remote_addr=("127.0.0.1", unused_port(kind=socket.SOCK_DGRAM))
        )
        for _ in range(20):  # the ICMP error comes back asynchronously
            transport.sendto(b"anyone?")
            await asyncio.sleep(0.01)
            if client.errors:
                break
        assert client.errors, "error_received was not called"
        assert isinstance(client.errors[0], ConnectionRefusedError)
        assert not transport.is_closing()  # an error is not the end of the endpoint
        transport.close()
        assert await client.lost is None
        assert client.events[0] == "connection_made"
        assert set(client.events[1:-1]) == {"error_received"}

    run(aio_loop, main())


def test_datagram_endpoint_errors(aio_loop: Loop) -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await aio_loop.create_datagram_endpoint(asyncio.DatagramProtocol)  # no address
        stream = socket.socket()
        try:
            with pytest.raises(ValueError):
                await aio_loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=stream)
        finally:
            stream.close()

    run(aio_loop, main())


@needs_python((3, 11), "loop.sock_sendto/sock_recvfrom/sock_recvfrom_into")
def test_sock_sendto_recvfrom(aio_loop: Loop) -> None:
    async def main() -> None:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with a, b:
            for s in (a, b):
                s.setblocking(False)
                s.bind(("127.0.0.1", 0))
            receiving = aio_loop.create_task(aio_loop.sock_recvfrom(b, 100))  # type: ignore[attr-defined, unused-ignore]
            await asyncio.sleep(0.01)
            assert not receiving.done()  # nothing yet: it waits
            sent = await aio_loop.sock_sendto(a, b"hello", b.getsockname())  # type: ignore[attr-defined, unused-ignore]
            assert sent == 5
            assert await receiving == (b"hello", a.getsockname())
            buf = bytearray(10)
            await aio_loop.sock_sendto(a, b"into", b.getsockname())  # type: ignore[attr-defined, unused-ignore]
            nbytes, addr = await aio_loop.sock_recvfrom_into(b, buf)  # type: ignore[attr-defined, unused-ignore]
            assert (nbytes, addr, bytes(buf[:nbytes])) == (4, a.getsockname(), b"into")
            await aio_loop.sock_sendto(a, b"0123456789", b.getsockname())  # type: ignore[attr-defined, unused-ignore]
            nbytes, _ = await aio_loop.sock_recvfrom_into(b, buf, 3)  # type: ignore[attr-defined, unused-ignore]
            assert bytes(buf[:nbytes]) == b"012"

    run(aio_loop, main())
