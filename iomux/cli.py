"""The ``iomux`` command line: ``info``, ``conformance``, ``serve`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from collections.abc import Sequence

from . import registry
from .errors import IomuxError


def _info(args: argparse.Namespace) -> int:
    infos = registry.backends()
    try:
        selection: registry.Selection | None = registry.choose(None)
        choice_error = ""
    except IomuxError as exc:
        selection, choice_error = None, str(exc)
    if args.json:
        out = {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "backends": [info.as_dict() for info in infos],
            "auto": selection.name if selection else None,
            "chosen": selection.describe() if selection else choice_error,
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"kernel {platform.release()}, Python {platform.python_version()}")
    for info in infos:
        state = "available" if info.available else "UNAVAILABLE"
        print(f"\n{info.name} [{state}] ({info.origin})")
        if not info.available:
            print(f"  why: {info.reason}")
        caps = info.capabilities
        if caps is not None:
            print(f"  triggers: {', '.join(sorted(t.value for t in caps.triggers))}")
            print(f"  wait cost: {caps.wait_cost}")
            print(f"  max fd: {caps.max_fd if caps.max_fd is not None else 'RLIMIT_NOFILE'}")
            print(f"  register from another thread: {'yes' if caps.threadsafe_register else 'no'}")
            print(f"  completion operations: {'yes' if caps.completion else 'no'}")
            for key, note in caps.notes.items():
                print(f"  {key}: {note}")
        for key, value in info.details.items():
            print(f"  {key}: {value}")
        for flaw in info.flaws:
            print(f"  flaw: {flaw}")
    print()
    print(f"chosen now: {selection.describe() if selection else 'none: ' + choice_error}")
    return 0


def _conformance(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from .conformance.runner import run_conformance
    except ModuleNotFoundError as exc:
        if exc.name not in ("pytest", "hypothesis"):
            raise
        print(
            f"iomux: the conformance suite needs {exc.name}: pip install 'iomux[test]'",
            file=sys.stderr,
        )
        return 2

    return int(run_conformance(backends=args.backend, drivers=args.driver, pytest_args=extra))


_SUBCOMMANDS = (("iomux.serve", "add_serve_parser"), ("iomux.bench.cli", "add_bench_parser"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m iomux``."""
    parser = argparse.ArgumentParser(prog="iomux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list backends, whether each can run here, and why")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    conf = sub.add_parser(
        "conformance",
        help="run the conformance suite on built-in backends or a third-party driver",
        description="Arguments after -- go to pytest.",
    )
    conf.add_argument("--backend", action="append", default=[], help="backend name (repeatable)")
    conf.add_argument(
        "--driver",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="a Multiplexer subclass to test (repeatable)",
    )

    # Subcommands that live in their own modules register themselves here.
    for module, hook in _SUBCOMMANDS:
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        getattr(imported, hook)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "conformance":
            return _conformance(args, extra)
        code: int = args.func(args)
        return code
    except IomuxError as exc:
        print(f"iomux: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
