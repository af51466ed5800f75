"""CPU used by processes outside the benchmark while it runs (a noisy, shared machine).

Before each run the harness waits (a bounded time) for a quiet moment; after
it, the CPU that other processes used during the run is recorded, and a run
that was contended above a threshold is run once more, keeping the quieter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

#: A run whose other-process CPU exceeds this share of one CPU is retried once.
RETRY_ABOVE = 0.15
QUIET_BELOW = 0.10


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, int]:
    """utime+stime ticks of every user-space process but this one, by pid.

    A run's own server and load generator start and end between two
    snapshots, so they appear in neither and are never counted.
    """
    out: dict[int, int] = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if pid == 2 or int(fields[1]) == 2:
            continue  # kernel threads: they carry our own traffic
        out[pid] = int(fields[11]) + int(fields[12])
    return out


def other_cpu(before: dict[int, int], after: dict[int, int], exclude: Iterable[int]) -> float:
    """CPU seconds used between two snapshots by processes not in ``exclude``."""
    skip = set(exclude)
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items() if pid not in skip)
    return max(ticks, 0) / _clock_ticks()


def wait_quiet(max_wait: float = 5.0, window: float = 0.5) -> float:
    """Wait up to ``max_wait`` s for a ``window`` in which others use < 10 % of a CPU.

    Returns the last measured share.
    """
    deadline = time.monotonic() + max_wait
    share = 0.0
    while True:
        before = snapshot()
        time.sleep(window)
        share = other_cpu(before, snapshot(), ())
        share /= window
        if share < QUIET_BELOW or time.monotonic() >= deadline:
            return share


def measured(run: Callable[[], dict[str, Any]], patient: bool = True) -> dict[str, Any]:
    """Run ``run()`` after a quiet moment; retry once if others used > 15 % of a CPU.

    The run's own server processes are named by ``result["server_pids"]``.
    The result gains ``contention`` (share of one CPU used by others) and
    ``attempts``; the least contended attempt is kept. ``patient=False``
    (quick runs) neither waits nor retries.
    """
    best: dict[str, Any] | None = None
    for attempt in range(2 if patient else 1):
        if patient:
            wait_quiet()
        before, t0 = snapshot(), time.monotonic()
        result = run()
        after, t1 = snapshot(), time.monotonic()
        used = other_cpu(before, after, result.get("server_pids", ()))
        share = used / max(t1 - t0, 1e-6)
        result["contention"] = round(share, 3)
        result["attempts"] = attempt + 1
        if best is None or share < best["contention"]:
            best = result
        if share <= RETRY_ABOVE or "error" in result or "skipped" in result:
            break
    assert best is not None
    return best


def contention_text(runs: Sequence[dict[str, Any]]) -> str:
    """A markdown note on retried or contended runs ("" if there were none)."""
    lines = []
    for run in runs:
        share = run.get("contention")
        if share is None:
            continue
        retried = run.get("attempts", 1) > 1
        if retried or share > RETRY_ABOVE:
            where = f"{run['server']} c={run.get('conns', '-')} rep {run['rep'] + 1}"
            what = "retried, " if retried else ""
            lines.append(f"- {where}: {what}kept run had others at {share * 100:.0f} % of a CPU")
    if not lines:
        return ""
    return (
        "### Contention\n\nCPU used by processes outside the benchmark during a run, in % of "
        f"one CPU; above {RETRY_ABOVE * 100:.0f} % a run is retried once and the quieter kept."
        "\n\n" + "\n".join(lines) + "\n\n"
    )
