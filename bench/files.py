"""File I/O: ``iomux.files`` on io_uring against aiofiles and ``asyncio.to_thread``.

Workloads (each at concurrency 1, 16, 64 and 256: that many tasks take the
files one after another; with fewer files than tasks, one task per file):

- read 2,000 files of 4 KiB (open, ``read()``, close) and 16 files of
  64 MiB (open, ``readinto`` a reused 1 MiB buffer to the end, close), with
  the page cache warm, and "cold" with ``O_DIRECT`` (aligned buffers, the
  page cache bypassed) where the filesystem allows it;
- write the same files (open ``"wb"``, write, close; no fsync);
- sendfile of a 1 GiB file over loopback TCP to a receiving process.

Peers, all in this process, one fresh event loop per run (warmed up on a
few of the files, untimed): ``iomux.files``
on iomux's loop on io_uring (kernel operations) and on stock asyncio (its
thread-pool fallback), aiofiles on stock asyncio and on uvloop, and
``asyncio.to_thread`` of the same code written with the built-in ``open()``.
For sendfile: ``iomux.reactor.splice.sendfile_splice`` on io_uring, the
iomux loop's ``sock_sendfile`` and stock asyncio's (``os.sendfile``), and
``os.sendfile`` in a thread. Runs are interleaved (every peer once per
repeat); medians over the repeats are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import iomux

from .common import (
    command_line,
    facts_line,
    fmt,
    left_out,
    machine_facts,
    median,
    out_dir,
    progress,
    ratio,
    table,
    write_outputs,
)
from .plot import bar_plot, line_plot

KiB = 1024
MiB = 1024 * KiB
DEFAULT: dict[str, Any] = {
    "small": (2000, 4 * KiB),
    "large": (16, 64 * MiB),
    "sendfile": 1024 * MiB,
}
QUICK: dict[str, Any] = {"small": (256, 4 * KiB), "large": (4, 4 * MiB), "sendfile": 32 * MiB}
DEFAULT_CONCURRENCY = (1, 16, 64, 256)
QUICK_CONCURRENCY = (1, 64)
LARGE_BUFFER = 1 * MiB
#: Files each run handles untimed first, on the same loop.
WARMUP_FILES = 4
#: (operation, file size class, cache): the workloads, in order.
WORKLOADS = (
    ("read", "small", "warm"),
    ("read", "large", "warm"),
    ("write", "small", "warm"),
    ("write", "large", "warm"),
    ("read", "small", "cold"),
    ("read", "large", "cold"),
)
BASELINE = "aiofiles/asyncio"
OURS = "iomux.files/io_uring"
TARGET_SMALL_RATIO = 2.0
TARGET_LARGE_SHARE = 0.9
TARGET_SENDFILE_SHARE = 0.9


# -- the peers -------------------------------------------------------------------------


def _direct_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_DIRECT)


class ThreadPeer:
    """The built-in ``open()`` in ``asyncio.to_thread``, one call per file."""

    @staticmethod
    def _read_small(path: str) -> int:
        with open(path, "rb") as f:
            return len(f.read())

    @staticmethod
    def _read_large(path: str, buf: Any) -> int:
        total = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
        return total

    @staticmethod
    def _write(path: str, data: Any, times: int) -> int:
        with open(path, "wb") as f:
            for _ in range(times):
                f.write(data)
        return len(data) * times

    @staticmethod
    def _read_direct(path: str, buf: Any) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            total = 0
            while n := os.preadv(fd, [buf], total):
                total += n
            return total
        finally:
            os.close(fd)

    async def read_small(self, path: str) -> int:
        return await asyncio.to_thread(self._read_small, path)

    async def read_large(self, path: str, buf: Any) -> int:
        return await asyncio.to_thread(self._read_large, path, buf)

    async def write(self, path: str, data: Any, times: int) -> int:
        return await asyncio.to_thread(self._write, path, data, times)

    async def read_direct(self, path: str, buf: Any) -> int:
        return await asyncio.to_thread(self._read_direct, path, buf)


class AiofilesPeer:
    """aiofiles (a thread-pool call per file method)."""

    def __init__(self) -> None:
        import aiofiles  # type: ignore[import-untyped,import-not-found,unused-ignore]

        self.open = aiofiles.open

    async def read_small(self, path: str) -> int:
        async with self.open(path, "rb") as f:
            return len(await f.read())

    async def read_large(self, path: str, buf: Any) -> int:
        total = 0
        async with self.open(path, "rb") as f:
            while n := await f.readinto(buf):
                total += n
        return total

    async def write(self, path: str, data: Any, times: int) -> int:
        async with self.open(path, "wb") as f:
            for _ in range(times):
                await f.write(data)
        return len(data) * times

    async def read_direct(self, path: str, buf: Any) -> int:
        total = 0
        async with self.open(path, "rb", buffering=0, opener=_direct_opener) as f:
            while n := await f.readinto(buf):
                total += n
        return total


class IomuxPeer(AiofilesPeer):
    """``iomux.files``: the same code as aiofiles' with the import changed."""

    def __init__(self) -> None:
        from iomux import files

        self.files = files
        self.open = files.open

    async def read_direct(self, path: str, buf: Any) -> int:
        files = self.files
        fd = await files.open_fd(path, os.O_RDONLY | os.O_DIRECT)
        try:
            total = 0
            while n := await files.preadinto(fd, buf, total):
                total += n
            return total
        finally:
            await files.close_fd(fd)


def _uring_loop() -> asyncio.AbstractEventLoop:
    return iomux.new_event_loop("io_uring")


def _uvloop_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


#: name -> (loop factory, peer factory, module it needs or None).
PEERS: dict[str, tuple[Callable[[], asyncio.AbstractEventLoop], Callable[[], Any], str | None]] = {
    OURS: (_uring_loop, IomuxPeer, None),
    "iomux.files/asyncio": (asyncio.new_event_loop, IomuxPeer, None),
    BASELINE: (asyncio.new_event_loop, AiofilesPeer, "aiofiles"),
    "aiofiles/uvloop": (_uvloop_loop, AiofilesPeer, "uvloop"),
    "to_thread/asyncio": (asyncio.new_event_loop, ThreadPeer, None),
}


def available_peers(only: list[str]) -> tuple[list[str], list[str]]:
    """The peers that can run here, and notes for those that cannot."""
    names, notes = [], []
    uring = next((b for b in iomux.backends() if b.name == "io_uring"), None)
    for name, (_, _, module) in PEERS.items():
        if only and name not in only:
            continue
        if name == OURS and (uring is None or not uring.available):
            notes.append(f"{name}: io_uring unavailable ({uring.reason if uring else 'absent'})")
            continue
        needed = [m for m in (module, "aiofiles" if "aiofiles" in name else None) if m]
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            notes.append(f"{name}: {', '.join(missing)} not installed")
            continue
        names.append(name)
    return names, notes


# -- the workloads ------------------------------------------------------------------------


def _aligned(size: int) -> mmap.mmap:
    """Page-aligned memory, as O_DIRECT needs."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


def direct_io_reason(folder: Path) -> str | None:
    """None if ``folder``'s filesystem reads with O_DIRECT, else why not."""
    probe = folder / ".direct-probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return f"O_DIRECT refused here: {exc.strerror}"
    try:
        buf = _aligned(4096)
        os.preadv(fd, [buf], 0)
    except OSError as exc:
        return f"O_DIRECT read failed here: {exc.strerror}"
    finally:
        os.close(fd)
        probe.unlink()
    return None


def make_files(folder: Path, kind: str, count: int, size: int) -> list[str]:
    """``count`` files of ``size`` random-ish bytes (written once, synced)."""
    paths = []
    block = hashlib.sha256(kind.encode()).digest() * (MiB // 32)
    for i in range(count):
        path = folder / f"{kind}-{i:05d}.bin"
        with open(path, "wb") as f:
            left = size
            while left:
                piece = block[: min(left, len(block))]
                f.write(piece)
                left -= len(piece)
            f.flush()
            os.fsync(f.fileno())
        paths.append(str(path))
    return paths


async def _batch(
    paths: list[str], concurrency: int, one: Callable[[str, int], Awaitable[int]]
) -> int:
    """Process every path with ``concurrency`` tasks; return the bytes moved."""
    queue = iter(paths)
    total = 0

    async def worker(index: int) -> None:
        nonlocal total
        for path in queue:
            moved = await one(path, index)
            total += moved

    await asyncio.gather(*(worker(i) for i in range(min(concurrency, len(paths)))))
    return total


def run_workload(
    name: str,
    workload: tuple[str, str, str],
    paths: list[str],
    out_paths: list[str],
    size: int,
    concurrency: int,
) -> dict[str, Any]:
    """One timed batch on a fresh loop of peer ``name``."""
    op, kind, cache = workload
    make_loop, make_peer, _ = PEERS[name]
    peer = make_peer()
    workers = min(concurrency, len(paths))
    if cache == "cold":
        buffers: list[Any] = [_aligned(min(size, LARGE_BUFFER)) for _ in range(workers)]
    else:
        buffers = [bytearray(LARGE_BUFFER) for _ in range(workers)]
    data = b"w" * min(size, LARGE_BUFFER)
    times = size // len(data)

    def one(path: str, index: int) -> Awaitable[int]:
        if op == "write":
            return peer.write(out_paths[paths.index(path)], data, times)  # type: ignore[no-any-return]
        if cache == "cold":
            return peer.read_direct(path, buffers[index])  # type: ignore[no-any-return]
        if kind == "small":
            return peer.read_small(path)  # type: ignore[no-any-return]
        return peer.read_large(path, buffers[index])  # type: ignore[no-any-return]

    loop = make_loop()
    try:
        # Untimed warm-up on the same loop: threads, the ring's kernel workers, imports.
        loop.run_until_complete(_batch(paths[:WARMUP_FILES], concurrency, one))
        start = time.perf_counter()
        moved = loop.run_until_complete(_batch(paths, concurrency, one))
        elapsed = time.perf_counter() - start
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    expected = len(paths) * size
    if moved != expected:
        return {"error": f"moved {moved} bytes, expected {expected}"}
    return {
        "seconds": elapsed,
        "files_per_s": len(paths) / elapsed,
        "mb_per_s": moved / elapsed / 1e6,
    }


# -- sendfile ---------------------------------------------------------------------------------

RECEIVER = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
buf = bytearray(4 << 20)
total = 0
while n := sock.recv_into(buf):
    total += n
sock.sendall(b"k")
print(total)
"""


@contextlib.contextmanager
def _receiver() -> Iterator[tuple[socket.socket, subprocess.Popen[str]]]:
    """A connected socket (ours) and the process draining its other end."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(listener.getsockname()[1])],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            listener.settimeout(30)
            conn, _ = listener.accept()
            with conn:
                yield conn, proc
        finally:
            proc.kill()
            proc.wait()


async def _sendfile_splice(loop: asyncio.AbstractEventLoop, sock: socket.socket, f: Any) -> int:
    from iomux.reactor.splice import sendfile_splice

    port = loop.completion_port  # type: ignore[attr-defined]
    return await sendfile_splice(loop, port, sock.fileno(), f, 0, None)


async def _sock_sendfile(loop: asyncio.AbstractEventLoop, sock: socket.socket, f: Any) -> int:
    return await loop.sock_sendfile(sock, f, fallback=False)


async def _thread_sendfile(loop: asyncio.AbstractEventLoop, sock: socket.socket, f: Any) -> int:
    def blocking() -> int:
        size = os.fstat(f.fileno()).st_size
        sent = 0
        while sent < size:
            n = os.sendfile(sock.fileno(), f.fileno(), sent, size - sent)
            if not n:
                break
            sent += n
        return sent

    sock.setblocking(True)
    return await asyncio.to_thread(blocking)


SENDERS: dict[str, tuple[Callable[[], asyncio.AbstractEventLoop], Any]] = {
    "splice/iomux-io_uring": (_uring_loop, _sendfile_splice),
    "sock_sendfile/iomux-io_uring": (_uring_loop, _sock_sendfile),
    "sock_sendfile/asyncio": (asyncio.new_event_loop, _sock_sendfile),
    "os.sendfile/to_thread": (asyncio.new_event_loop, _thread_sendfile),
}


def run_sendfile(name: str, path: str, size: int) -> dict[str, Any]:
    """Send the file once to a receiving process; time until it confirms."""
    make_loop, send = SENDERS[name]
    loop = make_loop()
    try:
        with _receiver() as (sock, proc), open(path, "rb") as f:
            sock.setblocking(False)
            start = time.perf_counter()
            try:
                sent = loop.run_until_complete(send(loop, sock, f))
            except (asyncio.SendfileNotAvailableError, NotImplementedError, OSError) as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
            sock.setblocking(True)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(60)
            ack = sock.recv(1)
            elapsed = time.perf_counter() - start
            out, _ = proc.communicate(timeout=60)
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    if ack != b"k" or sent != size or int(out.strip() or 0) != size:
        return {"error": f"sent {sent}, received {out.strip()} of {size}"}
    return {"seconds": elapsed, "mb_per_s": size / elapsed / 1e6}


# -- the report -------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """``{workload: {peer: {concurrency: {metric: median}}}}`` (errors kept)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["workload"], run["peer"], run["concurrency"]), []).append(run)
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for (workload, peer, conc), items in groups.items():
        cell: dict[str, Any] = {
            key: median(r.get(key) for r in items) for key in ("files_per_s", "mb_per_s")
        }
        errors = [r["error"] for r in items if "error" in r]
        if errors:
            cell["errors"] = errors
        out.setdefault(workload, {}).setdefault(peer, {})[conc] = cell
    return out


def workload_key(workload: tuple[str, str, str]) -> str:
    op, kind, cache = workload
    return f"{op} {kind}" + (f" ({cache})" if op == "read" else "")


def _metric(kind: str) -> tuple[str, str]:
    return ("files_per_s", " files/s") if kind == "small" else ("mb_per_s", " MB/s")


def targets(
    summary: dict[str, dict[str, dict[int, dict[str, Any]]]],
    sendfile: dict[str, dict[str, Any]],
    concurrency: tuple[int, ...],
) -> list[str]:
    """The three targets, measured or not."""
    lines = []
    small = summary.get(workload_key(("read", "small", "warm")), {})
    c = 64 if 64 in concurrency else max(concurrency)
    ours = small.get(OURS, {}).get(c, {}).get("files_per_s")
    base = small.get(BASELINE, {}).get(c, {}).get("files_per_s")
    if ours and base:
        verdict = "met" if ours / base >= TARGET_SMALL_RATIO else "NOT met"
        lines.append(
            f"4 KiB reads at concurrency {c}: {OURS} {fmt(ours)} files/s = "
            f"{ours / base:.2f}x {BASELINE} (target >= {TARGET_SMALL_RATIO}x: {verdict})"
        )
    large = summary.get(workload_key(("read", "large", "warm")), {})
    for conc in concurrency:
        ours = large.get(OURS, {}).get(conc, {}).get("mb_per_s")
        peers = {
            p: cells.get(conc, {}).get("mb_per_s")
            for p, cells in large.items()
            if not p.startswith("iomux.files")
        }
        peers = {p: v for p, v in peers.items() if v}
        if ours and peers:
            best = max(peers, key=lambda p: peers[p] or 0)
            share = ours / (peers[best] or 1)
            verdict = "met" if share >= TARGET_LARGE_SHARE else "NOT met"
            lines.append(
                f"large reads at concurrency {conc}: {ours / (peers[best] or 1):.2f}x the best "
                f"peer ({best}, {fmt(peers[best])} MB/s) (target >= "
                f"{TARGET_LARGE_SHARE:.2f}x: {verdict})"
            )
    splice = sendfile.get("splice/iomux-io_uring", {}).get("mb_per_s")
    native = sendfile.get("sock_sendfile/asyncio", {}).get("mb_per_s")
    if splice and native:
        verdict = "met" if splice / native >= TARGET_SENDFILE_SHARE else "NOT met"
        lines.append(
            f"sendfile: splice {fmt(splice)} MB/s = {splice / native:.2f}x os.sendfile "
            f"(target on par, >= {TARGET_SENDFILE_SHARE:.2f}x: {verdict})"
        )
    return lines


def render(
    summary: dict[str, dict[str, dict[int, dict[str, Any]]]],
    sendfile: dict[str, dict[str, Any]],
    names: list[str],
    concurrency: tuple[int, ...],
    sizes: dict[str, Any],
    notes: list[str],
    facts: dict[str, Any],
    command: str,
) -> str:
    """The markdown report."""
    small_n, small_size = sizes["small"]
    large_n, large_size = sizes["large"]
    out = [
        f"# File I/O: {small_n:,} files of {small_size // KiB} KiB, {large_n} of "
        f"{large_size // MiB} MiB, sendfile of {sizes['sendfile'] // MiB} MiB\n\n"
        f"`{command}`\n\n",
        facts_line(facts),
        f"\nMedian throughput per workload and concurrency (x {BASELINE}). Reads of large "
        f"files `readinto` a reused {LARGE_BUFFER // MiB} MiB buffer; cold reads use "
        "O_DIRECT.\n\n",
    ]
    for workload in WORKLOADS:
        key = workload_key(workload)
        if key not in summary:
            continue
        metric, unit = _metric(workload[1])
        out.append(f"## {key}\n\n")
        rows = []
        for name in names:
            row = [name]
            for conc in concurrency:
                cell = summary[key].get(name, {}).get(conc, {})
                value = cell.get(metric)
                base = summary[key].get(BASELINE, {}).get(conc, {}).get(metric)
                if value is None:
                    row.append("error: " + str(cell.get("errors", ["n/a"])[0])[:60])
                else:
                    row.append(f"{fmt(value, unit)} ({ratio(value, base)})")
            rows.append(row)
        out.append(table(["peer", *[f"c={c}" for c in concurrency]], rows) + "\n")
    if sendfile:
        out.append(f"## sendfile of {sizes['sendfile'] // MiB} MiB over loopback TCP\n\n")
        rows = []
        native = sendfile.get("sock_sendfile/asyncio", {}).get("mb_per_s")
        for name, cell in sendfile.items():
            value = cell.get("mb_per_s")
            if value is None:
                rows.append([name, "error: " + str(cell.get("errors", ["n/a"])[0])[:80]])
            else:
                rows.append([name, f"{fmt(value, ' MB/s')} ({ratio(value, native)} os.sendfile)"])
        out.append(table(["sender", "throughput"], rows) + "\n")
    lines = targets(summary, sendfile, concurrency)
    if lines:
        out.append("Targets:\n\n" + "".join(f"- {line}\n" for line in lines) + "\n")
    out.append(left_out(notes, ""))
    return "".join(out)


def run(args: argparse.Namespace) -> int:
    """``iomux bench files``: measure, print the tables, write JSON/markdown/PNG."""
    sizes = dict(QUICK if args.quick else DEFAULT)
    if args.small_files:
        sizes["small"] = (args.small_files, sizes["small"][1])
    if args.large_files:
        sizes["large"] = (args.large_files, sizes["large"][1])
    concurrency = tuple(
        args.concurrency or (QUICK_CONCURRENCY if args.quick else DEFAULT_CONCURRENCY)
    )
    repeats = args.repeats or (1 if args.quick else 3)
    names, notes = available_peers(args.peer)
    if not names:
        progress("files: no peer can run")
        return 1
    base = Path(args.dir) if args.dir else None
    folder = Path(tempfile.mkdtemp(prefix="iomux-bench-files-", dir=base))
    runs: list[dict[str, Any]] = []
    sendfile_runs: dict[str, list[dict[str, Any]]] = {}
    try:
        direct = direct_io_reason(folder)
        workloads = [w for w in WORKLOADS if w[2] != "cold" or direct is None]
        if direct is not None:
            notes.append(f"cold reads: {direct}")
        progress(f"files: peers {', '.join(names)}; concurrency {concurrency}; {repeats} repeats")
        inputs = {k: make_files(folder, k, *sizes[k]) for k in ("small", "large")}
        outputs = {k: [p.replace(f"{k}-", f"out-{k}-") for p in inputs[k]] for k in inputs}
        for rep in range(repeats):
            for workload in workloads:
                kind = workload[1]
                for conc in concurrency:
                    for name in names:
                        result = run_workload(
                            name, workload, inputs[kind], outputs[kind], sizes[kind][1], conc
                        )
                        runs.append(
                            {
                                "rep": rep,
                                "workload": workload_key(workload),
                                "peer": name,
                                "concurrency": conc,
                                **result,
                            }
                        )
                progress(f"files: repeat {rep + 1}/{repeats}: {workload_key(workload)} done")
        for out_paths in outputs.values():
            for path in out_paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        big = make_files(folder, "sendfile", 1, sizes["sendfile"])[0]
        senders = [s for s in SENDERS if "io_uring" not in s or OURS in names]
        for rep in range(repeats):
            for name in senders:
                sendfile_runs.setdefault(name, []).append(
                    run_sendfile(name, big, sizes["sendfile"])
                )
            progress(f"files: repeat {rep + 1}/{repeats}: sendfile done")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary = summarize(runs)
    sendfile: dict[str, dict[str, Any]] = {}
    for name, items in sendfile_runs.items():
        sendfile[name] = {"mb_per_s": median(r.get("mb_per_s") for r in items)}
        errors = [r["error"] for r in items if "error" in r]
        if errors:
            sendfile[name]["errors"] = errors
    facts = machine_facts()
    facts["aiofiles"] = _version("aiofiles")
    command = command_line(args)
    markdown = render(summary, sendfile, names, concurrency, sizes, notes, facts, command)
    data = {
        "benchmark": "files",
        "command": command,
        "machine": facts,
        "config": {
            "sizes": sizes,
            "concurrency": concurrency,
            "repeats": repeats,
            "large_buffer": LARGE_BUFFER,
        },
        "peers": names,
        "notes": notes,
        "summary": {
            w: {p: {str(c): cell for c, cell in cells.items()} for p, cells in by.items()}
            for w, by in summary.items()
        },
        "sendfile": sendfile,
        "targets": targets(summary, sendfile, concurrency),
        "runs": runs,
        "sendfile_runs": sendfile_runs,
    }
    out = out_dir(args.out)
    paths = write_outputs(out, "files", data, markdown)
    panels = []
    for workload in WORKLOADS:
        key = workload_key(workload)
        if key not in summary:
            continue
        metric, unit = _metric(workload[1])
        series = {
            name: [
                (float(c), summary[key].get(name, {}).get(c, {}).get(metric)) for c in concurrency
            ]
            for name in names
        }
        panels.append((unit.strip(), key, series))
    png = line_plot(out / "files.png", panels, "concurrency", "File I/O throughput", logy=False)
    extra: list[Path] = []
    if sendfile:
        extra_png = bar_plot(
            out / "files-sendfile.png",
            [("MB/s", {n: c.get("mb_per_s") for n, c in sendfile.items()})],
            "sendfile over loopback",
        )
        if extra_png:
            extra.append(extra_png)
    print(markdown)
    for written in [*paths, *([png] if png else []), *extra]:
        progress(f"wrote {written}")
    return 0


def _version(module: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:
        return None


def add_parser(sub: Any) -> None:
    """Add ``files`` to the ``bench`` subcommands."""
    p = sub.add_parser(
        "files", help="file I/O: iomux.files on io_uring vs aiofiles and to_thread; sendfile"
    )
    p.add_argument("--concurrency", type=int, action="append", help="tasks (repeatable)")
    p.add_argument("--repeats", type=int, help="runs of everything (default 3)")
    p.add_argument("--small-files", type=int, help="how many 4 KiB files (default 2000)")
    p.add_argument("--large-files", type=int, help="how many large files (default 16)")
    p.add_argument("--peer", action="append", default=[], help="only this peer (repeatable)")
    p.add_argument("--dir", help="where to create the files (default: the temporary folder)")
    p.set_defaults(func=run)
