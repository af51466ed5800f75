"""Shared machinery of the reliability tests: a server process, client worker processes, figures.

The module is imported by the tests and also run as a script in worker
processes (``python relsupport.py server|hold|churn ...``):

``server``
    A reactor echo server on one backend. It prints ``{"port": ..}`` and then
    answers commands read from stdin: ``stats`` prints one JSON line of
    figures (fds, RSS, registrations, kernel-side ring polls, live
    connections, errors reported to the exception handler), ``quit`` stops.
``hold``
    Opens ``--count`` connections from one source address, then makes each
    of them exchange a numbered message with the server every
    ``--interval`` seconds for ``--duration`` seconds, checking every echo.
    It prints a ``connected`` line, then a ``done`` line, then closes every
    connection when told ``close`` on stdin.
``churn``
    Runs ``--cycles`` connect/send/receive/close cycles, some of them ending
    with an abortive close (``SO_LINGER`` 0, an RST) before or after the
    echo, spread over several source addresses.

Every load here is bounded in count and time and ends by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import heapq
import json
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
#: Long runs are selected with IOMUX_SOAK=1.
SOAK = os.environ.get("IOMUX_SOAK", "") not in ("", "0")
#: Seconds each soak connection keeps exchanging data (IOMUX_SOAK_SECONDS).
SOAK_SECONDS = float(os.environ.get("IOMUX_SOAK_SECONDS", "180"))
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LINGER_RST = struct.pack("ii", 1, 0)

#: Figures gathered by the tests, printed in the terminal summary (see conftest).
FIGURES: list[dict[str, Any]] = []


def record(test: str, backend: str, **figures: Any) -> None:
    """Keep one row of figures for the summary (and IOMUX_RELIABILITY_REPORT)."""
    row = {"test": test, "backend": backend, **figures}
    FIGURES.append(row)
    path = os.environ.get("IOMUX_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_count() -> int:
    """Open fds of this process (the listing's own fd not counted)."""
    return len(os.listdir("/proc/self/fd")) - 1


def rss_kib() -> int:
    """Resident set size of this process, KiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def ring_polls(fd: int) -> int:
    """Poll requests the kernel holds on io_uring ``fd`` (from its fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        text = f.read()
    section = text.split("PollList:", 1)[1].split("CqOverflowList:", 1)[0]
    return sum(1 for line in section.splitlines() if line.strip().startswith("op="))


def source_addresses(n: int, first: int = 2) -> list[str]:
    """``n`` loopback source addresses, 127.0.0.<first>...."""
    return [f"127.0.0.{first + i}" for i in range(n)]


def bound_socket(source: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``source`` (port chosen at connect)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((source, 0))
    return s


def reset_close(s: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    s.close()


def close_loop(reactor: Any, timeout: float = 10.0) -> None:
    """Abort the servers and connections a test left open, then close the loop."""
    import asyncio

    if reactor.is_closed() or reactor.is_running():
        return
    try:
        reactor.run_until_complete(asyncio.wait_for(reactor.shutdown(grace=0, drain=0), timeout))
    finally:
        reactor.close()


# --- the server process --------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Run a reactor echo server answering ``stats``/``quit`` on stdin."""
    import asyncio

    from iomux.reactor import Reactor

    raise_nofile()
    reactor = Reactor(args.backend, io=args.io)
    mux = reactor.multiplexer
    errors: list[str] = []
    reactor.set_exception_handler(
        lambda _r, ctx: errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}")
    )
    counts: dict[str, Any] = {"made": 0, "live": 0, "peak": 0, "bytes": 0, "pauses": 0}
    lost_by: dict[str, int] = {}

    class Echo(asyncio.Protocol):
        transport: Any

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            counts["made"] += 1
            counts["live"] += 1
            counts["peak"] = max(counts["peak"], counts["live"])

        def data_received(self, data: bytes) -> None:
            counts["bytes"] += len(data)
            self.transport.write(data)

        def pause_writing(self) -> None:
            counts["pauses"] += 1
            self.transport.pause_reading()

        def resume_writing(self) -> None:
            self.transport.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            counts["live"] -= 1
            name = "None" if exc is None else type(exc).__name__
            lost_by[name] = lost_by.get(name, 0) + 1

    server = reactor.run_until_complete(
        reactor.create_server(
            Echo,
            "127.0.0.1",
            0,
            backlog=args.backlog,
            idle_timeout=args.idle_timeout,
        )
    )
    ring_fd = mux.ring.fileno() if mux.name == "io_uring" else -1  # type: ignore[attr-defined]
    port = reactor.completion_port if reactor.io == "completion" else None
    pending = bytearray()

    def stats() -> dict[str, Any]:
        gc.collect()
        out = {
            "fds": fd_count(),
            "rss_kib": rss_kib(),
            "objects": len(gc.get_objects()),
            "registrations": len(mux),
            "transports": len(reactor.connections),
            "connections": len(server.connections),
            "refused_out_of_range": server.refused_out_of_range,
            "lost_by": dict(lost_by),
            "errors": len(errors),
            "first_errors": errors[:5],
            "cpu": time.process_time(),
            "max_write_buffer": max(
                (t.get_write_buffer_size() for t in server.connections), default=0
            ),
            **counts,
        }
        if ring_fd >= 0:
            out["ring_polls"] = ring_polls(ring_fd)
        if port is not None:
            # Completion-port slots in use: the listener's and one per connection.
            out["slots"] = port.slots_in_use
        return out

    def on_stdin() -> None:
        chunk = os.read(0, 4096)
        if not chunk:
            reactor.stop()
            return
        pending.extend(chunk)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            command = line.decode().strip()
            if command == "stats":
                _emit(stats())
            elif command == "quit":
                reactor.stop()

    reactor.add_reader(0, on_stdin)
    _emit(
        {
            "port": server.port(),
            "max_fd": mux.capabilities.max_fd,
            "fds": fd_count(),
            "io": reactor.io,
        }
    )
    try:
        reactor.run_forever()
    finally:
        reactor.close()
    return 0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class ServerProcess:
    """Controls a ``relsupport.py server`` subprocess."""

    def __init__(
        self,
        backend: str,
        *,
        idle_timeout: float | None = None,
        backlog: int = 4096,
        io: str | None = None,
    ):
        cmd = [sys.executable, SCRIPT, "server", "--backend", backend, "--backlog", str(backlog)]
        if io is not None:
            cmd += ["--io", io]
        if idle_timeout is not None:
            cmd += ["--idle-timeout", str(idle_timeout)]
        self.backend = backend
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        hello = self._read()
        self.port: int = hello["port"]
        self.max_fd: int | None = hello["max_fd"]
        self.start_fds: int = hello["fds"]
        #: How the server's connections move bytes: "completion" or "readiness".
        self.io: str = hello["io"]

    def _read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout)
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the {self.backend} server process died: {err}")
        return json.loads(line)  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        """One ``stats`` answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._read()

    def wait_idle(self, live: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``stats`` until ``live`` connections remain; return the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st["live"] <= live and st["transports"] <= live:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"connections still open after {timeout} s: {st}")
            time.sleep(0.1)

    def close(self) -> str:
        """Stop the process; return its stderr."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            _, err = self.proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self.proc.kill()
            _, err = self.proc.communicate()
        return err or ""


def _readline(stream: IO[str], timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no answer within {timeout} s")
    finally:
        sel.close()
    return stream.readline()


def connection_budget(server: ServerProcess, wanted: int, margin: int = 40) -> tuple[int, str]:
    """How many connections the server can hold: ``wanted``, or what max_fd allows.

    Returns the number and a note that says why it is lower (never silently).
    """
    if server.max_fd is None:
        return wanted, ""
    fits = server.max_fd - server.start_fds - margin
    if fits >= wanted:
        return wanted, ""
    return fits, (
        f"{server.backend} declares max_fd={server.max_fd}: run at {fits} connections "
        f"instead of {wanted}"
    )


# --- holding clients -------------------------------------------------------------


def hold(args: argparse.Namespace) -> int:
    """Hold ``count`` connections, exchange periodically, report, close when told."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    n, size = args.count, args.size
    socks: list[socket.socket] = []
    expect: list[bytes] = [b""] * n
    got: list[bytearray] = [bytearray() for _ in range(n)]
    seq = [0] * n
    exchanges = [0] * n
    errors: list[str] = []
    mismatches = 0
    start = time.monotonic()
    # Connect with a bounded number in flight, as a real client pool would.
    connecting: set[int] = set()
    nxt = 0
    while (nxt < n or connecting) and time.monotonic() - start < args.connect_timeout:
        while nxt < n and len(connecting) < 256:
            s = bound_socket(args.source)
            err = s.connect_ex(("127.0.0.1", args.port))
            if err not in (0, errno.EINPROGRESS):
                errors.append(f"connect: {os.strerror(err)}")
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE, nxt)
            connecting.add(nxt)
            nxt += 1
        for key, _ in sel.select(1.0):
            i = key.data
            s = socks[i]
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                errors.append(f"connect: {os.strerror(err)}")
            sel.modify(s, selectors.EVENT_READ, i)
            connecting.discard(i)
    connected = n - len(connecting)
    if connecting:
        errors.append(f"{len(connecting)} connections not established in time")
    _emit({"event": "connected", "n": connected, "secs": time.monotonic() - start})

    # Exchange: each connection sends a numbered message every interval,
    # staggered, and checks the echo before its next message.
    now = time.monotonic()
    end = now + args.duration
    due: list[tuple[float, int]] = [
        (now + args.interval * i / n, i) for i in range(n) if i not in connecting
    ]
    heapq.heapify(due)
    waiting = 0
    while (due or waiting) and time.monotonic() < end + 30:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i = heapq.heappop(due)
            if now >= end:
                continue
            seq[i] += 1
            msg = (b"%08d:%08d:" % (i, seq[i])).ljust(size, b".")
            expect[i] = msg
            try:
                socks[i].send(msg)  # small: fits in the socket buffer
            except OSError as exc:
                errors.append(f"send: {exc!r}")
                continue
            waiting += 1
        timeout = max(0.0, min(due[0][0] - now, 0.5)) if due else 0.5
        for key, _ in sel.select(timeout):
            i = key.data
            try:
                data = socks[i].recv(65536)
            except OSError as exc:
                errors.append(f"recv: {exc!r}")
                sel.unregister(socks[i])
                continue
            if not data:
                errors.append("unexpected EOF from the server")
                sel.unregister(socks[i])
                continue
            got[i] += data
            if len(got[i]) >= size:
                if bytes(got[i]) != expect[i]:
                    mismatches += 1
                got[i].clear()
                exchanges[i] += 1
                waiting -= 1
                heapq.heappush(due, (now + args.interval, i))
    if waiting:
        errors.append(f"{waiting} echoes never came back")
    _emit(
        {
            "event": "done",
            "connected": connected,
            "exchanges": sum(exchanges),
            "min_exchanges": min(exchanges) if exchanges else 0,
            "mismatches": mismatches,
            "errors": len(errors),
            "first_errors": errors[:5],
        }
    )
    sys.stdin.readline()  # hold every connection until told
    for s in socks:
        s.close()
    _emit({"event": "closed"})
    return 0


class HoldingClients:
    """``workers`` ``hold`` processes sharing ``total`` connections, one source address each."""

    def __init__(
        self,
        port: int,
        total: int,
        *,
        workers: int,
        duration: float,
        interval: float,
        size: int = 64,
    ) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        sources = source_addresses(workers)
        for w in range(workers):
            count = total // workers + (1 if w < total % workers else 0)
            cmd = [
                sys.executable, SCRIPT, "hold", "--port", str(port), "--source", sources[w],
                "--count", str(count), "--duration", str(duration),
                "--interval", str(interval), "--size", str(size),
            ]  # fmt: skip
            self.procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def wait(self, event: str, timeout: float) -> list[dict[str, Any]]:
        """Each worker's next line, which must be ``event``."""
        out = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            assert p.stdout is not None
            line = _readline(p.stdout, max(0.1, deadline - time.monotonic()))
            msg = json.loads(line)
            assert msg["event"] == event, msg
            out.append(msg)
        return out

    def close(self) -> None:
        """Tell the workers to close their connections; wait for them."""
        for p in self.procs:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.write("close\n")
                p.stdin.flush()
        self.wait("closed", 60)
        for p in self.procs:
            p.wait(10)

    def kill(self) -> None:
        """Kill the workers still running."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


# --- churning clients --------------------------------------------------------------

#: How a churn cycle ends.
MODES = ("close", "rst_after_echo", "rst_before_echo", "close_at_once")


def churn(args: argparse.Namespace) -> int:
    """Run ``cycles`` connect/send/close cycles with at most ``concurrency`` at once."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    sources = args.sources.split(",")
    msg_size = args.size
    started = completed = 0
    counts = dict.fromkeys(MODES, 0)
    echoes_ok = mismatches = 0
    errors: list[str] = []
    live: dict[int, tuple[socket.socket, str, bytes, bytearray]] = {}
    deadline = time.monotonic() + args.timeout

    def mode_of(i: int) -> str:
        if args.rst_every and i % args.rst_every == 0:
            return "rst_after_echo"
        if args.rst_every and i % args.rst_every == 1:
            return "rst_before_echo"
        if args.rst_every and i % args.rst_every == 2:
            return "close_at_once"
        return "close"

    def finish(key: int, error: str | None = None) -> None:
        nonlocal completed
        s, mode, _, _ = live.pop(key)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(s)
        if error is not None:
            errors.append(f"{mode}: {error}")
        if mode.startswith("rst"):
            reset_close(s)
        else:
            s.close()
        counts[mode] += 1
        completed += 1

    while (started < args.cycles or live) and time.monotonic() < deadline:
        while started < args.cycles and len(live) < args.concurrency:
            i = started
            started += 1
            s = bound_socket(sources[i % len(sources)])
            err = s.connect_ex(("127.0.0.1", args.port))
            mode = mode_of(i)
            msg = (b"%010d" % i).ljust(msg_size, b"#")
            key = id(s)
            live[key] = (s, mode, msg, bytearray())
            if err not in (0, errno.EINPROGRESS):
                finish(key, f"connect: {os.strerror(err)}")
                continue
            sel.register(s, selectors.EVENT_WRITE, key)
        for skey, ev in sel.select(1.0):
            key = skey.data
            s, mode, msg, got = live[key]
            if ev & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(key, f"connect: {os.strerror(err)}")
                    continue
                if mode == "close_at_once":
                    finish(key)
                    continue
                try:
                    s.send(msg)
                except OSError as exc:
                    finish(key, f"send: {exc!r}")
                    continue
                if mode == "rst_before_echo":
                    finish(key)
                    continue
                sel.modify(s, selectors.EVENT_READ, key)
                continue
            try:
                data = s.recv(65536)
            except OSError as exc:
                finish(key, f"recv: {exc!r}")
                continue
            if not data:
                finish(key, "EOF before the echo")
                continue
            got += data
            if len(got) >= len(msg):
                if bytes(got) == msg:
                    echoes_ok += 1
                else:
                    mismatches += 1
                finish(key)
    if live:
        errors.append(f"{len(live)} cycles unfinished at the deadline")
    _emit(
        {
            "completed": completed,
            "modes": counts,
            "echoes_ok": echoes_ok,
            "mismatches": mismatches,
            "errors": len(errors),
            "first_errors": errors[:5],
        }
    )
    return 0


def run_churn(
    port: int,
    cycles: int,
    *,
    workers: int,
    sources: int,
    concurrency: int = 64,
    rst_every: int = 10,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run ``cycles`` churn cycles over ``workers`` processes; return the summed report."""
    addrs = source_addresses(sources, first=20)
    procs = []
    for w in range(workers):
        share = cycles // workers + (1 if w < cycles % workers else 0)
        mine = ",".join(addrs[w::workers] or addrs)
        cmd = [
            sys.executable, SCRIPT, "churn", "--port", str(port), "--sources", mine,
            "--cycles", str(share), "--concurrency", str(concurrency),
            "--rst-every", str(rst_every), "--timeout", str(timeout),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    total: dict[str, Any] = {
        "completed": 0, "echoes_ok": 0, "mismatches": 0, "errors": 0,
        "modes": dict.fromkeys(MODES, 0), "first_errors": [],
    }  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=timeout + 30)
        rep = json.loads(out)
        for k in ("completed", "echoes_ok", "mismatches", "errors"):
            total[k] += rep[k]
        for m, c in rep["modes"].items():
            total["modes"][m] += c
        total["first_errors"] += rep["first_errors"]
    return total


@contextlib.contextmanager
def server_process(backend: str, **kwargs: Any) -> Iterator[ServerProcess]:
    """A :class:`ServerProcess`, stopped afterwards (its stderr must hold no traceback)."""
    server = ServerProcess(backend, **kwargs)
    try:
        yield server
    finally:
        err = server.close()
    assert "Traceback" not in err, err


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker processes."""
    parser = argparse.ArgumentParser(prog="relsupport")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("server")
    p.add_argument("--backend", required=True)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--io", choices=("auto", "readiness", "completion"), default=None)
    p = sub.add_parser("hold")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default="127.0.0.1")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p = sub.add_parser("churn")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sources", default="127.0.0.1")
    p.add_argument("--cycles", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rst-every", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    return {"server": serve, "hold": hold, "churn": churn}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
