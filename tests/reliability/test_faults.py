"""Faults on every backend: the kernel says no, peers vanish, signals interrupt, callbacks raise.

Each scenario checks the reactor's own accounting afterwards: no error
reported that should not be, the connection's registration and fd gone,
and the reactor still serving other connections.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from factories import keeping
from relsupport import close_loop, record, reset_close

from iomux import Multiplexer
from iomux.reactor import IdleTimeout, Reactor, Server
from iomux.reactor.readiness import ReadinessListener
from iomux.reactor.testing import Recorder, collect_errors

T = TypeVar("T")
TIMEOUT = 10.0


@pytest.fixture
def reactor(driver: type[Multiplexer]) -> Iterator[Reactor]:
    r = Reactor(driver)
    try:
        yield r
    finally:
        close_loop(r)


@pytest.fixture
def readiness(driver: type[Multiplexer]) -> Iterator[Reactor]:
    """A loop on readiness I/O, whose listener's accept() faults are injected into."""
    r = Reactor(driver, io="readiness")
    try:
        yield r
    finally:
        close_loop(r)


def wait(reactor: Reactor, awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout)

    return reactor.run_until_complete(bounded())


def serve(reactor: Reactor, factory: Any, **opts: Any) -> Server:
    return wait(reactor, reactor.create_server(factory, "127.0.0.1", 0, **opts))


def refusing_listener(reactor: Reactor, server: Server, flaky: Any) -> ReadinessListener:
    """Start ``server`` with ``flaky`` (wrapping its socket) in its listener's place."""
    wait(reactor, server.start_serving())
    listener = server._listeners[0]
    assert isinstance(listener, ReadinessListener)
    flaky._sock = listener._sock
    listener._sock = flaky
    return listener


def run_until(reactor: Reactor, cond: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        reactor.run_once(0.01)


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the kernel refuses accept() -----------------------------------------------------


class RefusingSocket:
    """A listening socket whose accept() fails with ``err`` until ``until``."""

    def __init__(self, sock: Any, err: int, until: float) -> None:
        self._sock = sock
        self.err = err
        self.until = until
        self.calls = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if time.monotonic() < self.until:
            raise OSError(self.err, os.strerror(self.err))
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("err", ["ENFILE", "ENOBUFS", "ENOMEM"])
def test_accept_out_of_resources_pauses_without_spinning_then_resumes(
    readiness: Reactor, driver: type[Multiplexer], err: str, caplog: pytest.LogCaptureFixture
) -> None:
    reactor = readiness
    errors = collect_errors(reactor)
    recs: list[Recorder] = []
    server = serve(
        reactor, keeping(recs, lambda: Recorder(reactor, echo=True)), start_serving=False
    )
    assert not server.is_serving()
    window = 0.4
    flaky = RefusingSocket(None, getattr(errno, err), time.monotonic() + window)
    listener = refusing_listener(reactor, server, flaky)
    client = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    client.sendall(b"waiting in the backlog")
    cpu0 = time.process_time()
    with caplog.at_level(logging.WARNING, logger="iomux.reactor"):
        while time.monotonic() < flaky.until:
            reactor.run_once(flaky.until - time.monotonic())
    cpu = time.process_time() - cpu0
    refused = flaky.calls
    assert not recs, "accepted while accept() was failing"
    run_until(reactor, lambda: len(recs) == 1 and len(recs[0].received) == 22)
    assert client.recv(100) == b"waiting in the backlog"
    client.close()
    record(f"accept_{err}", driver.name, window_s=window, accept_calls=refused, cpu_s=round(cpu, 3))
    # Back-off of 100 ms: about 4 attempts in the window, not a spin.
    assert 2 <= refused <= 9, refused
    assert cpu < 0.15, cpu
    assert errors == []
    assert sum("pausing accepts" in r.getMessage() for r in caplog.records) == 1
    assert 2 <= listener.backoff.pauses <= 9, listener.backoff.pauses


def test_aborted_connection_in_backlog_is_skipped(readiness: Reactor) -> None:
    reactor = readiness
    errors = collect_errors(reactor)
    recs: list[Recorder] = []
    server = serve(
        reactor, keeping(recs, lambda: Recorder(reactor, echo=True)), start_serving=False
    )
    flaky = RefusingSocket(None, errno.ECONNABORTED, 0.0)
    real_accept = flaky.accept
    aborted = [3]

    def accept() -> tuple[socket.socket, Any]:
        if aborted[0]:
            aborted[0] -= 1
            raise ConnectionAbortedError(errno.ECONNABORTED, "aborted")
        return real_accept()

    flaky.accept = accept  # type: ignore[method-assign]
    listener = refusing_listener(reactor, server, flaky)
    client = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    client.sendall(b"x")
    t0 = time.monotonic()
    run_until(reactor, lambda: len(recs) == 1 and recs[0].received == b"x")
    assert time.monotonic() - t0 < 0.5  # skipped at once, no back-off
    assert errors == [] and aborted == [0] and listener.backoff.pauses == 0
    client.close()


# --- peers that vanish, reset or half-close ---------------------------------------------

VANISHING_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    got = 0
    while got < 100_000:
        got += len(s.recv(65536))
    print("reading stopped", flush=True)
    time.sleep(60)
    """
)


def test_peer_killed_mid_write(reactor: Reactor, driver: type[Multiplexer]) -> None:
    errors = collect_errors(reactor)
    big = os.urandom(8 << 20)
    recs: list[Recorder] = []

    def made(rec: Recorder) -> None:
        if rec is recs[0]:
            rec.transport.write(big)

    server = serve(reactor, keeping(recs, lambda: Recorder(reactor, on_made=made)))
    base = len(reactor.multiplexer)
    proc = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, str(server.port())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        line = ""
        deadline = time.monotonic() + TIMEOUT
        while not line and time.monotonic() < deadline:
            reactor.run_once(0.01)
            line = proc.stdout.readline()
        assert line == "reading stopped\n"
        rec = recs[0]
        fd = rec.transport.get_extra_info("socket").fileno()
        for _ in range(20):
            reactor.run_once(0.005)
        pending = rec.transport.get_write_buffer_size()
        assert pending > 0, "the server's write should still be in progress"
        assert len(reactor.connections) == 1
        proc.kill()  # the peer vanishes with unread data: its kernel resets
        run_until(reactor, lambda: rec.lost.done())
    finally:
        proc.kill()
        proc.wait()
    assert isinstance(rec.lost_exc, ConnectionError), rec.lost_exc
    assert errors == [], errors  # a peer going away is not the server's error
    assert len(reactor.multiplexer) == base
    assert not server.connections and not reactor.connections
    # The fd goes too: at once (readiness), or once the completion port reported
    # that no operation of the connection is left in the kernel (an iteration on).
    run_until(reactor, lambda: not fd_open(fd), timeout=2.0)
    record("peer_killed_mid_write", driver.name, buffered_when_killed=pending,
           lost=type(rec.lost_exc).__name__)  # fmt: skip
    # The server goes on.
    c = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    run_until(reactor, lambda: len(recs) == 2 and recs[1].made.done())
    recs[1].transport.write(b"still here")
    run_until(reactor, lambda: recs[1].transport.get_write_buffer_size() == 0)
    assert c.recv(100) == b"still here"
    c.close()


def test_write_after_peer_reset_is_epipe_not_a_crash(reactor: Reactor) -> None:
    errors = collect_errors(reactor)
    recs: list[Recorder] = []
    server = serve(reactor, keeping(recs, lambda: Recorder(reactor)))
    base = len(reactor.multiplexer)
    c = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    run_until(reactor, lambda: len(recs) == 1 and recs[0].made.done())
    reset_close(c)
    time.sleep(0.05)  # the RST has arrived; the reactor has not looked yet
    t = recs[0].transport
    t.write(b"a" * 1000)  # send() meets ECONNRESET or EPIPE
    t.write(b"b" * 1000)  # the transport is closing: dropped, no raise
    run_until(reactor, lambda: recs[0].lost.done())
    assert isinstance(recs[0].lost_exc, (BrokenPipeError, ConnectionResetError))
    assert errors == [] and len(reactor.multiplexer) == base


def test_half_closed_peer_still_gets_a_large_reply(reactor: Reactor) -> None:
    errors = collect_errors(reactor)
    reply = os.urandom(4 << 20)
    recs: list[Recorder] = []

    def on_eof(rec: Recorder) -> None:
        rec.transport.write(reply)
        rec.transport.close()  # after the buffer is flushed

    server = serve(reactor, keeping(recs, lambda: Recorder(reactor, keep_open=True, on_eof=on_eof)))
    c = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    c.sendall(b"request")
    c.shutdown(socket.SHUT_WR)
    c.setblocking(False)
    got = bytearray()
    eof = False
    deadline = time.monotonic() + TIMEOUT
    while not eof and time.monotonic() < deadline:
        reactor.run_once(0.001)
        try:
            while chunk := c.recv(1 << 20):
                got += chunk
            eof = True
        except BlockingIOError:
            pass
    c.close()
    assert eof and got == reply
    assert recs[0].received == b"request"
    run_until(reactor, lambda: recs[0].lost.done())
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
    assert errors == []


# --- protocol callbacks that raise -----------------------------------------------------


class Boom(Exception):
    """The failure a protocol callback raises."""


class Raiser(asyncio.BufferedProtocol):
    """An echo protocol whose callback named ``bad`` raises :class:`Boom`."""

    def __init__(self, bad: str, reactor: Reactor) -> None:
        self.bad = bad
        self.buf = bytearray(65536)
        self.transport: Any = None
        self.lost: Any = reactor.create_future()

    def _maybe(self, name: str) -> None:
        if name == self.bad:
            raise Boom(name)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=16_384)
        transport.write(b"\0" * PAYLOAD)  # more than the kernel takes at once: pause, resume
        self._maybe("connection_made")

    def get_buffer(self, sizehint: int) -> bytearray:
        self._maybe("get_buffer")
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self._maybe("buffer_updated")
        self.transport.write(bytes(self.buf[:nbytes]))

    def eof_received(self) -> bool:
        self._maybe("eof_received")
        return False

    def pause_writing(self) -> None:
        self._maybe("pause_writing")

    def resume_writing(self) -> None:
        self._maybe("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self._maybe("connection_lost")


#: What a Raiser writes on connection_made: more than loopback socket buffers hold.
PAYLOAD = 8 << 20
#: Callbacks after which the connection is closed (the others are reported only).
#: connection_made runs as a loop callback of its own (as in asyncio), so its
#: exception is reported like any callback's and the connection carries on.
FATAL = {"get_buffer", "buffer_updated", "eof_received"}
CALLBACKS = sorted(
    FATAL | {"connection_made", "pause_writing", "resume_writing", "connection_lost"}
)


@pytest.mark.parametrize("bad", CALLBACKS)
def test_raising_callback_is_reported_and_only_its_connection_suffers(
    reactor: Reactor, bad: str
) -> None:
    errors = collect_errors(reactor)
    protos: list[asyncio.BaseProtocol] = []

    def factory() -> asyncio.BaseProtocol:
        protos.append(Raiser(bad, reactor) if not protos else Recorder(reactor, echo=True))
        return protos[-1]

    server = serve(reactor, factory)
    victim = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    run_until(reactor, lambda: len(protos) == 1)
    bystander = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
    run_until(reactor, lambda: len(protos) == 2)
    victim.setblocking(False)
    got = 0
    ended: str | None = None
    deadline = time.monotonic() + TIMEOUT

    def pump() -> None:
        nonlocal got, ended
        try:
            while data := victim.recv(65536):
                got += len(data)
            ended = "eof"
        except BlockingIOError:
            pass
        except ConnectionError:
            ended = "reset"

    while got < PAYLOAD and ended is None and time.monotonic() < deadline:
        reactor.run_once(0.005)
        pump()
    if ended is None:
        victim.sendall(b"ping")
        victim.shutdown(socket.SHUT_WR)
        t_end = time.monotonic() + TIMEOUT
        while ended is None and time.monotonic() < t_end:
            reactor.run_once(0.005)
            pump()
    victim.close()
    raiser = protos[0]
    assert isinstance(raiser, Raiser)
    run_until(reactor, lambda: raiser.lost.done() and (bad != "connection_lost" or errors))
    # Reported once, through the exception handler, with the exception itself.
    booms = [e for e in errors if isinstance(e.get("exception"), Boom)]
    assert len(booms) == 1 and str(booms[0]["exception"]) == bad, errors
    assert bad in booms[0]["message"]
    assert len(errors) == 1, errors
    if bad in FATAL:
        assert ended in ("eof", "reset")
        assert isinstance(raiser.lost.result(), Boom)
    else:
        # The connection carried on: the whole payload and the echo arrived.
        assert got == PAYLOAD + 4 and ended == "eof", (got, ended)
    # The other connection never noticed.
    bystander.sendall(b"unaffected")
    echo = protos[1]
    assert isinstance(echo, Recorder)
    run_until(reactor, lambda: echo.received == b"unaffected")
    run_until(reactor, lambda: echo.transport.get_write_buffer_size() == 0)
    assert bystander.recv(100) == b"unaffected"
    bystander.close()


# --- EINTR storms -------------------------------------------------------------------------------


class SignalStorm:
    """SIGALRM every millisecond (setitimer), counted; the previous handler restored after."""

    def __enter__(self) -> SignalStorm:
        self.count = 0

        def handler(signum: int, frame: Any) -> None:
            self.count += 1

        self.old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self.old)


def test_signal_storm_never_ends_a_wait_early(reactor: Reactor, driver: type[Multiplexer]) -> None:
    fired: list[float] = []
    with SignalStorm() as storm:
        # A wait with nothing to do lasts its whole timeout.
        t0 = time.monotonic()
        reactor.run_once(0.25)
        idle_wait = time.monotonic() - t0
        # A timer fires at its time, not before.
        due = reactor.time() + 0.25
        reactor.call_at(due, lambda: fired.append(reactor.time()))
        run_until(reactor, lambda: bool(fired))
        # An idle timeout is not cut short either.
        recs: list[Recorder] = []
        server = serve(reactor, keeping(recs, lambda: Recorder(reactor)), idle_timeout=0.25)
        c = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
        run_until(reactor, lambda: len(recs) == 1)
        t1 = time.monotonic()
        run_until(reactor, lambda: recs[0].lost.done())
        idle = time.monotonic() - t1
        c.close()
    record("eintr_waits", driver.name, signals=storm.count)
    assert idle_wait >= 0.25, idle_wait
    assert fired[0] >= due
    assert isinstance(recs[0].lost_exc, IdleTimeout) and idle >= 0.24, idle
    assert storm.count >= 300, storm.count  # the storm really blew


STORM_CLIENT = textwrap.dedent(
    """
    import hashlib, selectors, signal, socket, sys
    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    size = int(sys.argv[2])
    blob = hashlib.shake_256(b"iomux").digest(size)
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent, got = 0, hashlib.sha256()
    n = 0
    while n < size:
        for _, ev in sel.select(5):
            if ev & selectors.EVENT_WRITE and sent < size:
                try:
                    sent += s.send(blob[sent:sent + 262144])
                except BlockingIOError:
                    pass
                if sent == size:
                    sel.modify(s, selectors.EVENT_READ)
            if ev & selectors.EVENT_READ:
                data = s.recv(1 << 20)
                if not data:
                    break
                got.update(data)
                n += len(data)
    print(n, got.hexdigest(), hashlib.sha256(blob).hexdigest(), flush=True)
    """
)


def test_signal_storm_during_large_transfer(reactor: Reactor, driver: type[Multiplexer]) -> None:
    size = 16 << 20
    errors = collect_errors(reactor)
    recs: list[Recorder] = []
    server = serve(reactor, keeping(recs, lambda: Recorder(reactor, echo=True)))
    with SignalStorm() as storm:
        proc = subprocess.Popen(
            [sys.executable, "-c", STORM_CLIENT, str(server.port()), str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            run_until(reactor, lambda: bool(recs) and recs[0].lost.done(), timeout=60)
            out, _ = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
            proc.wait()
    n, got, want = out.split()
    record("eintr_transfer", driver.name, bytes=size, signals=storm.count)
    assert int(n) == size and got == want, "bytes lost, duplicated or reordered"
    assert len(recs[0].received) == size
    assert hashlib.sha256(recs[0].received).hexdigest() == want
    assert errors == []
    # The storm ran through the transfer (one signal per ms; a fast run of
    # the 32 MiB exchange takes about 100 ms).
    assert storm.count >= 20, storm.count
