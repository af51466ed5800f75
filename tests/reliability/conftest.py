"""Reliability tests: make ``relsupport`` importable and print the figures they gathered."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from iomux.drivers import _uring as U

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import relsupport


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch) -> Iterator[U.Ring]:
    """A fresh io_uring Ring; fails (never skips) where io_uring does not work."""
    monkeypatch.delenv("IOMUX_URING_FORCE_FAIL", raising=False)
    reason = U.probe()
    if reason is not None:
        pytest.fail(f"io_uring does not work on this machine: {reason}")
    r = U.Ring()
    yield r
    r.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print one line of figures per reliability test and backend."""
    if not relsupport.FIGURES:
        return
    terminalreporter.section("iomux reliability figures")
    for row in relsupport.FIGURES:
        rest = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("test", "backend"))
        terminalreporter.write_line(f"{row['test']} [{row['backend']}]: {rest}")
