"""Build and drive ``echoload.c``, the C load generator (see its header comment)."""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SOURCE = Path(__file__).with_name("echoload.c")


class BenchError(RuntimeError):
    """A benchmark step failed (a tool is missing, a server died, a run broke)."""


def cache_dir() -> Path:
    """Where the compiled load generator is kept (``$IOMUX_BENCH_CACHE`` overrides)."""
    explicit = os.environ.get("IOMUX_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iomux-bench"


def echoload_path() -> Path:
    """Return the compiled load generator, compiling it with gcc on first use."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    folder = cache_dir()
    binary = folder / f"echoload-{digest}"
    if binary.exists():
        return binary
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise BenchError("a C compiler is needed to build the load generator: apt-get install gcc")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="echoload-", dir=folder)
    os.close(fd)
    cmd = [compiler, "-O2", "-Wall", "-o", tmp, str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.unlink(tmp)
        raise BenchError(f"building echoload failed: {' '.join(cmd)}\n{done.stderr}")
    os.replace(tmp, binary)
    return binary


@dataclass
class LoadSpec:
    """One run of the load generator against ``127.0.0.1:port``."""

    port: int
    conns: int = 1
    warmup: float = 1.0
    duration: float = 5.0
    depth: int = 1
    size: int = 64
    mode: str = "spin"
    http: bool = False
    requests: int = 0
    cpu: int | None = None
    watch_pids: list[int] = field(default_factory=list)
    watch_cpu: int | None = None
    sources: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    def argv(self) -> list[str]:
        """The command line of this run."""
        cmd = [
            str(echoload_path()),
            "--host", self.host,
            "--port", str(self.port),
            "--conns", str(self.conns),
            "--warmup", str(self.warmup),
            "--duration", str(self.duration),
            "--depth", str(self.depth),
            "--size", str(self.size),
            "--mode", self.mode,
        ]  # fmt: skip
        if self.http:
            cmd.append("--http")
        if self.requests:
            cmd += ["--requests", str(self.requests)]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        if self.watch_cpu is not None:
            cmd += ["--watch-cpu", str(self.watch_cpu)]
        for pid in self.watch_pids:
            cmd += ["--watch-pid", str(pid)]
        for source in self.sources:
            cmd += ["--source", source]
        return cmd


def run_load(spec: LoadSpec, timeout: float | None = None) -> dict[str, Any]:
    """Run the load generator once and return its JSON result."""
    limit = timeout if timeout is not None else spec.warmup + spec.duration + 60.0
    try:
        done = subprocess.run(
            spec.argv(), capture_output=True, text=True, timeout=limit, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"echoload did not finish within {limit:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"echoload failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"echoload printed no result: {done.stdout[-300:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class IdleHolder:
    """Open N connections, one echo round trip each, and keep them silent and open."""

    def __init__(self, port: int, count: int, sources: list[str], hold: float = 600.0) -> None:
        cmd = [
            str(echoload_path()),
            "--port", str(port),
            "--idle", str(count),
            "--hold", str(hold),
        ]  # fmt: skip
        for source in sources:
            cmd += ["--source", source]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the connections to be up; return the holder's report."""
        out = self.proc.stdout
        assert out is not None
        line = _read_line(out, timeout)
        if not line:
            err = (
                self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
            )
            raise BenchError(f"idle connections did not come up: {err.strip()[-300:]}")
        report: dict[str, Any] = json.loads(line)
        return report

    def close(self) -> None:
        """Close the connections and end the holder."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _read_line(stream: IO[str], timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(min(1.0, deadline - time.monotonic())):
                return stream.readline()
        return ""
    finally:
        sel.close()
