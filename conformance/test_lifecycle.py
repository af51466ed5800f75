"""close(), the context manager, and use in a forked child."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from iomux import ForkedError, Interest, Multiplexer, MultiplexerClosed

from .helpers import socketpair

R = Interest.READ


def test_close_is_idempotent_and_final(driver: type[Multiplexer]) -> None:
    mux = driver()
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        mux.close()
        mux.close()
        assert mux.closed and len(mux) == 0 and a not in mux
        calls: list[Callable[[], object]] = [
            lambda: mux.register(b, R),
            lambda: mux.modify(a, R),
            lambda: mux.unregister(a),
            lambda: mux.poll(0),
            lambda: mux.poll(None),
            mux.wakeup,
            lambda: mux[a],
            lambda: mux.get(a),
        ]
        for call in calls:
            with pytest.raises(MultiplexerClosed, match="closed"):
                call()


def test_close_releases_fds(driver: type[Multiplexer]) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with driver() as mux:
            a, b = socketpair()
            with a, b:
                mux.register(a, R)
        assert mux.closed
    assert len(os.listdir("/proc/self/fd")) == before


def test_closing_does_not_close_registered_files(driver: type[Multiplexer]) -> None:
    a, b = socketpair()
    with a, b:
        with driver() as mux:
            mux.register(a, R)
        b.send(b"x")
        assert a.recv(1) == b"x"


def test_use_in_forked_child_is_refused(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                mux.poll(0)
            except ForkedError as exc:
                code = 0 if str(os.getppid()) in str(exc) else 2
            except BaseException:
                code = 3
            try:
                mux.close()  # closing the child's copy is allowed
            except BaseException:
                code = 4
            os._exit(code)
        os.close(w)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        b.send(b"x")  # the parent's multiplexer is untouched
        assert [e.fd for e in mux.poll(1)] == [a.fileno()]
