"""PNG figures for the benchmarks; matplotlib is optional (``pip install iomux[bench]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import progress

Series = Mapping[str, Sequence[tuple[float, float | None]]]
#: matplotlib's default cycle has 10 colours; past them, lines change style.
COLORS = 10
LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed: no PNG (pip install 'iomux[bench]')")
        return None
    return plt


def line_plot(
    path: Path,
    panels: Sequence[tuple[str, str, Series]],
    xlabel: str,
    title: str,
    logx: bool = True,
    logy: bool | Sequence[bool] = False,
) -> Path | None:
    """Draw one line per series in each panel ``(ylabel, subtitle, series)``.

    ``logy`` is one flag for every panel or one per panel.

    Returns the PNG's path, or None when matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    logs = [logy] * len(panels) if isinstance(logy, bool) else list(logy)
    for ax, log, (ylabel, subtitle, series) in zip(axes[0], logs, panels, strict=True):
        for i, (name, points) in enumerate(series.items()):
            kept = [(x, y) for x, y in points if y is not None]
            if not kept:
                continue
            xs, ys = zip(*kept, strict=True)
            style = LINE_STYLES[i // COLORS % len(LINE_STYLES)]
            ax.plot(xs, ys, marker="o", linestyle=style, label=name)
        if logx:
            ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_plot(
    path: Path,
    panels: Sequence[tuple[str, Mapping[str, float | None]]],
    title: str,
) -> Path | None:
    """Draw one horizontal bar chart per panel ``(xlabel, {name: value})``."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels, strict=True):
        names = [n for n, v in values.items() if v is not None]
        nums = [float(values[n] or 0.0) for n in names]
        ax.barh(names, nums)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
