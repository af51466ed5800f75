"""Echo server comparison: iomux reactor and asyncio loops per backend, against peers.

The servers: ``iomux serve echo`` per backend; an asyncio Protocol echo server
and an asyncio streams echo server (``bench/aio_echo.py``) on
``iomux.new_event_loop(backend)`` per backend (``aio-iomux-BACKEND``,
``streams-iomux-BACKEND``); the same two on stock asyncio, uvloop and rloop
(``asyncio``, ``uvloop``, ``rloop``, ``streams-asyncio``, ...) as peers.
A fresh server process per run, pinned to CPU 0 (under ``nice -n -10`` when
allowed); the C load generator on CPU 1, closed loop, 64-byte messages.
Runs are interleaved (repeat 1: c=1 A B C, c=10 A B C, ...; repeat 2: ...)
and medians over the repeats are reported.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .common import (
    LOAD_CPU,
    SERVER_CPU,
    can_pin,
    command_line,
    facts_line,
    fmt,
    left_out,
    machine_facts,
    out_dir,
    progress,
    publish,
    summary_json,
)
from .contention import contention_text, measured
from .loadgen import BenchError, LoadSpec, echoload_path, run_load
from .plot import line_plot
from .report import METRICS, busy_table, errors_text, metric_tables, series, summarize
from .servers import (
    MALLOC_MODES,
    STEADY_MALLOC,
    Server,
    ServerSpec,
    free_port,
    server_specs,
)

DEFAULT_CONNS = (1, 10, 100, 1000)
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


@dataclass
class LoadConfig:
    """What every run of one benchmark shares."""

    warmup: float
    duration: float
    depth: int = 1
    size: int = 64
    mode: str = "spin"
    pin: bool = True
    http: bool = False


def load_run(spec: ServerSpec, conns: int, cfg: LoadConfig) -> dict[str, Any]:
    """Start ``spec`` fresh, drive it with echoload, stop it; return the run's numbers."""
    limit = spec.too_many(conns)
    if limit is not None:
        return {"skipped": limit}
    port = free_port()
    try:
        with Server(spec, port, cfg.pin) as server:
            server.wait_ready()
            load = LoadSpec(
                port=port,
                conns=conns,
                warmup=cfg.warmup,
                duration=cfg.duration,
                depth=cfg.depth,
                size=cfg.size,
                mode=cfg.mode,
                http=cfg.http,
                cpu=LOAD_CPU if cfg.pin else None,
                watch_pids=server.pids(),
                watch_cpu=SERVER_CPU if cfg.pin else None,
            )
            pids = server.pids()
            try:
                result = run_load(load)
            except BenchError as exc:
                raise BenchError(f"{exc}; server said: {server.log_tail(300)}") from None
    except BenchError as exc:
        return {"error": str(exc)}
    requests = result["requests"]
    cpu = result.get("server_cpu_s")
    user = result.get("server_user_s")
    return {
        "rps": result["rps"],
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "cpu_us_per_req": cpu * 1e6 / requests if cpu is not None and requests else None,
        "user_us_per_req": user * 1e6 / requests if user is not None and requests else None,
        "sys_us_per_req": (
            (cpu - user) * 1e6 / requests
            if cpu is not None and user is not None and requests
            else None
        ),
        "server_busy": result.get("server_cpu_busy"),
        "client_busy": result.get("client_busy"),
        "server_pids": pids,
        "load": result,
    }


def run_matrix(
    name: str,
    specs: list[ServerSpec],
    conns: tuple[int, ...],
    repeats: int,
    cfg: LoadConfig,
    quick: bool,
) -> list[dict[str, Any]]:
    """Run every (repeat, conns, server), interleaved; return the runs."""
    echoload_path()
    runs = []
    for rep in range(repeats):
        for c in conns:
            for spec in specs:
                result = measured(partial(load_run, spec, c, cfg), patient=not quick)
                runs.append({"rep": rep, "server": spec.name, "conns": c, **result})
                progress(f"{name}: rep {rep + 1}/{repeats} c={c} {spec.name}: {describe(result)}")
    return runs


def describe(result: dict[str, Any]) -> str:
    """One line about a run for the progress output."""
    if "skipped" in result:
        return f"n/a ({result['skipped']})"
    if "error" in result:
        return f"FAILED: {result['error'][:200]}"
    return (
        f"{fmt(result['rps'])} req/s, p50 {fmt(result['p50_us'])} us, "
        f"p99 {fmt(result['p99_us'])} us, server {fmt(result['cpu_us_per_req'])} us/req"
    )


def pick_specs(
    app: str, args: argparse.Namespace, label: str
) -> tuple[list[ServerSpec], list[str]]:
    """The servers selected on the command line (``app`` is "echo" or "http") and
    the notes on those left out, each said on stderr under ``label``, as is an
    empty choice."""
    specs, notes = server_specs(
        app, args.backend, peers=not args.no_peers, malloc=args.malloc, loops=True
    )
    if args.server:
        specs = [s for s in specs if s.name in args.server]
    for note in notes:
        progress(f"{label}: left out {note}")
    if not specs:
        progress(f"{label}: no server to run")
    return specs, notes


def run(args: argparse.Namespace) -> int:
    """``iomux bench echo``: run, print the tables, write JSON/markdown/PNG."""
    quick = args.quick
    conns = tuple(args.conns or ((1, 10) if quick else DEFAULT_CONNS))
    repeats = args.repeats or (1 if quick else 3)
    cfg = LoadConfig(
        warmup=args.warmup if args.warmup is not None else (0.2 if quick else 2.0),
        duration=args.duration or (0.5 if quick else 10.0),
        depth=args.depth,
        size=args.size,
        mode=args.client_mode,
        pin=can_pin() and not args.no_pin,
    )
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        conf = old["config"]
        conns, repeats, args.malloc = tuple(conf["conns"]), conf["repeats"], conf["malloc"]
        cfg = LoadConfig(**{k: conf[k] for k in vars(cfg)})
        runs, notes = old["runs"], old["notes"]
        servers: list[dict[str, Any]] = old["servers"]
        facts, command = old["machine"], old["command"]
    else:
        specs, notes = pick_specs("echo", args, "echo")
        if not specs:
            return 1
        runs = run_matrix("echo", specs, conns, repeats, cfg, quick)
        servers = [{"name": s.name, "argv": s.argv, "kind": s.kind} for s in specs]
        facts, command = machine_facts(), command_line(args)
    summary = summarize(runs, KEYS)
    names = [s["name"] for s in servers]
    md = [
        f"# Echo: closed loop, {cfg.size}-byte messages, depth {cfg.depth}, "
        f"{cfg.warmup}s warm-up + {cfg.duration}s measured, client mode {cfg.mode}\n\n",
        f"`{command}`\n\n",
        facts_line(facts),
        f"\nServer pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}: "
        f"{'yes' if cfg.pin else 'no'}. Fresh server per run; runs interleaved; "
        f"median of {repeats}. glibc malloc: {args.malloc}"
        f"{' (' + STEADY_MALLOC + ')' if args.malloc == 'steady' else ''}.\n\n",
        metric_tables(summary, names, conns, METRICS),
        busy_table(summary, names, conns),
        errors_text(summary),
        contention_text(runs),
    ]
    md.append(left_out(notes, ""))
    markdown = "".join(md)
    data = {
        "benchmark": "echo",
        "command": command,
        "machine": facts,
        "config": {"conns": conns, "repeats": repeats, "malloc": args.malloc, **vars(cfg)},
        "servers": servers,
        "notes": notes,
        "summary": summary_json(summary),
        "runs": runs,
    }
    folder = out_dir(args.out)
    png = line_plot(
        folder / "echo.png",
        [
            ("req/s", "throughput", series(summary, names, conns, "rps")),
            ("us", "p99 latency", series(summary, names, conns, "p99_us")),
            (
                "us per request",
                "server CPU per request",
                series(summary, names, conns, "cpu_us_per_req"),
            ),
        ],
        "connections",
        "Echo, 64-byte messages",
        logy=(False, True, False),
    )
    return publish(folder, "echo", data, markdown, png)


def add_server_options(p: argparse.ArgumentParser, conns_help: str) -> None:
    """Options shared by the server benchmarks."""
    p.add_argument("--conns", type=_int_list, help=conns_help)
    p.add_argument("--repeats", type=int, help="repeats per cell (median kept)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run")
    p.add_argument("--duration", type=float, help="measured seconds per run")
    add_server_choice(p)
    p.add_argument("--no-pin", action="store_true", help="do not pin server and client to CPUs")
    p.add_argument(
        "--client-mode",
        choices=("spin", "block"),
        default="spin",
        help="load generator waits by spinning (default) or sleeping",
    )
    add_malloc_option(p, "steady")


def add_server_choice(p: argparse.ArgumentParser) -> None:
    """``--server`` (repeatable) and ``--no-peers``: which servers run (see pick_specs)."""
    p.add_argument(
        "--server",
        action="append",
        default=[],
        help="only this server, e.g. asyncio, iomux-epoll or streams-iomux-io_uring (repeatable)",
    )
    p.add_argument(
        "--no-peers",
        action="store_true",
        help="leave out the peers (asyncio, uvloop, rloop, uvicorn on those); keep iomux's",
    )


def add_malloc_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--malloc``: glibc allocator settings for every server (see servers.STEADY_MALLOC)."""
    p.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default=default,
        help="steady: fixed glibc mmap/trim thresholds for every server; stock: glibc "
        f"defaults (default {default})",
    )


def add_parser(sub: Any) -> None:
    """Add ``echo`` to the ``bench`` subcommands."""
    p = sub.add_parser(
        "echo", help="echo servers: iomux reactor and loop per backend vs asyncio, uvloop, rloop"
    )
    add_server_options(p, "comma-separated connection counts (default 1,10,100,1000)")
    p.add_argument("--depth", type=int, default=1, help="requests in flight per connection")
    p.add_argument(
        "--size", type=int, default=64, help="bytes per message (default 64; try 65536 for bulk)"
    )
    p.add_argument(
        "--from-json", metavar="FILE", help="only redo the report from an earlier run's echo.json"
    )
    p.set_defaults(func=run)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]
