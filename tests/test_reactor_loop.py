"""Unit tests of the loop core: callbacks, timers, running, asyncio futures and tasks on it,
errors, signals, add_reader, closing."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest

from iomux.reactor import Reactor, ReactorClosed, ReactorRunning

T = TypeVar("T")


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor("epoll")
    try:
        yield r
    finally:
        r.close()


def wait(reactor: Reactor, awaitable: Awaitable[T], timeout: float) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout)

    return reactor.run_until_complete(bounded())


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
    assert isinstance(handle, asyncio.Handle)
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
        handle = reactor.call_at(when, lambda w=when: fired.append((w, time.monotonic())))
        assert isinstance(handle, asyncio.TimerHandle) and handle.when() == when
    wait(reactor, asyncio.sleep(0.05), 2)
    assert len(fired) == 5
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
    wait(reactor, asyncio.sleep(0.2), 5)
    assert fired == sorted(fired)
    assert len(fired) == 10_000 - len(cancelled)
    assert not cancelled & set(fired)


def test_mass_cancellation_purges_the_heap(reactor: Reactor) -> None:
    handles = [reactor.call_later(60, lambda: None) for _ in range(1000)]
    for h in handles[:900]:
        h.cancel()
    cancelled = [weakref.ref(h) for h in handles[:900]]
    del handles[:900], h
    assert all(ref() is not None for ref in cancelled)  # the heap still holds them
    reactor.run_once(0)  # the iteration purges the heap once most of it is cancelled
    assert [ref() for ref in cancelled] == [None] * 900
    assert not any(h.cancelled() for h in handles)
    timeout = reactor.next_timeout()
    assert timeout is not None and 59 < timeout <= 60


def test_equal_times_all_run_in_one_iteration(reactor: Reactor) -> None:
    """Timers due at the same time all run, once each, in the same iteration.

    (Their relative order is unspecified, as with asyncio's loops.)
    """
    when = reactor.time() + 0.01
    seen: list[tuple[int, int]] = []
    iteration = [0]

    def tick() -> None:  # runs once per iteration, counting them
        iteration[0] += 1
        if len(seen) < 50:
            reactor.call_soon(tick)

    for i in range(50):
        reactor.call_at(when, lambda i=i: seen.append((i, iteration[0])))
    reactor.call_soon(tick)
    wait(reactor, asyncio.sleep(0.03), 2)
    assert sorted(i for i, _ in seen) == list(range(50))
    assert len({it for _, it in seen}) == 1, seen
    assert reactor.time() >= when


def test_call_soon_threadsafe_wakes_blocked_reactor(reactor: Reactor) -> None:
    fut = reactor.create_future()
    threading.Timer(0.05, reactor.call_soon_threadsafe, (fut.set_result, "woken")).start()
    start = time.monotonic()
    assert wait(reactor, fut, 5) == "woken"
    assert time.monotonic() - start < 1.0


def test_run_forever_and_stop(reactor: Reactor) -> None:
    running: list[bool] = []
    reactor.call_soon(lambda: running.append(reactor.is_running()))
    reactor.call_later(0.02, reactor.stop)
    start = time.monotonic()
    reactor.run_forever()
    assert 0.02 <= time.monotonic() - start < 1.0
    assert running == [True]
    assert not reactor.is_running()


def test_run_until_complete_timeout_and_stop(reactor: Reactor) -> None:
    with pytest.raises(asyncio.TimeoutError):
        wait(reactor, reactor.create_future(), 0.05)
    reactor.call_soon(reactor.stop)
    with pytest.raises(RuntimeError, match="stopped before Future completed"):
        reactor.run_until_complete(reactor.create_future())


def test_coroutine_task(reactor: Reactor) -> None:
    async def work(x: int) -> int:
        assert asyncio.get_running_loop() is reactor
        await asyncio.sleep(0.01)
        value = await asyncio.sleep(0.01, x)
        assert value is not None
        return value * 2

    assert wait(reactor, work(21), 2) == 42
    task = reactor.create_task(work(1), name="worker")
    assert isinstance(task, asyncio.Task) and task.get_name() == "worker"
    assert reactor.run_until_complete(task) == 2


def test_task_exception_and_bad_await(reactor: Reactor) -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        wait(reactor, fails(), 2)

    class NotAFuture:
        def __await__(self) -> Any:
            yield "something else"

    async def bad() -> None:
        await NotAFuture()

    with pytest.raises(RuntimeError, match="bad yield"):
        wait(reactor, bad(), 2)


def test_task_cancel(reactor: Reactor) -> None:
    async def sleeper() -> None:
        await asyncio.sleep(10)

    task = reactor.create_task(sleeper())
    reactor.call_later(0.01, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        wait(reactor, task, 2)
    assert task.cancelled()


def test_future_states(reactor: Reactor) -> None:
    fut = reactor.create_future()
    assert isinstance(fut, asyncio.Future) and fut.get_loop() is reactor
    with pytest.raises(asyncio.InvalidStateError):
        fut.result()
    fut.set_result(1)
    with pytest.raises(asyncio.InvalidStateError):
        fut.set_result(2)
    assert fut.result() == 1 and fut.exception() is None
    seen: list[Any] = []
    fut.add_done_callback(seen.append)
    assert seen == []  # done callbacks run as loop callbacks, not at once
    reactor.run_once()
    assert seen == [fut]
    other = reactor.create_future()
    assert other.cancel() and not other.cancel()
    with pytest.raises(asyncio.CancelledError):
        other.result()


def test_callback_exception_goes_to_handler_and_loop_continues(reactor: Reactor) -> None:
    contexts: list[dict[str, Any]] = []
    reactor.set_exception_handler(lambda r, c: contexts.append(c))
    seen: list[int] = []
    reactor.call_soon(lambda: 1 / 0)
    reactor.call_soon(seen.append, 1)
    reactor.run_once()
    assert seen == [1]
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ZeroDivisionError)
    assert "handle" in contexts[0]


def test_default_handler_logs(reactor: Reactor, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        reactor.call_soon(lambda: [][1])
        reactor.run_once()
    assert "IndexError" in caplog.text
    assert "Exception in callback" in caplog.text


def test_keyboard_interrupt_propagates(reactor: Reactor) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    reactor.call_soon(interrupt)
    with pytest.raises(KeyboardInterrupt):
        reactor.run_once()
    assert not reactor.is_running()


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
    assert len(errors) == 1 and "already running" in str(errors[0])
    reactor.close()
    assert reactor.is_closed()
    with pytest.raises(ReactorClosed):
        reactor.call_soon_threadsafe(lambda: None)
    with pytest.raises(ReactorClosed):
        reactor.run_once()
    coro = asyncio.sleep(0)
    with pytest.raises(ReactorClosed):
        reactor.run_until_complete(coro)
    coro.close()
    reactor.close()  # idempotent


def test_close_while_running_is_refused(reactor: Reactor) -> None:
    errors: list[BaseException] = []

    def close() -> None:
        try:
            reactor.close()
        except RuntimeError as exc:
            errors.append(exc)

    reactor.call_soon(close)
    reactor.run_once()
    assert len(errors) == 1 and not reactor.is_closed()


def test_signal_handler_runs_as_callback(reactor: Reactor) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    got: list[str] = []
    try:
        reactor.add_signal_handler(signal.SIGUSR1, got.append, "usr1")
        reactor.call_later(0.01, os.kill, os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            reactor.run_once(0.5)
        assert got == ["usr1"]
        assert reactor.remove_signal_handler(signal.SIGUSR1)
        # As asyncio: removing the handler restores the default disposition.
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        assert not reactor.remove_signal_handler(signal.SIGUSR1)
        with pytest.raises(RuntimeError, match="cannot be caught"):
            reactor.add_signal_handler(signal.SIGKILL, lambda: None)
        with pytest.raises(TypeError, match="coroutines"):
            reactor.add_signal_handler(signal.SIGUSR1, asyncio.sleep)
    finally:
        reactor.remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, previous)


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
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def test_backend_selection_is_reported() -> None:
    r = Reactor("poll")
    try:
        assert r.multiplexer.name == "poll" and r.backend == "poll"
        assert r.io == "readiness"
        assert r.selection is not None and "poll" in r.selection.describe()
        assert "poll" in repr(r)
    finally:
        r.close()
    assert r.multiplexer.closed


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
        reactor.run_once(0)  # level-triggered, as asyncio: still readable
        assert seen == ["readable", "readable"]
        assert reactor.remove_reader(r) and not reactor.remove_reader(r)
        reactor.run_once(0)
        assert seen == ["readable", "readable"]
    finally:
        os.close(r)
        os.close(w)


def test_add_reader_replaces_the_callback_and_refuses_transport_fds(reactor: Reactor) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        seen: list[str] = []
        reactor.add_reader(r, seen.append, "first")
        reactor.add_reader(r, seen.append, "second")  # one reader per fd, as asyncio
        os.write(w, b"x")
        reactor.run_once(1.0)
        assert seen == ["second"]
        transport, _ = wait(reactor, reactor.connect_accepted_socket(asyncio.Protocol, a), 2)
        with pytest.raises(RuntimeError, match="is used by transport"):
            reactor.add_reader(a.fileno(), lambda: None)
        transport.close()
        reactor.run_once(0)
    finally:
        reactor.remove_reader(r)
        for fd in (r, w):
            os.close(fd)
        b.close()


CLOSE_WITH_UNSENT_DATA = textwrap.dedent(
    """
    import asyncio, gc, socket, sys, time, warnings
    from iomux.reactor import Reactor

    transports = []

    class Flood(asyncio.Protocol):
        def connection_made(self, transport):
            transports.append(transport)
            transport.write(b"x" * (8 << 20))  # far more than the socket buffers hold

    io = sys.argv[1]
    reactor = Reactor("io_uring" if io == "completion" else "epoll", io=io)
    assert reactor.io == io
    server = reactor.run_until_complete(reactor.create_server(Flood, "127.0.0.1", 0))
    client = socket.create_connection(("127.0.0.1", server.port()))
    client.settimeout(5)
    deadline = time.monotonic() + 5
    while not transports and time.monotonic() < deadline:
        reactor.run_once(0.01)
    for _ in range(5):
        reactor.run_once(0.01)
    assert transports[0].get_write_buffer_size() > 0
    reactor.close()
    assert not transports[0].is_closing()  # the loop left it alone
    # The transport is dropped: its socket is closed (with a ResourceWarning).
    transports.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    try:
        while client.recv(1 << 20):
            pass
        print("clean end of stream")
    except ConnectionResetError:
        print("reset")
    """
)


@pytest.mark.parametrize("io", ["readiness", "completion"])
def test_close_with_unsent_data_resets_the_peer(io: str) -> None:
    """loop.close() leaves transports alone, but their unsent data is not taken for a whole
    stream: when the sockets are eventually closed, the peers are reset.

    In a process of its own, with glibc's MALLOC_PERTURB_ so that a use of freed memory
    (a transport reaching into its closed loop) fails every time, not once in a while.
    """
    env = {**os.environ, "MALLOC_PERTURB_": "165"}
    out = subprocess.run(
        [sys.executable, "-c", CLOSE_WITH_UNSENT_DATA, io],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "reset", out
