"""``python -m iomux conformance``: run the suite and print a per-driver summary."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pytest

from iomux.registry import AUTO_ORDER

from .plugin import REFERENCE

_PARAM = re.compile(r"\[([^\]]+)\]")


class _Summary:
    """A pytest plugin that counts outcomes per driver."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def pytest_runtest_logreport(self, report: Any) -> None:
        """Count each test once, under the driver named in its parameters.

        A failure in teardown (a leak found after the test) counts as an error,
        on top of the test's own outcome.
        """
        match = _PARAM.search(report.nodeid)
        parts = match.group(1).split("-") if match else []
        driver = next((p for p in parts if p in self.labels), "(no driver)")
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.counts[driver][report.outcome] += 1
        elif report.when == "teardown" and report.outcome == "failed":
            self.counts[driver]["error"] += 1


def run_conformance(
    backends: list[str] | None = None,
    drivers: list[str] | None = None,
    pytest_args: list[str] | None = None,
) -> int:
    """Run the conformance suite; return pytest's exit code (non-zero on any failure)."""
    args = ["--pyargs", "iomux.conformance", "-p", "no:cacheprovider", "--import-mode=importlib"]
    # iomux is imported before pytest starts; its plugin module cannot be rewritten.
    args += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    for name in backends or []:
        args += ["--iomux-backend", name]
    for spec in drivers or []:
        args += ["--iomux-driver", spec]
    args += list(pytest_args or ["-q"])
    config_labels = [spec.rpartition(":")[2] for spec in drivers or []] + list(backends or [])
    # The asyncio section also runs each of its tests once on stock asyncio.
    summary = _Summary([REFERENCE, *(config_labels or AUTO_ORDER)])
    code = int(pytest.main(args, plugins=[summary]))
    print("\nconformance summary per driver:")
    for driver, counts in sorted(
        summary.counts.items(), key=lambda item: (item[0] != REFERENCE, item[0])
    ):
        outcomes = ("passed", "skipped", "failed", "error")
        parts = ", ".join(f"{counts[k]} {k}" for k in outcomes if counts[k])
        label = f"{driver} (reference)" if driver == REFERENCE else driver
        print(f"  {label}: {parts}")
    return code
