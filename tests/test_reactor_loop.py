"""Unit tests of the reactor core: callbacks, timers, futures, tasks, errors, signals."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from iomux.reactor import (
    FutureCancelled,
    InvalidFutureState,
    Reactor,
    ReactorClosed,
    ReactorRunning,
    RunTimeout,
)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor("epoll")
    try:
        yield r
    finally:
        r.close()


def test_call_soon_runs_in_order_and_next_iteration(reactor: Reactor) -> None:
    seen: list[Any] = []

    def first() -> None:
        seen.append(1)
        reactor.call_soon(seen.append, 3)  # scheduled during the run: next iteration

    reactor.call_soon(first)
    reactor.call_soon(seen.append, 2)
    reactor.run_once()
    assert seen == [1, 2]
    reactor.run_once()
    assert seen == [1, 2, 3]


def test_cancelled_handle_does_not_run(reactor: Reactor) -> None:
    seen: list[int] = []
    handle = reactor.call_soon(seen.append, 1)
    handle.cancel()
    assert handle.cancelled()
    reactor.run_once()
    assert seen == []
    assert "cancelled" in repr(handle)


def test_timers_never_early_and_in_order(reactor: Reactor) -> None:
    fired: list[tuple[float, float]] = []
    start = time.monotonic()
    for delay in (0.03, 0.0005, 0.01, 0.002, 0.0):
        when = start + delay
        reactor.call_at(when, lambda w=when: fired.append((w, time.monotonic())))
    reactor.run_until_complete(reactor.sleep(0.05), timeout=2)
    assert [w for w, _ in fired] == sorted(w for w, _ in fired)
    assert all(now >= when for when, now in fired), fired


def test_many_pending_timers_fire_sorted_and_cancel_lazily(reactor: Reactor) -> None:
    rng = random.Random(7)
    base = reactor.time() + 0.05
    fired: list[float] = []
    handles = []
    for _ in range(10_000):
        when = base + rng.random() * 0.1
        handles.append((when, reactor.call_at(when, fired.append, when)))
    cancelled = {w for w, h in handles[::3]}
    for _w, h in handles[::3]:
        h.cancel()
    reactor.run_until_complete(reactor.sleep(0.2), timeout=5)
    assert fired == sorted(fired)
    assert len(fired) == 10_000 - len(cancelled)
    assert not cancelled & set(fired)


def test_mass_cancellation_purges_the_heap(reactor: Reactor) -> None:
    handles = [reactor.call_later(60, lambda: None) for _ in range(1000)]
    for h in handles[:900]:
        h.cancel()
    assert len(reactor._timers) < 1000
    assert sum(not e[2]._cancelled for e in reactor._timers) == 100


def test_equal_times_run_fifo(reactor: Reactor) -> None:
    when = reactor.time() + 0.01
    seen: list[int] = []
    for i in range(50):
        reactor.call_at(when, seen.append, i)
    reactor.run_until_complete(reactor.sleep(0.03), timeout=2)
    assert seen == list(range(50))


def test_call_soon_threadsafe_wakes_blocked_reactor(reactor: Reactor) -> None:
    fut = reactor.create_future()
    threading.Timer(0.05, reactor.call_soon_threadsafe, (fut.set_result, "woken")).start()
    start = time.monotonic()
    assert reactor.run_until_complete(fut, timeout=5) == "woken"
    assert time.monotonic() - start < 1.0


def test_run_forever_and_stop(reactor: Reactor) -> None:
    reactor.call_later(0.02, reactor.stop)
    start = time.monotonic()
    reactor.run_forever()
    assert 0.02 <= time.monotonic() - start < 1.0
    assert not reactor.is_running()


def test_run_until_complete_timeout_and_stop(reactor: Reactor) -> None:
    with pytest.raises(RunTimeout):
        reactor.run_until_complete(reactor.create_future(), timeout=0.05)
    reactor.call_soon(reactor.stop)
    with pytest.raises(RuntimeError, match="stopped"):
        reactor.run_until_complete(reactor.create_future(), timeout=1)


def test_coroutine_task(reactor: Reactor) -> None:
    async def work(x: int) -> int:
        await reactor.sleep(0.01)
        value = await reactor.sleep(0.01, x)
        assert value is not None
        return value * 2

    assert reactor.run_until_complete(work(21), timeout=2) == 42


def test_task_exception_and_bad_await(reactor: Reactor) -> None:
    async def fails() -> None:
        await reactor.sleep(0)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        reactor.run_until_complete(fails(), timeout=2)

    class NotAFuture:
        def __await__(self) -> Any:
            yield "something else"

    async def bad() -> None:
        await NotAFuture()

    with pytest.raises(TypeError, match=r"only iomux\.reactor futures"):
        reactor.run_until_complete(bad(), timeout=2)


def test_task_cancel(reactor: Reactor) -> None:
    async def sleeper() -> None:
        await reactor.sleep(10)

    task = reactor.create_task(sleeper())
    reactor.call_later(0.01, task.cancel)
    with pytest.raises(FutureCancelled):
        reactor.run_until_complete(task, timeout=2)
    assert task.cancelled()


def test_future_states(reactor: Reactor) -> None:
    fut = reactor.create_future()
    with pytest.raises(InvalidFutureState):
        fut.result()
    fut.set_result(1)
    with pytest.raises(InvalidFutureState):
        fut.set_result(2)
    assert fut.result() == 1 and fut.exception() is None
    seen: list[Any] = []
    fut.add_done_callback(seen.append)
    reactor.run_once()
    assert seen == [fut]
    other = reactor.create_future()
    assert other.cancel() and not other.cancel()
    with pytest.raises(FutureCancelled):
        other.result()


def test_callback_exception_goes_to_handler_and_loop_continues(reactor: Reactor) -> None:
    contexts: list[dict[str, Any]] = []
    reactor.set_exception_handler(lambda r, c: contexts.append(c))
    seen: list[int] = []
    reactor.call_soon(lambda: 1 / 0)
    reactor.call_soon(seen.append, 1)
    reactor.run_once()
    assert seen == [1]
    assert isinstance(contexts[0]["exception"], ZeroDivisionError)
    assert "handle" in contexts[0]


def test_default_handler_logs(reactor: Reactor, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="iomux.reactor"):
        reactor.call_soon(lambda: [][1])
        reactor.run_once()
    assert "IndexError" in caplog.text


def test_keyboard_interrupt_propagates(reactor: Reactor) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    reactor.call_soon(interrupt)
    with pytest.raises(KeyboardInterrupt):
        reactor.run_once()


def test_next_timeout(reactor: Reactor) -> None:
    assert reactor.next_timeout() is None
    h = reactor.call_later(5, lambda: None)
    timeout = reactor.next_timeout()
    assert timeout is not None and 4 < timeout <= 5
    h.cancel()
    assert reactor.next_timeout() is None
    reactor.call_soon(lambda: None)
    assert reactor.next_timeout() == 0


def test_not_reentrant_and_closed(reactor: Reactor) -> None:
    errors: list[BaseException] = []

    def nested() -> None:
        try:
            reactor.run_once()
        except ReactorRunning as exc:
            errors.append(exc)

    reactor.call_soon(nested)
    reactor.run_once()
    assert len(errors) == 1
    reactor.close()
    assert reactor.is_closed()
    with pytest.raises(ReactorClosed):
        reactor.call_soon_threadsafe(lambda: None)
    with pytest.raises(ReactorClosed):
        reactor.run_once()
    reactor.close()  # idempotent


def test_signal_handler_runs_as_callback(reactor: Reactor) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    got: list[str] = []
    reactor.add_signal_handler(signal.SIGUSR1, got.append, "usr1")
    try:
        reactor.call_later(0.01, os.kill, os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            reactor.run_once(0.5)
        assert got == ["usr1"]
    finally:
        assert reactor.remove_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert not reactor.remove_signal_handler(signal.SIGUSR1)
    with pytest.raises(ValueError, match="cannot be caught"):
        reactor.add_signal_handler(signal.SIGKILL, lambda: None)


def test_signal_handler_from_other_thread_is_refused(reactor: Reactor) -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            reactor.add_signal_handler(signal.SIGUSR2, lambda: None)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=install)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


def test_backend_selection_is_reported() -> None:
    with Reactor("poll") as r:
        assert r.multiplexer.name == "poll"
        assert r.selection is not None and "poll" in r.selection.describe()
        assert "poll" in repr(r)


def test_add_and_remove_reader(reactor: Reactor) -> None:
    r, w = os.pipe()
    try:
        seen: list[str] = []
        reactor.add_reader(r, seen.append, "readable")
        reactor.run_once(0)
        assert seen == []
        os.write(w, b"x")
        reactor.run_once(1.0)
        assert seen == ["readable"]
        assert reactor.remove_reader(r) and not reactor.remove_reader(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("io", ["readiness", "completion"])
def test_close_with_unsent_data_resets_the_peer(io: str) -> None:
    import asyncio
    import socket

    class Flood(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            transport.write(b"x" * (8 << 20))  # far more than the socket buffers hold

    reactor = Reactor("io_uring" if io == "completion" else "epoll", strategy=io)
    server = reactor.create_server(Flood, "127.0.0.1", 0)
    client = socket.create_connection(("127.0.0.1", server.port()))
    client.settimeout(5)
    try:
        deadline = time.monotonic() + 5
        while not reactor._transports and time.monotonic() < deadline:
            reactor.run_once(0.01)
        for _ in range(5):
            reactor.run_once(0.01)
        reactor.close()
        with pytest.raises(ConnectionResetError):
            while client.recv(1 << 20):
                pass
    finally:
        client.close()
        if not reactor.is_closed():
            reactor.close()
