"""Wait scaling: the cost of one ``poll(0)`` with N idle fds registered.

Each registered fd is an eventfd (one fd each, so N can come near the fd
limit). For k ready fds, the first k eventfds are made readable. Backends are
interleaved: for every repeat and every N, each backend in turn registers the
N fds, times ``poll(0)`` for each k, and unregisters them. A sample is the
fastest of ten timed loops (a loop that another process interrupted only gets
slower); medians over the repeats are reported, with the ratio to the
smallest N.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import iomux

from .common import (
    command_line,
    facts_line,
    fmt,
    machine_facts,
    median,
    out_dir,
    progress,
    publish,
    raise_fd_limit,
    table,
)
from .plot import line_plot

DEFAULT_SIZES = (10, 100, 1000, 10000, 19000)
DEFAULT_READY = (0, 1, 5, 64)
QUICK_SIZES = (10, 100, 1000)
QUICK_READY = (0, 1)
#: Registered-fd counts whose cost ratio to the smallest N is the target.
TARGET_N = 19000
TARGET_RATIO = 1.2
TARGET_BACKENDS = ("epoll", "io_uring")
#: Fds kept free for the interpreter, the multiplexers and the output files.
FD_MARGIN = 32


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def time_polls(mux: iomux.Multiplexer, target_s: float, chunks: int = 10) -> tuple[float, int, int]:
    """Time ``mux.poll(0)``; return (µs per call, calls timed, events per call).

    The time is split into ``chunks`` timed loops and the fastest loop is
    kept: on a shared machine, a loop that another process interrupted is
    slower, never faster.
    """
    mux.poll(0)  # let a driver with asynchronous readiness (a ring) catch up
    start = time.perf_counter()
    events = len(mux.poll(0))
    once = max(time.perf_counter() - start, 1e-7)
    iters = int(min(max(target_s / chunks / once, 5), 100_000))
    poll = mux.poll
    best = float("inf")
    for _ in range(chunks):
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            poll(0)
        best = min(best, (time.perf_counter_ns() - t0) / iters)
    return best / 1000.0, iters * chunks, events


def _skip_reason(mux: iomux.Multiplexer, fds: list[int], n: int) -> str | None:
    if n > len(fds):
        return "fd limit"
    max_fd = mux.capabilities.max_fd
    if max_fd is not None and max(fds[:n]) >= max_fd:
        return f"limit {max_fd}"
    return None


def _measure_backend(
    mux: iomux.Multiplexer, fds: list[int], n: int, ready: tuple[int, ...], target_s: float
) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for fd in fds[:n]:
        mux.register(fd, iomux.Interest.READ)
    try:
        for k in ready:
            if k > n:
                continue
            for fd in fds[:k]:
                os.eventfd_write(fd, 1)
            try:
                us, iters, events = time_polls(mux, target_s)
            finally:
                for fd in fds[:k]:
                    os.eventfd_read(fd)
            runs.append({"k": k, "us_per_poll": us, "iters": iters, "events": events})
    finally:
        for fd in fds[:n]:
            mux.unregister(fd)
    return runs


def measure(
    names: list[str],
    sizes: tuple[int, ...],
    ready: tuple[int, ...],
    repeats: int,
    target_s: float,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run the interleaved measurement; return (runs, {backend: skip reason per N})."""
    limit = raise_fd_limit()
    # Open the multiplexers first so that their own fds (the waker, a ring) get
    # low numbers, below select's FD_SETSIZE.
    muxes = {name: iomux.open_multiplexer(name) for name in names}
    fds: list[int] = []
    try:
        room = limit - _open_fds() - FD_MARGIN
        for _ in range(min(max(sizes), room)):
            fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        runs: list[dict[str, Any]] = []
        skips: dict[str, str] = {}
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for rep in range(repeats):
                for n in sizes:
                    for name, mux in muxes.items():
                        reason = _skip_reason(mux, fds, n)
                        if reason is not None:
                            skips[f"{name}/{n}"] = reason
                            continue
                        for run in _measure_backend(mux, fds, n, ready, target_s):
                            runs.append({"rep": rep, "backend": name, "n": n, **run})
                    progress(f"wait: repeat {rep + 1}/{repeats}, N={n} done")
        finally:
            if gc_was:
                gc.enable()
        return runs, skips
    finally:
        for fd in fds:
            os.close(fd)
        for mux in muxes.values():
            mux.close()


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[int, float | None]]]:
    """Median µs per poll: ``{backend: {k: {n: µs}}}``."""
    groups: dict[tuple[str, int, int], list[float]] = {}
    for run in runs:
        groups.setdefault((run["backend"], run["k"], run["n"]), []).append(run["us_per_poll"])
    out: dict[str, dict[int, dict[int, float | None]]] = {}
    for (name, k, n), values in groups.items():
        out.setdefault(name, {}).setdefault(k, {})[n] = median(values)
    return out


def target_status(summary: dict[str, dict[int, dict[int, float | None]]], smallest: int) -> str:
    """Say whether cost(19000) / cost(smallest N) <= 1.2 for epoll and io_uring (k=0)."""
    parts = []
    for name in TARGET_BACKENDS:
        costs = summary.get(name, {}).get(0, {})
        big, small = costs.get(TARGET_N), costs.get(smallest)
        if big is None or small is None:
            parts.append(f"{name}: not measured")
            continue
        r = big / small
        verdict = "met" if r <= TARGET_RATIO else "NOT met"
        parts.append(f"{name}: {r:.2f}x ({verdict})")
    return (
        f"Target: cost at N={TARGET_N} <= {TARGET_RATIO}x the cost at N={smallest}, "
        f"k=0 -- " + "; ".join(parts)
    )


def render(
    summary: dict[str, dict[int, dict[int, float | None]]],
    names: list[str],
    unavailable: dict[str, str],
    skips: dict[str, str],
    sizes: tuple[int, ...],
    ready: tuple[int, ...],
    facts: dict[str, Any],
    command: str,
) -> str:
    """The markdown report."""
    smallest = min(sizes)
    out = [f"# Wait scaling: one poll(0) with N idle fds registered\n\n`{command}`\n\n"]
    out.append(facts_line(facts) + "\n")
    out.append(
        "Median us per poll(0), including the iomux Python layer (ratio to the smallest N "
        "that holds the k ready fds).\n\n"
    )
    for k in ready:
        out.append(f"## k = {k} ready fd{'s' if k != 1 else ''}\n\n")
        rows = []
        base_n = min((n for n in sizes if n >= k), default=smallest)
        for n in sizes:
            row = [f"{n:,}"]
            for name in names:
                reason = skips.get(f"{name}/{n}")
                cost = summary.get(name, {}).get(k, {}).get(n)
                base = summary.get(name, {}).get(k, {}).get(base_n)
                if k > n:
                    row.append("n/a (k > N)")
                elif reason is not None:
                    row.append(f"n/a ({reason})")
                elif cost is None:
                    row.append("n/a")
                else:
                    rel = f"{cost / base:.2f}x" if base else "-"
                    row.append(f"{fmt(cost)} ({rel})")
            rows.append(row)
        out.append(table(["N", *names], rows) + "\n")
    if unavailable:
        out.append("Not measured: ")
        out.append("; ".join(f"{n} ({r})" for n, r in unavailable.items()) + ".\n\n")
    out.append(target_status(summary, smallest) + "\n")
    return "".join(out)


def run(args: argparse.Namespace) -> int:
    """``iomux bench wait``: measure, print the table, write JSON/markdown/PNG."""
    sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    ready = tuple(args.ready or (QUICK_READY if args.quick else DEFAULT_READY))
    repeats = args.repeats or (2 if args.quick else 5)
    target_s = (args.target_ms or (3.0 if args.quick else 50.0)) / 1000.0
    infos = [b for b in iomux.backends() if not args.backend or b.name in args.backend]
    names = [b.name for b in infos if b.available]
    unavailable = {b.name: b.reason for b in infos if not b.available}
    if not names:
        progress("wait: no backend available")
        return 1
    progress(f"wait: backends {', '.join(names)}; N {sizes}; k {ready}; {repeats} repeats")
    runs, skips = measure(names, sizes, ready, repeats, target_s)
    summary = summarize(runs)
    facts = machine_facts()
    command = command_line(args)
    markdown = render(summary, names, unavailable, skips, sizes, ready, facts, command)
    data = {
        "benchmark": "wait",
        "command": command,
        "machine": facts,
        "config": {"sizes": sizes, "ready": ready, "repeats": repeats, "target_s": target_s},
        "backends": names,
        "unavailable": unavailable,
        "skipped": skips,
        "summary_us": {
            n: {str(k): {str(s): v for s, v in c.items()} for k, c in by.items()}
            for n, by in summary.items()
        },
        "runs": runs,
    }
    folder = out_dir(args.out)
    panels = []
    for k in sorted({ready[0], ready[-1]}):
        series = {
            name: [(float(n), summary.get(name, {}).get(k, {}).get(n)) for n in sizes]
            for name in names
        }
        panels.append(("us per poll(0)", f"k = {k} ready", series))
    png = line_plot(
        folder / "wait.png",
        panels,
        "registered idle fds (N)",
        "Cost of one poll(0)",
        logx=True,
        logy=True,
    )
    return publish(folder, "wait", data, markdown, png)


def add_parser(sub: Any) -> None:
    """Add ``wait`` to the ``bench`` subcommands."""
    p = sub.add_parser("wait", help="cost of poll(0) against the number of registered fds")
    p.add_argument("--sizes", type=_int_list, help="comma-separated N values")
    p.add_argument("--ready", type=_int_list, help="comma-separated ready-fd counts k")
    p.add_argument("--repeats", type=int, help="repeats per point (median kept)")
    p.add_argument("--target-ms", type=float, help="time spent per sample, ms")
    p.set_defaults(func=run)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]
