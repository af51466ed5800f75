"""Reactor streams: echo, backpressure, half-close, reset, abort, refusal, IPv6, Unix.

Each test runs on every driver and asserts the exact byte stream and the
exact protocol callback sequence (``Recorder.sequence()``), so every
backend must behave identically.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iomux import Multiplexer, Trigger
from iomux.conformance.plugin import require, require_completion
from iomux.reactor import Reactor
from iomux.reactor.testing import READ_SIZE, Recorder, collect_errors, recording

TIMEOUT = 10.0


@pytest.fixture(
    params=[Trigger.LEVEL, Trigger.EDGE, "completion"], ids=["level", "edge", "completion"]
)
def reactor(driver: type[Multiplexer], request: pytest.FixtureRequest) -> Iterator[Reactor]:
    """A reactor on the driver: readiness registered LEVEL or EDGE, or completion I/O."""
    if request.param == "completion":
        require_completion(driver)
        r = Reactor(backend=driver, strategy="completion")
    else:
        require(driver, request.param)
        r = Reactor(backend=driver, trigger=request.param)
    try:
        yield r
    finally:
        r.close()


def _echo_pair(
    reactor: Reactor, host: str = "127.0.0.1", **client_opts: Any
) -> tuple[list[Recorder], Recorder]:
    servers: list[Recorder] = []

    def factory() -> Recorder:
        servers.append(Recorder(reactor, echo=True))
        return servers[-1]

    server = reactor.create_server(factory, host, 0)
    client = Recorder(reactor, **client_opts)
    reactor.run_until_complete(
        reactor.create_connection(lambda: client, host, server.port()), timeout=TIMEOUT
    )
    return servers, client


def test_echo_small(reactor: Reactor) -> None:
    errors = collect_errors(reactor)
    payload = b"hello, reactor\n" * 10

    def send(rec: Recorder) -> None:
        rec.transport.write(payload[:50])
        rec.transport.writelines([payload[50:100], payload[100:]])
        rec.transport.write_eof()

    servers, client = _echo_pair(reactor, on_made=send)
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    reactor.run_until_complete(servers[0].lost, timeout=TIMEOUT)
    assert bytes(servers[0].received) == payload
    assert bytes(client.received) == payload
    assert servers[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]
    assert errors == []


def test_echo_16mib_with_backpressure(reactor: Reactor) -> None:
    """16 MiB each way; the client does not read at first, so both sides back up."""
    errors = collect_errors(reactor)
    payload = os.urandom(16 * 1024 * 1024)

    def start(rec: Recorder) -> None:
        rec.transport.pause_reading()
        rec.transport.write(payload)
        rec.transport.write_eof()
        reactor.call_later(0.2, rec.transport.resume_reading)

    servers, client = _echo_pair(reactor, on_made=start)
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    server = servers[0]
    reactor.run_until_complete(server.lost, timeout=TIMEOUT)
    digest = hashlib.sha256(payload).hexdigest()
    assert hashlib.sha256(server.received).hexdigest() == digest
    assert hashlib.sha256(client.received).hexdigest() == digest
    assert client.pauses >= 1 and client.resumes >= 1, client.events[:5]
    assert server.pauses >= 1 and server.resumes >= 1
    # The echo side stopped reading when paused: its buffer stayed bounded.
    high = 64 * 1024
    assert server.max_buffered <= high + READ_SIZE
    assert server.sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]
    assert errors == []


def test_half_close(reactor: Reactor) -> None:
    """write_eof -> eof_received; the other side can still answer."""

    def answer(rec: Recorder) -> None:
        rec.transport.write(b"reply to " + bytes(rec.received))
        rec.transport.close()

    server_rec: list[Recorder] = []

    def factory() -> Recorder:
        server_rec.append(Recorder(reactor, keep_open=True, on_eof=answer))
        return server_rec[-1]

    server = reactor.create_server(factory, "127.0.0.1", 0)

    def send(rec: Recorder) -> None:
        rec.transport.write(b"question")
        rec.transport.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            rec.transport.write(b"more")

    client = Recorder(reactor, on_made=send)
    reactor.run_until_complete(
        reactor.create_connection(lambda: client, "127.0.0.1", server.port()), timeout=TIMEOUT
    )
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    reactor.run_until_complete(server_rec[0].lost, timeout=TIMEOUT)
    assert bytes(client.received) == b"reply to question"
    assert server_rec[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]


def test_peer_reset(reactor: Reactor) -> None:
    recs: list[Recorder] = []
    server = reactor.create_server(recording(recs, lambda: Recorder(reactor)), "127.0.0.1", 0)
    raw = socket.create_connection(("127.0.0.1", server.port()))
    raw.sendall(b"some bytes")
    while not recs or not recs[0].received:
        reactor.run_once(0.1)
    # SO_LINGER with a zero timeout makes close() send RST.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    exc = reactor.run_until_complete(recs[0].lost, timeout=TIMEOUT)
    assert isinstance(exc, ConnectionResetError)
    assert recs[0].sequence() == ["made", "data", "lost:ConnectionResetError"]


def test_abort_drops_buffer_and_closes_now(reactor: Reactor) -> None:
    big = b"x" * (8 * 1024 * 1024)

    def reply_then_abort(rec: Recorder, data: bytes) -> None:
        rec.transport.write(big)
        assert rec.transport.get_write_buffer_size() > 0
        rec.transport.abort()
        assert rec.transport.is_closing()
        assert rec.transport.get_write_buffer_size() == 0

    recs: list[Recorder] = []
    server = reactor.create_server(
        recording(recs, lambda: Recorder(reactor, on_data=reply_then_abort)),
        "127.0.0.1",
        0,
    )
    client = Recorder(reactor, on_made=lambda r: r.transport.write(b"go"))
    reactor.run_until_complete(
        reactor.create_connection(lambda: client, "127.0.0.1", server.port()), timeout=TIMEOUT
    )
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    assert recs[0].sequence() == ["made", "data", "lost:None"]
    # Written data was dropped, so the peer is reset: it must not mistake
    # the truncated stream for a complete one (no clean EOF).
    assert len(client.received) < len(big)
    assert client.sequence()[0] == "made" and "eof" not in client.sequence()
    assert isinstance(client.lost_exc, ConnectionResetError), client.lost_exc


def test_connection_refused(reactor: Reactor, tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # bound, never listened: nothing accepts on this port
    fut = reactor.create_connection(lambda: Recorder(reactor), "127.0.0.1", port)
    with pytest.raises(ConnectionRefusedError, match=str(port)):
        reactor.run_until_complete(fut, timeout=TIMEOUT)
    missing = reactor.create_unix_connection(lambda: Recorder(reactor), str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError):
        reactor.run_until_complete(missing, timeout=TIMEOUT)
    assert len(reactor.multiplexer) == 0


def test_pause_and_resume_reading(reactor: Reactor) -> None:
    recs: list[Recorder] = []

    def pause(rec: Recorder) -> None:
        rec.transport.pause_reading()
        assert not rec.transport.is_reading()

    server = reactor.create_server(
        recording(recs, lambda: Recorder(reactor, on_made=pause)), "127.0.0.1", 0
    )
    client = Recorder(reactor, on_made=lambda r: r.transport.write(b"a" * 100_000))
    reactor.run_until_complete(
        reactor.create_connection(lambda: client, "127.0.0.1", server.port()), timeout=TIMEOUT
    )
    reactor.run_until_complete(reactor.sleep(0.2), timeout=TIMEOUT)
    assert recs[0].events == ["made"] and not recs[0].received
    recs[0].transport.resume_reading()
    assert recs[0].transport.is_reading()
    while len(recs[0].received) < 100_000:
        reactor.run_once(1.0)
    assert bytes(recs[0].received) == b"a" * 100_000
    assert recs[0].sequence() == ["made", "data"]


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_ipv6_echo(reactor: Reactor) -> None:
    if not _ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1); not a driver capability")
    servers, client = _echo_pair(
        reactor, "::1", on_made=lambda r: (r.transport.write(b"six"), r.transport.write_eof())
    )
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    assert bytes(client.received) == b"six"
    assert client.transport.get_extra_info("peername")[0] == "::1"
    assert servers[0].sequence() == ["made", "data", "eof", "lost:None"]


def test_unix_socket_echo(reactor: Reactor, tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    recs: list[Recorder] = []
    server = reactor.create_unix_server(recording(recs, lambda: Recorder(reactor, echo=True)), path)
    payload = os.urandom(3 * 1024 * 1024)
    client = Recorder(
        reactor, on_made=lambda r: (r.transport.write(payload), r.transport.write_eof())
    )
    reactor.run_until_complete(
        reactor.create_unix_connection(lambda: client, path), timeout=TIMEOUT
    )
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    assert bytes(client.received) == payload
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]
    server.close()
    assert not os.path.exists(path)


def test_protocol_exception_closes_that_connection_only(reactor: Reactor) -> None:
    errors = collect_errors(reactor)

    class Boom(Exception):
        pass

    def explode(rec: Recorder, data: bytes) -> None:
        if data.startswith(b"boom"):
            raise Boom("raised by the protocol")

    recs: list[Recorder] = []
    server = reactor.create_server(
        recording(recs, lambda: Recorder(reactor, echo=True, on_data=explode)),
        "127.0.0.1",
        0,
    )
    bad = Recorder(reactor, on_made=lambda r: r.transport.write(b"boom"))
    good = Recorder(
        reactor, on_made=lambda r: (r.transport.write(b"fine"), r.transport.write_eof())
    )
    port = server.port()
    reactor.run_until_complete(reactor.create_connection(lambda: bad, "127.0.0.1", port))
    reactor.run_until_complete(bad.lost, timeout=TIMEOUT)
    reactor.run_until_complete(reactor.create_connection(lambda: good, "127.0.0.1", port))
    reactor.run_until_complete(good.lost, timeout=TIMEOUT)
    assert isinstance(recs[0].lost_exc, Boom)
    assert recs[0].sequence() == ["made", "data", "lost:Boom"]
    assert [type(e["exception"]) for e in errors] == [Boom]
    assert errors[0]["protocol"] is recs[0]
    assert bytes(good.received) == b"fine"
    assert recs[1].sequence() == ["made", "data", "eof", "lost:None"]
