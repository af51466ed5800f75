"""Reactor deadlines: idle timeouts and absolute deadlines close with a visible reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from iomux import Multiplexer
from iomux.reactor import DeadlineExceeded, IdleTimeout, Reactor
from iomux.reactor.testing import Recorder, recording

from .reactor_support import MODES, close_reactor, new_reactor, run_until, wait

TIMEOUT = 5.0


@pytest.fixture(params=MODES)
def reactor(driver: type[Multiplexer], request: pytest.FixtureRequest) -> Iterator[Reactor]:
    r = new_reactor(driver, request.param)
    try:
        yield r
    finally:
        close_reactor(r)


def _serve(reactor: Reactor, **server_opts: Any) -> tuple[list[Recorder], int]:
    recs: list[Recorder] = []
    server = wait(
        reactor,
        reactor.create_server(
            recording(recs, lambda: Recorder(reactor)), "127.0.0.1", 0, **server_opts
        ),
        TIMEOUT,
    )
    return recs, server.port()


def _connect(reactor: Reactor, port: int, **opts: Any) -> Recorder:
    client = Recorder(reactor)
    wait(reactor, reactor.create_connection(lambda: client, "127.0.0.1", port, **opts), TIMEOUT)
    return client


def test_server_idle_timeout_closes_silent_connection(reactor: Reactor) -> None:
    recs, port = _serve(reactor, idle_timeout=0.2)
    start = time.monotonic()
    client = _connect(reactor, port)
    run_until(reactor, lambda: recs, TIMEOUT)
    assert recs[0].transport.get_idle_timeout() == 0.2
    exc = wait(reactor, recs[0].lost, TIMEOUT)
    took = time.monotonic() - start
    assert isinstance(exc, IdleTimeout) and exc.seconds == 0.2
    assert "idle" in str(exc)
    assert 0.2 <= took < 1.5, took
    wait(reactor, client.lost, TIMEOUT)
    assert recs[0].sequence() == ["made", "lost:IdleTimeout"]
    # Nothing written was dropped: the peer sees a clean end, not a reset.
    assert client.sequence() == ["made", "eof", "lost:None"]


def test_activity_postpones_idle_timeout(reactor: Reactor) -> None:
    recs, port = _serve(reactor, idle_timeout=0.25)
    client = _connect(reactor, port)
    run_until(reactor, lambda: recs, TIMEOUT)
    last = time.monotonic()
    for _ in range(6):  # 0.6 s of traffic every 0.1 s: longer than the timeout
        client.transport.write(b"tick")
        last = time.monotonic()
        wait(reactor, asyncio.sleep(0.1), TIMEOUT)
        assert not recs[0].lost.done()
    exc = wait(reactor, recs[0].lost, TIMEOUT)
    assert isinstance(exc, IdleTimeout)
    assert time.monotonic() - last >= 0.25
    assert bytes(recs[0].received) == b"tick" * 6


def test_idle_timeout_set_late_counts_from_the_last_io(reactor: Reactor) -> None:
    # A connection with no limit at first: its traffic before the timeout
    # was set must not count as idleness (the clock starts at the last byte
    # or at set_idle_timeout, never at the connection's opening).
    recs, port = _serve(reactor)
    client = _connect(reactor, port)
    run_until(reactor, lambda: recs, TIMEOUT)
    for _ in range(5):  # 0.5 s of traffic, longer than the timeout set below
        client.transport.write(b"tick")
        wait(reactor, asyncio.sleep(0.1), TIMEOUT)
    run_until(reactor, lambda: recs[0].received == b"tick" * 5, TIMEOUT)
    start = time.monotonic()
    recs[0].transport.set_idle_timeout(0.3)
    wait(reactor, asyncio.sleep(0.15), TIMEOUT)
    assert not recs[0].lost.done(), "closed at once: the idle clock started at the opening"
    exc = wait(reactor, recs[0].lost, TIMEOUT)
    assert isinstance(exc, IdleTimeout)
    assert 0.3 <= time.monotonic() - start < 1.5


def test_server_lifetime_closes_busy_connection(reactor: Reactor) -> None:
    recs, port = _serve(reactor, lifetime=0.3)
    client = _connect(reactor, port)
    start = time.monotonic()

    def chatter() -> None:
        if not client.transport.is_closing():
            client.transport.write(b"busy")
            reactor.call_later(0.02, chatter)

    chatter()
    run_until(reactor, lambda: recs, TIMEOUT)
    deadline = recs[0].transport.get_deadline()
    assert deadline is not None and deadline <= reactor.time() + 0.3
    exc = wait(reactor, recs[0].lost, TIMEOUT)
    assert isinstance(exc, DeadlineExceeded)
    assert reactor.time() >= deadline
    assert 0.28 <= time.monotonic() - start < 1.5
    assert recs[0].sequence() == ["made", "data", "lost:DeadlineExceeded"]


def test_transport_deadline_and_idle_on_client(reactor: Reactor) -> None:
    _, port = _serve(reactor)
    deadline = reactor.time() + 0.2
    client = _connect(reactor, port, deadline=deadline)
    assert client.transport.get_deadline() == deadline
    exc = wait(reactor, client.lost, TIMEOUT)
    assert isinstance(exc, DeadlineExceeded)
    assert reactor.time() >= deadline
    assert client.sequence() == ["made", "lost:DeadlineExceeded"]
    other = _connect(reactor, port)
    assert other.transport.get_idle_timeout() is None
    other.transport.set_idle_timeout(0.15)
    assert other.transport.get_idle_timeout() == 0.15
    exc = wait(reactor, other.lost, TIMEOUT)
    assert isinstance(exc, IdleTimeout)
    with pytest.raises(ValueError, match="positive"):
        other.transport.set_idle_timeout(0)
    with pytest.raises(ValueError, match="positive"):
        _connect(reactor, port, idle_timeout=-1)


def test_clearing_limits_keeps_connection_open(reactor: Reactor) -> None:
    recs, port = _serve(reactor, idle_timeout=0.1, lifetime=0.2)
    for attempt in range(5):
        client = _connect(reactor, port)
        run_until(reactor, lambda: len(recs) > attempt, TIMEOUT)  # noqa: B023
        rec = recs[attempt]
        rec.transport.set_idle_timeout(None)
        rec.transport.set_deadline(None)
        if not rec.transport.is_closing():
            break
        # A loaded machine let the 0.1 s limit pass before it could be cleared.
    else:
        pytest.fail("five connections in a row reached their limit before it was cleared")
    assert rec.transport.get_idle_timeout() is None
    assert rec.transport.get_deadline() is None
    wait(reactor, asyncio.sleep(0.3), TIMEOUT)
    assert not rec.lost.done() and not client.lost.done()
    # The connection still works after its limits were cleared.
    client.transport.write(b"still open")
    run_until(reactor, lambda: rec.received == b"still open", TIMEOUT)
