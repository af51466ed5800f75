"""HTTP/1.1 keep-alive hello world: ``iomux serve http`` and uvicorn per backend vs peers.

The peers are the same app on asyncio and uvloop with httptools
(``bench/aio_http.py``), and uvicorn + httptools serving a hello-world ASGI app
(``bench/asgi_hello.py``) with ``--loop uvloop`` and ``--loop asyncio``; uvicorn
also runs with ``--loop iomux:new_event_loop`` and ``IOMUX_BACKEND`` per backend
(``uvicorn-iomux-BACKEND``), compared with ``uvicorn-uvloop`` in the same run.
The client is ``wrk`` when installed (``-t1 --latency``), else the C load
generator's HTTP mode; ``--client`` picks one.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
from functools import partial
from typing import Any

from .common import (
    LOAD_CPU,
    SERVER_CPU,
    busy_share,
    can_pin,
    command_line,
    cpu_ticks,
    facts_line,
    left_out,
    machine_facts,
    out_dir,
    progress,
    publish,
    summary_json,
)
from .contention import contention_text, measured
from .echo import LoadConfig, add_server_options, describe, load_run, pick_specs
from .loadgen import BenchError, echoload_path
from .plot import bar_plot, line_plot
from .report import METRICS, busy_table, errors_text, metric_tables, series, summarize
from .servers import Server, ServerSpec, free_port

KEYS = (
    "rps",
    "p50_us",
    "p99_us",
    "cpu_us_per_req",
    "user_us_per_req",
    "sys_us_per_req",
    "server_busy",
    "client_busy",
)
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, req/s, p50/p99 (us) and error counts from ``wrk --latency`` output."""
    out: dict[str, Any] = {}
    for pct, key in (("50", "p50_us"), ("99", "p99_us")):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        out[key] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["bad_responses"] = int(m.group(1)) if m else 0
    return out


def _wrk(port: int, conns: int, seconds: float, pin: bool) -> str:
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, math.ceil(seconds))}s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    if pin and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(LOAD_CPU), *cmd]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish in time") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def wrk_run(spec: ServerSpec, conns: int, cfg: LoadConfig) -> dict[str, Any]:
    """Start ``spec`` fresh, warm it up and measure it with wrk; return the run's numbers."""
    limit = spec.too_many(conns)
    if limit is not None:
        return {"skipped": limit}
    port = free_port()
    try:
        with Server(spec, port, cfg.pin) as server:
            server.wait_ready()
            if cfg.warmup > 0:
                _wrk(port, conns, cfg.warmup, cfg.pin)
            cpu0, srv0, cli0 = server.cpu_seconds(), cpu_ticks(SERVER_CPU), cpu_ticks(LOAD_CPU)
            user0 = server.cpu_seconds(user_only=True)
            text = _wrk(port, conns, cfg.duration, cfg.pin)
            cpu1, srv1, cli1 = server.cpu_seconds(), cpu_ticks(SERVER_CPU), cpu_ticks(LOAD_CPU)
            user1 = server.cpu_seconds(user_only=True)
            pids = server.pids()
    except BenchError as exc:
        return {"error": str(exc)}
    result = parse_wrk(text)
    if result["rps"] is None:
        return {"error": f"unparsable wrk output: {text[-300:]}"}
    if result["socket_errors"] or result["bad_responses"]:
        result["warning"] = (
            f"{result['socket_errors']} socket errors, {result['bad_responses']} bad responses"
        )
    requests = result.get("requests")
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    result["cpu_us_per_req"] = cpu * 1e6 / requests if cpu is not None and requests else None
    user = user1 - user0 if user0 is not None and user1 is not None else None
    result["user_us_per_req"] = user * 1e6 / requests if user is not None and requests else None
    result["sys_us_per_req"] = (
        (cpu - user) * 1e6 / requests if cpu is not None and user is not None and requests else None
    )
    result["server_busy"] = busy_share(srv0, srv1) if cfg.pin else None
    result["client_busy"] = busy_share(cli0, cli1) if cfg.pin else None
    result["server_pids"] = pids
    result["wrk_output"] = text
    return result


def run(args: argparse.Namespace) -> int:
    """``iomux bench http``: run, print the tables, write JSON/markdown/PNG."""
    quick = args.quick
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "echoload"
    if client == "wrk" and not shutil.which("wrk"):
        progress("http: wrk is not installed (apt-get install wrk); use --client echoload")
        return 1
    conns = tuple(args.conns or ((10,) if quick else (100,)))
    repeats = args.repeats or (1 if quick else 3)
    cfg = LoadConfig(
        warmup=args.warmup if args.warmup is not None else (0.0 if quick else 2.0),
        duration=args.duration or (1.0 if quick else 10.0),
        mode=args.client_mode,
        pin=can_pin() and not args.no_pin,
        http=True,
    )
    specs, notes = pick_specs("http", args, "http")
    if not specs:
        return 1
    echoload_path()
    runs = []
    for rep in range(repeats):
        for c in conns:
            for spec in specs:
                runner = wrk_run if client == "wrk" else load_run
                result = measured(partial(runner, spec, c, cfg), patient=not quick)
                runs.append({"rep": rep, "server": spec.name, "conns": c, **result})
                progress(
                    f"http ({client}): rep {rep + 1}/{repeats} c={c} {spec.name}: "
                    f"{describe(result)}"
                )
    summary = summarize(runs, KEYS)
    names = [s.name for s in specs]
    facts = machine_facts()
    command = command_line(args)
    client_text = (
        f"wrk -t1 -c{','.join(str(c) for c in conns)} "
        f"-d{max(1, math.ceil(cfg.duration))}s --latency"
        if client == "wrk"
        else "echoload --http (closed loop, " + cfg.mode + ")"
    )
    md = [
        f"# HTTP/1.1 keep-alive hello world, {cfg.warmup}s warm-up + {cfg.duration}s measured\n\n",
        f"`{command}`\n\n",
        facts_line(facts),
        f"\nClient: {client_text}. Server pinned to CPU {SERVER_CPU}, client to CPU {LOAD_CPU}: "
        f"{'yes' if cfg.pin else 'no'}. Peers: asyncio/uvloop + httptools; uvicorn + "
        "httptools on uvloop/asyncio (`uvicorn-iomux-*`: uvicorn on iomux's loop). Median of "
        f"{repeats}. glibc malloc: {args.malloc}.\n\n",
        metric_tables(summary, names, conns, METRICS),
        busy_table(summary, names, conns),
        errors_text(summary),
        contention_text(runs),
    ]
    md.append(left_out(notes, ""))
    markdown = "".join(md)
    data = {
        "benchmark": "http",
        "command": command,
        "client": client,
        "machine": facts,
        "config": {"conns": conns, "repeats": repeats, "malloc": args.malloc, **vars(cfg)},
        "servers": [{"name": s.name, "argv": s.argv, "kind": s.kind} for s in specs],
        "notes": notes,
        "summary": summary_json(summary),
        "runs": runs,
    }
    folder = out_dir(args.out)
    title = f"HTTP keep-alive hello world ({client})"
    if len(conns) == 1:
        one = conns[0]
        png = bar_plot(
            folder / "http.png",
            [
                (f"req/s, c={one}", {n: summary[n][one].get("rps") for n in names}),
                (
                    f"server CPU us per request, c={one}",
                    {n: summary[n][one].get("cpu_us_per_req") for n in names},
                ),
            ],
            title,
        )
    else:
        png = line_plot(
            folder / "http.png",
            [
                ("req/s", "throughput", series(summary, names, conns, "rps")),
                (
                    "us per request",
                    "server CPU per request",
                    series(summary, names, conns, "cpu_us_per_req"),
                ),
            ],
            "connections",
            title,
        )
    return publish(folder, "http", data, markdown, png)


def add_parser(sub: Any) -> None:
    """Add ``http`` to the ``bench`` subcommands."""
    p = sub.add_parser(
        "http", help="HTTP keep-alive: iomux serve http and uvicorn per backend vs asyncio/uvloop"
    )
    add_server_options(p, "comma-separated connection counts (default 100)")
    p.add_argument(
        "--client",
        choices=("auto", "wrk", "echoload"),
        default="auto",
        help="load generator (auto: wrk if installed)",
    )
    p.set_defaults(func=run)
