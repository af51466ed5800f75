"""The io_uring driver beyond the shared contract: fallbacks, batching, stale completions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

import iomux
from iomux import Interest, Trigger, registry
from iomux.drivers.io_uring import IoUringDriver


@pytest.fixture
def uring() -> Iterator[IoUringDriver]:
    reason = IoUringDriver.probe()
    if reason is not None:
        pytest.fail(f"io_uring must be available on this Linux machine: {reason}")
    mux = IoUringDriver()
    yield mux
    mux.close()


@pytest.fixture
def forget() -> Iterator[None]:
    registry.forget_probes()
    yield
    registry.forget_probes()


@pytest.mark.parametrize(
    ("force", "words"),
    [
        ("ENOSYS", "ENOSYS"),
        ("EPERM", "seccomp"),
        ("disabled", "kernel.io_uring_disabled = 2"),
        ("nobuild", "apt-get install liburing-dev"),
    ],
)
def test_forced_failure_falls_back_with_reason(
    monkeypatch: pytest.MonkeyPatch, forget: None, force: str, words: str
) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", force)
    monkeypatch.delenv("IOMUX_BACKEND", raising=False)
    monkeypatch.setenv("IOMUX_CONFIG", os.devnull)
    info = registry.backend_info("io_uring")
    assert not info.available and words in info.reason
    sel = iomux.choose("auto")
    assert sel.name == "epoll"
    assert sel.skipped[0][0] == "io_uring" and words in sel.skipped[0][1]
    assert iomux.choose("io_uring,poll").name == "poll"
    with pytest.raises(iomux.BackendUnavailable, match="io_uring"):
        iomux.open_multiplexer("io_uring")


def test_forced_flag_rejection_still_works(monkeypatch: pytest.MonkeyPatch, forget: None) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "flags")
    with iomux.open_multiplexer("io_uring") as mux:
        assert "SINGLE_ISSUER" not in mux.ring.setup_flag_names  # type: ignore[attr-defined]
        a, b = socket.socketpair()
        with a, b:
            mux.register(a, Interest.READ)
            b.send(b"x")
            assert [e.fd for e in mux.poll(1)] == [a.fileno()]


def test_info_json_shows_fallback_in_a_fresh_process() -> None:
    env = dict(os.environ, IOMUX_URING_FORCE_FAIL="EPERM")
    env.pop("IOMUX_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-m", "iomux", "info", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    data = json.loads(out.stdout)
    uring = next(b for b in data["backends"] if b["name"] == "io_uring")
    assert uring["available"] is False and "EPERM" in uring["reason"]
    assert data["auto"] == "epoll"
    assert "skipped io_uring" in data["chosen"]


def test_registrations_are_batched_into_the_next_poll(uring: IoUringDriver) -> None:
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        uring.poll(0)
        for a, _ in pairs:
            uring.register(a, Interest.WRITE)
        assert uring.ring.pending == 50  # queued in user space, no system call yet
        assert len(uring.poll(0)) == 50
        assert uring.ring.pending == 0  # level polls stay armed: nothing to re-arm
        # Still writable: the next wait checks the 50 again and reports them.
        assert len(uring.poll(0)) == 50
        assert uring.ring.pending == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_level_fds_beyond_one_copy_out_are_all_reported_in_turn() -> None:
    # 40 always-writable fds, at most 16 completions per enter: each wait
    # reports some, and no fd waits more than a few waits for its turn.
    mux = IoUringDriver(capacity=16)
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        for a, _ in pairs:
            mux.register(a, Interest.WRITE)
        wanted = {a.fileno() for a, _ in pairs}
        seen_per_wait = []
        for _ in range(12):
            fds = [e.fd for e in mux.poll(0)]
            assert len(fds) == len(set(fds)), "an fd was reported twice in one wait"
            seen_per_wait.append(set(fds))
        for start in range(0, 12 - 4):
            window = set().union(*seen_per_wait[start : start + 4])
            assert window == wanted, f"not reported within 4 waits: {wanted - window}"
    finally:
        mux.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_no_event_after_unregister_with_poll_in_flight(uring: IoUringDriver) -> None:
    a, b = socket.socketpair()
    with a, b:
        uring.register(a, Interest.READ)
        assert uring.poll(0) == []  # the poll request is now in the kernel
        uring.unregister(a)
        b.send(b"x")
        assert uring.poll(0.05) == []


def test_stale_completion_dropped_after_reregister(uring: IoUringDriver) -> None:
    a, b = socket.socketpair()
    with a, b:
        uring.register(a, Interest.READ, "old")
        b.send(b"x")
        # The completion for "old" is posted, not yet read, when the fd is re-registered.
        uring.ring.enter(0, 0)
        uring.unregister(a)
        uring.register(a, Interest.WRITE, "new")
        events = uring.poll(0.5)
        assert [(e.events, e.data) for e in events] == [(Interest.WRITE, "new")]


def test_fd_reuse_gets_no_stale_event(uring: IoUringDriver) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    uring.register(a, Interest.READ, "first file")
    uring.poll(0)
    uring.unregister(a)
    a.close()
    b.close()
    c, d = socket.socketpair()
    with c, d:
        if c.fileno() != fd:
            os.dup2(c.fileno(), fd)
            c.close()
            c = socket.socket(fileno=fd)
        uring.register(c, Interest.READ, "second file")
        assert uring.poll(0.02) == []
        d.send(b"y")
        assert [e.data for e in uring.poll(1)] == ["second file"]


def test_small_completion_queue_loses_nothing() -> None:
    with IoUringDriver(entries=8, cq_entries=16, capacity=32) as mux:
        pairs = [socket.socketpair() for _ in range(1500)]
        try:
            for a, b in pairs:
                mux.register(a, Interest.READ, trigger=Trigger.EDGE)
                b.send(b"x")
            seen: set[int] = set()
            for _ in range(100):
                seen.update(e.fd for e in mux.poll(0.1))
                if len(seen) == len(pairs):
                    break
            assert seen == {a.fileno() for a, _ in pairs}
        finally:
            for a, b in pairs:
                a.close()
                b.close()


def test_close_cancels_everything(uring: IoUringDriver) -> None:
    a, b = socket.socketpair()
    with b:
        uring.register(a, Interest.READ)
        uring.poll(0)  # the poll request, holding a reference to a's file, is in the kernel
        uring.close()
        assert uring.ring.closed
        a.close()
        # The cancelled poll released its reference: the peer sees EOF.
        b.settimeout(2)
        assert b.recv(1) == b""


def test_unregister_then_close_releases_the_file(uring: IoUringDriver) -> None:
    a, b = socket.socketpair()
    with b:
        uring.register(a, Interest.READ)
        uring.poll(0)
        uring.unregister(a)
        uring.poll(0)  # submits the removal
        a.close()
        b.settimeout(2)
        assert b.recv(1) == b""


def test_level_reports_survive_modify_while_data_flows(uring: IoUringDriver) -> None:
    """A replaced level poll whose removal failed (it was busy reporting a
    wake-up) lives on until the removal is retried, and a wake-up in between
    reaches it after its successor; the fd must still be reported while it
    is readable (a lost report here stalls a connection for good)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        uring.register(a, Interest.READ)
        for i in range(200):
            b.send(b"y" * 512)  # a wake-up for the current poll...
            # ...before the registration changes, as a transport's does
            # when its write buffer fills and drains.
            uring.modify(a, Interest.READ | Interest.WRITE if i % 2 else Interest.READ)
            for attempt in range(3):
                reported = 0
                for event in uring.poll(2.0):
                    reported |= event.events
                # Nothing was read: level triggering reports it every time.
                assert reported & Interest.READ, f"iteration {i}: no report {attempt}"
                if attempt == 0:
                    b.send(b"z" * 512)  # wakes the old poll and the new one
            assert a.recv(65536)
