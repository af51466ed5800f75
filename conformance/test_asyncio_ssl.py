"""asyncio compatibility: TLS over the loop's transports (servers, clients,
streams, start_tls, handshake timeouts and failures).

The CA and the server certificate (for localhost and 127.0.0.1) are made at
test time with trustme (in the ``test`` extra).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .aio_support import (
    PY311,
    PYVER,
    Recorder,
    ServerRecorders,
    close_server,
    needs_python,
    payload,
    run,
    sha,
    wait_until,
)

trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme: pip install trustme")

Loop = asyncio.AbstractEventLoop
HOST = "localhost"


@dataclass
class Tls:
    """A server context with a certificate for localhost, and clients that trust it or not."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    untrusting: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    untrusting = ssl.create_default_context()  # the system's CAs only
    yield Tls(server, client, untrusting)


async def _tls_pair(
    loop: Loop, tls: Tls, **server_options: Any
) -> tuple[asyncio.AbstractServer, ServerRecorders, Recorder]:
    factory = ServerRecorders(loop, echo=True)
    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=tls.server, **server_options)
    address = server.sockets[0].getsockname()
    client = Recorder(loop)
    await loop.create_connection(lambda: client, *address, ssl=tls.client, server_hostname=HOST)
    return server, factory, client


def test_tls_echo_and_extra_info(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        server, factory, client = await _tls_pair(aio_loop, tls)
        transport = client.tr
        ssl_object = transport.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject) and not ssl_object.server_side
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        assert transport.get_extra_info("sslcontext") is tls.client
        peercert = transport.get_extra_info("peercert")
        assert ("DNS", HOST) in peercert["subjectAltName"]
        assert transport.get_extra_info("cipher") == ssl_object.cipher()
        assert transport.get_extra_info("peername") == server.sockets[0].getsockname()  # type: ignore[attr-defined]
        assert transport.get_extra_info("socket").family == socket.AF_INET
        assert not transport.can_write_eof()
        with pytest.raises(NotImplementedError):
            transport.write_eof()
        transport.write(b"secret")
        assert await client.wait_data(6) == b"secret"
        accepted = await factory.first()
        assert accepted.tr.get_extra_info("ssl_object").server_side
        assert accepted.tr.get_extra_info("sslcontext") is tls.server
        transport.close()
        assert await client.lost is None
        assert await accepted.lost is None
        await close_server(server)

    run(aio_loop, main())


@pytest.mark.parametrize("closer", ["client", "server"])
def test_tls_close_callback_order(aio_loop: Loop, tls: Tls, closer: str) -> None:
    """From 3.11 both sides see eof_received (close_notify) before connection_lost;
    in 3.10 only the side that closed does."""

    async def main() -> None:
        server, factory, client = await _tls_pair(aio_loop, tls)
        client.tr.write(b"hi")
        await client.wait_data(2)
        accepted = await factory.first()
        (client if closer == "client" else accepted).tr.close()
        assert await client.lost is None and await accepted.lost is None
        with_eof = ["connection_made", "data_received", "eof_received", "connection_lost"]
        without = ["connection_made", "data_received", "connection_lost"]
        closing, other = (client, accepted) if closer == "client" else (accepted, client)
        assert closing.sequence() == with_eof
        assert other.sequence() == (with_eof if PY311 else without), PYVER
        await close_server(server)

    run(aio_loop, main())


def test_tls_large_transfer(aio_loop: Loop, tls: Tls) -> None:
    data = payload(4 * 1024 * 1024, seed=9)

    async def main() -> None:
        server, _, client = await _tls_pair(aio_loop, tls)
        client.tr.write(data)
        received = await client.wait_data(len(data), timeout=20)
        assert sha(received) == sha(data)
        client.tr.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main(), timeout=30)


def test_tls_streams(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert writer.get_extra_info("ssl_object") is not None
            while line := await reader.readline():
                writer.write(line[::-1])
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.server)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(
            *address, ssl=tls.client, server_hostname=HOST
        )
        assert writer.get_extra_info("peercert") is not None
        for word in (b"stream", b"over", b"tls"):
            writer.write(word + b"\n")
            await writer.drain()
            assert await reader.readexactly(len(word) + 1) == b"\n" + word[::-1]
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_handshake_timeout_on_the_client(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        silent = socket.socket()
        silent.setblocking(False)
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with silent:  # accepts (in the kernel) and never answers the ClientHello
            with pytest.raises(ValueError):
                await aio_loop.create_connection(
                    asyncio.Protocol, *silent.getsockname(), ssl_handshake_timeout=1
                )
            start = aio_loop.time()
            with pytest.raises(ConnectionAbortedError, match="SSL handshake is taking longer"):
                await aio_loop.create_connection(
                    asyncio.Protocol,
                    *silent.getsockname(),
                    ssl=tls.client,
                    server_hostname=HOST,
                    ssl_handshake_timeout=0.2,
                )
            assert 0.2 - 0.001 <= aio_loop.time() - start < 5

    run(aio_loop, main())


def test_handshake_timeout_on_the_server(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        factory = ServerRecorders(aio_loop)
        server = await aio_loop.create_server(
            factory, "127.0.0.1", 0, ssl=tls.server, ssl_handshake_timeout=0.2
        )
        mute = socket.socket()
        mute.setblocking(False)
        with mute:
            await aio_loop.sock_connect(mute, server.sockets[0].getsockname())
            start = aio_loop.time()
            assert await asyncio.wait_for(aio_loop.sock_recv(mute, 100), 5) == b""
            assert 0.2 - 0.001 <= aio_loop.time() - start < 5
        assert all(not p.made.done() for p in factory.protocols)
        await close_server(server)

    run(aio_loop, main())


def test_handshake_failures_are_reported_to_the_client(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0, ssl=tls.server)
        address = server.sockets[0].getsockname()
        with pytest.raises(ssl.SSLCertVerificationError):  # an unknown CA
            await aio_loop.create_connection(
                asyncio.Protocol, *address, ssl=tls.untrusting, server_hostname=HOST
            )
        with pytest.raises(ssl.SSLCertVerificationError):  # the wrong name
            await aio_loop.create_connection(
                asyncio.Protocol, *address, ssl=tls.client, server_hostname="other.example"
            )
        with pytest.raises(ssl.SSLError):  # a server that does not speak TLS
            await asyncio.wait_for(_plain_to_tls(aio_loop, tls), 5)
        # the server goes on: a good client is served, and only it got connection_made
        client = Recorder(aio_loop)
        transport, _ = await aio_loop.create_connection(
            lambda: client, *address, ssl=tls.client, server_hostname=HOST
        )
        transport.write(b"fine")
        await client.wait_data(4)
        made = [p for p in factory.protocols if p.made.done()]
        assert len(made) == 1
        transport.close()
        await client.lost
        await close_server(server)

    run(aio_loop, main())


async def _plain_to_tls(loop: Loop, tls: Tls) -> None:
    """A TLS client against a plain TCP server that answers garbage: SSLError."""

    class Garbage(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.write(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 8)

    server = await loop.create_server(Garbage, "127.0.0.1", 0)
    try:
        address = server.sockets[0].getsockname()
        await loop.create_connection(
            asyncio.Protocol, *address, ssl=tls.client, server_hostname=HOST
        )
    finally:
        await close_server(server)


class _StartTlsServer(Recorder):
    """Plain text until the line STARTTLS; then it answers GO, stops reading,
    and the test upgrades its transport."""

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop, echo=False)
        self.asked: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.asked.done():
            self.tr.write(data.upper())  # over TLS by now
        elif bytes(self.data).endswith(b"STARTTLS\n"):
            self.tr.write(b"GO\n")
            self.tr.pause_reading()  # the ClientHello waits in the kernel
            self.asked.set_result(None)


def test_loop_start_tls_upgrades_a_plain_connection(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        servers: list[_StartTlsServer] = []

        def factory() -> _StartTlsServer:
            servers.append(_StartTlsServer(aio_loop))
            return servers[-1]

        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        client = Recorder(aio_loop)
        plain, _ = await aio_loop.create_connection(lambda: client, *address)
        plain.write(b"hello\nSTARTTLS\n")
        await client.wait_data(3)
        assert bytes(client.data) == b"GO\n"
        await wait_until(lambda: bool(servers), what="the server protocol")
        accepted = servers[0]
        await accepted.asked
        server_side = aio_loop.create_task(
            aio_loop.start_tls(accepted.tr, accepted, tls.server, server_side=True)
        )
        client_tls = await aio_loop.start_tls(plain, client, tls.client, server_hostname=HOST)
        assert client_tls is not None
        server_tls = await server_side
        assert server_tls is not None
        client.transport = client_tls
        accepted.transport = server_tls
        assert client_tls.get_extra_info("ssl_object") is not None
        assert server_tls.get_extra_info("ssl_object").server_side
        client.data.clear()
        client_tls.write(b"now encrypted")
        assert await client.wait_data(13) == b"NOW ENCRYPTED"
        assert client.sequence() == ["connection_made", "data_received"]  # no second made
        client_tls.close()
        assert await client.lost is None
        assert await accepted.lost is None
        await close_server(server)

    run(aio_loop, main())


@needs_python((3, 11), "StreamWriter.start_tls")
def test_stream_writer_start_tls(aio_loop: Loop, tls: Tls) -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await reader.readline() == b"STARTTLS\n"
            writer.write(b"GO\n")
            await writer.start_tls(tls.server)  # type: ignore[attr-defined, unused-ignore]
            assert writer.get_extra_info("ssl_object") is not None
            line = await reader.readline()
            writer.write(line.upper())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(*address)
        assert writer.get_extra_info("ssl_object") is None
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        await writer.start_tls(tls.client, server_hostname=HOST)  # type: ignore[attr-defined, unused-ignore]
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"secret line\n")
        assert await reader.readline() == b"SECRET LINE\n"
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
