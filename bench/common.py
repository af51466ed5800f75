"""Helpers shared by the benchmarks: machine facts, progress, output files, tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The server runs on this CPU and the load generator on LOAD_CPU (when there are two).
SERVER_CPU = 0
LOAD_CPU = 1


def progress(message: str) -> None:
    """Print one progress line to stderr at once."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def can_pin() -> bool:
    """Whether the server and the load generator can get a CPU each."""
    try:
        cpus = os.sched_getaffinity(0)
    except OSError:
        return False
    return SERVER_CPU in cpus and LOAD_CPU in cpus


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _liburing_version() -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "liburing-dev"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _module_version(name: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:
        return None


def machine_facts() -> dict[str, Any]:
    """Facts about this machine and software that a reader needs to compare runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "liburing_dev": _liburing_version(),
        "iomux": _module_version("iomux"),
        "uvloop": _module_version("uvloop"),
        "httptools": _module_version("httptools"),
        "cpuidle_governor": _read("/sys/devices/system/cpu/cpuidle/current_governor").strip()
        or None,
        "clocksource": _read(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        ).strip()
        or None,
        "rlimit_nofile": [soft, hard],
    }


def command_line(args: Any) -> str:
    """The command that produced a result, for the reports."""
    argv = sys.argv[1:]
    if "bench" in argv:
        return "python -m iomux " + " ".join(argv[argv.index("bench") :])
    return f"python -m iomux bench {getattr(args, 'bench_command', '?')} (called in-process)"


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def out_dir(path: str) -> Path:
    """Create (if needed) and return the output folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_outputs(folder: Path, name: str, data: dict[str, Any], markdown: str) -> list[Path]:
    """Write ``NAME.json`` and ``NAME.md`` into ``folder``; return their paths."""
    json_path = folder / f"{name}.json"
    md_path = folder / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


def publish(folder: Path, name: str, data: dict[str, Any], markdown: str, png: Path | None) -> int:
    """Write ``NAME.json`` and ``NAME.md``, print the report and where it all went; 0."""
    paths = write_outputs(folder, name, data, markdown)
    print(markdown)
    for path in [*paths, *([png] if png else [])]:
        progress(f"wrote {path}")
    return 0


def left_out(notes: list[str], lead: str = "\n") -> str:
    """The report's line on servers or peers left out (and why); "" when none was."""
    return f"{lead}Left out: {'; '.join(notes)}.\n" if notes else ""


def summary_json(summary: dict[str, dict[int, Any]]) -> dict[str, dict[str, Any]]:
    """A per-server, per-connection-count summary with JSON's string keys."""
    return {s: {str(c): v for c, v in by.items()} for s, by in summary.items()}


def fmt(value: float | None, unit: str = "") -> str:
    """Format a number with about three significant digits and thousands separators."""
    if value is None:
        return "n/a"
    size = abs(value)
    if size >= 1000:
        text = f"{value:,.0f}"
    elif size >= 100:
        text = f"{value:.0f}"
    elif size >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return text + unit


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` as ``1.23x``, or ``-`` when either is missing."""
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def facts_line(facts: dict[str, Any]) -> str:
    """One markdown line describing the machine."""
    return (
        f"Machine: {facts['cpu_model']}, {facts['cpus']} CPUs, kernel {facts['kernel']}, "
        f"Python {facts['python']}, liburing-dev {facts['liburing_dev'] or 'absent'}, "
        f"uvloop {facts['uvloop'] or 'absent'}, {facts['date']}.\n"
    )


def cpu_ticks(cpu: int) -> tuple[int, int] | None:
    """(busy, total) jiffies of one CPU from /proc/stat, busy including irq and softirq."""
    prefix = f"cpu{cpu} "
    for line in _read("/proc/stat").splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:9]]
            total = sum(values)
            return total - values[3] - values[4], total
    return None


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The busy share of a CPU between two :func:`cpu_ticks` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])
