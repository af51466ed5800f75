"""Unit tests of the transports (readiness, and completion on io_uring): arguments,
limits, extra info, buffered protocols."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from iomux import Trigger
from iomux.reactor import Reactor
from iomux.reactor.testing import Recorder


@pytest.fixture(
    params=[Trigger.LEVEL, Trigger.EDGE, "completion"], ids=["level", "edge", "completion"]
)
def reactor(request: pytest.FixtureRequest) -> Iterator[Reactor]:
    if request.param == "completion":
        r = Reactor("io_uring", strategy="completion")
    else:
        r = Reactor("epoll", trigger=request.param)
    try:
        yield r
    finally:
        r.close()


def _pair(reactor: Reactor, protocol: asyncio.BaseProtocol) -> tuple[Any, socket.socket]:
    a, b = socket.socketpair()
    transport, _ = reactor.connect_accepted_socket(lambda: protocol, a)
    return transport, b


def test_write_checks_arguments(reactor: Reactor) -> None:
    transport, peer = _pair(reactor, Recorder(reactor))
    with peer:
        with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
            transport.write("text")
        transport.write(b"")
        transport.write(bytearray(b"ab"))
        transport.write(memoryview(b"cd"))
        transport.writelines([b"e", bytearray(b"f"), memoryview(b"g")])
        reactor.run_once(0)  # completion I/O sends with the next ring enter
        assert peer.recv(100) == b"abcdefg"
        transport.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            transport.write(b"late")
        assert transport.can_write_eof()


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
        while rec.resumes == 0:
            try:
                while peer.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
            reactor.run_once(0.1)
        assert transport.get_write_buffer_size() <= 250


def test_close_after_close_and_writes_after_close_are_dropped(reactor: Reactor) -> None:
    rec = Recorder(reactor)
    transport, peer = _pair(reactor, rec)
    with peer:
        transport.close()
        transport.close()
        transport.write(b"dropped")
        assert transport.is_closing()
        reactor.run_until_complete(rec.lost, timeout=2)
        assert peer.recv(10) == b""
    assert rec.sequence() == ["made", "lost:None"]


def test_extra_info(reactor: Reactor) -> None:
    transport, peer = _pair(reactor, Recorder(reactor))
    with peer:
        sock = transport.get_extra_info("socket")
        assert isinstance(sock, socket.socket)
        assert transport.get_extra_info("sockname") == sock.getsockname()
        assert transport.get_extra_info("nothing", "dflt") == "dflt"
        assert transport.get_protocol() is not None
        assert "open" in repr(transport)


class Buffered(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(7)  # small: many reads per message
        self.got = bytearray()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.got += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.eof = True
        return False


def test_buffered_protocol(reactor: Reactor) -> None:
    proto = Buffered()
    _, peer = _pair(reactor, proto)
    with peer:
        peer.sendall(b"a buffered protocol gets recv_into")
        peer.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if proto.eof:
                break
            reactor.run_once(0.1)
        assert bytes(proto.got) == b"a buffered protocol gets recv_into"
        assert proto.eof


def test_set_protocol_switches_receiver(reactor: Reactor) -> None:
    first, second = Recorder(reactor), Recorder(reactor)
    transport, peer = _pair(reactor, first)
    with peer:
        transport.set_protocol(second)
        peer.sendall(b"to second")
        while not second.received:
            reactor.run_once(0.1)
        assert not first.received and bytes(second.received) == b"to second"


def test_protocol_factory_error_is_reported(reactor: Reactor) -> None:
    contexts: list[dict[str, Any]] = []
    reactor.set_exception_handler(lambda r, c: contexts.append(c))

    def factory() -> asyncio.Protocol:
        raise RuntimeError("no protocol for you")

    server = reactor.create_server(factory, "127.0.0.1", 0)
    with socket.create_connection(("127.0.0.1", server.port()), timeout=2) as c:
        while not contexts:
            reactor.run_once(0.1)
        assert c.recv(10) == b""
    assert "factory" in contexts[0]["message"]
    server.close()
    assert server.sockets == () and not server.is_serving()


def test_unknown_trigger_is_refused() -> None:
    with pytest.raises(ValueError, match="EDGE or LEVEL"):
        Reactor("epoll", trigger=Trigger.ONESHOT)
    with pytest.raises(ValueError, match="does not support"):
        Reactor("poll", trigger=Trigger.EDGE)
