"""Reactor deadlines: idle timeouts and absolute deadlines close with a visible reason."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from iomux import Multiplexer
from iomux.reactor import DeadlineExceeded, IdleTimeout, Reactor
from iomux.reactor.testing import Recorder, recording

TIMEOUT = 5.0


@pytest.fixture
def reactor(driver: type[Multiplexer], reactor_io: str) -> Iterator[Reactor]:
    r = Reactor(backend=driver, strategy=reactor_io)
    try:
        yield r
    finally:
        r.close()


def _serve(reactor: Reactor, **server_opts: Any) -> tuple[list[Recorder], int]:
    recs: list[Recorder] = []
    server = reactor.create_server(
        recording(recs, lambda: Recorder(reactor)), "127.0.0.1", 0, **server_opts
    )
    return recs, server.port()


def _connect(reactor: Reactor, port: int, **opts: Any) -> Recorder:
    client = Recorder(reactor)
    reactor.run_until_complete(
        reactor.create_connection(lambda: client, "127.0.0.1", port, **opts), timeout=TIMEOUT
    )
    return client


def test_server_idle_timeout_closes_silent_connection(reactor: Reactor) -> None:
    recs, port = _serve(reactor, idle_timeout=0.2)
    start = time.monotonic()
    client = _connect(reactor, port)
    exc = reactor.run_until_complete(recs[0].lost, timeout=TIMEOUT)
    took = time.monotonic() - start
    assert isinstance(exc, IdleTimeout) and exc.seconds == 0.2
    assert "idle" in str(exc)
    assert 0.2 <= took < 1.5, took
    reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    assert recs[0].sequence() == ["made", "lost:IdleTimeout"]
    assert client.sequence() == ["made", "eof", "lost:None"]


def test_activity_postpones_idle_timeout(reactor: Reactor) -> None:
    recs, port = _serve(reactor, idle_timeout=0.25)
    client = _connect(reactor, port)
    last = time.monotonic()
    for _ in range(6):  # 0.6 s of traffic every 0.1 s: longer than the timeout
        client.transport.write(b"tick")
        last = time.monotonic()
        reactor.run_until_complete(reactor.sleep(0.1), timeout=TIMEOUT)
        assert not recs[0].lost.done()
    exc = reactor.run_until_complete(recs[0].lost, timeout=TIMEOUT)
    assert isinstance(exc, IdleTimeout)
    assert time.monotonic() - last >= 0.25
    assert bytes(recs[0].received) == b"tick" * 6


def test_server_lifetime_closes_busy_connection(reactor: Reactor) -> None:
    recs, port = _serve(reactor, lifetime=0.3)
    client = _connect(reactor, port)
    start = time.monotonic()

    def chatter() -> None:
        if not client.transport.is_closing():
            client.transport.write(b"busy")
            reactor.call_later(0.02, chatter)

    chatter()
    exc = reactor.run_until_complete(recs[0].lost, timeout=TIMEOUT)
    assert isinstance(exc, DeadlineExceeded)
    assert 0.28 <= time.monotonic() - start < 1.5
    assert recs[0].sequence() == ["made", "data", "lost:DeadlineExceeded"]


def test_transport_deadline_and_idle_on_client(reactor: Reactor) -> None:
    _, port = _serve(reactor)
    deadline = reactor.time() + 0.2
    client = _connect(reactor, port, deadline=deadline)
    assert client.transport.get_deadline() == deadline
    exc = reactor.run_until_complete(client.lost, timeout=TIMEOUT)
    assert isinstance(exc, DeadlineExceeded)
    assert reactor.time() >= deadline
    assert client.sequence() == ["made", "lost:DeadlineExceeded"]
    other = _connect(reactor, port)
    other.transport.set_idle_timeout(0.15)
    assert other.transport.get_idle_timeout() == 0.15
    exc = reactor.run_until_complete(other.lost, timeout=TIMEOUT)
    assert isinstance(exc, IdleTimeout)
    with pytest.raises(ValueError, match="positive"):
        other.transport.set_idle_timeout(0)


def test_clearing_limits_keeps_connection_open(reactor: Reactor) -> None:
    recs, port = _serve(reactor, idle_timeout=0.1)
    client = _connect(reactor, port)
    while not recs:
        reactor.run_once(0.05)
    recs[0].transport.set_idle_timeout(None)
    reactor.run_until_complete(reactor.sleep(0.3), timeout=TIMEOUT)
    assert not recs[0].lost.done() and not client.lost.done()
