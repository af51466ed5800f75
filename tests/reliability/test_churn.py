"""Churn: connect/send/close cycles, with abortive closes (RST) mixed in.

Afterwards the server holds the fds, registrations, (io_uring) kernel-side
poll requests and completion-port slots it held before, no exception was
reported, and its RSS has not grown beyond a small bound (nor its count of
Python objects). Short by default; ``IOMUX_SOAK=1`` runs 100,000 cycles per
backend.

One cycle in ten ends with an RST after the echo, one with an RST right
after sending (the server may meet ECONNRESET or EPIPE), one closes right
after connecting; the rest close normally after the echo.
"""

from __future__ import annotations

from relsupport import SOAK, record, run_churn, server_process

from iomux import Multiplexer

CYCLES = 100_000 if SOAK else 2_000
WARMUP_CYCLES = 10_000 if SOAK else 500
#: RSS may move this much (allocator noise); Python objects may not grow at all.
RSS_SLACK_KIB = 4 * 1024
OBJECT_SLACK = 50


def test_churn_leaves_nothing_behind(driver: type[Multiplexer]) -> None:
    with server_process(driver.name) as server:
        run_churn(server.port, WARMUP_CYCLES, workers=2, sources=8)
        base = server.wait_idle()
        report = run_churn(server.port, CYCLES, workers=2, sources=8)
        after = server.wait_idle()
    rst = report["modes"]["rst_after_echo"] + report["modes"]["rst_before_echo"]
    record(
        "churn",
        driver.name,
        cycles=report["completed"],
        rst_injected=rst,
        echoes_ok=report["echoes_ok"],
        fds=f"{base['fds']}/{after['fds']}",
        rss_kib=f"{base['rss_kib']}/{after['rss_kib']}",
        py_objects=f"{base['objects']}/{after['objects']}",
        registrations=f"{base['registrations']}/{after['registrations']}",
        ring_polls=f"{base.get('ring_polls', '-')}/{after.get('ring_polls', '-')}",
        io=server.io,
        server_lost_by=after["lost_by"],
    )
    assert report["errors"] == 0 and report["mismatches"] == 0, report
    assert report["completed"] == CYCLES
    assert report["echoes_ok"] == report["modes"]["close"] + report["modes"]["rst_after_echo"]
    assert after["errors"] == 0, after["first_errors"]
    assert after["made"] - base["made"] == CYCLES, (base, after)
    assert after["fds"] == base["fds"], (base, after)
    assert after["registrations"] == base["registrations"], (base, after)
    assert after.get("ring_polls") == base.get("ring_polls"), (base, after)
    # Completion I/O: every connection's port slot was given back (the listener's stays).
    assert after.get("slots") == base.get("slots") == (1 if server.io == "completion" else None)
    assert after["objects"] - base["objects"] <= OBJECT_SLACK, (base, after)
    assert after["rss_kib"] - base["rss_kib"] <= RSS_SLACK_KIB, (base, after)
    # Resets reached the server as errors of the peer, never as crashes.
    assert set(after["lost_by"]) <= {"None", "ConnectionResetError", "BrokenPipeError"}, after
