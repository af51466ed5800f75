"""Reactor streams: echo, backpressure, half-close, reset, abort, refusal, IPv6, Unix.

Each test runs on every driver, in every I/O mode (readiness registered
level- or edge-triggered, and completion), and asserts the exact byte
stream and the exact protocol callback sequence (``Recorder.sequence()``),
so every backend must behave identically.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iomux import Multiplexer
from iomux.reactor import Reactor, Server
from iomux.reactor.testing import READ_SIZE, Recorder, collect_errors, recording

from .reactor_support import MODES, close_reactor, new_reactor, run_until, wait

TIMEOUT = 10.0


@pytest.fixture(params=MODES)
def reactor(driver: type[Multiplexer], request: pytest.FixtureRequest) -> Iterator[Reactor]:
    """A loop on the driver: readiness registered LEVEL or EDGE, or completion I/O."""
    r = new_reactor(driver, request.param)
    try:
        yield r
    finally:
        close_reactor(r)


def _serve(reactor: Reactor, factory: Any, host: str = "127.0.0.1", **opts: Any) -> Server:
    return wait(reactor, reactor.create_server(factory, host, 0, **opts), TIMEOUT)


def _connect(reactor: Reactor, client: Recorder, host: str, port: int) -> None:
    transport, protocol = wait(
        reactor, reactor.create_connection(lambda: client, host, port), TIMEOUT
    )
    assert protocol is client and transport is client.transport
    # connection_made ran (as a callback) before create_connection returned.
    assert client.made.done()


def _echo_pair(
    reactor: Reactor, host: str = "127.0.0.1", **client_opts: Any
) -> tuple[list[Recorder], Recorder]:
    servers: list[Recorder] = []
    server = _serve(reactor, recording(servers, lambda: Recorder(reactor, echo=True)), host)
    client = Recorder(reactor, **client_opts)
    _connect(reactor, client, host, server.port())
    return servers, client


def test_echo_small(reactor: Reactor) -> None:
    errors = collect_errors(reactor)
    payload = b"hello, reactor\n" * 10

    def send(rec: Recorder) -> None:
        rec.transport.write(payload[:50])
        rec.transport.writelines([payload[50:100], payload[100:]])
        rec.transport.write_eof()

    servers, client = _echo_pair(reactor, on_made=send)
    wait(reactor, client.lost, TIMEOUT)
    wait(reactor, servers[0].lost, TIMEOUT)
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
    wait(reactor, client.lost, TIMEOUT)
    server = servers[0]
    wait(reactor, server.lost, TIMEOUT)
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
    errors = collect_errors(reactor)

    def answer(rec: Recorder) -> None:
        rec.transport.write(b"reply to " + bytes(rec.received))
        rec.transport.close()

    server_rec: list[Recorder] = []
    server = _serve(
        reactor, recording(server_rec, lambda: Recorder(reactor, keep_open=True, on_eof=answer))
    )
    refused: list[BaseException] = []

    def send(rec: Recorder) -> None:
        rec.transport.write(b"question")
        rec.transport.write_eof()
        assert rec.transport.can_write_eof()
        try:
            rec.transport.write(b"more")
        except RuntimeError as exc:
            refused.append(exc)

    client = Recorder(reactor, on_made=send)
    _connect(reactor, client, "127.0.0.1", server.port())
    wait(reactor, client.lost, TIMEOUT)
    wait(reactor, server_rec[0].lost, TIMEOUT)
    assert len(refused) == 1 and "write_eof" in str(refused[0]), refused
    assert bytes(server_rec[0].received) == b"question"
    assert bytes(client.received) == b"reply to question"
    assert server_rec[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]
    assert errors == []


def test_peer_reset(reactor: Reactor) -> None:
    recs: list[Recorder] = []
    server = _serve(reactor, recording(recs, lambda: Recorder(reactor)))
    raw = socket.create_connection(("127.0.0.1", server.port()))
    raw.sendall(b"some bytes")
    run_until(reactor, lambda: recs and recs[0].received == b"some bytes", TIMEOUT)
    # SO_LINGER with a zero timeout makes close() send RST.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    exc = wait(reactor, recs[0].lost, TIMEOUT)
    assert isinstance(exc, ConnectionResetError)
    assert recs[0].sequence() == ["made", "data", "lost:ConnectionResetError"]


def test_abort_drops_buffer_and_closes_now(reactor: Reactor) -> None:
    big = b"x" * (8 * 1024 * 1024)
    seen: list[tuple[int, bool, int]] = []

    def reply_then_abort(rec: Recorder, data: bytes) -> None:
        rec.transport.write(big)
        buffered = rec.transport.get_write_buffer_size()
        rec.transport.abort()
        seen.append((buffered, rec.transport.is_closing(), rec.transport.get_write_buffer_size()))

    recs: list[Recorder] = []
    server = _serve(reactor, recording(recs, lambda: Recorder(reactor, on_data=reply_then_abort)))
    client = Recorder(reactor, on_made=lambda r: r.transport.write(b"go"))
    _connect(reactor, client, "127.0.0.1", server.port())
    wait(reactor, client.lost, TIMEOUT)
    wait(reactor, recs[0].lost, TIMEOUT)
    assert len(seen) == 1
    buffered, closing, after = seen[0]
    assert buffered > 0 and closing and after == 0, seen
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
    base = len(reactor.multiplexer)
    refused = reactor.create_connection(lambda: Recorder(reactor), "127.0.0.1", port)
    with pytest.raises(ConnectionRefusedError, match=str(port)):
        wait(reactor, refused, TIMEOUT)
    missing = reactor.create_unix_connection(lambda: Recorder(reactor), str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError):
        wait(reactor, missing, TIMEOUT)
    # Nothing of the failed attempts stays registered.
    assert len(reactor.multiplexer) == base


def test_pause_and_resume_reading(reactor: Reactor) -> None:
    recs: list[Recorder] = []
    paused: list[bool] = []

    def pause(rec: Recorder) -> None:
        rec.transport.pause_reading()
        paused.append(rec.transport.is_reading())

    server = _serve(reactor, recording(recs, lambda: Recorder(reactor, on_made=pause)))
    client = Recorder(reactor, on_made=lambda r: r.transport.write(b"a" * 100_000))
    _connect(reactor, client, "127.0.0.1", server.port())
    wait(reactor, asyncio.sleep(0.2), TIMEOUT)
    assert paused == [False]
    assert recs[0].events == ["made"] and not recs[0].received
    recs[0].transport.resume_reading()
    assert recs[0].transport.is_reading()
    run_until(reactor, lambda: len(recs[0].received) >= 100_000, TIMEOUT)
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
    wait(reactor, client.lost, TIMEOUT)
    assert bytes(client.received) == b"six"
    assert client.transport.get_extra_info("peername")[0] == "::1"
    wait(reactor, servers[0].lost, TIMEOUT)
    assert servers[0].sequence() == ["made", "data", "eof", "lost:None"]


def test_unix_socket_echo(reactor: Reactor, tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    recs: list[Recorder] = []
    server = wait(
        reactor,
        reactor.create_unix_server(recording(recs, lambda: Recorder(reactor, echo=True)), path),
        TIMEOUT,
    )
    payload = os.urandom(3 * 1024 * 1024)
    client = Recorder(
        reactor, on_made=lambda r: (r.transport.write(payload), r.transport.write_eof())
    )
    wait(reactor, reactor.create_unix_connection(lambda: client, path), TIMEOUT)
    wait(reactor, client.lost, TIMEOUT)
    wait(reactor, recs[0].lost, TIMEOUT)
    assert bytes(client.received) == payload
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]
    server.close()
    wait(reactor, server.wait_closed(), TIMEOUT)
    assert server.sockets == ()
    # As asyncio: the socket file is removed on close from Python 3.13 on.
    assert os.path.exists(path) == (sys.version_info < (3, 13))


def test_protocol_exception_closes_that_connection_only(reactor: Reactor) -> None:
    errors = collect_errors(reactor)

    class Boom(Exception):
        pass

    def explode(rec: Recorder, data: bytes) -> None:
        if data.startswith(b"boom"):
            raise Boom("raised by the protocol")

    recs: list[Recorder] = []
    server = _serve(reactor, recording(recs, lambda: Recorder(reactor, echo=True, on_data=explode)))
    bad = Recorder(reactor, on_made=lambda r: r.transport.write(b"boom"))
    good = Recorder(
        reactor, on_made=lambda r: (r.transport.write(b"fine"), r.transport.write_eof())
    )
    port = server.port()
    _connect(reactor, bad, "127.0.0.1", port)
    wait(reactor, bad.lost, TIMEOUT)
    _connect(reactor, good, "127.0.0.1", port)
    wait(reactor, good.lost, TIMEOUT)
    wait(reactor, recs[1].lost, TIMEOUT)
    assert isinstance(recs[0].lost_exc, Boom)
    assert recs[0].sequence() == ["made", "data", "lost:Boom"]
    assert [type(e["exception"]) for e in errors] == [Boom]
    assert errors[0]["protocol"] is recs[0]
    assert bytes(good.received) == b"fine"
    assert recs[1].sequence() == ["made", "data", "eof", "lost:None"]
