"""fileno() and submit(): a host loop waiting on the multiplexer's own fd."""

from __future__ import annotations

import io
import select
import threading
import time

import pytest

from iomux import Interest, Multiplexer

from .helpers import drain, socketpair

R = Interest.READ


def _host_wait(fd: int, timeout: float) -> float:
    """Block in a separate epoll on ``fd``, as a host loop would; return the time taken."""
    with select.epoll() as host:
        host.register(fd, select.EPOLLIN)
        start = time.monotonic()
        host.poll(timeout)
        return time.monotonic() - start


def test_without_pollable_fd_fileno_is_refused(mux: Multiplexer) -> None:
    if mux.capabilities.pollable_fd:
        assert isinstance(mux.fileno(), int)
        return
    with pytest.raises(io.UnsupportedOperation, match="pollable_fd"):
        mux.fileno()
    mux.submit()  # harmless everywhere


def test_blocked_host_is_woken_by_readiness(mux: Multiplexer) -> None:
    if not mux.capabilities.pollable_fd:
        pytest.skip(f"{mux.name} declares no capability pollable_fd")
    fd = mux.fileno()
    a, b = socketpair()
    with a, b:
        mux.register(a, R, "x")
        for round_ in range(3):
            mux.submit()
            threading.Timer(0.05, b.send, (b"ping",)).start()
            took = _host_wait(fd, 3.0)
            assert took < 2.0, f"round {round_}: the host was not woken"
            assert [e.data for e in mux.poll(0)] == ["x"]
            drain(a)
        mux.submit()
        threading.Timer(0.05, mux.wakeup).start()
        assert _host_wait(fd, 3.0) < 2.0
        assert mux.poll(0) == []


def test_registration_after_fileno_reaches_the_kernel(mux: Multiplexer) -> None:
    if not mux.capabilities.pollable_fd:
        pytest.skip(f"{mux.name} declares no capability pollable_fd")
    fd = mux.fileno()
    a, b = socketpair()
    with a, b:
        b.send(b"already here")
        mux.register(a, R)  # no poll() and no submit(): the host just waits
        assert _host_wait(fd, 3.0) < 2.0
        assert [e.fd for e in mux.poll(0)] == [a.fileno()]
