"""Timeouts, wakeup() and signals (EINTR)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from iomux import Interest, Multiplexer

from .helpers import socketpair

R = Interest.READ


def _timed(mux: Multiplexer, timeout: float | None) -> tuple[list[object], float]:
    start = time.monotonic()
    events = mux.poll(timeout)
    return list(events), time.monotonic() - start


def test_zero_never_blocks(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        durations = [_timed(mux, 0)[1] for _ in range(20)]
        assert min(durations) < 0.005, durations


@pytest.mark.parametrize("timeout", [-1, -0.001])
def test_negative_is_zero(mux: Multiplexer, timeout: float) -> None:
    events, took = _timed(mux, timeout)
    assert events == [] and took < 0.5


@pytest.mark.parametrize("timeout", [0.0002, 0.0015, 0.03])
def test_positive_never_early(mux: Multiplexer, timeout: float) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        for _ in range(3):
            events, took = _timed(mux, timeout)
            assert events == []
            assert took >= timeout, f"poll({timeout}) returned after {took:.6f} s"


def test_wakeup_from_another_thread_ends_blocking_poll(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        timer = threading.Timer(0.05, mux.wakeup)
        timer.start()
        events, took = _timed(mux, None)
        timer.join()
        assert events == []
        assert 0.04 <= took < 2.0


def test_wakeup_before_poll_is_not_lost(mux: Multiplexer) -> None:
    mux.wakeup()
    mux.wakeup()
    events, took = _timed(mux, 5)
    assert events == [] and took < 1.0
    # Consumed: the next wait blocks for its timeout again.
    events, took = _timed(mux, 0.03)
    assert events == [] and took >= 0.03


def test_wakeup_with_events_returns_them(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        b.send(b"x")
        mux.wakeup()
        deadline = time.monotonic() + 2
        seen: list[int] = []
        while not seen and time.monotonic() < deadline:
            seen = [e.fd for e in mux.poll(1)]
        assert seen == [a.fileno()]


def test_wakeup_hammered_from_threads(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                mux.wakeup()

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                assert mux.poll(0.01) == []
            b.send(b"x")
            got: list[int] = []
            while not got:
                got = [e.fd for e in mux.poll(1)]
            assert got == [a.fileno()]
        finally:
            stop.set()
            for t in threads:
                t.join()


def _with_timer(handler: object, interval: float, repeat: bool = True) -> object:
    old = signal.signal(signal.SIGALRM, handler)  # type: ignore[arg-type]
    signal.setitimer(signal.ITIMER_REAL, interval, interval if repeat else 0)
    return old


def _stop_timer(old: object) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    signal.signal(signal.SIGALRM, old)  # type: ignore[arg-type]


def test_eintr_is_retried_with_remaining_time(mux: Multiplexer) -> None:
    a, b = socketpair()
    fired = []
    with a, b:
        mux.register(a, R)
        old = _with_timer(lambda *_: fired.append(1), 0.01)
        try:
            events, took = _timed(mux, 0.2)
        finally:
            _stop_timer(old)
        assert len(fired) >= 3, "the signal should have interrupted the wait"
        assert events == []
        assert took >= 0.2


def test_eintr_retry_keeps_events(mux: Multiplexer) -> None:
    a, b = socketpair()
    fired = []
    with a, b:
        mux.register(a, R)
        old = _with_timer(lambda *_: fired.append(1), 0.005)
        try:
            threading.Timer(0.1, b.send, (b"x",)).start()
            events, took = _timed(mux, 5)
        finally:
            _stop_timer(old)
        assert [e.fd for e in events] == [a.fileno()]  # type: ignore[attr-defined]
        assert took < 4


class _Boom(Exception):
    pass


def test_exception_from_signal_handler_propagates(mux: Multiplexer) -> None:
    def handler(*_: object) -> None:
        raise _Boom

    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        old = _with_timer(handler, 0.02, repeat=False)
        try:
            start = time.monotonic()
            with pytest.raises(_Boom):
                mux.poll(5)
            assert time.monotonic() - start < 2
        finally:
            _stop_timer(old)
        # The multiplexer is still usable afterwards.
        b.send(b"x")
        assert [e.fd for e in mux.poll(1)] == [a.fileno()]


@pytest.mark.parametrize("bad", [float("nan"), "1", b"0"])
def test_bad_timeout_is_refused(mux: Multiplexer, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        mux.poll(bad)  # type: ignore[arg-type]


def test_infinite_timeout_blocks_like_none(mux: Multiplexer) -> None:
    threading.Timer(0.05, mux.wakeup).start()
    events, took = _timed(mux, float("inf"))
    assert events == [] and 0.04 <= took < 2.0
