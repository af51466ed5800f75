"""Slow and idle peers: slowloris clients are cut, clients that never read meet backpressure."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from factories import keeping
from relsupport import close_loop, record

from iomux import Multiplexer
from iomux.reactor import DeadlineExceeded, IdleTimeout, Reactor, Server
from iomux.reactor.testing import READ_SIZE, Recorder, collect_errors
from iomux.reactor.transport import HIGH_WATER

TIMEOUT = 10.0


@pytest.fixture
def reactor(driver: type[Multiplexer]) -> Iterator[Reactor]:
    r = Reactor(driver)
    try:
        yield r
    finally:
        close_loop(r)


def serve(reactor: Reactor, factory: Any, **opts: Any) -> Server:
    return reactor.run_until_complete(
        asyncio.wait_for(reactor.create_server(factory, "127.0.0.1", 0, **opts), TIMEOUT)
    )


def test_slowloris_cut_by_idle_timeout_and_deadline(
    reactor: Reactor, driver: type[Multiplexer]
) -> None:
    """Trickling clients reset the idle timer, so the deadline cuts them; silent ones go idle."""
    errors = collect_errors(reactor)
    idle, lifetime = 0.3, 0.8
    recs: list[Recorder] = []
    server = serve(
        reactor,
        keeping(recs, lambda: Recorder(reactor, echo=True)),
        idle_timeout=idle,
        lifetime=lifetime,
    )
    gc.collect()  # what earlier tests left for the collector is not this server's
    base_regs, base_fds = len(reactor.multiplexer), len(os.listdir("/proc/self/fd"))
    tricklers = [socket.create_connection(("127.0.0.1", server.port())) for _ in range(20)]
    silent = [socket.create_connection(("127.0.0.1", server.port())) for _ in range(5)]
    normal = socket.create_connection(("127.0.0.1", server.port()))
    for s in [*tricklers, *silent, normal]:
        s.setblocking(False)
    t0 = time.monotonic()
    gone: dict[socket.socket, float] = {}
    latencies: list[float] = []
    next_trickle = t0
    while len(gone) < len(tricklers) + len(silent) and time.monotonic() - t0 < TIMEOUT:
        reactor.run_once(0.005)
        now = time.monotonic()
        if now >= next_trickle:
            next_trickle = now + 0.1
            for s in tricklers:
                if s not in gone:
                    try:
                        s.send(b"G")  # one byte of a request line, every 100 ms
                    except ConnectionError:
                        gone[s] = now
        if now - t0 < lifetime - 0.15:
            # An honest client is served promptly all along.
            normal.send(b"ping")
            sent = time.monotonic()
            got = b""
            while got != b"ping" and time.monotonic() - sent < 1.0:
                reactor.run_once(0.001)
                try:
                    got += normal.recv(100)
                except BlockingIOError:
                    pass
            assert got == b"ping"
            latencies.append(time.monotonic() - sent)
        for s in [*tricklers, *silent]:
            if s in gone:
                continue
            try:
                if s.recv(100) == b"":
                    gone[s] = time.monotonic()
            except BlockingIOError:
                pass
            except ConnectionError:
                gone[s] = time.monotonic()
    run_until_lost = time.monotonic() + TIMEOUT
    while not all(r.lost.done() for r in recs) and time.monotonic() < run_until_lost:
        reactor.run_once(0.01)
    for s in [*tricklers, *silent, normal]:
        s.close()
    by_fd = {r.transport.get_extra_info("peername"): r for r in recs}
    for s in tricklers:
        assert gone[s] - t0 >= lifetime - 0.01, "cut before its deadline"
    for s in silent:
        assert idle - 0.01 <= gone[s] - t0 < lifetime, "a silent client outlived its idle timeout"
    kinds = sorted(type(r.lost_exc).__name__ for r in by_fd.values())
    assert kinds.count(DeadlineExceeded.__name__) == len(tricklers) + 1  # + the honest one
    assert kinds.count(IdleTimeout.__name__) == len(silent)
    assert errors == []
    assert len(reactor.multiplexer) == base_regs
    assert len(os.listdir("/proc/self/fd")) == base_fds
    assert max(latencies) < 0.2, max(latencies)
    record(
        "slowloris",
        driver.name,
        tricklers=len(tricklers),
        silent=len(silent),
        max_echo_latency_ms=round(max(latencies) * 1e3, 1),
    )


def test_client_that_never_reads_meets_backpressure(
    reactor: Reactor, driver: type[Multiplexer]
) -> None:
    """The server stops reading instead of buffering what it cannot send."""
    errors = collect_errors(reactor)
    recs: list[Recorder] = []
    server = serve(reactor, keeping(recs, lambda: Recorder(reactor, echo=True)))
    c = socket.create_connection(("127.0.0.1", server.port()))
    c.setblocking(False)
    block = os.urandom(1 << 16)
    sent = 0
    stalled_since: float | None = None
    deadline = time.monotonic() + TIMEOUT
    # Push until the client cannot send any more for 0.3 s: the window is full.
    while time.monotonic() < deadline:
        reactor.run_once(0.001)
        try:
            sent += c.send(block)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.3:
                break
    assert stalled_since is not None, "the client was never held back"
    rec = recs[0]
    transport = rec.transport
    assert not transport.is_reading() and rec.pauses >= 1
    held = rec.max_buffered
    assert held <= HIGH_WATER + READ_SIZE, held
    assert sent < 64 << 20, sent  # kernel buffers, not the server's memory
    # Reading everything back gives exactly what was sent, and reading resumes.
    got = 0
    deadline = time.monotonic() + TIMEOUT
    c.setblocking(False)
    while got < sent and time.monotonic() < deadline:
        reactor.run_once(0.001)
        try:
            while chunk := c.recv(1 << 20):
                got += len(chunk)
        except BlockingIOError:
            pass
    assert got == sent and len(rec.received) == sent
    # The last send's completion may still be on its way: give the loop a
    # few iterations to see the buffer drain below the low-water mark.
    deadline = time.monotonic() + TIMEOUT
    while not transport.is_reading() and time.monotonic() < deadline:
        reactor.run_once(0.01)
    assert transport.is_reading() and rec.resumes >= 1
    assert errors == []
    c.close()
    record("never_reads", driver.name, client_sent=sent, server_max_buffered=held)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


def test_serve_echo_memory_stays_bounded_when_client_never_reads(
    driver: type[Multiplexer],
) -> None:
    """``iomux serve echo``: a client pushing 256 MiB and reading nothing costs it no memory."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "iomux", "serve", "echo", "--backend", driver.name, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, line
        before = _rss_kib(proc.pid)
        c = socket.create_connection(("127.0.0.1", int(match.group(1))))
        c.setblocking(False)
        block = b"x" * (1 << 20)
        sent = 0
        end = time.monotonic() + 0.8
        while time.monotonic() < end and sent < 256 << 20:
            try:
                sent += c.send(block)
            except BlockingIOError:
                time.sleep(0.01)
        after = _rss_kib(proc.pid)
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    record("serve_never_reads", driver.name, client_sent=sent, rss_kib=f"{before}/{after}")
    assert sent < 64 << 20, sent
    assert after - before < 8 * 1024, (before, after)
