"""Completion I/O on io_uring: how it is chosen, the completion port (``iomux.completion``)
driven by hand, and the loop's completion transports: pausing, buffers, closing, slots."""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from iomux import Trigger
from iomux import completion as C
from iomux.drivers import _uring as U
from iomux.drivers.io_uring import IoUringDriver
from iomux.reactor import CompletionUnsupported, Reactor
from iomux.reactor.completion import CompletionListener, CompletionStreamTransport
from iomux.reactor.readiness import ReadinessStreamTransport
from iomux.reactor.testing import Recorder, collect_errors

T = TypeVar("T")
TIMEOUT = 10.0


def close_loop(reactor: Reactor) -> None:
    """Abort what a test left open, then close the loop (no transport outlives it)."""
    if not reactor.is_closed():
        try:
            wait(reactor, reactor.shutdown(grace=0, drain=0))
        finally:
            reactor.close()


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor("io_uring", io="completion")
    try:
        yield r
    finally:
        close_loop(r)


def wait(reactor: Reactor, awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
    async def bounded() -> T:
        inner: Awaitable[T] = awaitable
        if asyncio.isfuture(awaitable):
            inner = asyncio.shield(awaitable)
        return await asyncio.wait_for(inner, timeout)

    return reactor.run_until_complete(bounded())


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

    server = wait(reactor, reactor.create_server(factory, "127.0.0.1", 0))
    return recs, server.port()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s kernel receive queue (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


# --- choosing the I/O ---------------------------------------------------------------


def test_completion_is_the_default_where_declared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMUX_IO", raising=False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backend": "io_uring"}, "completion"),
        ({"backend": "epoll"}, "readiness"),
        ({"backend": "io_uring", "io": "readiness"}, "readiness"),
        ({"backend": "io_uring", "io": "auto"}, "completion"),
        ({"backend": "io_uring", "trigger": Trigger.EDGE}, "readiness"),  # a trigger: readiness
    ]
    for kwargs, io in cases:
        r = Reactor(**kwargs)
        try:
            assert r.io == io, (kwargs, r)
            assert r.backend == kwargs["backend"]
        finally:
            r.close()
    for env, io in [
        ("readiness", "readiness"),
        ("completion", "completion"),
        ("auto", "completion"),
    ]:
        monkeypatch.setenv("IOMUX_IO", env)
        r = Reactor("io_uring")
        try:
            assert r.io == io, env
        finally:
            r.close()


def test_the_chosen_io_is_what_serves_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMUX_IO", raising=False)
    cases: list[tuple[dict[str, Any], type]] = [
        ({}, CompletionStreamTransport),
        ({"io": "readiness"}, ReadinessStreamTransport),
        ({"trigger": Trigger.EDGE}, ReadinessStreamTransport),
    ]
    for kwargs, kind in cases:
        r = Reactor("io_uring", **kwargs)
        try:
            a, b = socket.socketpair()
            transport, _ = wait(r, r.connect_accepted_socket(asyncio.Protocol, a))
            assert type(transport) is kind, (kwargs, transport)
            if kind is ReadinessStreamTransport:
                assert r.io == "readiness" and a.fileno() in r.multiplexer
            else:
                assert r.io == "completion" and len(r.multiplexer) == 0
            if "trigger" in kwargs:
                registration = r.multiplexer.get(a.fileno())
                assert registration is not None and registration.trigger is Trigger.EDGE
            transport.close()
            b.close()
        finally:
            close_loop(r)


def test_forcing_completion_where_it_cannot_run_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IOMUX_IO", raising=False)
    with pytest.raises(CompletionUnsupported, match="epoll driver declares no capability"):
        Reactor("epoll", io="completion")
    with pytest.raises(ValueError, match="readiness I/O only"):
        Reactor("io_uring", io="completion", trigger=Trigger.LEVEL)
    with pytest.raises(ValueError, match="one of auto, readiness, completion"):
        Reactor("io_uring", io="fastest")
    monkeypatch.setenv("IOMUX_IO", "sideways")
    with pytest.raises(ValueError, match="IOMUX_IO='sideways'"):
        Reactor("io_uring")
    # The port's provided buffers must be a power of two.
    ring = U.Ring()
    try:
        with pytest.raises(OSError) as info:
            ring.stream_port(buffers=3)
        assert info.value.errno == errno.EINVAL
    finally:
        ring.close()


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


# --- the completion port, driven by hand -----------------------------------------------


class Port:
    """``IoUringDriver().completion_port()``, polled by hand; events kept per slot."""

    def __init__(self, **options: Any) -> None:
        self.mux = IoUringDriver()
        if options:  # made before the driver asks for it: the driver uses this one
            self.mux.ring.stream_port(submitter=self.mux.submit, **options)
        self.port: Any = self.mux.completion_port()
        assert isinstance(self.port, C.CompletionPort)
        #: slot -> [(kind, res, bytes or offset)], in order.
        self.events: dict[int, list[tuple[int, int, Any]]] = {}

    def poll(self, timeout: float = 0.01) -> None:
        self.mux.poll(timeout)
        events, data = self.port.events()
        for slot, kind, res, off in events:
            value = bytes(data[off : off + res]) if kind == C.DATA else off
            self.events.setdefault(slot, []).append((kind, res, value))

    def kinds(self, slot: int, *, backlog: bool = False) -> list[int]:
        """The kinds of ``slot``'s events (BACKLOG, a flow-control report, only if asked)."""
        return [kind for kind, _, _ in self.events.get(slot, []) if backlog or kind != C.BACKLOG]

    def data(self, slot: int) -> bytes:
        return b"".join(v for kind, _, v in self.events.get(slot, []) if kind == C.DATA)

    def until(self, cond: Callable[[], object], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s: {self.events}")
            self.poll()

    def close(self) -> None:
        self.mux.close()


@pytest.fixture
def port() -> Iterator[Port]:
    p = Port()
    try:
        yield p
    finally:
        p.close()


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_port_receives_sends_and_closes_without_closing_the_fd(port: Port) -> None:
    a, b = pair()
    with a, b:
        s = port.port.open(a.fileno())
        b.sendall(b"before read")
        port.poll()
        assert port.kinds(s) == []  # nothing is received before read()
        port.port.read(s)
        port.until(lambda: port.data(s) == b"before read")
        for chunk in (b"one ", bytearray(b"two "), memoryview(b"three")):
            port.port.send(s, chunk)
        port.port.shutdown_write(s)
        b.settimeout(TIMEOUT)
        got = b""
        while len(got) < 13:
            port.poll()
            got += b.recv(100)
        assert got == b"one two three"
        port.until(lambda: port.port.sent(s) == 13)
        assert b.recv(10) == b""  # the half-close came after every byte
        b.sendall(b"answer")
        b.shutdown(socket.SHUT_WR)
        port.until(lambda: C.EOF in port.kinds(s))
        assert port.data(s) == b"before readanswer"
        port.port.close(s)
        port.until(lambda: C.CLOSED in port.kinds(s))
        assert port.kinds(s)[-2:] == [C.DRAINED, C.CLOSED]
        assert fd_open(a.fileno())  # the port never closes an fd: the caller does
        port.port.free(s)
        assert port.port.open(a.fileno()) == s  # a freed slot is given out again


def _receive_burst(buffers: int, buffer_size: int, size: int) -> tuple[list[int], list[int]]:
    """A peer sends ``size`` random bytes at once, then ends; a port of ``buffers``
    buffers of ``buffer_size`` receives them (checked whole and in order). Returns the
    sizes of its DATA events and the kinds of all its events."""
    port = Port(buffers=buffers, buffer_size=buffer_size)
    a, b = pair()
    try:
        s = port.port.open(a.fileno())
        port.port.read(s)
        port.poll(0)
        payload = random.Random(size).randbytes(size)
        sender = threading.Thread(target=lambda: (b.sendall(payload), b.shutdown(socket.SHUT_WR)))
        sender.start()
        port.until(lambda: C.EOF in port.kinds(s))
        sender.join(TIMEOUT)
        assert port.data(s) == payload
        return [res for kind, res, _ in port.events[s] if kind == C.DATA], port.kinds(s)
    finally:
        port.close()
        a.close()
        b.close()


def test_port_receives_survive_running_out_of_buffers() -> None:
    """Two 64-byte buffers for 256 KiB: the multishot receive runs dry again and again
    (ENOBUFS) and is re-armed each time; nothing is lost, duplicated or reordered."""
    sizes, kinds = _receive_burst(2, 64, 256 * 1024)
    # One event holds what one call received for the connection: with two
    # 64-byte buffers, a few hundred bytes (with the default ones, 64 KiB).
    assert len(sizes) >= 256 * 1024 // 1024, "the receives did not use the small buffers"
    assert kinds[-1] == C.EOF and C.ERROR not in kinds


def test_port_joins_a_connections_receives_of_one_call() -> None:
    """A burst that fills many 4 KiB buffers reaches Python as few events: the receives
    of one call for one connection come out as one, in order and whole."""
    sizes, _ = _receive_burst(512, 4096, 1 << 20)
    assert max(sizes) > 4096, sizes
    assert max(sizes) <= 64 * 1024  # at most 64 KiB per connection per call


def test_port_uses_incremental_buffers_where_the_kernel_has_them() -> None:
    """Kernel 6.12+ consumes provided buffers incrementally; iomux asks for it unless
    IOMUX_URING_DISABLE names it, and says so (``iomux info`` lists it too)."""
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    port = Port()
    try:
        if "incremental_buffers" in U.disabled_features():
            assert not port.port.incremental
        elif (major, minor) >= (6, 12):
            assert port.port.incremental, "kernel 6.12+ should grant IOU_PBUF_RING_INC"
    finally:
        port.close()


def test_port_uses_receive_bundles_with_whole_buffers_where_the_kernel_has_them() -> None:
    """Kernel 6.10+ lets one receive fill several provided buffers (bundles); iomux
    asks for them with whole buffers (incremental ones already take up to 64 KiB
    per receive) unless IOMUX_URING_DISABLE names them, and says so."""
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    for incremental in (True, False):
        port = Port(incremental=incremental)
        try:
            if port.port.incremental or "recv_bundles" in U.disabled_features():
                assert not port.port.bundles
            elif (major, minor) >= (6, 10):
                assert port.port.bundles, "kernel 6.10+ should take IORING_RECVSEND_BUNDLE"
        finally:
            port.close()
    port = Port()
    try:
        features = U.describe()["stream_features"]
        assert ("recv_bundles" in features) == port.port.bundles  # type: ignore[operator]
    finally:
        port.close()


@pytest.mark.parametrize("bundles", [True, False], ids=["bundles", "one-buffer-each"])
def test_port_bundles_fill_several_buffers_per_receive(bundles: bool) -> None:
    """4 MiB sent while the port does not poll, then received through 64 whole
    buffers of 4 KiB: with bundles a receive fills many buffers (fewer completions),
    without them one each; the bytes arrive whole and in order either way."""
    port = Port(buffers=64, buffer_size=4096, incremental=False, bundles=bundles)
    a, b = pair()
    try:
        if not bundles:
            assert not port.port.bundles
        elif not port.port.bundles:
            major, minor = (int(part) for part in platform.release().split(".")[:2])
            if (major, minor) >= (6, 10):
                pytest.fail("this kernel should take receive bundles (6.10+): see iomux info")
            pytest.skip(f"kernel {platform.release()} has no receive bundles (6.10+)")
        s = port.port.open(a.fileno())
        payload = random.Random(4).randbytes(4 << 20)
        sender = threading.Thread(target=lambda: (b.sendall(payload), b.shutdown(socket.SHUT_WR)))
        sender.start()
        time.sleep(0.05)  # the socket fills before the first receive
        port.port.read(s)
        port.until(lambda: C.EOF in port.kinds(s))
        sender.join(TIMEOUT)
        assert port.data(s) == payload
        assert C.ERROR not in port.kinds(s)
        receives, filled = port.port.receive_counts()
        assert filled >= (4 << 20) // 4096
        if bundles:
            assert filled >= 4 * receives, f"{filled} buffers in {receives} receives"
        else:
            assert filled == receives, f"{filled} buffers in {receives} receives"
        port.port.close(s)
        port.until(lambda: C.CLOSED in port.kinds(s))
    finally:
        port.close()
        a.close()
        b.close()


def test_port_does_not_bundle_incremental_buffers() -> None:
    """Bundles are not used with incremental buffers, even when asked for (each
    incremental receive already takes up to a whole buffer)."""
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    port = Port(buffers=8, buffer_size=16384, incremental=True, bundles=True)
    try:
        if (major, minor) >= (6, 12):
            assert port.port.incremental, "kernel 6.12+ should grant IOU_PBUF_RING_INC"
        if port.port.incremental:
            assert not port.port.bundles
    finally:
        port.close()


@pytest.mark.parametrize("bundles", [True, False], ids=["bundles", "one-buffer-each"])
@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "whole-buffers"])
def test_port_small_messages_of_many_connections_share_few_buffers(
    incremental: bool, bundles: bool
) -> None:
    """Sixteen peers send 200 messages of 1-300 bytes each, all at once, into four
    2 KiB buffers: with incremental buffers the connections' receives share a buffer
    at moving offsets (and a bundle's bytes run from one buffer into the next); every
    way, every connection gets its bytes whole and in order."""
    port = Port(buffers=4, buffer_size=2048, incremental=incremental, bundles=bundles)
    pairs = [pair() for _ in range(16)]
    try:
        if not incremental:
            assert not port.port.incremental
        slots = [port.port.open(a.fileno()) for a, _ in pairs]
        for s in slots:
            port.port.read(s)
        port.poll(0)
        rnd = random.Random(21)
        messages = [[rnd.randbytes(rnd.randint(1, 300)) for _ in range(200)] for _ in pairs]

        def send() -> None:
            for i in range(200):
                for (_, b), msgs in zip(pairs, messages, strict=True):
                    b.sendall(msgs[i])
            for _, b in pairs:
                b.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        port.until(lambda: all(C.EOF in port.kinds(s) for s in slots))
        sender.join(TIMEOUT)
        for s, msgs in zip(slots, messages, strict=True):
            assert port.data(s) == b"".join(msgs)
            assert C.ERROR not in port.kinds(s)
    finally:
        port.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_port_packed_events_are_the_events_as_records(port: Port) -> None:
    # The port's own view and the contract's default (which packs events())
    # give the same records: the C dispatcher reads either.
    a, b = pair()
    c, d = pair()
    with a, b, c, d:
        slots = {port.port.open(a.fileno()): b"one", port.port.open(c.fileno()): b"two"}
        for slot in slots:
            port.port.read(slot)
        for take in (C.CompletionPort.packed_events, type(port.port).packed_events):
            b.send(b"one")
            d.send(b"two")
            got: dict[int, bytes] = {}
            deadline = time.monotonic() + TIMEOUT
            while len(got) < 2 and time.monotonic() < deadline:
                port.mux.poll(0.01)
                records, data = take(port.port)
                assert len(records) % C.EVENT_RECORD.size == 0
                for slot, kind, res, off in C.EVENT_RECORD.iter_unpack(records):
                    assert kind == C.DATA
                    got[slot] = bytes(memoryview(data)[off : off + res])  # type: ignore[arg-type]
            assert got == slots, take
            assert port.port.events()[0] == ()  # taken by packed_events


def test_port_long_and_short_sends_keep_their_order(port: Port) -> None:
    """Sends shorter than stage_max go through the stage, longer ones are records that
    point at the caller's bytes: mixed, they reach the peer in the order sent."""
    a, b = pair()
    with a, b:
        s = port.port.open(a.fileno())
        rnd = random.Random(11)
        limit = port.port.stage_max
        pieces = [
            rnd.randbytes(n) for n in (10, limit, 3, limit - 1, 5 * limit, 1, limit + 1, 200_000, 7)
        ]
        for piece in pieces:
            buf = bytearray(piece)
            port.port.send(s, buf)
            buf[:] = b"x" * len(buf)  # the port took a copy of what was given
        expected = b"".join(pieces)
        got = bytearray()
        b.setblocking(False)
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(expected) and time.monotonic() < deadline:
            port.poll(0.001)
            try:
                got += b.recv(1 << 20)
            except BlockingIOError:
                pass
        assert bytes(got) == expected
        assert port.port.sent(s) == len(expected)


def test_port_pause_leaves_the_bytes_in_the_kernel(port: Port) -> None:
    a, b = pair()
    with a, b:
        s = port.port.open(a.fileno())
        port.port.read(s)
        b.sendall(b"first")
        port.until(lambda: port.data(s) == b"first")
        port.port.pause(s)
        for _ in range(3):
            port.poll()  # the receive's cancellation goes through
        before = len(port.events[s])
        b.sendall(b"x" * 50_000)
        for _ in range(10):
            port.poll()
            # Nobody takes them: the receive was cancelled, not just muted.
            assert unread(a) == 50_000
        assert len(port.events[s]) == before
        port.port.read(s)
        port.until(lambda: len(port.data(s)) == 50_005)
        assert port.data(s) == b"first" + b"x" * 50_000 and unread(a) == 0


def test_port_pause_and_read_racing_a_flood_lose_nothing(port: Port) -> None:
    """Pause and read again every iteration while the peer floods: each cancellation races
    a receive that is running (EALREADY) or done; every byte arrives once, in order."""
    a, b = pair()
    with a, b:
        s = port.port.open(a.fileno())
        port.port.read(s)
        payload = random.Random(9).randbytes(4 << 20)

        def send() -> None:  # in 8 KiB pieces, so that data keeps arriving all along
            for at in range(0, len(payload), 8192):
                b.sendall(payload[at : at + 8192])
                time.sleep(0.0002)
            b.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 30
        rounds = 0
        while C.EOF not in port.kinds(s) and time.monotonic() < deadline:
            port.port.pause(s)
            port.poll(0)
            port.port.read(s)
            port.poll(0.001)
            rounds += 1
        sender.join(TIMEOUT)
        assert C.EOF in port.kinds(s), f"no end of stream after {rounds} rounds"
        got = port.data(s)
        assert len(got) == len(payload) and got == payload
        assert rounds >= 50, rounds
        port.port.close(s, abort=True)
        port.until(lambda: C.CLOSED in port.kinds(s))


def test_port_abort_reports_closed_only_when_nothing_is_left_and_the_slot_is_reused(
    port: Port,
) -> None:
    a, b = pair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s = port.port.open(a.fileno())
    port.port.read(s)
    port.port.send(s, b"z" * (16 << 20))  # the peer does not read: the send stays in flight
    for _ in range(5):
        port.poll()
    assert 0 < port.port.sent(s) < 16 << 20
    # What the kernel did not take is reported, once, above the default 64 KiB.
    assert port.kinds(s, backlog=True) == [C.BACKLOG]
    assert port.events[s][0][1] == (16 << 20) - port.port.sent(s)
    port.port.close(s, abort=True)
    port.until(lambda: C.CLOSED in port.kinds(s))
    # CLOSED comes once, last, with no DRAINED (nothing was flushed).
    assert port.kinds(s, backlog=True) == [C.BACKLOG, C.CLOSED]
    old_fd = a.fileno()
    a.close()  # only now: nothing of the slot is left in the kernel
    b.setblocking(False)
    drained = 0
    try:
        while chunk := b.recv(1 << 20):
            drained += len(chunk)
    except BlockingIOError:
        pass
    assert drained < 16 << 20
    b.close()
    port.port.free(s)
    # A new connection, very likely on the same fd number, gets the same slot; no
    # completion of the old operations reaches it.
    c, d = pair()
    with c, d:
        assert old_fd in (c.fileno(), d.fileno())  # the old fd number is in use again
        assert port.port.open(c.fileno()) == s
        port.events.clear()
        port.port.read(s)
        d.sendall(b"next")
        port.until(lambda: port.data(s) == b"next")
        for _ in range(5):
            port.poll()
        assert port.kinds(s, backlog=True) == [C.DATA]
        port.port.close(s, abort=True)
        port.until(lambda: C.CLOSED in port.kinds(s))


def test_port_reports_sent_when_asked_and_errors_of_a_dead_peer(port: Port) -> None:
    a, b = pair()
    with a:
        b.setblocking(False)
        s = port.port.open(a.fileno())
        total = 4 << 20
        port.port.send(s, b"q" * total)
        port.port.notify_sent(s, total)
        for _ in range(5):
            port.poll()
        assert C.SENT not in port.kinds(s)  # the peer is not reading
        got = 0
        deadline = time.monotonic() + TIMEOUT
        while C.SENT not in port.kinds(s) and time.monotonic() < deadline:
            port.poll()
            try:
                while chunk := b.recv(1 << 20):
                    got += len(chunk)
            except BlockingIOError:
                pass
        assert port.kinds(s) == [C.SENT] and port.port.sent(s) == total
        assert port.kinds(s, backlog=True) == [C.BACKLOG, C.SENT]
        # The peer goes away: the next send fails with EPIPE, as an ERROR event.
        b.close()
        port.port.send(s, b"to nobody")
        port.until(lambda: C.ERROR in port.kinds(s))
        kind, res, what = port.events[s][-1]
        assert (kind, what) == (C.ERROR, C.FAILED_SEND)
        assert -res in (errno.EPIPE, errno.ECONNRESET), os.strerror(-res)
        port.port.close(s, abort=True)
        port.until(lambda: C.CLOSED in port.kinds(s))


def test_port_reports_a_reset_as_a_receive_error(port: Port) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        conn.setblocking(False)
        with conn:
            s = port.port.open(conn.fileno())
            port.port.read(s)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            client.close()
            port.until(lambda: C.ERROR in port.kinds(s))
            assert port.events[s] == [(C.ERROR, -errno.ECONNRESET, C.FAILED_RECV)]
            port.port.close(s, abort=True)
            port.until(lambda: C.CLOSED in port.kinds(s))


def test_port_listener_accepts_until_closed(port: Port) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    with listener:
        s = port.port.listen(listener.fileno())
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        port.until(lambda: port.kinds(s).count(C.ACCEPTED) == 3)
        fds = [res for kind, res, _ in port.events[s] if kind == C.ACCEPTED]
        for fd, client in zip(fds, clients, strict=True):
            assert not os.get_blocking(fd)  # accepted non-blocking
            conn = socket.socket(fileno=fd)
            assert conn.getpeername() == client.getsockname()
            conn.close()
            client.close()
        port.port.close(s)
        port.until(lambda: C.CLOSED in port.kinds(s))
        assert C.ACCEPT_END not in port.kinds(s)  # closing is not the accept's end
        assert fd_open(listener.fileno())


# --- the loop's completion transports -------------------------------------------------------


def test_connections_use_the_port_not_registrations(reactor: Reactor) -> None:
    errors = collect_errors(reactor)
    recs, port = serve(reactor, echo=True)
    assert len(reactor.multiplexer) == 0  # the listener accepts with the port
    slots = reactor._completion._slots  # type: ignore[union-attr]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        c.sendall(b"over the ring")
        run_until(reactor, lambda: recs and recs[0].received == b"over the ring")
        run_until(reactor, lambda: recs[0].transport.get_write_buffer_size() == 0)
        assert c.recv(100) == b"over the ring"
        transport = recs[0].transport
        assert isinstance(transport, CompletionStreamTransport)
        assert len(reactor.multiplexer) == 0  # nothing registered for readiness
        owners = [o for o in slots if o is not None]
        assert len(owners) == 2 and transport in owners
        assert any(isinstance(o, CompletionListener) for o in owners)
        assert transport.get_extra_info("peername") == c.getsockname()
        first_slot = transport._slot
    run_until(reactor, lambda: recs[0].lost.done())
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
    run_until(reactor, lambda: sum(o is not None for o in slots) == 1)
    # The next connection reuses the freed slot.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        c.sendall(b"again")
        run_until(reactor, lambda: len(recs) == 2 and recs[1].received == b"again")
        assert recs[1].transport._slot == first_slot
        assert c.recv(100) == b"again"
    run_until(reactor, lambda: recs[1].lost.done())
    assert errors == []


def test_writes_wait_for_the_next_poll_and_keep_their_order(reactor: Reactor) -> None:
    rec = Recorder(reactor)
    a, peer = socket.socketpair()
    transport, _ = wait(reactor, reactor.connect_accepted_socket(lambda: rec, a))
    peer.setblocking(False)
    with peer:
        transport.write(b"one ")
        transport.write(bytearray(b"two "))
        transport.writelines([b"three ", memoryview(b"four")])
        # No system call per write: nothing reached the socket yet.
        with pytest.raises(BlockingIOError):
            peer.recv(100)
        assert transport.get_write_buffer_size() == 18
        got = b""
        deadline = time.monotonic() + TIMEOUT
        while len(got) < 18 and time.monotonic() < deadline:
            reactor.run_once(0.01)
            try:
                got += peer.recv(100)
            except BlockingIOError:
                pass
        assert got == b"one two three four"
        run_until(reactor, lambda: transport.get_write_buffer_size() == 0)
        transport.close()


def test_receives_survive_running_out_of_buffers() -> None:
    """The loop on a port of two 64-byte buffers: 256 KiB arrive whole, in order."""
    mux = IoUringDriver()
    mux.ring.stream_port(buffers=2, buffer_size=64, submitter=mux.submit)
    reactor = Reactor(mux, io="completion")
    try:
        sizes: list[int] = []
        recs, port = serve(reactor, on_data=lambda r, d: sizes.append(len(d)))
        payload = os.urandom(256 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
            sender = threading.Thread(
                target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR))
            )
            sender.start()
            run_until(reactor, lambda: recs and recs[0].lost.done())
            sender.join(TIMEOUT)
        assert bytes(recs[0].received) == payload
        assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]
        assert len(sizes) >= len(payload) // 1024  # the two small buffers were used
    finally:
        close_loop(reactor)


def test_pause_cancels_the_receive_and_resume_delivers_in_order(reactor: Reactor) -> None:
    def pause_on_first(rec: Recorder, data: bytes) -> None:
        if len(rec.events) == 2:  # made, data
            rec.transport.pause_reading()

    recs, port = serve(reactor, on_data=pause_on_first)
    payload = os.urandom(200 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        c.sendall(payload[:1000])
        run_until(reactor, lambda: recs and len(recs[0].received) == 1000)
        transport = recs[0].transport
        assert not transport.is_reading()
        for _ in range(5):
            reactor.run_once(0.01)  # the pause reaches the kernel
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        with sock:
            c.sendall(payload[1000:])  # more than the server's receive buffer holds
            c.shutdown(socket.SHUT_WR)
            seen = len(recs[0].events)
            reactor.run_once(0.05)
            waiting = unread(sock)
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                reactor.run_once(0.01)
                assert len(recs[0].events) == seen, "data_received was called while paused"
            # The receive was cancelled: the bytes wait in the kernel, untouched
            # (more may still arrive from the sender, none leaves).
            assert waiting > 64 * 1024 and unread(sock) >= waiting
        transport.resume_reading()
        run_until(reactor, lambda: recs[0].lost.done())
    assert bytes(recs[0].received) == payload
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]


def test_end_of_stream_while_paused_comes_after_the_held_data(reactor: Reactor) -> None:
    recs, port = serve(reactor, on_made=lambda r: r.transport.pause_reading())
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
        run_until(reactor, lambda: recs and recs[0].made.done())
        c.sendall(b"before the end")
        c.shutdown(socket.SHUT_WR)
        for _ in range(20):
            reactor.run_once(0.01)
        assert recs[0].events == ["made"]
        recs[0].transport.resume_reading()
        run_until(reactor, lambda: recs[0].lost.done())
    assert bytes(recs[0].received) == b"before the end"
    assert recs[0].sequence() == ["made", "data", "eof", "lost:None"]


def test_abort_keeps_the_fd_until_its_operations_completed(reactor: Reactor) -> None:
    """The fd is closed only once the port reported the slot CLOSED, so its number
    cannot be reused while a send or receive of the old connection is live."""
    errors = collect_errors(reactor)
    recs, port = serve(reactor)
    c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    run_until(reactor, lambda: recs and recs[0].made.done())
    transport = recs[0].transport
    sock = transport.get_extra_info("socket")
    fd = sock.fileno()
    transport.write(b"z" * (16 << 20))  # the peer does not read: the send stays in flight
    for _ in range(5):
        reactor.run_once(0.01)
    assert transport.get_write_buffer_size() > 0
    transport.abort()
    assert fd_open(fd)
    deadline = time.monotonic() + TIMEOUT
    while sock.fileno() != -1:
        assert time.monotonic() < deadline, "the socket was never closed"
        reactor.run_once(0.01)
        # Open for as long as the port has not reported the slot CLOSED.
        assert sock.fileno() != -1 or transport._slot_closed
    assert recs[0].lost.done() and not fd_open(fd)
    # The reset reaches the peer; a new connection (maybe on the old fd number) works.
    with pytest.raises(ConnectionResetError):
        while c.recv(1 << 20):
            pass
    c.close()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as d:
        d.sendall(b"next")
        run_until(reactor, lambda: len(recs) == 2 and recs[1].received == b"next")
        assert recs[1].transport._slot == transport._slot  # the slot was given out again
    assert recs[0].sequence() == ["made", "lost:None"]
    assert errors == []


@pytest.mark.parametrize("how", ["abort", "drain"])
def test_loop_close_closes_sockets_awaiting_their_slot(how: str) -> None:
    """connection_lost ran, the port has not reported the slot CLOSED yet: closing the
    loop (and its ring) must close the socket; nothing can use its fd any more."""
    reactor = Reactor("io_uring", io="completion")
    try:
        recs, port = serve(reactor)
        c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        run_until(reactor, lambda: recs and recs[0].made.done())
        transport = recs[0].transport
        fd = transport.get_extra_info("socket").fileno()
        transport.write(b"z" * (8 << 20))
        reader = None
        if how == "abort":
            transport.abort()
        else:
            transport.close()  # flushed first: the peer reads everything

            def read_all() -> None:
                got = 0
                while got < 8 << 20:
                    got += len(c.recv(1 << 20))

            reader = threading.Thread(target=read_all)
            reader.start()
        while not recs[0].lost.done():
            reactor.run_once(0.01)
        if reader is not None:
            reader.join(TIMEOUT)
        reactor.close()
        assert not fd_open(fd), "the socket's fd outlived the loop"
        c.settimeout(TIMEOUT)
        try:
            while c.recv(1 << 20):
                pass
        except ConnectionResetError:
            assert how == "abort"
        c.close()
    finally:
        reactor.close()


AFTER_CLOSE = textwrap.dedent(
    """
    import asyncio, gc, socket, warnings
    from iomux.reactor import Reactor

    reactor = Reactor("io_uring", io="completion")
    a, b = socket.socketpair()
    transport, _ = reactor.run_until_complete(
        reactor.connect_accepted_socket(asyncio.Protocol, a)
    )
    transport.write(b"x")  # never sent: the loop does not run again
    reactor.close()
    print(transport.get_write_buffer_size(), "fd=" in repr(transport))
    del transport
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # __del__ warns with the transport's repr
    print("collected")
    """
)


def test_a_transport_that_outlives_its_loop_is_safe_to_look_at() -> None:
    """repr(), get_write_buffer_size() and the ResourceWarning of a transport left open
    when its loop closed must not reach into the closed ring (run with MALLOC_PERTURB_,
    so that a read of freed memory fails every time)."""
    out = subprocess.run(
        [sys.executable, "-c", AFTER_CLOSE],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "MALLOC_PERTURB_": "165"},
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["1", "True", "collected"], out


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
    transport, _ = wait(reactor, reactor.connect_accepted_socket(lambda: proto, a))
    payload = bytes(range(256)) * 4
    with peer:
        peer.sendall(payload)
        run_until(reactor, lambda: len(proto.got) >= 10)
        for _ in range(5):
            reactor.run_once(0.01)
        assert len(proto.got) == 10  # the rest of that receive is held
        transport.resume_reading()
        run_until(reactor, lambda: len(proto.got) == len(payload))
        transport.close()
    assert bytes(proto.got) == payload


def test_peer_reset_during_bulk_receive_is_always_seen() -> None:
    """The multishot receive can miss a reset's wake-up; the guard poll restarts it."""
    for _ in range(25):
        reactor = Reactor("io_uring", io="completion")
        try:
            assert isinstance(_reset_mid_transfer(reactor), ConnectionResetError)
        finally:
            close_loop(reactor)


def _reset_mid_transfer(reactor: Reactor) -> BaseException | None:
    """The server answers 8 MiB and aborts at once; return the client's connection_lost."""
    big = b"x" * (8 << 20)

    def reply_then_abort(rec: Recorder, data: bytes) -> None:
        rec.transport.write(big)
        rec.transport.abort()  # unsent data dropped: the peer is reset

    _, port = serve(reactor, on_data=reply_then_abort)
    client = Recorder(reactor, on_made=lambda r: r.transport.write(b"go"))
    wait(reactor, reactor.create_connection(lambda: client, "127.0.0.1", port))
    return wait(reactor, client.lost, 5.0)
