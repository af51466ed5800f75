"""Idle-connection scale: server memory per idle connection and its effect on latency.

Per server: a one-connection closed-loop probe (latency without the crowd),
RSS read, then N connections opened from several 127.0.0.x source addresses,
each doing one echo round trip and then staying silent; RSS read again and the
probe repeated with the crowd up. RSS growth / N is the user-space memory an
idle connection costs (kernel socket memory is not in RSS).
"""

from __future__ import annotations

import argparse
import time
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
    median,
    out_dir,
    progress,
    publish,
    raise_fd_limit,
    table,
)
from .echo import add_malloc_option
from .loadgen import BenchError, IdleHolder, LoadSpec, echoload_path, run_load
from .plot import bar_plot
from .servers import Server, ServerSpec, free_port, server_specs

#: Connections one holder process keeps open (below the per-process fd limit).
PER_HOLDER = 15000
TARGET_BYTES = 1000
KEYS = (
    "rss_base",
    "rss_idle",
    "bytes_per_conn",
    "setup_s",
    "p50_before",
    "p50_after",
    "p99_before",
    "p99_after",
    "rps_before",
    "rps_after",
)


def _probe(server: Server, port: int, warmup: float, duration: float, pin: bool) -> dict[str, Any]:
    return run_load(
        LoadSpec(
            port=port,
            conns=1,
            warmup=warmup,
            duration=duration,
            cpu=LOAD_CPU if pin else None,
            watch_pids=server.pids(),
            watch_cpu=SERVER_CPU if pin else None,
        )
    )


def idle_run(
    spec: ServerSpec,
    count: int,
    sources: list[str],
    workers: int | None,
    warmup: float,
    duration: float,
    pin: bool,
) -> dict[str, Any]:
    """One server: probe, RSS, idle crowd up, RSS, probe again."""
    limit = spec.too_many(count)
    if limit is not None:
        return {"skipped": limit}
    room = raise_fd_limit() - 64
    if count > room * (workers or 1):
        return {"skipped": f"fd limit {room + 64} per process; use --workers"}
    port = free_port()
    holders: list[IdleHolder] = []
    try:
        with Server(spec, port, pin) as server:
            server.wait_ready()
            try:
                before = _probe(server, port, warmup, duration, pin)
                rss_base = server.rss_bytes()
                t0 = time.monotonic()
                left = count
                while left > 0:
                    chunk = min(left, PER_HOLDER)
                    holders.append(IdleHolder(port, chunk, sources))
                    left -= chunk
                reports = [h.wait_ready(timeout=300.0) for h in holders]
                setup = time.monotonic() - t0
                opened = sum(int(r["idle"]) for r in reports)
                if opened < count:
                    raise BenchError(
                        f"only {opened} of {count} idle connections came up: {server.log_tail(300)}"
                    )
                time.sleep(0.5)
                rss_idle = server.rss_bytes()
                after = _probe(server, port, warmup, duration, pin)
            finally:
                for holder in holders:
                    holder.close()
    except BenchError as exc:
        return {"error": str(exc)}
    growth = rss_idle - rss_base if rss_idle is not None and rss_base is not None else None
    return {
        "idle": opened,
        "rss_base": rss_base,
        "rss_idle": rss_idle,
        "bytes_per_conn": growth / opened if growth is not None else None,
        "setup_s": setup,
        "p50_before": before["p50_us"],
        "p50_after": after["p50_us"],
        "p99_before": before["p99_us"],
        "p99_after": after["p99_us"],
        "rps_before": before["rps"],
        "rps_after": after["rps"],
    }


def _mib(value: float | None) -> str:
    return f"{value / 1048576:.1f}" if value is not None else "n/a"


def render(
    cells: dict[str, dict[str, Any]],
    names: list[str],
    count: int,
    sources: list[str],
    repeats: int,
    facts: dict[str, Any],
    command: str,
    notes: list[str],
) -> str:
    """The markdown report."""
    rows = []
    for name in names:
        c = cells[name]
        if c.get("skipped") or c.get("bytes_per_conn") is None:
            why = c.get("skipped") or "; ".join(c.get("errors", [])) or "no result"
            rows.append([name, f"n/a ({why[:120]})", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                _mib(c["rss_base"]),
                _mib(c["rss_idle"]),
                fmt(c["bytes_per_conn"]),
                f"{c['setup_s']:.2f}",
                f"{fmt(c['p50_before'])} -> {fmt(c['p50_after'])}",
                f"{fmt(c['p99_before'])} -> {fmt(c['p99_after'])}",
                f"{fmt(c['rps_before'])} -> {fmt(c['rps_after'])}",
            ]
        )
    verdicts = []
    for name in names:
        value = cells[name].get("bytes_per_conn")
        if name.startswith(("iomux-", "aio-iomux-")) and value is not None:
            verdicts.append(
                f"{name} {fmt(value)} B ({'met' if value <= TARGET_BYTES else 'NOT met'})"
            )
    md = [
        f"# Idle connections: {count:,} idle (one echo round trip each, then silent), "
        f"from {len(sources)} source addresses\n\n`{command}`\n\n",
        facts_line(facts),
        f"\nRSS growth = RSS with the crowd up - RSS after a one-connection warm run, per idle "
        f"connection. Latency and req/s: one active closed-loop connection, same process, "
        f"without -> with the crowd. Median of {repeats}.\n\n",
        table(
            [
                "server",
                "RSS base MiB",
                "RSS with idle MiB",
                "bytes/conn",
                "accept+1st echo, s",
                "p50 us",
                "p99 us",
                "req/s",
            ],
            rows,
        ),
        f"\nTarget: <= {TARGET_BYTES} bytes per idle connection for iomux -- "
        + ("; ".join(verdicts) if verdicts else "no iomux server measured")
        + "\n",
    ]
    md.append(left_out(notes))
    return "".join(md)


def run(args: argparse.Namespace) -> int:
    """``iomux bench idle``: run, print the table, write JSON/markdown/PNG."""
    quick = args.quick
    count = args.count or (200 if quick else 15000)
    repeats = args.repeats or 1
    warmup = args.warmup if args.warmup is not None else (0.1 if quick else 1.0)
    duration = args.duration or (0.3 if quick else 5.0)
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]
    pin = can_pin() and not args.no_pin
    specs, notes = server_specs(
        "echo",
        args.backend,
        peers=not args.no_peers,
        workers=args.workers,
        malloc=args.malloc,
        loops=True,
    )
    if args.server:
        specs = [s for s in specs if s.name in args.server]
    if not specs:
        progress("idle: no server to run")
        return 1
    for note in notes:
        progress(f"idle: left out {note}")
    echoload_path()
    runs = []
    for rep in range(repeats):
        for spec in specs:
            result = idle_run(spec, count, sources, args.workers, warmup, duration, pin)
            runs.append({"rep": rep, "server": spec.name, **result})
            text = (
                f"{fmt(result['bytes_per_conn'])} B/conn, p99 {fmt(result['p99_before'])} -> "
                f"{fmt(result['p99_after'])} us"
                if "bytes_per_conn" in result
                else str(result.get("skipped") or result.get("error"))
            )
            progress(f"idle: rep {rep + 1}/{repeats} {spec.name} N={count}: {text}")
    cells: dict[str, dict[str, Any]] = {}
    for spec in specs:
        mine = [r for r in runs if r["server"] == spec.name]
        ok = [r for r in mine if "error" not in r and "skipped" not in r]
        cell: dict[str, Any] = {k: median(r.get(k) for r in ok) for k in KEYS}
        skipped = [r["skipped"] for r in mine if "skipped" in r]
        if skipped:
            cell["skipped"] = skipped[0]
        cell["errors"] = [r["error"] for r in mine if "error" in r]
        cells[spec.name] = cell
    names = [s.name for s in specs]
    facts = machine_facts()
    command = command_line(args)
    markdown = render(cells, names, count, sources, repeats, facts, command, notes)
    data = {
        "benchmark": "idle",
        "command": command,
        "machine": facts,
        "config": {
            "count": count,
            "workers": args.workers,
            "sources": sources,
            "repeats": repeats,
            "malloc": args.malloc,
            "warmup": warmup,
            "duration": duration,
            "pin": pin,
        },
        "servers": [{"name": s.name, "argv": s.argv, "kind": s.kind} for s in specs],
        "notes": notes,
        "summary": cells,
        "runs": runs,
    }
    folder = out_dir(args.out)
    png = bar_plot(
        folder / "idle.png",
        [
            ("RSS bytes per idle connection", {n: cells[n].get("bytes_per_conn") for n in names}),
            (
                "p99 us of one active connection, with the crowd",
                {n: cells[n].get("p99_after") for n in names},
            ),
        ],
        f"{count:,} idle connections",
    )
    return publish(folder, "idle", data, markdown, png)


def add_parser(sub: Any) -> None:
    """Add ``idle`` to the ``bench`` subcommands."""
    p = sub.add_parser("idle", help="RSS per idle connection and latency with an idle crowd")
    p.add_argument("--count", type=int, help="idle connections (default 15000)")
    p.add_argument(
        "--workers",
        type=int,
        help="run iomux serve with --workers N (allows more than one process holds)",
    )
    p.add_argument("--sources", type=int, default=4, help="127.0.0.x source addresses (default 4)")
    p.add_argument("--repeats", type=int, help="repeats per server (median kept)")
    p.add_argument("--warmup", type=float, help="warm-up seconds of each latency probe")
    p.add_argument("--duration", type=float, help="measured seconds of each latency probe")
    p.add_argument("--server", action="append", default=[], help="only this server (repeatable)")
    p.add_argument("--no-peers", action="store_true", help="leave out asyncio and uvloop")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and client to CPUs")
    add_malloc_option(p, "stock")
    p.set_defaults(func=run)
