"""System calls per request: ``strace -c -f`` on each echo server for a fixed request count.

The server is started and warmed up untraced; strace then attaches to it
(and its threads and workers), the load generator sends a fixed number of
requests over C connections, and strace's summary is divided by the requests
answered. This shows what a backend's batching saves: io_uring can submit and
reap many operations per ``io_uring_enter``, where epoll needs an
``epoll_wait`` plus a ``recv`` and a ``send`` per ready connection.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    LOAD_CPU,
    can_pin,
    command_line,
    facts_line,
    left_out,
    machine_facts,
    out_dir,
    progress,
    publish,
    table,
)
from .echo import add_malloc_option
from .loadgen import BenchError, LoadSpec, echoload_path, run_load
from .plot import bar_plot
from .servers import Server, ServerSpec, free_port, server_specs

TOP = 8


def parse_strace_summary(text: str) -> dict[str, dict[str, int]]:
    """``{syscall: {"calls": n, "errors": n}}`` from ``strace -c`` output (no total row)."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[-1] == "total" or not parts[0][0].isdigit():
            continue
        name, nums = parts[-1], parts[:-1]
        try:
            calls = int(nums[3])
            errors = int(nums[4]) if len(nums) > 4 else 0
        except (ValueError, IndexError):
            continue
        out[name] = {"calls": calls, "errors": errors}
    return out


def _traced(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1]) != 0
    except OSError:
        return False
    return False


def syscall_run(spec: ServerSpec, conns: int, requests: int, pin: bool) -> dict[str, Any]:
    """Trace one server over ``requests`` echo requests; return counts per request."""
    limit = spec.too_many(conns)
    if limit is not None:
        return {"skipped": limit}
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        try:
            with Server(spec, port, pin) as server:
                server.wait_ready()
                run_load(LoadSpec(port=port, conns=conns, warmup=0.0, duration=0.3))
                cmd = ["strace", "-c", "-f", "-q", "-o", str(out)]
                for pid in server.pids():
                    cmd += ["-p", str(pid)]
                tracer = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                try:
                    deadline = time.monotonic() + 10
                    while not _traced(server.proc.pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    time.sleep(0.2)
                    result = run_load(
                        LoadSpec(
                            port=port,
                            conns=conns,
                            warmup=0.0,
                            duration=120.0,
                            requests=requests,
                            cpu=LOAD_CPU if pin else None,
                        ),
                        timeout=240,
                    )
                finally:
                    tracer.send_signal(signal.SIGINT)
                    try:
                        _, err = tracer.communicate(timeout=30)
                    except subprocess.TimeoutExpired:
                        tracer.kill()
                        _, err = tracer.communicate()
        except BenchError as exc:
            return {"error": str(exc)}
        text = out.read_text() if out.exists() else ""
    counts = parse_strace_summary(text)
    if not counts:
        return {"error": f"strace gave no summary: {err.decode(errors='replace')[-300:]}"}
    answered = int(result["requests"])
    total = sum(c["calls"] for c in counts.values())
    return {
        "requests": answered,
        "total_calls": total,
        "per_request": total / answered if answered else None,
        "calls": counts,
        "per_request_by_call": {k: v["calls"] / answered for k, v in counts.items()}
        if answered
        else {},
    }


def render(
    results: dict[str, dict[str, Any]],
    names: list[str],
    conns: int,
    requests: int,
    facts: dict[str, Any],
    command: str,
    notes: list[str],
) -> str:
    """The markdown report."""
    ok = [n for n in names if results[n].get("per_request") is not None]
    weight: dict[str, float] = {}
    for n in ok:
        for call, per in results[n]["per_request_by_call"].items():
            weight[call] = max(weight.get(call, 0.0), per)
    top = sorted(weight, key=lambda c: -weight[c])[:TOP]
    rows = []
    for n in names:
        r = results[n]
        if r.get("per_request") is None:
            why = r.get("skipped") or r.get("error") or "no result"
            rows.append([n, f"n/a ({str(why)[:100]})", *[""] * len(top)])
            continue
        by = r["per_request_by_call"]
        rows.append([n, f"{r['per_request']:.2f}", *[f"{by.get(c, 0.0):.2f}" for c in top]])
    md = [
        f"# System calls per echo request ({requests:,} requests over {conns} connections, "
        f"64-byte messages)\n\n`{command}`\n\n",
        facts_line(facts),
        "\nCounted by `strace -c -f` attached after an untraced warm-up; strace slows the "
        "server, so only the counts mean anything, not the time.\n\n",
        table(["server", "all calls / req", *top], rows),
    ]
    base = results.get("iomux-epoll", {}).get("per_request")
    for n in ok:
        if n.startswith("iomux-io_uring") and base:
            saved = 1 - results[n]["per_request"] / base
            word = "fewer" if saved >= 0 else "more"
            md.append(
                f"\n{n}: {results[n]['per_request']:.2f} calls per request against "
                f"{base:.2f} for iomux-epoll ({abs(saved) * 100:.0f} % {word}).\n"
            )
    md.append(left_out(notes))
    return "".join(md)


def run(args: argparse.Namespace) -> int:
    """``iomux bench syscalls``: trace, print the table, write JSON/markdown/PNG."""
    if shutil.which("strace") is None:
        progress("syscalls: strace is not installed (apt-get install strace)")
        return 1
    requests = args.requests or (2000 if args.quick else 20000)
    conns = args.conns or 10
    pin = can_pin() and not args.no_pin
    specs, notes = server_specs("echo", args.backend, peers=not args.no_peers, malloc=args.malloc)
    if args.server:
        specs = [s for s in specs if s.name in args.server]
    if not specs:
        progress("syscalls: no server to run")
        return 1
    echoload_path()
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        results[spec.name] = syscall_run(spec, conns, requests, pin)
        r = results[spec.name]
        text = (
            f"{r['per_request']:.2f} syscalls/request"
            if r.get("per_request") is not None
            else str(r.get("skipped") or r.get("error"))
        )
        progress(f"syscalls: {spec.name}: {text}")
    names = [s.name for s in specs]
    facts = machine_facts()
    command = command_line(args)
    markdown = render(results, names, conns, requests, facts, command, notes)
    data = {
        "benchmark": "syscalls",
        "command": command,
        "machine": facts,
        "config": {"requests": requests, "conns": conns, "pin": pin, "malloc": args.malloc},
        "servers": [{"name": s.name, "argv": s.argv, "kind": s.kind} for s in specs],
        "notes": notes,
        "results": results,
    }
    folder = out_dir(args.out)
    png = bar_plot(
        folder / "syscalls.png",
        [("system calls per request", {n: results[n].get("per_request") for n in names})],
        "System calls per echo request",
    )
    return publish(folder, "syscalls", data, markdown, png)


def add_parser(sub: Any) -> None:
    """Add ``syscalls`` to the ``bench`` subcommands."""
    p = sub.add_parser("syscalls", help="strace -c: system calls per request per backend")
    p.add_argument("--requests", type=int, help="requests to trace (default 20000)")
    p.add_argument("--conns", type=int, help="connections (default 10)")
    p.add_argument("--server", action="append", default=[], help="only this server (repeatable)")
    p.add_argument("--no-peers", action="store_true", help="leave out asyncio and uvloop")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and client to CPUs")
    add_malloc_option(p, "steady")
    p.set_defaults(func=run)
