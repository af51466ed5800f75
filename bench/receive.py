"""Bulk receive on io_uring's completion port: provided-buffer layouts and bundles.

A sender process (pinned to the load CPU) writes ``--total`` MiB in 1 MiB
``sendall`` calls over loopback TCP; this process (pinned to the server CPU)
receives them through the ring's stream port, the path the event loop's
io_uring transports use, and counts the bytes of each DATA event. Measured
per configuration: this process's CPU (user + system, ``getrusage``) per GiB
received, throughput, and the provided buffers one receive completion
filled on average. Configurations: incremental buffers (32 of 64 KiB, kernel
6.12+), and whole buffers (512 of 4 KiB) with and without receive
bundles (kernel 6.10+; the port uses them with whole buffers only). The
port refuses a feature the kernel lacks; the report's second column says
what each run used. Runs are interleaved; medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

from .common import (
    LOAD_CPU,
    SERVER_CPU,
    can_pin,
    command_line,
    facts_line,
    machine_facts,
    median,
    out_dir,
    progress,
    publish,
    table,
)
from .plot import bar_plot

#: (name, stream_port options)
CONFIGS = (
    ("incremental 32 x 64 KiB", {"buffers": 32, "buffer_size": 65536, "incremental": True}),
    ("whole 512 x 4 KiB", {"buffers": 512, "buffer_size": 4096, "incremental": False}),
)

_SENDER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])):
    s.sendall(chunk)
s.close()
"""


def _one(options: dict[str, Any], bundles: bool, mib: int, pin: bool) -> dict[str, Any]:
    """Receive ``mib`` MiB once; the figures of that run."""
    from iomux import completion as C
    from iomux.drivers.io_uring import IoUringDriver

    mux = IoUringDriver()
    mux.ring.stream_port(submitter=mux.submit, bundles=bundles, **options)
    port: Any = mux.completion_port()
    listener = socket.create_server(("127.0.0.1", 0))
    sender_cmd = [sys.executable, "-c", _SENDER, str(listener.getsockname()[1]), str(mib)]
    if pin:
        sender_cmd = ["taskset", "-c", str(LOAD_CPU), *sender_cmd]
    sender = subprocess.Popen(sender_cmd)
    conn, _ = listener.accept()
    conn.setblocking(False)
    try:
        slot = port.open(conn.fileno())
        port.read(slot)
        got, ended = 0, False
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        while not ended:
            mux.poll(1.0)
            events, _ = port.events()
            for _slot, kind, res, _off in events:
                if kind == C.DATA:
                    got += res
                elif kind in (C.EOF, C.ERROR):
                    ended = True
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        receives, filled = port.receive_counts()
        used = {"incremental": port.incremental, "bundles": port.bundles}
    finally:
        sender.wait()
        mux.close()
        conn.close()
        listener.close()
    if got != mib << 20:
        raise RuntimeError(f"received {got} bytes of {mib << 20}")
    gib = got / 2**30
    return {
        **used,
        "cpu_s_per_gib": (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / gib,
        "user_s_per_gib": (r1.ru_utime - r0.ru_utime) / gib,
        "gb_per_s": got / (t1 - t0) / 1e9,
        "buffers_per_receive": filled / receives if receives else None,
    }


def run(args: argparse.Namespace) -> int:
    """``iomux bench receive``."""
    import iomux

    if not any(b.name == "io_uring" and b.available for b in iomux.backends()):
        print("io_uring is not available here: nothing to measure (see `iomux info`)")
        return 1
    mib = args.total or (8 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 5)
    pin = can_pin() and not args.no_pin
    # Bundles are never used with incremental buffers (see StreamPort).
    cells = [
        (name, options, bundles)
        for name, options in CONFIGS
        for bundles in ((False,) if options["incremental"] else (True, False))
    ]
    runs: dict[str, list[dict[str, Any]]] = {}
    affinity = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {SERVER_CPU})
    try:
        for r in range(repeats):
            for name, options, bundles in cells:
                key = f"{name}, bundles {'on' if bundles else 'off'}"
                progress(f"receive: repeat {r + 1}/{repeats}: {key}")
                runs.setdefault(key, []).append(_one(options, bundles, mib, pin))
    finally:
        os.sched_setaffinity(0, affinity)
    rows: list[list[str]] = []
    medians: dict[str, dict[str, Any]] = {}
    for key, results in runs.items():
        m = {
            k: median(x[k] for x in results)
            for k in ("cpu_s_per_gib", "user_s_per_gib", "gb_per_s", "buffers_per_receive")
        }
        used = [f for f in ("incremental", "bundles") if results[0][f]]
        medians[key] = {**m, "used": used}
        rows.append(
            [
                key,
                ", ".join(used) or "neither",
                f"{m['cpu_s_per_gib']:.3f}",
                f"{m['user_s_per_gib']:.3f}",
                f"{m['gb_per_s']:.2f}",
                f"{m['buffers_per_receive']:.1f}" if m["buffers_per_receive"] else "-",
            ]
        )
    facts = machine_facts()
    md = (
        f"# Bulk receive on io_uring's stream port: {mib} MiB per run, median of {repeats}\n\n"
        f"`{command_line(args)}`\n\n{facts_line(facts)}\n"
        + table(
            [
                "buffers, bundles",
                "features used",
                "CPU s/GiB",
                "user s/GiB",
                "GB/s",
                "buffers/receive",
            ],
            rows,
        )
    )
    folder = out_dir(args.out)
    png = bar_plot(
        folder / "receive.png",
        [
            ("receiver CPU s/GiB", {k: v["cpu_s_per_gib"] for k, v in medians.items()}),
            ("GB/s", {k: v["gb_per_s"] for k, v in medians.items()}),
        ],
        "Bulk receive on io_uring's stream port",
    )
    data = {
        "benchmark": "receive",
        "machine": facts,
        "total_mib": mib,
        "runs": runs,
        "medians": medians,
    }
    return publish(folder, "receive", data, md, png)


def add_parser(sub: Any) -> None:
    """Add ``receive`` to the ``bench`` subcommands."""
    p = sub.add_parser("receive", help="bulk receive on io_uring: buffer layouts and bundles")
    p.add_argument("--total", type=int, help="MiB received per run (default 512)")
    p.add_argument("--repeats", type=int, help="runs per configuration (default 5)")
    p.add_argument("--no-pin", action="store_true", help="do not pin sender and receiver to CPUs")
    p.set_defaults(func=run)
