"""Medians and markdown tables for the server benchmarks (server x connections)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .common import fmt, median, ratio, table
from .contention import RETRY_ABOVE

BASES = ("asyncio", "uvloop", "rloop")
#: Name prefixes of server families: a ``streams-*`` row is compared with
#: ``streams-asyncio`` / ``streams-uvloop`` / ``streams-rloop``, a ``uvicorn-*`` row
#: with ``uvicorn-asyncio`` / ``uvicorn-uvloop``; every other row with ``asyncio`` /
#: ``uvloop`` / ``rloop`` (the Protocol peers).
FAMILIES = ("streams-", "uvicorn-")
#: The metrics every server run reports, with their table titles.
METRICS = (
    ("rps", "Throughput, req/s (higher is better)"),
    ("p50_us", "p50 latency, us (lower is better)"),
    ("p99_us", "p99 latency, us (lower is better)"),
    ("cpu_us_per_req", "Server CPU time per request, us (user+sys from /proc; lower is better)"),
    ("user_us_per_req", "Server user-space CPU per request, us (utime; lower is better)"),
    ("sys_us_per_req", "Server kernel CPU per request, us (stime; lower is better)"),
)

Summary = dict[str, dict[int, dict[str, Any]]]


def summarize(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> Summary:
    """Median of each key per (server, conns); errors and skips are carried as text.

    Only runs during which other processes used at most 15 % of a CPU count,
    unless a cell has none (then all its runs count and ``contended`` is set).
    """
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["server"], run["conns"]), []).append(run)
    out: Summary = {}
    for (server, conns), group in grouped.items():
        cell: dict[str, Any] = {}
        ok = [r for r in group if "error" not in r and "skipped" not in r]
        clean = [r for r in ok if (r.get("contention") or 0.0) <= RETRY_ABOVE]
        if ok and not clean:
            cell["contended"] = True
        ok = clean or ok
        for key in keys:
            cell[key] = median(r.get(key) for r in ok)
        cell["runs"] = len(ok)
        skipped = [r["skipped"] for r in group if "skipped" in r]
        errors = [r["error"] for r in group if "error" in r]
        if skipped:
            cell["skipped"] = skipped[0]
        if errors:
            cell["errors"] = errors
        out.setdefault(server, {})[conns] = cell
    return out


def family(server: str) -> str:
    """The family prefix of ``server`` ("" for the Protocol servers): see :data:`FAMILIES`."""
    return next((p for p in FAMILIES if server.startswith(p)), "")


def _cell(summary: Summary, server: str, conns: int, key: str, bases: list[str]) -> str:
    cell = summary.get(server, {}).get(conns, {})
    bases = [family(server) + b for b in bases]
    if cell.get("skipped"):
        return f"n/a ({cell['skipped']})"
    value = cell.get(key)
    if value is None:
        return "failed" if cell.get("errors") else "n/a"
    mark = "*" if cell.get("contended") else ""
    if not bases:
        return fmt(value) + mark
    ratios = " / ".join(ratio(value, summary.get(b, {}).get(conns, {}).get(key)) for b in bases)
    return f"{fmt(value)}{mark} ({ratios})"


def metric_tables(
    summary: Summary,
    servers: Sequence[str],
    conns: Sequence[int],
    metrics: Sequence[tuple[str, str]],
) -> str:
    """One markdown table per metric, with same-run ratios to the peers that ran.

    Each row is compared with the peers of its family (:data:`FAMILIES`): the
    column note ``(x asyncio / x uvloop / x rloop)`` means ``streams-asyncio``
    ... for a ``streams-*`` row and ``uvicorn-asyncio`` ... for a ``uvicorn-*`` row.
    """
    prefixes = {family(s) for s in servers}
    bases = [b for b in BASES if any(p + b in summary for p in prefixes)]
    note = " (" + " / ".join(f"x {b}" for b in bases) + ")" if bases else ""
    parts = []
    named = sorted(p for p in prefixes if p and any(p + b in summary for b in bases))
    if named:
        parts.append(
            "Ratios are to the same-run peers of a row's family: "
            + "; ".join(
                f"`{p}*` rows to " + " / ".join(f"`{p}{b}`" for b in bases if p + b in summary)
                for p in named
            )
            + "; other rows to "
            + (" / ".join(f"`{b}`" for b in bases if b in summary) or "none")
            + ". `-` = that peer did not run.\n\n"
        )
    for key, title in metrics:
        rows = [[s, *[_cell(summary, s, c, key, bases) for c in conns]] for s in servers]
        parts.append(f"### {title}{note}\n\n")
        parts.append(table(["server", *[f"c={c}" for c in conns]], rows) + "\n")
    kept = [
        f"{s} c={c}: {summary[s][c].get('runs', 0)}"
        for s in servers
        for c in conns
        if c in summary.get(s, {}) and not summary[s][c].get("skipped")
    ]
    parts.append(
        "Medians over the runs during which other processes used <= "
        f"{RETRY_ABOVE * 100:.0f} % of a CPU; `*` = no such run, all runs used. Runs kept: "
        + ", ".join(kept)
        + ".\n\n"
    )
    return "".join(parts)


def busy_table(summary: Summary, servers: Sequence[str], conns: Sequence[int]) -> str:
    """Server CPU busy % / load generator busy % per cell."""
    rows = []
    for server in servers:
        row = [server]
        for c in conns:
            cell = summary.get(server, {}).get(c, {})
            srv, cli = cell.get("server_busy"), cell.get("client_busy")
            left = f"{srv * 100:.0f}" if srv is not None else "?"
            right = f"{cli * 100:.0f}" if cli is not None else "?"
            flag = " !" if cli is not None and cli >= 0.95 else ""
            row.append(f"{left} / {right}{flag}")
        rows.append(row)
    return (
        "### Busy: server CPU % (/proc/stat of its CPU, incl. softirq) / load generator %\n\n"
        + table(["server", *[f"c={c}" for c in conns]], rows)
        + "\n`!` = load generator >= 95 % busy: it may be a co-bottleneck; the req/s is a "
        "lower bound.\n\n"
    )


def errors_text(summary: Summary) -> str:
    """A list of the failed runs, or ""."""
    lines = []
    for server, by_conns in summary.items():
        for conns, cell in by_conns.items():
            for err in cell.get("errors", []):
                lines.append(f"- {server} c={conns}: {err}")
    return "### Failed runs\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def series(
    summary: Summary, servers: Sequence[str], conns: Sequence[int], key: str
) -> dict[str, list[tuple[float, float | None]]]:
    """``{server: [(conns, value)]}`` for a plot."""
    return {s: [(float(c), summary.get(s, {}).get(c, {}).get(key)) for c in conns] for s in servers}
