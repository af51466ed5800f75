"""The completion strategy on io_uring: choice, the ring protocol, pausing, buffers, closing."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from iomux import Trigger
from iomux.reactor import Reactor
from iomux.reactor.completion import CompletionStrategy, CompletionUnsupported
from iomux.reactor.completion_transport import CompletionTransport
from iomux.reactor.testing import Recorder, collect_errors

TIMEOUT = 10.0


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor("io_uring", strategy="completion")
    try:
        yield r
    finally:
        r.close()


def run_until(reactor: Reactor, cond: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        reactor.run_once(0.01)


def serve(reactor: Reactor, **opts: Any) -> tuple[list[Recorder], int]:
    recs: list[Recorder] = []

    def factory() -> Recorder:
        recs.append(Recorder(reactor, **opts))
        return recs[-1]

    server = reactor.create_server(factory, "127.0.0.1", 0)
    return recs, server.port()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- choosing the strategy ------------------------------------------------------------


def test_completion_is_the_default_where_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMUX_IO", raising=False)
    with Reactor("io_uring") as r:
        assert isinstance(r.strategy, CompletionStrategy)
    with Reactor("epoll") as r:
        assert r.strategy.name == "readiness"
    with Reactor("io_uring", strategy="readiness") as r:
        assert r.strategy.name == "readiness"
    with Reactor("io_uring", trigger=Trigger.EDGE) as r:  # a trigger means readiness
        assert r.strategy.name == "readiness" and r.strategy.trigger is Trigger.EDGE  # type: ignore[attr-defined]
    monkeypatch.setenv("IOMUX_IO", "readiness")
    with Reactor("io_uring") as r:
        assert r.strategy.name == "readiness"
    monkeypatch.setenv("IOMUX_IO", "completion")
    with Reactor("io_uring") as r:
        assert r.strategy.name == "completion"


def test_forcing_completion_where_it_cannot_run_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(CompletionUnsupported, match="epoll driver declares no capability"):
        Reactor("epoll", strategy="completion")
    with pytest.raises(ValueError, match="readiness strategy only"):
        Reactor("io_uring", strategy="completion", trigger=Trigger.LEVEL)
    with pytest.raises(ValueError, match="one of auto, readiness, completion"):
        Reactor("io_uring", strategy="fastest")
    monkeypatch.setenv("IOMUX_IO", "sideways")
    with pytest.raises(ValueError, match="IOMUX_IO='sideways'"):
        Reactor("io_uring")
    with pytest.raises(ValueError, match="power of two"):
        Reactor("io_uring", strategy=lambda r: CompletionStrategy(r, buffers=3))


def test_serve_io_option() -> None:
    for io, expect in [(None, "completion I/O"), ("readiness", "readiness I/O")]:
        extra = [] if io is None else ["--io", io]
        cmd = [sys.executable, "-m", "iomux", "serve", "echo", "--backend", "io_uring"]
        env = {k: v for k, v in os.environ.items() if k != "IOMUX_IO"}
        proc = subprocess.Popen(
            [*cmd, "--port", "0", *extra], stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert expect in line, line
            port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"ping")
                assert c.recv(10) == b"ping"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()
            proc.wait()


# --- operations on the ring ---------------------------------------------------------------


def test_connections_use_ring_operations_not_registrations(reactor: Reactor) -> None:
    strategy = reactor.strategy
    assert isinstance(strategy, CompletionStrategy)
    base = len(strategy.handlers)
    recs, port = serve(reactor, echo=True)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        c.sendall(b"over the ring")
        c.settimeout(TIMEOUT)
        run_until(reactor, lambda: recs and recs[0].received == b"over the ring")
        run_until(reactor, lambda: recs[0].transport.get_write_buffer_size() == 0)
        assert c.recv(100) == b"over the ring"
        assert isinstance(recs[0].transport, CompletionTransport)
        assert len(reactor.multiplexer) == 0  # nothing registered for readiness
        assert len(strategy.handlers) == base + 2 + 4  # the listener's and the connection's
        assert recs[0].transport.get_extra_info("peername") == c.getsockname()
    run_until(reactor, lambda: recs[0].lost.done())
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
    run_until(reactor, lambda: len(strategy.handlers) == base + 2)
    assert not strategy.dying


def test_writes_in_one_iteration_become_one_send(reactor: Reactor) -> None:
    rec = Recorder(reactor)
    a, peer = socket.socketpair()
    transport, _ = reactor.connect_accepted_socket(lambda: rec, a)
    ring = reactor.strategy.ring  # type: ignore[attr-defined]
    with peer:
        queued = ring.pending
        transport.write(b"one ")
        transport.write(bytearray(b"two "))
        transport.writelines([b"three ", memoryview(b"four")])
        assert ring.pending == queued + 1  # one SEND record; the rest waits for it
        assert transport.get_write_buffer_size() == 18
        run_until(reactor, lambda: transport.get_write_buffer_size() == 0)
        got = b""
        peer.settimeout(TIMEOUT)
        while len(got) < 18:
            got += peer.recv(100)
        assert got == b"one two three four"


def test_receives_survive_running_out_of_buffers() -> None:
    """Two 64-byte buffers for 256 KiB: the multishot receive ends with ENOBUFS and is re-armed."""
    reactor = Reactor(
        "io_uring", strategy=lambda r: CompletionStrategy(r, buffers=2, buffer_size=64)
    )
    enobufs: list[int] = []
    strategy = reactor.strategy
    complete = strategy.complete

    def counting(batch: list[tuple[int, int, int]]) -> None:
        enobufs.extend(1 for _, res, _ in batch if res == -errno.ENOBUFS)
        complete(batch)

    strategy.complete = counting  # type: ignore[method-assign]
    try:
        recs, port = serve(reactor)
        payload = os.urandom(256 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            run_until(reactor, lambda: recs and recs[0].lost.done())
        assert bytes(recs[0].received) == payload
        assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
        assert enobufs, "the group never ran dry: the re-arm path was not exercised"
    finally:
        reactor.close()


# --- pausing --------------------------------------------------------------------------------


def test_pause_cancels_the_receive_and_resume_delivers_in_order(reactor: Reactor) -> None:
    paused_calls: list[int] = []

    def pause_on_first(rec: Recorder, data: bytes) -> None:
        if len(rec.events) == 2:  # made, data
            rec.transport.pause_reading()

    recs, port = serve(reactor, on_data=pause_on_first)
    payload = os.urandom(200 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        c.sendall(payload[:1000])
        run_until(reactor, lambda: recs and recs[0].received)
        transport = recs[0].transport
        assert not transport.is_reading()
        c.sendall(payload[1000:])
        c.shutdown(socket.SHUT_WR)
        seen = len(recs[0].events)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            reactor.run_once(0.01)
            paused_calls.append(len(recs[0].events) - seen)
        assert set(paused_calls) == {0}, "data_received was called while paused"
        assert transport._recv_state == 0  # the multishot receive was cancelled
        transport.resume_reading()
        run_until(reactor, lambda: recs[0].lost.done())
    assert bytes(recs[0].received) == payload
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]


def test_end_of_stream_while_paused_comes_after_the_held_data(reactor: Reactor) -> None:
    recs, port = serve(reactor, on_made=lambda r: r.transport.pause_reading())
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        run_until(reactor, lambda: recs)
        c.sendall(b"before the end")
        c.shutdown(socket.SHUT_WR)
        for _ in range(20):
            reactor.run_once(0.01)
        assert recs[0].events == ["made"]
        recs[0].transport.resume_reading()
        run_until(reactor, lambda: recs[0].lost.done())
    assert bytes(recs[0].received) == b"before the end"
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]


# --- closing --------------------------------------------------------------------------------


def test_abort_keeps_the_fd_until_its_operations_completed(reactor: Reactor) -> None:
    """The fd number cannot be reused while a send or receive of the old connection is live."""
    errors = collect_errors(reactor)
    recs, port = serve(reactor)
    strategy = reactor.strategy
    assert isinstance(strategy, CompletionStrategy)
    base = len(strategy.handlers)
    c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    run_until(reactor, lambda: recs)
    transport = recs[0].transport
    fd = transport.get_extra_info("socket").fileno()
    transport.write(b"z" * (16 << 20))  # the peer does not read: the send stays in flight
    for _ in range(5):
        reactor.run_once(0.01)
    assert transport.get_write_buffer_size() > 0
    transport.abort()
    assert fd_open(fd) and strategy.dying  # cancelled, not closed yet
    with socket.socket() as fresh:
        assert fresh.fileno() != fd
    run_until(reactor, lambda: not strategy.dying)
    assert not fd_open(fd)
    assert len(strategy.handlers) == base
    # The reset reaches the peer; a new connection (maybe on the old fd number) works.
    with pytest.raises(ConnectionResetError):
        while c.recv(1 << 20):
            pass
    c.close()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as d:
        d.sendall(b"next")
        run_until(reactor, lambda: len(recs) == 2 and recs[1].received == b"next")
    assert recs[0].sequence() == ["made", "lost:None"]
    assert errors == []


def test_reactor_close_closes_sockets_awaiting_cancellation() -> None:
    reactor = Reactor("io_uring", strategy="completion")
    recs, port = serve(reactor)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        run_until(reactor, lambda: recs)
        fd = recs[0].transport.get_extra_info("socket").fileno()
        dying = reactor.strategy.dying  # type: ignore[attr-defined]
        recs[0].transport.abort()
        assert fd_open(fd) and dying
        reactor.close()
        assert not fd_open(fd)
        c.settimeout(TIMEOUT)
        assert c.recv(10) == b""


def test_fileno_after_operations_started_is_refused(reactor: Reactor) -> None:
    serve(reactor)
    with pytest.raises(RuntimeError, match=r"before creating servers"):
        reactor.fileno()


# --- protocols ------------------------------------------------------------------------------


class SmallBuffers(asyncio.BufferedProtocol):
    """A BufferedProtocol with a 10-byte buffer that pauses after the first fill."""

    def __init__(self) -> None:
        self.buf = bytearray(10)
        self.got = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.got += self.buf[:nbytes]
        if len(self.got) == 10:
            self.transport.pause_reading()


def test_buffered_protocol_with_small_buffers_and_a_pause(reactor: Reactor) -> None:
    proto = SmallBuffers()
    a, peer = socket.socketpair()
    transport, _ = reactor.connect_accepted_socket(lambda: proto, a)
    payload = bytes(range(256)) * 4
    with peer:
        peer.sendall(payload)
        run_until(reactor, lambda: len(proto.got) >= 10)
        for _ in range(5):
            reactor.run_once(0.01)
        assert len(proto.got) == 10  # the rest of that receive is held
        transport.resume_reading()
        run_until(reactor, lambda: len(proto.got) == len(payload))
    assert bytes(proto.got) == payload


def test_peer_reset_during_bulk_receive_is_always_seen() -> None:
    """The multishot receive can miss a reset's wake-up; the guard poll restarts it."""
    for _ in range(25):
        reactor = Reactor("io_uring", strategy="completion")
        try:
            assert isinstance(_reset_mid_transfer(reactor), ConnectionResetError)
        finally:
            reactor.close()


def _reset_mid_transfer(reactor: Reactor) -> BaseException | None:
    """The server answers 8 MiB and aborts at once; return the client's connection_lost."""
    big = b"x" * (8 << 20)

    def reply_then_abort(rec: Recorder, data: bytes) -> None:
        rec.transport.write(big)
        rec.transport.abort()  # unsent data dropped: the peer is reset

    _, port = serve(reactor, on_data=reply_then_abort)
    client = Recorder(reactor, on_made=lambda r: r.transport.write(b"go"))
    reactor.run_until_complete(
        reactor.create_connection(lambda: client, "127.0.0.1", port), timeout=TIMEOUT
    )
    return reactor.run_until_complete(client.lost, timeout=5.0)
