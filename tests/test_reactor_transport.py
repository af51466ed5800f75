"""Unit tests of the stream transports (readiness LEVEL and EDGE on epoll, completion on
io_uring): arguments, limits, extra info, buffered protocols."""

from __future__ import annotations

import asyncio
import socket
import time
from asyncio import trsock
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest

from iomux import Trigger
from iomux.reactor import Reactor, StreamTransport
from iomux.reactor.completion import CompletionStreamTransport
from iomux.reactor.readiness import ReadinessStreamTransport
from iomux.reactor.testing import Recorder

T = TypeVar("T")
TIMEOUT = 5.0


@pytest.fixture(
    params=[Trigger.LEVEL, Trigger.EDGE, "completion"], ids=["level", "edge", "completion"]
)
def reactor(request: pytest.FixtureRequest) -> Iterator[Reactor]:
    if request.param == "completion":
        r = Reactor("io_uring", io="completion")
    else:
        r = Reactor("epoll", trigger=request.param)
    try:
        yield r
    finally:
        # Abort what a test left open: no transport outlives its loop.
        try:
            wait(r, r.shutdown(grace=0, drain=0))
        finally:
            r.close()


def wait(reactor: Reactor, awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout)

    return reactor.run_until_complete(bounded())


def _pair(reactor: Reactor, protocol: asyncio.BaseProtocol) -> tuple[Any, socket.socket]:
    a, b = socket.socketpair()
    transport, proto = wait(reactor, reactor.connect_accepted_socket(lambda: protocol, a))
    assert proto is protocol
    return transport, b


def receive(reactor: Reactor, peer: socket.socket, n: int) -> bytes:
    """Run the loop while reading ``n`` bytes from ``peer`` (fewer at EOF)."""
    peer.setblocking(False)
    got = b""
    deadline = time.monotonic() + TIMEOUT
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {got!r} arrived within {TIMEOUT} s"
        reactor.run_once(0.01)
        try:
            chunk = peer.recv(n - len(got))
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
    return got


def test_transport_kind_follows_the_io(reactor: Reactor) -> None:
    transport, peer = _pair(reactor, Recorder(reactor))
    with peer:
        assert isinstance(transport, StreamTransport)
        assert isinstance(transport, asyncio.Transport)
        if reactor.io == "completion":
            assert isinstance(transport, CompletionStreamTransport)
            assert len(reactor.multiplexer) == 0  # nothing registered for readiness
        else:
            assert isinstance(transport, ReadinessStreamTransport)
            registration = reactor.multiplexer.get(transport.get_extra_info("socket").fileno())
            assert registration is not None
            assert registration.trigger is reactor.trigger
        transport.close()


def test_write_checks_arguments(reactor: Reactor) -> None:
    transport, peer = _pair(reactor, Recorder(reactor))
    with peer:
        with pytest.raises(TypeError, match="bytes-like object"):
            transport.write("text")
        transport.write(b"")
        transport.write(bytearray(b"ab"))
        transport.write(memoryview(b"cd"))
        transport.writelines([b"e", bytearray(b"f"), memoryview(b"g")])
        assert receive(reactor, peer, 7) == b"abcdefg"
        transport.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            transport.write(b"late")
        assert transport.can_write_eof()
        assert receive(reactor, peer, 1) == b""  # the half-close reached the peer
        transport.close()


def test_bytes_written_from_a_reused_buffer_are_the_ones_given(reactor: Reactor) -> None:
    transport, peer = _pair(reactor, Recorder(reactor))
    with peer:
        buf = bytearray(b"first")
        transport.write(buf)
        buf[:] = b"XXXXX"  # the caller reuses its buffer before the send happens
        transport.write(b"-second")
        assert receive(reactor, peer, 12) == b"first-second"
        transport.close()


def test_write_buffer_limits(reactor: Reactor) -> None:
    rec = Recorder(reactor)
    transport, peer = _pair(reactor, rec)
    with peer:
        assert transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        transport.set_write_buffer_limits(high=1000)
        assert transport.get_write_buffer_limits() == (250, 1000)
        with pytest.raises(ValueError, match="must be >="):
            transport.set_write_buffer_limits(high=10, low=20)
        transport.write(b"x" * (8 * 1024 * 1024))
        size = transport.get_write_buffer_size()
        assert size > 1000 and rec.pauses == 1
        peer.setblocking(False)
        got = 0
        while rec.resumes == 0:
            try:
                while chunk := peer.recv(1 << 20):
                    got += len(chunk)
            except BlockingIOError:
                pass
            reactor.run_once(0.01)
        assert transport.get_write_buffer_size() <= 250
        assert rec.pauses == 1 and rec.resumes == 1
        transport.close()


def test_close_after_close_and_writes_after_close_are_dropped(reactor: Reactor) -> None:
    rec = Recorder(reactor)
    transport, peer = _pair(reactor, rec)
    with peer:
        transport.close()
        transport.close()
        transport.write(b"dropped")
        assert transport.is_closing()
        wait(reactor, rec.lost)
        peer.settimeout(TIMEOUT)
        assert peer.recv(10) == b""
        transport.write(b"dropped too")  # after connection_lost: dropped, no raise
    assert rec.sequence() == ["made", "lost:None"]


def test_extra_info(reactor: Reactor) -> None:
    transport, peer = _pair(reactor, Recorder(reactor))
    with peer:
        sock = transport.get_extra_info("socket")
        assert isinstance(sock, trsock.TransportSocket)
        assert sock.fileno() >= 0 and sock.family == socket.AF_UNIX
        assert transport.get_extra_info("sockname") == sock.getsockname()
        assert transport.get_extra_info("peername") == peer.getsockname()
        assert transport.get_extra_info("nothing", "dflt") == "dflt"
        assert transport.get_protocol() is not None
        assert "open" in repr(transport)
        transport.close()


class Buffered(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(7)  # small: many reads per message
        self.got = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.got += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def test_buffered_protocol(reactor: Reactor) -> None:
    proto = Buffered()
    _, peer = _pair(reactor, proto)
    with peer:
        peer.sendall(b"a buffered protocol gets recv_into")
        peer.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if proto.lost:
                break
            reactor.run_once(0.1)
        assert bytes(proto.got) == b"a buffered protocol gets recv_into"
        assert proto.eof and proto.lost == [None]


def test_set_protocol_switches_receiver(reactor: Reactor) -> None:
    first, second = Recorder(reactor), Recorder(reactor)
    transport, peer = _pair(reactor, first)
    with peer:
        transport.set_protocol(second)
        assert transport.get_protocol() is second
        peer.sendall(b"to second")
        for _ in range(100):
            if second.received:
                break
            reactor.run_once(0.1)
        assert not first.received and bytes(second.received) == b"to second"
        transport.close()


def test_protocol_factory_error_is_reported(reactor: Reactor) -> None:
    contexts: list[dict[str, Any]] = []
    reactor.set_exception_handler(lambda r, c: contexts.append(c))

    def factory() -> asyncio.Protocol:
        raise RuntimeError("no protocol for you")

    server = wait(reactor, reactor.create_server(factory, "127.0.0.1", 0))
    with socket.create_connection(("127.0.0.1", server.port()), timeout=2) as c:
        for _ in range(100):
            if contexts:
                break
            reactor.run_once(0.1)
        assert c.recv(10) == b""
    assert len(contexts) == 1
    assert "transport creation" in contexts[0]["message"]
    assert str(contexts[0]["exception"]) == "no protocol for you"
    server.close()
    assert server.sockets == () and not server.is_serving()


def test_unknown_trigger_is_refused() -> None:
    with pytest.raises(ValueError, match="LEVEL or EDGE"):
        Reactor("epoll", trigger=Trigger.ONESHOT)
    with pytest.raises(ValueError, match="does not support"):
        Reactor("poll", trigger=Trigger.EDGE)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, Trigger.LEVEL),
        ({"trigger": Trigger.LEVEL}, Trigger.LEVEL),
        ({"trigger": Trigger.EDGE}, Trigger.EDGE),
    ],
)
def test_the_loop_says_how_its_stream_transports_register(
    kwargs: dict[str, Trigger], expected: Trigger
) -> None:
    reactor = Reactor("epoll", **kwargs)
    try:
        assert reactor.trigger is expected
    finally:
        reactor.close()
