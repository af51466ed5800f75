"""User-space instructions per request: each echo server (or, with ``--app http``,
each HTTP server, uvicorn on every loop included) under callgrind.

Each server is started under ``valgrind --tool=callgrind``, which counts every
machine instruction the server process runs in user space (its own code,
Python's interpreter, the C extensions, libc). The load generator first sends
2,000 requests (after its usual one-second warm-up) so that the first-time
costs (imports, caches, callgrind's own translation) are out of the way; then
callgrind's counters are zeroed with ``callgrind_control -z``, the load
generator sends exactly N requests over C connections, and the counters are
dumped with ``callgrind_control -d``. The instruction total of that dump
divided by the requests answered is the figure reported.

The counted run has no warm-up and a window far longer than it needs, so it
stops after N requests and not at a time limit: with the load generator's
default one-second warm-up, the requests sent during the warm-up would be
counted by callgrind but not by the load generator, and the figure would be
wrong. The count includes what the server does to accept and serve the C
connections of the counted run, spread over its N requests.

Instruction counts do not depend on how fast the machine is or on what else
runs on it, so they compare servers more steadily than CPU time does; they
leave out the kernel (system calls, the TCP stack) and do not weigh cache
misses or branch mispredictions. Callgrind runs the server tens of times
slower, so only the counts mean anything, not the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common
from .common import facts_line, fmt, left_out, progress, ratio, table
from .echo import _int_list, add_malloc_option, add_server_choice, pick_specs
from .loadgen import BenchError, LoadSpec, echoload_path, run_load
from .plot import bar_plot
from .report import family, summarize
from .servers import STEADY_MALLOC, Server, ServerSpec, free_port

#: Requests sent before the counters are zeroed (after echoload's default warm-up).
WARMUP_REQUESTS = 2000
#: The counted run's window, in seconds: long enough never to end it before N requests.
COUNT_WINDOW = 900.0
#: Seconds a server under callgrind may take to start listening, and to write a dump.
READY_TIMEOUT = 120.0
DUMP_TIMEOUT = 60.0
KEYS = ("instructions_per_request", "instructions", "requests")
BASE = "uvloop"
#: What one request is, per --app.
APPS = {"echo": "64-byte echo request", "http": "HTTP keep-alive request"}


@dataclasses.dataclass(frozen=True)
class Tools:
    """The valgrind programs a run needs."""

    valgrind: str
    control: str


def find_tools() -> Tools:
    """``valgrind`` and ``callgrind_control``; BenchError if either is missing."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        missing = "valgrind" if valgrind is None else "callgrind_control"
        raise BenchError(
            f"instructions: {missing} is not installed; it comes with valgrind "
            "(apt-get install valgrind)"
        )
    return Tools(valgrind, control)


def valgrind_version(tools: Tools) -> str | None:
    """``valgrind --version`` (e.g. ``valgrind-3.19.0``), or None if it fails."""
    try:
        done = subprocess.run(
            [tools.valgrind, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def parse_callgrind_total(text: str) -> int | None:
    """The instruction count of a callgrind dump: its ``summary:`` line, else ``totals:``.

    With one event (Ir, the default) both lines hold one number. ``summary:``
    is what ``callgrind_annotate`` reports as the program total; the first
    dump after ``callgrind_control -z`` can have a larger ``totals:`` (the sum
    of the cost lines), so ``totals:`` is only the fallback.
    """
    found: dict[str, int] = {}
    for line in text.splitlines():
        for key in ("summary:", "totals:"):
            if line.startswith(key) and key not in found:
                fields = line[len(key) :].split()
                if fields and fields[0].isdigit():
                    found[key] = int(fields[0])
    return found.get("summary:", found.get("totals:"))


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def traceable_argv(argv: list[str]) -> list[str]:
    """``argv`` with a program valgrind can run: a binary, not a wrapper script.

    Valgrind follows symbolic links itself, so a virtual environment's
    ``bin/python`` (a link to the interpreter) is kept as it is: Python finds
    its environment from that path, and resolving the link would lose it. A
    Python that is a script (a pyenv shim, for one) is replaced by this
    process's interpreter, ``sys.executable``, or the file it links to.
    """
    program = shutil.which(argv[0]) or argv[0]
    if _is_elf(program):
        return argv
    if Path(argv[0]).name.startswith("python"):
        for candidate in (sys.executable, os.path.realpath(sys.executable)):
            if _is_elf(candidate):
                return [candidate, *argv[1:]]
    raise BenchError(
        f"{argv[0]} is not a binary (a wrapper script?): callgrind would count the wrapper"
    )


def callgrind_spec(spec: ServerSpec, tools: Tools, folder: Path) -> ServerSpec:
    """``spec`` run under callgrind, its dumps going to ``folder/cg.out.PID.N``."""
    argv = [
        tools.valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={folder / 'cg.out.%p'}",
        *traceable_argv(spec.argv),
    ]
    return dataclasses.replace(spec, argv=argv, env=dict(spec.env))


def _control(tools: Tools, option: str, pid: int) -> None:
    try:
        done = subprocess.run(
            [tools.control, option, str(pid)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DUMP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"callgrind_control {option} {pid} did not answer") from None
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip()[-300:]
        raise BenchError(f"callgrind_control {option} {pid} failed: {said}")


def _read_dump(path: Path, timeout: float) -> str:
    """The dump's text once it is complete (its last line, ``totals:``, is written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        if "\ntotals:" in text:
            return text
        time.sleep(0.1)
    raise BenchError(f"callgrind wrote no complete dump {path.name} in {timeout:.0f}s")


def instruction_run(
    spec: ServerSpec, conns: int, requests: int, tools: Tools, http: bool = False
) -> dict[str, Any]:
    """Count one server's instructions over ``requests`` requests on ``conns`` connections
    (64-byte echoes, or HTTP keep-alive GETs with ``http``).

    Returns the total, the requests the load generator saw answered and their
    quotient, or ``{"error": ...}`` / ``{"skipped": ...}``.
    """
    limit = spec.too_many(conns)
    if limit is not None:
        return {"skipped": limit}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="iomux-callgrind-") as tmp:
        try:
            traced = callgrind_spec(spec, tools, Path(tmp))
            with Server(traced, port, pin=False) as server:
                try:
                    server.wait_ready(timeout=READY_TIMEOUT)
                    pid = server.proc.pid  # valgrind runs the server in its own process
                    run_load(LoadSpec(port=port, conns=conns, requests=WARMUP_REQUESTS, http=http))
                    _control(tools, "-z", pid)
                    result = run_load(
                        LoadSpec(
                            port=port,
                            conns=conns,
                            warmup=0.0,
                            duration=COUNT_WINDOW,
                            requests=requests,
                            http=http,
                        ),
                        timeout=COUNT_WINDOW + 60.0,
                    )
                    _control(tools, "-d", pid)
                    text = _read_dump(Path(tmp) / f"cg.out.{pid}.1", DUMP_TIMEOUT)
                except BenchError as exc:
                    raise BenchError(f"{exc}; server said: {server.log_tail(300)}") from None
                finally:
                    # A Python server under valgrind does not end on SIGTERM.
                    server.proc.kill()
                    server.proc.wait()
        except BenchError as exc:
            return {"error": str(exc)}
    total = parse_callgrind_total(text)
    if total is None:
        return {"error": "the callgrind dump has no summary: or totals: line"}
    answered = int(result["requests"])
    return {
        "instructions_per_request": total / answered if answered else None,
        "instructions": total,
        "requests": answered,
        "rps_under_callgrind": result.get("rps"),
    }


def describe(result: dict[str, Any]) -> str:
    """One progress line's worth of a run's result."""
    per = result.get("instructions_per_request")
    if per is None:
        return str(result.get("skipped") or result.get("error") or "no result")
    return f"{fmt(per)} instructions/request ({result['requests']:,} requests)"


def _spread(runs: list[dict[str, Any]], server: str, conns: int) -> str:
    values = [
        r["instructions_per_request"]
        for r in runs
        if r["server"] == server
        and r["conns"] == conns
        and r.get("instructions_per_request") is not None
    ]
    if len(values) < 2:
        return ""
    return f" ({fmt(min(values))}-{fmt(max(values))})"


def render(
    runs: list[dict[str, Any]],
    names: list[str],
    conns: tuple[int, ...],
    config: dict[str, Any],
    facts: dict[str, Any],
    command: str,
    notes: list[str],
) -> str:
    """The markdown report: a row per server and connection count."""
    summary = summarize(runs, KEYS)
    key = KEYS[0]

    def value(server: str, c: int) -> float | None:
        cell = summary.get(server, {}).get(c, {})
        got: float | None = cell.get(key)
        return got

    has_base = any(value(family(n) + BASE, c) is not None for n in names for c in conns)
    header = ["server", "conns", "instructions / request", "requests", "instructions"]
    if has_base:
        header.insert(3, f"x {BASE}")
    rows = []
    for name in names:
        for c in conns:
            cell = summary.get(name, {}).get(c, {})
            per = cell.get(key)
            if per is None:
                why = cell.get("skipped") or "; ".join(cell.get("errors", [])) or "no result"
                row = [name, str(c), f"n/a ({str(why)[:100]})", "", ""]
            else:
                row = [
                    name,
                    str(c),
                    fmt(per) + _spread(runs, name, c),
                    f"{cell['requests']:,.0f}",
                    f"{cell['instructions']:,.0f}",
                ]
            if has_base:
                row.insert(3, ratio(per, value(family(name) + BASE, c)))
            rows.append(row)
    repeats = config["repeats"]
    malloc = config["malloc"]
    title = (
        f"# User-space instructions per {APPS[config['app']]} ({config['requests']:,} "
        f"requests per run)\n\n`{command}`\n\n"
    )
    method = (
        f"\nCounted by {config['valgrind'] or 'valgrind'} `--tool=callgrind` in the server "
        f"process: counters zeroed after {WARMUP_REQUESTS:,} warm-up requests, then "
        "dumped after the counted ones (load generator warm-up 0, so it stops at the "
        "request count); instructions / requests answered. A fresh server per run"
        + (f", median of {repeats} (min-max in brackets)" if repeats > 1 else "")
        + f". glibc malloc: {malloc}"
        + (f" ({STEADY_MALLOC})" if malloc == "steady" else "")
        + ". Kernel work is not counted; callgrind slows the server, so only the counts "
        "mean anything, not the time.\n\n"
    )
    baseline = (
        f"\n`x {BASE}`: against `{BASE}` in the same run (`streams-*` rows against "
        f"`streams-{BASE}`, `uvicorn-*` rows against `uvicorn-{BASE}`); `-` = it did not run.\n"
        if has_base
        else ""
    )
    md = [title, facts_line(facts), method, table(header, rows), baseline]
    md.append(left_out(notes))
    return "".join(md)


def run(args: argparse.Namespace) -> int:
    """``iomux bench instructions``: count, print the table, write JSON/markdown/PNG."""
    tools = find_tools()
    requests = args.requests or (1000 if args.quick else 20000)
    conns = tuple(args.conns or ((10,) if args.quick else (100,)))
    repeats = args.repeats or 1
    specs, notes = pick_specs(args.app, args, "instructions")
    if not specs:
        return 1
    echoload_path()
    runs: list[dict[str, Any]] = []
    for rep in range(repeats):
        for c in conns:
            for spec in specs:
                result = instruction_run(spec, c, requests, tools, http=args.app == "http")
                runs.append({"rep": rep, "server": spec.name, "conns": c, **result})
                progress(
                    f"instructions: rep {rep + 1}/{repeats} c={c} {spec.name}: {describe(result)}"
                )
    names = [s.name for s in specs]
    facts = common.machine_facts()
    command = common.command_line(args)
    config = {
        "app": args.app,
        "requests": requests,
        "conns": conns,
        "repeats": repeats,
        "malloc": args.malloc,
        "warmup_requests": WARMUP_REQUESTS,
        "valgrind": valgrind_version(tools),
    }
    markdown = render(runs, names, conns, config, facts, command, notes)
    summary = summarize(runs, KEYS)
    data = {
        "benchmark": "instructions",
        "command": command,
        "machine": facts,
        "config": config,
        "servers": [{"name": s.name, "argv": s.argv, "kind": s.kind, "env": s.env} for s in specs],
        "notes": notes,
        "summary": common.summary_json(summary),
        "runs": runs,
    }
    folder = common.out_dir(args.out)
    png = bar_plot(
        folder / "instructions.png",
        [
            (
                f"instructions per request, c={c}",
                {n: summary.get(n, {}).get(c, {}).get(KEYS[0]) for n in names},
            )
            for c in conns
        ],
        f"User-space instructions per {APPS[args.app]} (callgrind)",
    )
    return common.publish(folder, "instructions", data, markdown, png)


def add_parser(sub: Any) -> None:
    """Add ``instructions`` to the ``bench`` subcommands."""
    p = sub.add_parser(
        "instructions", help="callgrind: user-space instructions per request per server"
    )
    p.add_argument("--requests", type=int, help="requests counted per run (default 20000)")
    p.add_argument(
        "--conns", type=_int_list, help="comma-separated connection counts (default 100)"
    )
    p.add_argument("--repeats", type=int, help="runs per server and count (median kept)")
    p.add_argument(
        "--app",
        choices=tuple(APPS),
        default="echo",
        help="echo: the echo servers, 64-byte messages (default); http: the HTTP servers "
        "(iomux serve http, asyncio/uvloop + httptools, uvicorn on each loop), keep-alive GETs",
    )
    add_server_choice(p)
    add_malloc_option(p, "steady")
    p.set_defaults(func=run)
