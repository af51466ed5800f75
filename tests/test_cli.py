"""The command line: info and conformance, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import iomux


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iomux", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_info_json() -> None:
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    names = [b["name"] for b in data["backends"]]
    assert names[:4] == ["io_uring", "epoll", "poll", "select"]
    for b in data["backends"]:
        assert isinstance(b["available"], bool) and isinstance(b["reason"], str)
        assert b["available"] or b["reason"]
    assert data["auto"] == iomux.choose().name
    assert data["kernel"]


def test_info_text_names_flaws_and_choice() -> None:
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "select [available]" in out.stdout
    assert "flaw: cannot watch fds >= FD_SETSIZE (1024)" in out.stdout
    assert "chosen now: backend" in out.stdout


def test_info_reports_bad_env() -> None:
    import os

    env = dict(os.environ, IOMUX_BACKEND="nope")
    out = subprocess.run(
        [sys.executable, "-m", "iomux", "info"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0
    assert "unknown backend 'nope'" in out.stdout


def test_conformance_on_third_party_driver_spec() -> None:
    out = _run("conformance", "--driver", "iomux.drivers.poll:PollDriver", "--", "-q", "-x")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "PollDriver:" in out.stdout and " passed" in out.stdout


def test_conformance_fails_for_broken_driver() -> None:
    out = _run("conformance", "--driver", "no.such:Driver", "--", "-q", "-x")
    assert out.returncode != 0
    assert "cannot load driver no.such:Driver" in out.stdout
