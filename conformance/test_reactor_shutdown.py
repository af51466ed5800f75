"""Graceful shutdown: stop accepting, finish or drain, lose nothing written."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import socket
import time
import warnings
from collections.abc import Iterator

import pytest

from iomux import Multiplexer
from iomux.reactor import Reactor, ShutdownTimeout
from iomux.reactor.testing import Recorder, recording

from .reactor_support import MODES, close_reactor, new_reactor, run_until, wait

TIMEOUT = 10.0
BIG = 32 * 1024 * 1024


@pytest.fixture(params=MODES)
def reactor(driver: type[Multiplexer], request: pytest.FixtureRequest) -> Iterator[Reactor]:
    r = new_reactor(driver, request.param)
    try:
        yield r
    finally:
        close_reactor(r)


def _echo_server(reactor: Reactor) -> tuple[list[Recorder], int]:
    recs: list[Recorder] = []
    server = wait(
        reactor,
        reactor.create_server(
            recording(recs, lambda: Recorder(reactor, echo=True)), "127.0.0.1", 0
        ),
        TIMEOUT,
    )
    return recs, server.port()


def test_shutdown_with_data_in_flight(reactor: Reactor) -> None:
    recs, port = _echo_server(reactor)
    payload = os.urandom(4 * 1024 * 1024)
    client = Recorder(reactor)
    wait(reactor, reactor.create_connection(lambda: client, "127.0.0.1", port), TIMEOUT)
    client.transport.write(payload[: len(payload) // 2])
    run_until(reactor, lambda: len(client.received) >= 100_000, TIMEOUT)  # the echo flows
    done = reactor.shutdown(grace=5.0)
    # New connections are refused from now on...
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # ...while the open one keeps being served until it finishes by itself.
    client.transport.write(payload[len(payload) // 2 :])
    client.transport.write_eof()
    start = time.monotonic()
    wait(reactor, done, TIMEOUT)
    assert time.monotonic() - start < 4.0, "shutdown waited for the grace period"
    wait(reactor, client.lost, TIMEOUT)
    assert hashlib.sha256(client.received).digest() == hashlib.sha256(payload).digest()
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert client.sequence() == ["made", "data", "eof", "lost:None"]


def test_shutdown_serves_backlog_and_flushes_at_grace_end(reactor: Reactor) -> None:
    recs, port = _echo_server(reactor)
    # This client completes its handshake and sends while the loop is not
    # running: it sits in the backlog when the shutdown begins.
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(b"queued before shutdown")
    done = reactor.shutdown(grace=0.3, drain=5.0)
    wait(reactor, asyncio.sleep(0.1), TIMEOUT)
    assert len(recs) == 1, "the backlogged connection was not accepted"
    # The server writes 32 MiB the client is not reading yet (more than the
    # socket buffers hold); at the grace end the connection is closed with
    # its buffer flushed, not dropped.
    recs[0].transport.write(b"z" * BIG)
    assert recs[0].transport.get_write_buffer_size() > 0
    wait(reactor, asyncio.sleep(0.4), TIMEOUT)
    assert recs[0].transport.is_closing() and not done.done()
    raw.setblocking(False)
    got = bytearray()
    deadline = time.monotonic() + TIMEOUT
    while not done.done() and time.monotonic() < deadline:
        reactor.run_once(0.01)
        try:
            got += raw.recv(1 << 20)
        except BlockingIOError:
            pass
    raw.setblocking(True)
    raw.settimeout(TIMEOUT)
    while chunk := raw.recv(1 << 20):
        got += chunk
    raw.close()
    assert bytes(got) == b"queued before shutdown" + b"z" * BIG
    assert recs[0].sequence() == ["made", "data", "lost:None"]


def test_shutdown_aborts_after_drain_time(reactor: Reactor) -> None:
    recs, port = _echo_server(reactor)
    raw = socket.create_connection(("127.0.0.1", port))  # never reads
    run_until(reactor, lambda: recs and recs[0].made.done(), TIMEOUT)
    recs[0].transport.write(b"q" * (16 * 1024 * 1024))
    start = time.monotonic()
    done = reactor.shutdown(grace=0.1, drain=0.2)
    wait(reactor, done, TIMEOUT)
    assert 0.3 <= time.monotonic() - start < 3.0
    exc = wait(reactor, recs[0].lost, TIMEOUT)
    assert isinstance(exc, ShutdownTimeout)
    # Written bytes were dropped: the peer is reset, never shown a clean end.
    raw.settimeout(TIMEOUT)
    with pytest.raises(ConnectionResetError):
        while raw.recv(1 << 20):
            pass
    raw.close()


class _Abandoning(asyncio.Protocol):
    """Pauses reading and keeps no reference to its transport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]


def test_shutdown_ends_past_a_transport_collected_unclosed(reactor: Reactor) -> None:
    """A connection whose transport nobody holds nor closed (asyncio collects such a
    transport, with a ResourceWarning) never tells the shutdown it ended: the shutdown
    still completes by the end of the drain time, as every other connection is over."""
    recs, port = _echo_server(reactor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        wait(reactor, reactor.create_connection(_Abandoning, "127.0.0.1", port), TIMEOUT)
        run_until(reactor, lambda: recs and recs[0].made.done(), TIMEOUT)
        gc.collect()
        start = time.monotonic()
        done = reactor.shutdown(grace=0.1, drain=0.2)
        wait(reactor, done, TIMEOUT)
        gc.collect()
    assert time.monotonic() - start < 3.0
    assert reactor.connections == frozenset()
    wait(reactor, recs[0].lost, TIMEOUT)


def test_sigterm_handler_shuts_down_and_stops(reactor: Reactor) -> None:
    recs, port = _echo_server(reactor)
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    raw.sendall(b"last words")
    previous = signal.getsignal(signal.SIGTERM)
    reactor.install_shutdown_handlers((signal.SIGTERM,), grace=0.2, drain=1.0)
    try:
        assert signal.getsignal(signal.SIGTERM) not in (previous, signal.SIG_DFL)
        reactor.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        guard = reactor.call_later(TIMEOUT, reactor.stop)  # fail fast on a hang
        start = time.monotonic()
        reactor.run_forever()
        assert time.monotonic() - start < 3.0
        assert not guard.cancelled() and guard.when() > reactor.time()
        guard.cancel()
        assert reactor.remove_signal_handler(signal.SIGTERM)
        # As asyncio: removing the handler restores the default disposition.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        reactor.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    got = b""
    while chunk := raw.recv(4096):
        got += chunk
    raw.close()
    assert got == b"last words"
    wait(reactor, recs[0].lost, TIMEOUT)
    assert recs[0].sequence() == ["made", "data", "lost:None"]
