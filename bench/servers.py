"""The servers under test: ``iomux serve`` per backend, asyncio-loop servers and peers.

Each run starts a fresh server process, pinned to the server CPU, and stops it
with SIGTERM afterwards. CPU time and RSS are read from /proc.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import iomux

from .common import SERVER_CPU
from .loadgen import BenchError

PR_SET_PDEATHSIG = 1
#: glibc malloc settings for ``--malloc steady`` (the default of the throughput
#: benchmarks). With glibc's defaults, a process whose mmap threshold was never
#: raised serves asyncio's 256 KiB ``recv`` buffer with mmap + mremap + munmap
#: on every read (three extra system calls and page faults per request), or
#: not, depending on what the process happened to free earlier. Fixing the
#: thresholds for every server alike removes that accident from the comparison.
STEADY_MALLOC = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=16777216"
MALLOC_MODES = ("steady", "stock")


def reactor_available() -> bool:
    """Whether ``python -m iomux serve`` exists in this installation."""
    return importlib.util.find_spec("iomux.serve") is not None


def module_available(name: str) -> bool:
    """Whether the top-level module ``name`` can be imported."""
    return importlib.util.find_spec(name) is not None


def uvloop_available() -> bool:
    """Whether uvloop can be imported."""
    return module_available("uvloop")


@dataclass
class ServerSpec:
    """How to start one server under test."""

    name: str
    argv: list[str]
    #: "iomux" for the reactor, "iomux-loop" for a server on iomux.new_event_loop,
    #: "peer" for the others (asyncio, uvloop, rloop, uvicorn on those).
    kind: str
    backend: str | None = None
    #: The backend's fd ceiling (select: FD_SETSIZE), None if only RLIMIT_NOFILE.
    max_fd: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def too_many(self, conns: int) -> str | None:
        """Why this server cannot take ``conns`` connections, or None if it can."""
        if self.max_fd is not None and conns + 32 > self.max_fd:
            return f"limit {self.max_fd}"
        return None


@functools.cache
def serve_help(app: str) -> str:
    """The ``--help`` text of ``python -m iomux serve APP`` ("" if it fails)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "iomux", "serve", app, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def readiness_args(app: str) -> list[str] | None:
    """The ``serve`` arguments that force io_uring into readiness mode, if it has any.

    Looks in ``serve APP --help`` for an option whose choices or help mention
    readiness: ``--opt {completion,readiness}`` gives ``["--opt", "readiness"]``,
    a bare ``--readiness``-style flag gives ``["--flag"]``.
    """
    return readiness_args_in(serve_help(app))


def readiness_args_in(text: str) -> list[str] | None:
    """:func:`readiness_args` for a given ``--help`` text."""
    if not text:
        return None
    blocks = re.split(r"\n(?=\s{2}-)", text)
    for block in blocks:
        if "readiness" not in block.lower() and "poll" not in block.lower():
            continue
        opt = re.search(r"(--[\w-]+)(?:\s+\{([^}]*)\})?", block)
        if opt is None:
            continue
        choices = [c.strip() for c in (opt.group(2) or "").split(",") if c.strip()]
        if choices:
            for wanted in ("readiness", "poll"):
                picked = [c for c in choices if wanted in c.lower()]
                if picked:
                    return [opt.group(1), picked[0]]
            continue
        if re.match(r"--[\w-]+\s+[A-Z_]+", block.strip()):
            continue  # takes a value we cannot guess
        if "readiness" in opt.group(1) or "poll" in opt.group(1):
            return [opt.group(1)]
    return None


def server_specs(
    app: str,
    backends: list[str],
    host: str = "127.0.0.1",
    peers: bool = True,
    workers: int | None = None,
    malloc: str = "stock",
    loops: bool = False,
) -> tuple[list[ServerSpec], list[str]]:
    """The servers to compare for ``app`` ("echo" or "http"), and notes on what is left out.

    ``loops=True`` adds the asyncio-loop servers: for "echo", the Protocol and
    streams echo servers of ``bench/aio_echo.py`` on ``iomux.new_event_loop``
    per backend and on rloop (plus streams on asyncio and uvloop); for
    "http", uvicorn on uvloop, asyncio and ``iomux:new_event_loop`` per
    backend (see :func:`loop_specs`). ``malloc="steady"`` runs every server
    with :data:`STEADY_MALLOC`.
    """
    specs: list[ServerSpec] = []
    notes: list[str] = []
    available = []
    for info in iomux.backends():
        if backends and info.name not in backends:
            continue
        if not info.available:
            notes.append(f"iomux-{info.name}: backend unavailable ({info.reason})")
            continue
        available.append(info)
    if reactor_available():
        for info in available:
            base = [
                sys.executable,
                "-m",
                "iomux",
                "serve",
                app,
                "--backend",
                info.name,
                "--host",
                host,
            ]
            if workers:
                base += ["--workers", str(workers)]
            cap = info.capabilities.max_fd if info.capabilities else None
            specs.append(ServerSpec(f"iomux-{info.name}", base, "iomux", info.name, cap))
            if info.name == "io_uring":
                extra = readiness_args(app)
                if extra:
                    specs.append(
                        ServerSpec(
                            "iomux-io_uring-readiness", base + extra, "iomux", info.name, cap
                        )
                    )
                else:
                    notes.append("iomux-io_uring-readiness: `serve --help` shows no readiness mode")
                # The same server dispatching completions in Python instead of
                # with the C dispatcher: what the dispatcher saves, in one run.
                specs.append(
                    ServerSpec(
                        "iomux-io_uring-pydispatch",
                        base,
                        "iomux",
                        info.name,
                        cap,
                        env={"IOMUX_SPEEDUPS": "0"},
                    )
                )
    else:
        notes.append("iomux reactor: `iomux.serve` is not in this installation yet")
    before: list[ServerSpec] = []  # asyncio-loop servers listed before the stock peers
    after: list[ServerSpec] = []  # ... and after them
    if loops and workers:
        notes.append("asyncio-loop servers: single-process, left out of --workers runs")
    elif loops:
        before, after, why = loop_specs(app, available, host, peers)
        notes += why
    specs += before
    if peers and not workers:
        module = "iomux.bench.aio_echo" if app == "echo" else "iomux.bench.aio_http"
        base = [sys.executable, "-m", module, "--host", host]
        specs.append(ServerSpec("asyncio", base, "peer"))
        if uvloop_available():
            specs.append(ServerSpec("uvloop", [*base, "--uvloop"], "peer"))
        else:
            notes.append("uvloop: not installed (pip install 'iomux[bench]')")
    elif workers:
        notes.append("asyncio/uvloop: single-process servers, left out of --workers runs")
    specs += after
    if malloc == "steady":
        tunables = os.environ.get("GLIBC_TUNABLES")
        value = f"{tunables}:{STEADY_MALLOC}" if tunables else STEADY_MALLOC
        for spec in specs:
            spec.env["GLIBC_TUNABLES"] = value
    return specs, notes


def loop_specs(
    app: str, available: list[iomux.BackendInfo], host: str, peers: bool
) -> tuple[list[ServerSpec], list[ServerSpec], list[str]]:
    """The asyncio-loop servers for ``app`` (see :func:`server_specs`, ``loops=True``).

    Returns the servers to list before the stock asyncio/uvloop peers, those to
    list after them, and notes. Every server on iomux's loop gets its backend's
    ``max_fd``. rloop, uvloop and uvicorn are optional: when one is missing,
    its servers are left out with a note.
    """
    if app == "echo":
        return _echo_loop_specs(available, host, peers)
    specs, notes = _uvicorn_specs(available, host, peers)
    return [], specs, notes


def _max_fd(info: iomux.BackendInfo) -> int | None:
    return info.capabilities.max_fd if info.capabilities else None


def _echo_loop_specs(
    available: list[iomux.BackendInfo], host: str, peers: bool
) -> tuple[list[ServerSpec], list[ServerSpec], list[str]]:
    notes: list[str] = []
    base = [sys.executable, "-m", "iomux.bench.aio_echo", "--host", host]
    has_uvloop, has_rloop = uvloop_available(), module_available("rloop")
    if peers and not has_rloop:
        notes.append("rloop, streams-rloop: rloop is not installed (pip install rloop)")
    if peers and not has_uvloop:
        notes.append("streams-uvloop: uvloop is not installed (pip install 'iomux[bench]')")

    def on_iomux(prefix: str, extra: list[str]) -> list[ServerSpec]:
        return [
            ServerSpec(
                f"{prefix}-iomux-{info.name}",
                [*base, "--loop", "iomux", "--backend", info.name, *extra],
                "iomux-loop",
                info.name,
                _max_fd(info),
            )
            for info in available
        ]

    # Protocol servers: aio-iomux-BACKEND, then (after server_specs' asyncio and
    # uvloop) rloop; streams servers: streams-iomux-BACKEND, streams-asyncio, ...
    before = on_iomux("aio", [])
    after: list[ServerSpec] = []
    if peers and has_rloop:
        after.append(ServerSpec("rloop", [*base, "--loop", "rloop"], "peer"))
    after += on_iomux("streams", ["--streams"])
    if peers:
        for loop, present in (("asyncio", True), ("uvloop", has_uvloop), ("rloop", has_rloop)):
            if present:
                argv = [*base, "--loop", loop, "--streams"]
                after.append(ServerSpec(f"streams-{loop}", argv, "peer"))
    return before, after, notes


def _uvicorn_specs(
    available: list[iomux.BackendInfo], host: str, peers: bool
) -> tuple[list[ServerSpec], list[str]]:
    if not module_available("uvicorn") or not module_available("httptools"):
        return [], ["uvicorn: needs uvicorn and httptools (pip install uvicorn httptools)"]
    specs: list[ServerSpec] = []
    notes: list[str] = []
    base = [
        sys.executable,
        "-m",
        "uvicorn",
        "iomux.bench.asgi_hello:app",
        "--http",
        "httptools",
        "--host",
        host,
        "--backlog",
        "1024",
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    for info in available:
        spec = ServerSpec(
            f"uvicorn-iomux-{info.name}",
            [*base, "--loop", "iomux:new_event_loop"],
            "iomux-loop",
            info.name,
            _max_fd(info),
        )
        spec.env.update(IOMUX_BACKEND=info.name, IOMUX_BENCH_BACKEND=info.name)
        specs.append(spec)
    if peers:
        specs.append(ServerSpec("uvicorn-asyncio", [*base, "--loop", "asyncio"], "peer"))
        if uvloop_available():
            specs.append(ServerSpec("uvicorn-uvloop", [*base, "--loop", "uvloop"], "peer"))
        else:
            notes.append("uvicorn-uvloop: uvloop is not installed (pip install 'iomux[bench]')")
    return specs, notes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _prepare_child(pin: bool) -> None:
    try:  # end with the harness, even if it is killed
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
    if pin:
        try:
            os.sched_setaffinity(0, {SERVER_CPU})
        except OSError:
            pass
    try:
        os.nice(-10)
    except OSError:
        pass


def proc_cpu_seconds(pid: int, *, user_only: bool = False) -> float | None:
    """utime+stime (or utime) of a process, in seconds (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + (0 if user_only else int(fields[12]))
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int | None:
    """Resident set size of a process in bytes (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        for child in text.split():
            found.append(int(child))
            found.extend(_children(int(child)))
    return found


class Server:
    """A running server process; use as a context manager."""

    def __init__(self, spec: ServerSpec, port: int, pin: bool, host: str = "127.0.0.1") -> None:
        self.spec = spec
        self.port = port
        self.host = host
        self._log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, **spec.env)
        self.proc = subprocess.Popen(
            [*spec.argv, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=lambda: _prepare_child(pin),
        )

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 600) -> str:
        """The end of the server's output."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:].strip()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the server accepts a connection; BenchError if it dies or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.spec.name} exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if self.spec.argv.count("--workers"):
                time.sleep(0.5)  # let every worker come up
            return
        raise BenchError(f"{self.spec.name} did not listen on port {self.port} in {timeout}s")

    def pids(self) -> list[int]:
        """The server's process and its descendants (workers)."""
        return [self.proc.pid, *_children(self.proc.pid)]

    def cpu_seconds(self, *, user_only: bool = False) -> float | None:
        """Total utime+stime (or utime) of the server's processes."""
        values = [proc_cpu_seconds(pid, user_only=user_only) for pid in self.pids()]
        kept = [v for v in values if v is not None]
        return sum(kept) if kept else None

    def rss_bytes(self) -> int | None:
        """Total RSS of the server's processes."""
        values = [proc_rss_bytes(pid) for pid in self.pids()]
        kept = [v for v in values if v is not None]
        return sum(kept) if kept else None

    def stop(self) -> int | None:
        """SIGTERM the server (SIGKILL after 10 s); return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
