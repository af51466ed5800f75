"""``python -m iomux bench ...``: the benchmark subcommands (see bench/README.md)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_OUT = "bench-results"


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` and its subcommands to the ``iomux`` command line."""
    from . import echo, files, httpbench, idle, instructions, receive, syscalls, wait

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quick", action="store_true", help="tiny sizes and durations (a smoke test)"
    )
    common.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder for JSON/markdown/PNG (default {DEFAULT_OUT})"
    )
    common.add_argument(
        "--backend",
        action="append",
        default=[],
        help="only this iomux backend (repeatable; default: every available one)",
    )
    bench: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="benchmarks: wait scaling, echo, http, idle connections, syscalls, instructions, "
        "receive, files",
        description=__doc__,
    )
    sub = bench.add_subparsers(dest="bench_command", required=True)

    class _Sub:
        """Pass the common options to every benchmark's parser."""

        def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
            parser: argparse.ArgumentParser = sub.add_parser(name, parents=[common], **kwargs)
            return parser

    adder = _Sub()
    for module in (wait, echo, httpbench, idle, syscalls, instructions, receive, files):
        module.add_parser(adder)
    return bench
