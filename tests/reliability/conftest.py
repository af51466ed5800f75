"""Reliability tests: make ``relsupport`` importable and print the figures they gathered."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import relsupport


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print one line of figures per reliability test and backend."""
    if not relsupport.FIGURES:
        return
    terminalreporter.section("iomux reliability figures")
    for row in relsupport.FIGURES:
        rest = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("test", "backend"))
        terminalreporter.write_line(f"{row['test']} [{row['backend']}]: {rest}")
