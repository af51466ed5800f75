"""Reactor under load and at resource limits: 1,000 clients, EMFILE, max_fd."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from iomux import Multiplexer
from iomux.reactor import Reactor
from iomux.reactor.testing import Recorder, recording

from .helpers import fd_budget
from .reactor_support import MODES, close_reactor, new_reactor, require_mode, wait

TIMEOUT = 10.0
CLIENTS = 1000

# The clients run in a subprocess on the stdlib's selectors, so the server
# process holds only its own ~1,000 sockets: select's FD_SETSIZE (1024)
# cannot hold both ends in one process.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, selectors, socket, sys, time
    port, n = int(sys.argv[1]), int(sys.argv[2])
    sel = selectors.DefaultSelector()
    want, got, socks = {}, {}, []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        msg = (b"client %06d " % i) * 64
        want[s] = msg
        got[s] = bytearray()
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
    pending, unsent = set(socks), {s: memoryview(want[s]) for s in socks}
    deadline = time.monotonic() + 20
    while pending and time.monotonic() < deadline:
        for key, ev in sel.select(1.0):
            s = key.fileobj
            if ev & selectors.EVENT_WRITE and unsent.get(s) is not None:
                try:
                    sent = s.send(unsent[s])
                except BlockingIOError:
                    continue
                unsent[s] = unsent[s][sent:] if sent < len(unsent[s]) else None
                if unsent[s] is None:
                    sel.modify(s, selectors.EVENT_READ)
            elif ev & selectors.EVENT_READ:
                data = s.recv(65536)
                if not data:
                    sel.unregister(s)
                    pending.discard(s)
                    continue
                got[s] += data
                if len(got[s]) >= len(want[s]):
                    sel.unregister(s)
                    pending.discard(s)
    ok = sum(1 for s in socks if bytes(got[s]) == want[s])
    print(json.dumps({"ok": ok, "pending": len(pending)}), flush=True)
    sys.stdin.readline()  # hold every connection open until told
    for s in socks:
        s.close()
    """
)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reactor(driver: type[Multiplexer], mode: str) -> Iterator[Reactor]:
    r = new_reactor(driver, mode)
    try:
        yield r
    finally:
        close_reactor(r)


def test_thousand_concurrent_clients(reactor: Reactor, driver: type[Multiplexer]) -> None:
    open_now = len(os.listdir("/proc/self/fd"))
    max_fd = driver.capabilities.max_fd
    if max_fd is not None:
        # Every server-side socket must fit below max_fd: this is a real limit.
        assert open_now + CLIENTS + 8 < max_fd, f"{open_now} fds open already"
    recs: list[Recorder] = []
    live = [0, 0]  # now, most at once

    def made(rec: Recorder) -> None:
        live[0] += 1
        live[1] = max(live)

    def factory() -> Recorder:
        rec = Recorder(reactor, echo=True, on_made=made)
        rec.lost.add_done_callback(lambda f: live.__setitem__(0, live[0] - 1))
        recs.append(rec)
        return rec

    server = wait(reactor, reactor.create_server(factory, "127.0.0.1", 0, backlog=CLIENTS), TIMEOUT)
    with fd_budget(CLIENTS + 64):
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, str(server.port()), str(CLIENTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            os.set_blocking(proc.stdout.fileno(), False)
            line = ""
            deadline = time.monotonic() + 30
            while not line.endswith("\n") and time.monotonic() < deadline:
                reactor.run_once(0.05)
                line += proc.stdout.readline() or ""
            result = json.loads(line)
            assert result == {"ok": CLIENTS, "pending": 0}
            assert live[1] == CLIENTS, "the clients were not all connected at once"
            proc.stdin.write("done\n")
            proc.stdin.flush()
            while any(not r.lost.done() for r in recs) and time.monotonic() < deadline:
                reactor.run_once(0.05)
        finally:
            proc.kill()
            proc.wait()
    assert len(recs) == CLIENTS
    assert all(r.sequence() == ["made", "data", "eof", "lost:None"] for r in recs)
    assert len(server.connections) == 0


EMFILE_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys, time
    from iomux.conformance.reactor_support import mode_options
    from iomux.registry import load_driver
    from iomux.reactor import Reactor
    from iomux.reactor.testing import Recorder, recording
    reactor = Reactor(load_driver(sys.argv[1]), **mode_options(sys.argv[2]))
    recs = []
    # The limit is lowered before the server starts: io_uring's accept takes
    # the limit in force when it was submitted.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    server = reactor.run_until_complete(reactor.create_server(
        recording(recs, lambda: Recorder(reactor, echo=True)), "127.0.0.1", 0))
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(server.port(), flush=True)
    sys.stdin.readline()  # the parent has queued its clients
    listener = server._listeners[0]
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < 1.0:
        reactor.run_once(1.0 - (time.monotonic() - wall0))
    cpu = time.process_time() - cpu0
    pauses, served_while_full = listener.backoff.pauses, len(recs)
    for fd in fillers:
        os.close(fd)
    deadline = time.monotonic() + 5
    while (len(recs) < 2 or any(not r.received for r in recs)) and time.monotonic() < deadline:
        reactor.run_once(0.05)
    for _ in range(20):
        reactor.run_once(0.01)
    print(json.dumps({"cpu": cpu, "pauses": pauses, "served_while_full": served_while_full,
                      "served": len(recs)}), flush=True)
    """
)


def test_emfile_on_accept_backs_off_then_recovers(driver: type[Multiplexer], mode: str) -> None:
    require_mode(driver, mode)
    spec = f"{driver.__module__}:{driver.__qualname__}"
    proc = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SCRIPT, spec, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        for i in range(2):
            c = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            c.sendall(b"hello %d" % i)
            clients.append(c)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        for i, c in enumerate(clients):
            assert c.recv(100) == b"hello %d" % i
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
        for c in clients:
            c.close()
    result = json.loads(out)
    # With 100 ms back-off, about 10 pauses in the second; a spinning loop
    # would burn most of the second's CPU.
    assert result["served_while_full"] == 0
    assert 3 <= result["pauses"] <= 15, result
    assert result["cpu"] < 0.2, result
    assert result["served"] == 2
    assert err.count("pausing accepts") == 1, err


def test_fd_beyond_max_fd_is_closed_and_server_goes_on(
    reactor: Reactor, driver: type[Multiplexer], caplog: pytest.LogCaptureFixture
) -> None:
    max_fd = driver.capabilities.max_fd
    if max_fd is None:
        pytest.skip(f"{driver.name} declares no capability max_fd (no fd limit of its own)")
    recs: list[Recorder] = []
    server = wait(
        reactor,
        reactor.create_server(
            recording(recs, lambda: Recorder(reactor, echo=True)), "127.0.0.1", 0
        ),
        TIMEOUT,
    )
    fillers: list[int] = []
    with fd_budget(max_fd + 64):
        try:
            while not fillers or fillers[-1] < max_fd - 1:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            high = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
            with caplog.at_level(logging.WARNING, logger="iomux.reactor"):
                while server.refused_out_of_range == 0:
                    reactor.run_once(0.1)
            assert high.recv(10) == b""  # closed by the server
            high.close()
            os.close(fillers.pop(0))  # room for one connection below max_fd
            os.close(fillers.pop(0))
            low = socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT)
            low.sendall(b"still serving")
            while not recs or len(recs[0].received) < 13:
                reactor.run_once(0.1)
            assert low.recv(100) == b"still serving"
            low.close()
        finally:
            for fd in fillers:
                os.close(fd)
    lines = [r for r in caplog.records if "max_fd" in r.getMessage()]
    assert len(lines) == 1 and str(max_fd) in lines[0].getMessage()
    assert server.refused_out_of_range == 1
