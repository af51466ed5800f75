"""Every benchmark's --quick mode runs and writes outputs that parse.

Timings are never asserted: only that each run finished and produced numbers.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import iomux
from iomux.cli import main

# The reactor (`python -m iomux serve`): when present, its servers must appear and succeed.
REACTOR = importlib.util.find_spec("iomux.serve") is not None

HAS_CC = bool(shutil.which("gcc") or shutil.which("cc"))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS = {m: importlib.util.find_spec(m) is not None for m in ("uvloop", "rloop", "uvicorn")}
AVAILABLE = [info.name for info in iomux.backends() if info.available]
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler to build bench/echoload.c")


def run_bench(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    rc = main(["bench", name, "--quick", "--out", str(tmp_path), *extra])
    assert rc == 0
    data: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert data["machine"]["kernel"]
    md = (tmp_path / f"{name}.md").read_text()
    assert md.startswith("# ")
    assert "|---|" in md
    if HAS_MPL:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    return data


def check_servers(data: dict[str, Any], key: str) -> None:
    """Every server that ran produced `key` in every cell it was not skipped for."""
    names = [s["name"] for s in data["servers"]]
    assert "asyncio" in names
    if REACTOR:
        assert any(s["kind"] == "iomux" for s in data["servers"]), data["notes"]
    for name in names:
        for conns, cell in data["summary"][name].items():
            if cell.get("skipped"):
                continue
            assert not cell.get("errors"), (name, conns, cell.get("errors"))
            assert cell[key] is not None and cell[key] > 0, (name, conns, cell)


def test_wait(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "wait")
    assert data["runs"]
    assert "epoll" in data["backends"]
    costs = data["summary_us"]["epoll"]["0"]
    assert costs["10"] > 0 and costs["1000"] > 0
    assert all(run["events"] == run["k"] for run in data["runs"] if run["backend"] == "epoll")


def check_present(data: dict[str, Any], wanted: list[str], optional: dict[str, str]) -> None:
    """Every server in ``wanted`` ran; one in ``optional`` ran iff its module is installed.

    ``optional`` maps a server name to the module it needs; a missing module
    must leave a note naming the server instead.
    """
    names = [s["name"] for s in data["servers"]]
    for name in wanted:
        assert name in names, (name, names, data["notes"])
    for name, module in optional.items():
        if HAS[module]:
            assert name in names, (name, names, data["notes"])
        else:
            assert name not in names
            assert any(name in note for note in data["notes"]), (name, data["notes"])


@needs_cc
def test_echo(tmp_path: Path) -> None:
    # Every server, at one connection count and for a short time: about 20 servers.
    data = run_bench(tmp_path, "echo", "--conns", "10", "--warmup", "0.1", "--duration", "0.3")
    check_servers(data, "rps")
    check_servers(data, "cpu_us_per_req")
    assert AVAILABLE
    check_present(
        data,
        [f"{kind}-iomux-{b}" for kind in ("aio", "streams") for b in AVAILABLE]
        + ["streams-asyncio"],
        {name: name for name in ("uvloop", "rloop")}
        | {f"streams-{name}": name for name in ("uvloop", "rloop")},
    )
    kinds = {s["name"]: s["kind"] for s in data["servers"]}
    assert kinds[f"aio-iomux-{AVAILABLE[0]}"] == "iomux-loop"
    md = (tmp_path / "echo.md").read_text()
    assert "x asyncio" in md
    if HAS["rloop"]:
        assert "x rloop" in md


@needs_cc
@pytest.mark.skipif(
    importlib.util.find_spec("httptools") is None, reason="the asyncio peer needs httptools"
)
def test_http(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "http")
    check_servers(data, "rps")
    if not HAS["uvicorn"]:
        assert any(note.startswith("uvicorn") for note in data["notes"]), data["notes"]
        return
    check_present(
        data,
        [f"uvicorn-iomux-{b}" for b in AVAILABLE] + ["uvicorn-asyncio"],
        {"uvicorn-uvloop": "uvloop"},
    )
    if HAS["uvloop"]:
        assert (
            "`uvicorn-*` rows to `uvicorn-asyncio` / `uvicorn-uvloop`"
            in (tmp_path / "http.md").read_text()
        )


@needs_cc
def test_idle(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "idle")
    for server in data["servers"]:
        cell = data["summary"][server["name"]]
        if cell.get("skipped"):
            continue
        assert not cell["errors"], cell["errors"]
        assert cell["bytes_per_conn"] is not None
        assert cell["p99_after"] > 0


@needs_cc
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_syscalls(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "syscalls")
    for server in data["servers"]:
        result = data["results"][server["name"]]
        if result.get("skipped"):
            continue
        assert result.get("per_request", 0) > 0, result


HAS_CALLGRIND = bool(shutil.which("valgrind") and shutil.which("callgrind_control"))


@needs_cc
@pytest.mark.skipif(not REACTOR, reason="no iomux reactor (iomux.serve) to count")
@pytest.mark.skipif(not HAS_CALLGRIND, reason="valgrind is not installed")
@pytest.mark.parametrize("app", ["echo", "http"])
def test_instructions(tmp_path: Path, app: str) -> None:
    """One iomux server under callgrind for 300 requests: a real count, every request answered."""
    server = "iomux-io_uring" if "io_uring" in AVAILABLE else "iomux-epoll"
    requests, conns = 300, 10
    data = run_bench(
        tmp_path,
        "instructions",
        *("--app", app, "--requests", str(requests), "--conns", str(conns)),
        *("--server", server, "--no-peers"),
    )
    assert data["config"]["app"] == app
    assert [s["name"] for s in data["servers"]] == [server]
    [run] = data["runs"]
    assert run["server"] == server and run["conns"] == conns, run
    assert "error" not in run, run
    # echoload stops at the first pass over its ready connections that reaches the
    # count, so it may see up to one more reply per connection than it asked for.
    assert requests <= run["requests"] < requests + conns, run
    assert run["instructions"] > 0
    assert 100 < run["instructions_per_request"] < 1_000_000, run
    assert run["instructions_per_request"] == run["instructions"] / run["requests"]
    cell = data["summary"][server][str(conns)]
    assert cell["instructions_per_request"] == run["instructions_per_request"]
    report = (tmp_path / "instructions.md").read_text()
    assert server in report and ("HTTP keep-alive" in report) == (app == "http")


def test_instructions_needs_valgrind(monkeypatch: pytest.MonkeyPatch) -> None:
    from iomux.bench import instructions
    from iomux.bench.loadgen import BenchError

    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    with pytest.raises(BenchError, match="apt-get install valgrind"):
        instructions.find_tools()


def test_callgrind_parser() -> None:
    from iomux.bench.instructions import parse_callgrind_total

    head = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\nevents: Ir\n"
    body = "\nfn=(1) main\n16 3\n+1 4\n"
    assert parse_callgrind_total(head + "summary: 74846587\n" + body + "totals: 80353782") == (
        74846587
    )
    assert parse_callgrind_total(head + body + "totals: 7\n") == 7
    assert parse_callgrind_total(head + body) is None


def test_traceable_argv(tmp_path: Path) -> None:
    import sys

    from iomux.bench.instructions import traceable_argv
    from iomux.bench.loadgen import BenchError

    assert traceable_argv([sys.executable, "-m", "x"]) == [sys.executable, "-m", "x"]
    shim = tmp_path / "python"
    shim.write_text('#!/bin/sh\nexec python3 "$@"\n')
    shim.chmod(0o755)
    replaced = traceable_argv([str(shim), "-m", "x"])
    assert replaced[1:] == ["-m", "x"] and replaced[0] != str(shim)
    other = tmp_path / "wrapper"
    other.write_text("#!/bin/sh\n")
    with pytest.raises(BenchError, match="not a binary"):
        traceable_argv([str(other)])


def test_receive(tmp_path: Path) -> None:
    """Every configuration received every byte (the benchmark checks the count) and
    reports its figures; whole buffers with bundles fill several per receive.
    Without io_uring the benchmark refuses, with a non-zero exit."""
    if "io_uring" not in AVAILABLE:
        assert main(["bench", "receive", "--quick", "--out", str(tmp_path)]) == 1
        return
    data = run_bench(tmp_path, "receive")
    assert len(data["medians"]) == 3
    for key, m in data["medians"].items():
        assert m["cpu_s_per_gib"] > 0 and m["gb_per_s"] > 0, key
        if "bundles" in m["used"]:
            assert m["buffers_per_receive"] > 1, (key, m)
        else:
            assert m["buffers_per_receive"] <= 2, (key, m)


def test_wrk_parser() -> None:
    from iomux.bench.httpbench import parse_wrk

    text = """Running 1s test @ http://127.0.0.1:1/
  1 threads and 10 connections
  Latency Distribution
     50%  100.00us
     75%    1.11ms
     90%    1.18ms
     99%    1.47ms
  75412 requests in 1.01s, 5.61MB read
Requests/sec:  74935.49
"""
    parsed = parse_wrk(text)
    assert parsed["p50_us"] == pytest.approx(100.0)
    assert parsed["p99_us"] == pytest.approx(1470.0)
    assert parsed["requests"] == 75412
    assert parsed["rps"] == pytest.approx(74935.49)


def test_ratios_by_family() -> None:
    from iomux.bench.report import METRICS, metric_tables

    summary: Any = {
        name: {10: {"rps": rps, "runs": 1}}
        for name, rps in [
            ("asyncio", 100.0),
            ("uvloop", 200.0),
            ("aio-iomux-epoll", 150.0),
            ("streams-asyncio", 50.0),
            ("streams-iomux-epoll", 100.0),
            ("uvicorn-uvloop", 40.0),
            ("uvicorn-iomux-epoll", 20.0),
        ]
    }
    md = metric_tables(summary, list(summary), [10], METRICS[:1])
    assert "(x asyncio / x uvloop)" in md
    assert "| aio-iomux-epoll | 150 (1.50x / 0.75x) |" in md
    assert "| streams-iomux-epoll | 100 (2.00x / -) |" in md
    assert "| uvicorn-iomux-epoll | 20.0 (- / 0.50x) |" in md


def test_strace_parser() -> None:
    from iomux.bench.syscalls import parse_strace_summary

    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 80.81    0.231455        2893        80        40 wait4
  3.26    0.009345           6      1375           openat
------ ----------- ----------- --------- --------- ----------------
100.00    0.286417          31      1455        40 total
"""
    parsed = parse_strace_summary(text)
    assert parsed == {"wait4": {"calls": 80, "errors": 40}, "openat": {"calls": 1375, "errors": 0}}


def test_readiness_flag_detection() -> None:
    from iomux.bench.servers import readiness_args_in

    head = "usage: iomux serve [-h]\n\noptions:\n  -h, --help  show this help message and exit\n"
    assert readiness_args_in(head + "  --backend BACKEND  backend name (epoll, poll)\n") is None
    mode = "  --uring-mode {completion,readiness}\n                        how io_uring waits\n"
    assert readiness_args_in(head + mode) == ["--uring-mode", "readiness"]
    flag = "  --readiness           use io_uring as a readiness backend\n"
    assert readiness_args_in(head + flag) == ["--readiness"]


def test_files(tmp_path: Path) -> None:
    data = run_bench(
        tmp_path / "out",
        "files",
        *("--small-files", "24", "--large-files", "2", "--concurrency", "4"),
        *("--dir", str(tmp_path)),
    )
    peers = data["peers"]
    if "io_uring" in AVAILABLE:
        assert "iomux.files/io_uring" in peers
    assert "iomux.files/asyncio" in peers and "to_thread/asyncio" in peers
    has_aiofiles = importlib.util.find_spec("aiofiles") is not None
    assert ("aiofiles/asyncio" in peers) is has_aiofiles
    assert any(n.startswith("aiofiles/asyncio") for n in data["notes"]) is not has_aiofiles
    has_uvloop = HAS["uvloop"] and has_aiofiles
    assert ("aiofiles/uvloop" in peers) is has_uvloop
    assert {"read small (warm)", "read large (warm)", "write small", "write large"} <= set(
        data["summary"]
    )
    for workload, by_peer in data["summary"].items():
        key = "files_per_s" if "small" in workload else "mb_per_s"
        for peer, cells in by_peer.items():
            cell = cells["4"]
            assert not cell.get("errors"), (workload, peer, cell)
            assert cell[key] > 0, (workload, peer, cell)
    for sender, cell in data["sendfile"].items():
        assert not cell.get("errors") and cell["mb_per_s"] > 0, (sender, cell)
    assert list(tmp_path.glob("iomux-bench-files-*")) == []  # its files are removed
