"""io_uring faults: buffer ring exhausted, completion queue overflow, cancel racing completion,
and the ring unavailable at start."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from factories import keeping
from relsupport import record, ring_polls

from iomux.drivers import _uring as U
from iomux.reactor import Reactor
from iomux.reactor.testing import Recorder, collect_errors

MS = 1_000_000


def pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        out.append((a, b))
    return out


def test_enobufs_storm_over_a_shared_buffer_ring_loses_nothing(ring: U.Ring) -> None:
    """Eight multishot receives share four 256-byte buffers: ENOBUFS again and again."""
    conns = pairs(8)
    group = ring.buffer_group(3, 4, 256)
    rng = random.Random(7)
    payloads = [rng.randbytes(48_000 + 1000 * i) for i in range(len(conns))]
    sent = [0] * len(conns)
    received = [bytearray() for _ in conns]
    eof = [False] * len(conns)
    enobufs = 0
    for i, (a, _) in enumerate(conns):
        ring.recv(a.fileno(), group, i)
    deadline = time.monotonic() + 20
    while not all(eof) and time.monotonic() < deadline:
        for i, (_, b) in enumerate(conns):
            if sent[i] < len(payloads[i]):
                try:
                    sent[i] += b.send(payloads[i][sent[i] : sent[i] + 4096])
                except BlockingIOError:
                    pass
                if sent[i] == len(payloads[i]):
                    b.shutdown(socket.SHUT_WR)
        for ud, res, flags in ring.completions(1, 50 * MS):
            if res > 0:
                assert flags & U.F_BUFFER
                received[ud] += group.take(flags >> U.BUFFER_SHIFT, res)
            elif res == 0:
                eof[ud] = True
                continue
            elif res == -errno.ENOBUFS:
                enobufs += 1
            else:
                raise AssertionError(f"receive {ud} failed: {os.strerror(-res)}")
            if not flags & U.F_MORE:
                ring.recv(conns[ud][0].fileno(), group, ud)  # re-arm after recycling
    assert all(eof), "some receives never saw the end of their stream"
    for i in range(len(conns)):
        assert bytes(received[i]) == payloads[i], f"connection {i}: bytes lost or reordered"
    assert enobufs >= 1, "the buffer ring never ran dry: the test proved nothing"
    record("uring_enobufs", "io_uring", connections=len(conns), enobufs=enobufs)
    for a, b in conns:
        a.close()
        b.close()


def test_cancel_racing_completion_is_one_or_the_other(ring: U.Ring) -> None:
    """A poll and a receive cancelled while data arrives: exactly one outcome each, no loss."""
    group = ring.buffer_group(9, 16, 64)
    outcomes: dict[str, int] = {}
    rng = random.Random(11)
    for i in range(300):
        a, b = socket.socketpair()
        a.setblocking(False)
        target, canceller = 10_000 + i, 20_000 + i
        recv = i % 2 == 1
        if recv:
            ring.recv(a.fileno(), group, target, multishot=False)
        else:
            ring.poll_add(a.fileno(), U.POLLIN, target)
        early = []
        if rng.random() < 0.5:
            early += ring.completions(0, 0)  # the operation is armed before the data comes
        b.send(b"payload")
        if rng.random() < 0.5:
            early += ring.completions(0, 0)
        ring.cancel(target, canceller)
        seen: dict[int, list[tuple[int, int]]] = {target: [], canceller: []}
        for ud, res, flags in early:
            seen[ud].append((res, flags))
        deadline = time.monotonic() + 5
        while (not seen[target] or not seen[canceller]) and time.monotonic() < deadline:
            for ud, res, flags in ring.completions(1, 100 * MS):
                seen[ud].append((res, flags))
        for _ud, res, flags in ring.completions(0, 0):
            seen[_ud].append((res, flags))  # nothing may come twice
        assert len(seen[target]) == 1 and len(seen[canceller]) == 1, seen
        (res, flags), (cres, _) = seen[target][0], seen[canceller][0]
        if res == -errno.ECANCELED:
            assert cres == 0, (res, cres)
            # Cancelled: the bytes are still in the socket.
            assert a.recv(100) == b"payload"
            kind = "cancelled"
        else:
            assert cres in (-errno.ENOENT, -errno.EALREADY), (res, cres)
            if recv:
                assert res == 7 and group.take(flags >> U.BUFFER_SHIFT, res) == b"payload"
                with pytest.raises(BlockingIOError):
                    a.recv(100)  # delivered once, not twice
            else:
                assert res & U.POLLIN
            kind = "completed"
        key = f"{'recv' if recv else 'poll'}_{kind}"
        outcomes[key] = outcomes.get(key, 0) + 1
        a.close()
        b.close()
    record("uring_cancel_race", "io_uring", **outcomes)
    assert ring_polls(ring.fileno()) <= 1  # only the ring's own wake-up poll is left


@pytest.mark.parametrize("io", ["readiness", "completion"])
def test_completion_queue_overflow_under_a_flood_loses_nothing(io: str) -> None:
    """400 connections ready at once against an 8-entry completion queue."""
    reactor = Reactor("io_uring", io=io, entries=8, cq_entries=8, capacity=8)
    try:
        assert reactor.io == io
        mux = reactor.multiplexer
        assert mux.ring.cq_entries < 400  # type: ignore[attr-defined]
        errors = collect_errors(reactor)
        reactor.run_once(0)
        base = ring_polls(mux.ring.fileno())  # type: ignore[attr-defined]
        recs: list[Recorder] = []
        clients = []
        for i, (a, b) in enumerate(pairs(400)):
            rec = Recorder(reactor, echo=True)
            reactor.run_until_complete(
                reactor.connect_accepted_socket(keeping(recs, lambda rec=rec: rec), a)  # type: ignore[misc]
            )
            clients.append((b, b"%05d" % i * 20))
        reactor.run_once(0)  # every poll (readiness) or receive (completion) armed
        for b, msg in clients:
            b.send(msg)  # all 400 ready at once
        deadline = time.monotonic() + 20
        while any(len(r.received) < 100 for r in recs) and time.monotonic() < deadline:
            reactor.run_once(0.01)
        for (b, msg), rec in zip(clients, recs, strict=True):
            assert bytes(rec.received) == msg
            got = b""
            while len(got) < len(msg) and time.monotonic() < deadline:
                try:
                    got += b.recv(200)
                except BlockingIOError:
                    reactor.run_once(0.01)  # the echo of the last receives: sent next iteration
            assert got == msg
            b.close()
        while any(not r.lost.done() for r in recs) and time.monotonic() < deadline:
            reactor.run_once(0.01)
        assert all(r.sequence() == ["made", "data", "eof", "lost:None"] for r in recs)
        assert errors == []
        assert ring_polls(mux.ring.fileno()) == base  # type: ignore[attr-defined]
        record("uring_cq_overflow", "io_uring", io=io, cq_entries=mux.ring.cq_entries, ready=400)  # type: ignore[attr-defined]
    finally:
        reactor.close()


@pytest.mark.parametrize("failure", ["EPERM", "ENOSYS"])
def test_serve_falls_back_when_the_ring_is_unavailable(failure: str) -> None:
    env = {**os.environ, "IOMUX_URING_FORCE_FAIL": failure}
    cmd = [sys.executable, "-m", "iomux", "serve", "echo", "--port", "0"]
    proc = subprocess.Popen([*cmd, "--backend", "auto"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "backend epoll" in line, line
        assert f"skipped io_uring: io_uring_setup failed with {failure}" in line, line
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"still served")
            assert c.recv(100) == b"still served"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    # Asked for by name, it is an error that says why, never a silent fallback.
    explicit = subprocess.run(
        [*cmd, "--backend", "io_uring"], capture_output=True, text=True, env=env, timeout=30
    )
    assert explicit.returncode != 0
    assert f"failed with {failure}" in explicit.stderr
