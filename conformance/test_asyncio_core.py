"""asyncio compatibility: scheduling, timers, running, futures, tasks, executors,
name resolution, the exception handler, debug mode and context propagation.

Every test runs on stock asyncio (the reference) and on iomux's loop over
every driver; see ``loop_kind`` and ``aio_loop`` in the plugin.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import fractions
import gc
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from .aio_support import (
    PY311,
    Garbage,
    Recorder,
    close_server,
    echo_server,
    needs_python,
    run,
    run_forever,
    wait_until,
)

Loop = asyncio.AbstractEventLoop
LoopFactory = Callable[[], Loop]
#: How early a timer may fire: asyncio runs timers due within the clock's resolution.
EARLY = 1e-6


# --- scheduling and timers ----------------------------------------------------------------


def test_call_soon_runs_callbacks_in_order_with_their_args(aio_loop: Loop) -> None:
    seen: list[Any] = []
    for i in range(5):
        aio_loop.call_soon(seen.append, i)
    aio_loop.call_soon(lambda *args: seen.append(args), "x", 2)
    aio_loop.call_soon(aio_loop.stop)
    handle = aio_loop.call_soon(seen.append, "not yet")  # after stop: still this iteration
    assert isinstance(handle, asyncio.Handle) and not handle.cancelled()
    run_forever(aio_loop)
    assert seen == [0, 1, 2, 3, 4, ("x", 2), "not yet"]


def test_call_soon_with_context_runs_in_that_context(aio_loop: Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    ctx = contextvars.copy_context()
    ctx.run(var.set, "in ctx")
    seen: list[str] = []

    def bump() -> None:
        seen.append(var.get())
        var.set(var.get() + "+")

    aio_loop.call_soon(bump, context=ctx)
    aio_loop.call_soon(bump, context=ctx)  # sees the first one's change: the same context
    aio_loop.call_soon(bump)  # a copy of the caller's context
    aio_loop.call_soon(aio_loop.stop)
    run_forever(aio_loop)
    assert seen == ["in ctx", "in ctx+", "unset"]
    assert ctx[var] == "in ctx++" and var.get() == "unset"


def test_call_later_fires_after_its_delay(aio_loop: Loop) -> None:
    fired: list[tuple[str, float]] = []
    before = aio_loop.time()
    handle = aio_loop.call_later(0.05, lambda tag: fired.append((tag, aio_loop.time())), "a")
    after = aio_loop.time()
    assert isinstance(handle, asyncio.TimerHandle)
    assert before + 0.05 <= handle.when() <= after + 0.05
    run(aio_loop, wait_until(lambda: bool(fired), what="the call_later callback"))
    [(tag, when)] = fired
    assert tag == "a" and when >= handle.when() - EARLY


def test_call_at_never_runs_before_when_and_runs_in_time_order(aio_loop: Loop) -> None:
    fired: list[tuple[float, float]] = []
    now = aio_loop.time()
    whens = [now + d for d in (0.04, 0.0, 0.02, 0.01, 0.03)]

    def record(when: float) -> None:
        fired.append((when, aio_loop.time()))

    handles = [aio_loop.call_at(w, record, w) for w in whens]
    assert [h.when() for h in handles] == whens  # exactly what was asked
    run(aio_loop, wait_until(lambda: len(fired) == len(whens), what="five timers"))
    assert [w for w, _ in fired] == sorted(whens)
    for when, ran in fired:
        assert ran >= when - EARLY, f"timer due at {when} ran at {ran}"


def test_timers_with_zero_and_negative_delays_run(aio_loop: Loop) -> None:
    seen: list[str] = []
    aio_loop.call_later(0, seen.append, "zero")
    aio_loop.call_later(-1, seen.append, "negative")
    aio_loop.call_at(aio_loop.time() - 10, seen.append, "past")
    run(aio_loop, wait_until(lambda: len(seen) == 3, what="three due timers"))
    assert sorted(seen) == ["negative", "past", "zero"]


def test_call_soon_threadsafe_wakes_a_blocked_loop(aio_loop: Loop) -> None:
    async def main() -> tuple[int, int, float]:
        fut: asyncio.Future[int] = aio_loop.create_future()
        ran_in: list[int] = []

        def deliver() -> None:
            ran_in.append(threading.get_ident())
            fut.set_result(threading.get_ident())

        def worker() -> None:
            time.sleep(0.05)
            aio_loop.call_soon_threadsafe(deliver)

        thread = threading.Thread(target=worker)
        start = time.monotonic()
        thread.start()
        result = await fut  # nothing else is scheduled: the loop blocks in its wait
        elapsed = time.monotonic() - start
        thread.join()
        return result, ran_in[0], elapsed

    result, ran_in, elapsed = run(aio_loop, main(), timeout=20)
    assert result == ran_in == threading.get_ident()  # the callback ran in the loop's thread
    assert elapsed < 5, f"the loop woke up {elapsed:.1f} s after call_soon_threadsafe"


def test_call_soon_threadsafe_from_many_threads(aio_loop: Loop) -> None:
    async def main() -> list[int]:
        got: list[int] = []
        done = asyncio.Event()

        def add(i: int) -> None:
            got.append(i)
            if len(got) == 400:
                done.set()

        def worker(base: int) -> None:
            for i in range(100):
                aio_loop.call_soon_threadsafe(add, base + i)

        threads = [threading.Thread(target=worker, args=(b * 100,)) for b in range(4)]
        for t in threads:
            t.start()
        await done.wait()
        for t in threads:
            t.join()
        return got

    got = run(aio_loop, main())
    assert sorted(got) == list(range(400))
    for base in range(0, 400, 100):  # each thread's callbacks run in its order
        mine = [i for i in got if base <= i < base + 100]
        assert mine == sorted(mine)


def test_time_is_monotonic_and_advances(aio_loop: Loop) -> None:
    async def main() -> tuple[float, float, float]:
        t0 = aio_loop.time()
        t1 = aio_loop.time()
        await asyncio.sleep(0.05)
        return t0, t1, aio_loop.time()

    t0, t1, t2 = run(aio_loop, main())
    assert t0 <= t1 <= t2
    assert 0.05 - 0.001 <= t2 - t0 < 5


def test_cancelled_handles_and_timers_do_not_run(aio_loop: Loop) -> None:
    seen: list[str] = []
    soon = aio_loop.call_soon(seen.append, "soon")
    later = aio_loop.call_later(0.01, seen.append, "later")
    at = aio_loop.call_at(aio_loop.time() + 0.02, seen.append, "at")
    for handle in (soon, later, at):
        handle.cancel()
        handle.cancel()  # idempotent
        assert handle.cancelled()
    kept = aio_loop.call_later(0.03, seen.append, "kept")
    run(aio_loop, asyncio.sleep(0.06))
    assert seen == ["kept"]
    kept.cancel()  # cancelling a timer that ran is harmless
    assert later.when() > 0  # a cancelled timer still says when it was due


def test_cancelling_a_timer_releases_its_callback_at_once(aio_loop: Loop) -> None:
    """A cancelled timer drops its callback and arguments at once (the loop's heap
    lets go of the handle itself only later); in debug mode its repr still names them."""

    class Target:
        def fire(self) -> None:
            raise AssertionError("a cancelled timer ran")

    targets = [Target() for _ in range(200)]
    refs = [weakref.ref(t) for t in targets]
    timers = [aio_loop.call_later(3600, t.fire) for t in targets]
    timers += [aio_loop.call_at(aio_loop.time() + 3600, t.fire) for t in targets]
    del targets
    for timer in timers:
        timer.cancel()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert all(timer.cancelled() and "cancelled" in repr(timer) for timer in timers)
    run(aio_loop, asyncio.sleep(0.01))
    aio_loop.set_debug(True)
    timer = aio_loop.call_later(3600, print, "kept in the repr")
    timer.cancel()
    assert "print" in repr(timer) and "cancelled" in repr(timer)


def test_a_callback_can_cancel_a_later_callback(aio_loop: Loop) -> None:
    seen: list[str] = []
    second = None

    def first() -> None:
        seen.append("first")
        assert second is not None
        second.cancel()

    aio_loop.call_soon(first)
    second = aio_loop.call_soon(seen.append, "second")
    timer = aio_loop.call_later(0.01, seen.append, "timer")
    aio_loop.call_soon(timer.cancel)
    run(aio_loop, asyncio.sleep(0.03))
    assert seen == ["first"]


def test_timer_delays_and_times_of_every_number_type(aio_loop: Loop) -> None:
    """Ints, floats, bools and Fractions schedule timers; None and an int too large
    for a float are refused with the same errors; ``when()`` is what was asked."""
    seen: list[str] = []
    aio_loop.call_later(0, seen.append, "int")
    aio_loop.call_later(0.001, seen.append, "float")
    aio_loop.call_later(False, seen.append, "bool")
    aio_loop.call_later(fractions.Fraction(1, 1000), seen.append, "fraction")  # type: ignore[arg-type]
    whole = int(aio_loop.time())
    at = aio_loop.call_at(whole, seen.append, "int when")
    assert at.when() == whole and type(at.when()) is int
    with pytest.raises(TypeError):
        aio_loop.call_later(None, seen.append, "none")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        aio_loop.call_later(10**400, seen.append, "huge")
    run(aio_loop, wait_until(lambda: len(seen) == 5, what="five timers"))
    assert sorted(seen) == ["bool", "float", "fraction", "int", "int when"]


def test_scheduling_methods_refuse_unknown_keywords_and_missing_callbacks(
    aio_loop: Loop,
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: aio_loop.call_soon(print, sep="-"),  # type: ignore[call-arg]
        lambda: aio_loop.call_later(1, print, end=""),  # type: ignore[call-arg]
        lambda: aio_loop.call_at(1, print, flush=True),  # type: ignore[call-arg]
        lambda: aio_loop.call_soon(),  # type: ignore[call-arg]
        lambda: aio_loop.call_later(1),  # type: ignore[call-arg]
        lambda: aio_loop.call_at(),  # type: ignore[call-arg]
    ]
    for call in calls:
        with pytest.raises(TypeError):
            call()
    run(aio_loop, asyncio.sleep(0))  # nothing was half-scheduled


def test_callbacks_can_cancel_their_own_handle_and_timer(aio_loop: Loop) -> None:
    seen: list[str] = []
    handles: dict[str, asyncio.Handle] = {}

    def cancel_self(name: str) -> None:
        seen.append(name)
        handles[name].cancel()
        assert handles[name].cancelled()

    handles["soon"] = aio_loop.call_soon(cancel_self, "soon")
    handles["later"] = aio_loop.call_later(0.001, cancel_self, "later")
    run(aio_loop, wait_until(lambda: len(seen) == 2, what="both callbacks"))
    assert sorted(seen) == ["later", "soon"]


def test_keyboard_interrupt_in_a_callback_stops_the_loop_and_keeps_the_rest(
    aio_loop: Loop,
) -> None:
    seen: list[str] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    aio_loop.call_soon(seen.append, "before")
    aio_loop.call_soon(interrupt)
    aio_loop.call_soon(seen.append, "after")
    with pytest.raises(KeyboardInterrupt):
        aio_loop.run_forever()
    assert seen == ["before"]
    aio_loop.call_soon(aio_loop.stop)
    run_forever(aio_loop)  # the callbacks left over run first
    assert seen == ["before", "after"]


def test_scheduling_on_a_closed_loop_is_refused(aio_loop_factory: LoopFactory) -> None:
    loop = aio_loop_factory()
    loop.close()
    coro = asyncio.sleep(0)
    calls: list[Callable[[], object]] = [
        lambda: loop.call_soon(print),
        lambda: loop.call_later(1, print),
        lambda: loop.call_at(1, print),
        lambda: loop.create_task(coro),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()
    coro.close()


# --- running and stopping -----------------------------------------------------------------


def test_run_forever_until_stop(aio_loop: Loop) -> None:
    seen: list[str] = []
    assert not aio_loop.is_running()

    def inside() -> None:
        seen.append(f"running={aio_loop.is_running()}")
        aio_loop.call_later(0.01, aio_loop.stop)

    aio_loop.call_soon(inside)
    run_forever(aio_loop)
    assert seen == ["running=True"]
    assert not aio_loop.is_running() and not aio_loop.is_closed()


def test_stop_lets_the_current_batch_finish_and_the_next_run_continues(aio_loop: Loop) -> None:
    seen: list[str] = []

    def first() -> None:
        seen.append("first")
        aio_loop.call_soon(second)
        aio_loop.stop()

    def second() -> None:
        seen.append("second")
        aio_loop.stop()

    aio_loop.call_soon(first)
    aio_loop.call_soon(seen.append, "same batch")
    run_forever(aio_loop)
    assert seen == ["first", "same batch"]  # second was scheduled during the last batch
    run_forever(aio_loop)
    assert seen == ["first", "same batch", "second"]


def test_stop_before_run_forever_polls_io_once(aio_loop: Loop) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.send(b"x")
        seen: list[str] = []
        aio_loop.add_reader(a, lambda: seen.append(a.recv(1).decode()))
        aio_loop.call_soon(seen.append, "soon")
        aio_loop.stop()
        deadline = time.monotonic() + 5
        while "x" not in seen and time.monotonic() < deadline:
            run_forever(aio_loop)  # one iteration each: the ready fd is polled with no wait
        assert aio_loop.remove_reader(a)
        assert seen[0] == "soon" and "x" in seen


def test_run_until_complete_returns_result_or_raises(aio_loop: Loop) -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ZeroDivisionError("boom")

    assert aio_loop.run_until_complete(value()) == 42
    with pytest.raises(ZeroDivisionError, match="boom"):
        aio_loop.run_until_complete(fail())
    fut = aio_loop.create_future()
    aio_loop.call_later(0.01, fut.set_result, "future")
    assert aio_loop.run_until_complete(fut) == "future"
    task = aio_loop.create_task(value())
    assert aio_loop.run_until_complete(task) == 42  # an existing task
    assert aio_loop.run_until_complete(asyncio.sleep(0, "awaitable")) == "awaitable"


def test_run_until_complete_stopped_before_completion_raises(aio_loop: Loop) -> None:
    fut = aio_loop.create_future()
    aio_loop.call_soon(aio_loop.stop)
    with pytest.raises(RuntimeError, match="stopped before Future completed"):
        aio_loop.run_until_complete(fut)
    assert not fut.done()
    aio_loop.call_soon(fut.set_result, 7)
    assert aio_loop.run_until_complete(fut) == 7  # and the loop can run again


def test_close_refuses_while_running_is_idempotent_and_final(aio_loop: Loop) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="running"):
            aio_loop.close()
        assert aio_loop.is_running() and not aio_loop.is_closed()

    run(aio_loop, main())
    aio_loop.close()
    aio_loop.close()
    assert aio_loop.is_closed() and not aio_loop.is_running()
    refused: list[Callable[[], object]] = [
        lambda: aio_loop.call_soon(print),
        lambda: aio_loop.call_later(1, print),
        lambda: aio_loop.call_at(aio_loop.time() + 1, print),
        lambda: aio_loop.call_soon_threadsafe(print),
        aio_loop.run_forever,
    ]
    for call in refused:
        with pytest.raises(RuntimeError, match="closed"):
            call()
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closed"):
        aio_loop.run_until_complete(coro)
    coro.close()


def test_running_a_loop_inside_a_running_loop_is_refused(
    aio_loop: Loop, aio_loop_factory: LoopFactory
) -> None:
    other = aio_loop_factory()

    async def refuse_run_until_complete() -> None:
        for target in (aio_loop, other):
            coro = asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="running"):
                target.run_until_complete(coro)
            coro.close()
        assert asyncio.get_running_loop() is aio_loop

    async def refuse_run_forever(target: Loop) -> None:
        # one refusal per run: a refused run_forever() resets the running loop's
        # state in CPython 3.13.0 (its cleanup runs even when its setup refused)
        with pytest.raises(RuntimeError, match="running"):
            target.run_forever()

    try:
        run(aio_loop, refuse_run_until_complete())
        run(aio_loop, refuse_run_forever(aio_loop))
        run(aio_loop, refuse_run_forever(other))
        assert other.run_until_complete(asyncio.sleep(0, "other")) == "other"  # still usable
        assert aio_loop.run_until_complete(asyncio.sleep(0, "again")) == "again"
    finally:
        other.close()


def test_get_running_loop_and_get_event_loop_inside(aio_loop: Loop) -> None:
    async def main() -> tuple[Loop, Loop]:
        return asyncio.get_running_loop(), asyncio.get_event_loop()

    running, current = run(aio_loop, main())
    assert running is aio_loop and current is aio_loop
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_shutdown_asyncgens_finalizes_async_generators(aio_loop: Loop) -> None:
    finalized: list[str] = []

    async def agen(name: str) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)  # finalization runs on the loop
            finalized.append(name)

    async def start() -> AsyncIterator[int]:
        gen = agen("kept")
        assert await gen.__anext__() == 1
        return gen

    async def dropped() -> None:
        gen = agen("dropped")
        assert await gen.__anext__() == 1
        del gen
        gc.collect()
        await wait_until(lambda: "dropped" in finalized, what="finalizing a dropped agen")

    kept = run(aio_loop, start())
    run(aio_loop, dropped())
    assert finalized == ["dropped"]
    run(aio_loop, aio_loop.shutdown_asyncgens())
    assert finalized == ["dropped", "kept"]
    del kept


def test_shutdown_default_executor_joins_its_threads(aio_loop: Loop) -> None:
    async def main() -> int:
        ident = await aio_loop.run_in_executor(None, threading.get_ident)
        assert ident != threading.get_ident()
        await aio_loop.shutdown_default_executor()
        assert ident not in {t.ident for t in threading.enumerate()}
        with pytest.raises(RuntimeError, match="shutdown"):
            aio_loop.run_in_executor(None, threading.get_ident)
        return ident

    run(aio_loop, main())


@needs_python((3, 11), "asyncio.Runner")
def test_runner_with_loop_factory(aio_loop_factory: LoopFactory) -> None:
    made: list[Loop] = []

    def factory() -> Loop:
        made.append(aio_loop_factory())
        return made[-1]

    async def main(x: int) -> tuple[int, Loop]:
        await asyncio.sleep(0)
        return x, asyncio.get_running_loop()

    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[attr-defined, unused-ignore]
        loop = runner.get_loop()
        assert runner.run(main(1)) == (1, loop)
        assert runner.run(main(2)) == (2, loop)  # the same loop for every run
    assert made == [loop] and loop.is_closed()


@needs_python((3, 12), "asyncio.run(loop_factory=...)")
def test_asyncio_run_with_loop_factory(aio_loop_factory: LoopFactory) -> None:
    made: list[Loop] = []

    def factory() -> Loop:
        made.append(aio_loop_factory())
        return made[-1]

    async def main() -> Loop:
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    loop = asyncio.run(main(), loop_factory=factory)  # type: ignore[call-arg, unused-ignore]
    assert made == [loop] and loop.is_closed()


@needs_python((3, 11), "asyncio.Runner")
def test_runner_turns_sigint_into_cancelling_main(aio_loop_factory: LoopFactory) -> None:
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler other than Python's default in this process")
    cancelled: list[bool] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, signal.raise_signal, signal.SIGINT)
        try:
            await loop.create_future()  # blocks in the loop's wait until the signal
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with asyncio.Runner(loop_factory=aio_loop_factory) as runner:  # type: ignore[attr-defined, unused-ignore]
        with pytest.raises(KeyboardInterrupt):
            runner.run(main())
    assert cancelled == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- futures and tasks --------------------------------------------------------------------


def test_create_future_belongs_to_the_loop(aio_loop: Loop) -> None:
    async def main() -> str:
        fut: asyncio.Future[str] = aio_loop.create_future()
        assert asyncio.isfuture(fut) and fut.get_loop() is aio_loop and not fut.done()
        aio_loop.call_soon(fut.set_result, "ok")
        return await fut

    assert run(aio_loop, main()) == "ok"


def test_create_task_with_name(aio_loop: Loop) -> None:
    async def work() -> str:
        task = asyncio.current_task()
        assert task is not None
        return task.get_name()

    async def main() -> tuple[str, str]:
        named = aio_loop.create_task(work(), name="worker")
        unnamed = aio_loop.create_task(work())
        assert named.get_loop() is aio_loop and named in asyncio.all_tasks()
        return await named, await unnamed

    named, unnamed = run(aio_loop, main())
    assert named == "worker" and re.fullmatch(r"Task-\d+", unnamed)


@needs_python((3, 11), "create_task(context=...)")
def test_create_task_with_context(aio_loop: Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    ctx = contextvars.copy_context()
    ctx.run(var.set, "given")

    async def work() -> str:
        seen = var.get()
        var.set("changed by task")
        return seen

    async def main() -> str:
        return await aio_loop.create_task(work(), context=ctx)  # type: ignore[call-arg, unused-ignore]

    assert run(aio_loop, main()) == "given"
    assert ctx[var] == "changed by task" and var.get() == "unset"


def test_task_factory(aio_loop: Loop) -> None:
    calls: list[tuple[Loop, str]] = []

    def factory(loop: Loop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        calls.append((loop, coro.__name__))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def work() -> int:
        return 1

    async def main() -> list[int]:
        return [await aio_loop.create_task(work()), await asyncio.ensure_future(work())]

    assert aio_loop.get_task_factory() is None
    aio_loop.set_task_factory(factory)
    assert aio_loop.get_task_factory() is factory
    assert run(aio_loop, main()) == [1, 1]
    names = ["_bounded", "main", "work", "work"]  # run() wraps main() in a task too
    assert calls == [(aio_loop, name) for name in names]
    aio_loop.set_task_factory(None)
    assert aio_loop.get_task_factory() is None
    assert run(aio_loop, main()) == [1, 1] and len(calls) == len(names)
    with pytest.raises(TypeError):
        aio_loop.set_task_factory(42)  # type: ignore[arg-type]


@needs_python((3, 12), "asyncio.eager_task_factory")
def test_eager_task_factory(aio_loop: Loop) -> None:
    async def quick() -> str:
        return "eager"

    async def main() -> str:
        task = aio_loop.create_task(quick())
        assert task.done()  # ran to completion inside create_task
        return task.result()

    aio_loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined, unused-ignore]
    try:
        assert run(aio_loop, main()) == "eager"
    finally:
        aio_loop.set_task_factory(None)


def test_cancelling_a_task_blocked_on_io(aio_loop: Loop) -> None:
    a, b = socket.socketpair()

    async def main() -> bytes:
        a.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=a)
        inner: list[str] = []

        async def blocked() -> bytes:
            try:
                return await reader.read(100)
            except asyncio.CancelledError:
                inner.append("cancelled")
                raise

        task = aio_loop.create_task(blocked())
        await asyncio.sleep(0.02)
        assert not task.done()
        assert task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and inner == ["cancelled"]
        b.send(b"after")  # the stream is still usable
        data = await reader.read(100)
        writer.close()
        await writer.wait_closed()
        return data

    with b:
        assert run(aio_loop, main()) == b"after"


def test_cancellation_propagates_through_awaiting_tasks(aio_loop: Loop) -> None:
    async def main() -> list[str]:
        log: list[str] = []

        async def inner() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                log.append("inner cancelled")
                raise

        async def outer(child: asyncio.Task[None]) -> None:
            try:
                await child
            except asyncio.CancelledError:
                log.append("outer cancelled")
                raise

        child = aio_loop.create_task(inner())
        parent = aio_loop.create_task(outer(child))
        await asyncio.sleep(0.01)
        parent.cancel()
        results = await asyncio.gather(parent, child, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        shielded = aio_loop.create_task(asyncio.sleep(0.01, "shielded"))
        shield = asyncio.shield(shielded)
        shield.cancel()
        with pytest.raises(asyncio.CancelledError):
            await shield
        assert await shielded == "shielded"
        return log

    assert run(aio_loop, main()) == ["inner cancelled", "outer cancelled"]


def test_wait_for_and_timeout_on_io(aio_loop: Loop) -> None:
    a, b = socket.socketpair()

    async def main() -> bytes:
        a.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=a)
        start = aio_loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.05)
        assert 0.05 - 0.001 <= aio_loop.time() - start < 5
        if PY311:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):  # type: ignore[attr-defined, unused-ignore]
                    await reader.read(10)
        b.send(b"late")
        data = await asyncio.wait_for(reader.read(10), 5)
        writer.close()
        await writer.wait_closed()
        return data

    with b:
        assert run(aio_loop, main()) == b"late"


def test_gather(aio_loop: Loop) -> None:
    async def after(delay: float, value: Any) -> Any:
        await asyncio.sleep(delay)
        if isinstance(value, BaseException):
            raise value
        return value

    async def main() -> None:
        ordered = await asyncio.gather(after(0.02, "a"), after(0, "b"), after(0.01, "c"))
        assert list(ordered) == ["a", "b", "c"]
        results = await asyncio.gather(
            after(0, 1), after(0.01, ValueError("v")), return_exceptions=True
        )
        assert results[0] == 1 and isinstance(results[1], ValueError)
        with pytest.raises(KeyError):
            await asyncio.gather(after(0, KeyError("k")), after(0.01, 2))
        assert await asyncio.gather() == []

    run(aio_loop, main())


def test_unretrieved_task_exception_goes_to_the_exception_handler(aio_loop: Loop) -> None:
    contexts: list[dict[str, Any]] = []
    aio_loop.set_exception_handler(lambda loop, ctx: contexts.append(ctx))

    async def fail() -> None:
        raise LookupError("never retrieved")

    async def main() -> None:
        task = aio_loop.create_task(fail())
        await asyncio.wait({task})
        del task
        gc.collect()

    run(aio_loop, main())
    assert [c["message"] for c in contexts] == ["Task exception was never retrieved"]
    assert isinstance(contexts[0]["exception"], LookupError)


# --- executors ----------------------------------------------------------------------------


def test_run_in_executor_default_and_given(aio_loop: Loop) -> None:
    def where(x: int, y: int) -> tuple[str, int]:
        return threading.current_thread().name, x + y

    def fail() -> None:
        raise KeyError("in executor")

    async def main() -> None:
        name, total = await aio_loop.run_in_executor(None, where, 1, 2)
        assert total == 3 and name != threading.current_thread().name
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="given") as pool:
            name, total = await aio_loop.run_in_executor(pool, where, 3, 4)
            assert total == 7 and name.startswith("given")
            with pytest.raises(KeyError, match="in executor"):
                await aio_loop.run_in_executor(pool, fail)

    run(aio_loop, main())


def test_set_default_executor(aio_loop: Loop) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mydefault")

    async def main() -> str:
        return await aio_loop.run_in_executor(None, lambda: threading.current_thread().name)

    try:
        aio_loop.set_default_executor(pool)
        assert run(aio_loop, main()).startswith("mydefault")
        run(aio_loop, aio_loop.shutdown_default_executor())
        with pytest.raises(RuntimeError):
            pool.submit(print)  # the loop shut its default executor down
    finally:
        pool.shutdown(wait=True)


def test_set_default_executor_refuses_other_executors(aio_loop: Loop) -> None:
    class Inline(concurrent.futures.Executor):
        pass

    if PY311:
        with pytest.raises(TypeError, match="ThreadPoolExecutor"):
            aio_loop.set_default_executor(Inline())
    else:
        with pytest.warns(DeprecationWarning, match="ThreadPoolExecutor"):
            aio_loop.set_default_executor(Inline())


# --- name resolution ----------------------------------------------------------------------


def test_getaddrinfo(aio_loop: Loop) -> None:
    async def main() -> None:
        tcp = socket.SOCK_STREAM
        infos = await aio_loop.getaddrinfo("localhost", 80, type=tcp)
        assert sorted(infos) == sorted(socket.getaddrinfo("localhost", 80, type=tcp))
        assert any(info[4][:2] == ("127.0.0.1", 80) for info in infos)
        numeric = await aio_loop.getaddrinfo(
            "127.0.0.1", "8080", type=tcp, proto=socket.IPPROTO_TCP, flags=socket.AI_NUMERICHOST
        )
        assert numeric == [(socket.AF_INET, tcp, socket.IPPROTO_TCP, "", ("127.0.0.1", 8080))]
        v6 = await aio_loop.getaddrinfo("::1", 53, family=socket.AF_INET6, type=socket.SOCK_DGRAM)
        assert [info[4][:2] for info in v6] == [("::1", 53)]
        with pytest.raises(socket.gaierror):
            await aio_loop.getaddrinfo("256.0.0.1", 80, flags=socket.AI_NUMERICHOST)

    run(aio_loop, main())


def test_getnameinfo(aio_loop: Loop) -> None:
    async def main() -> None:
        flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        assert await aio_loop.getnameinfo(("127.0.0.1", 8080), flags) == ("127.0.0.1", "8080")
        assert await aio_loop.getnameinfo(("::1", 22, 0, 0), flags) == ("::1", "22")
        host, _ = await aio_loop.getnameinfo(("127.0.0.1", 80))
        assert host == socket.getnameinfo(("127.0.0.1", 80), 0)[0]

    run(aio_loop, main())


# --- the exception handler ----------------------------------------------------------------


def test_exception_in_a_callback_is_reported_with_its_handle(aio_loop: Loop) -> None:
    reported: list[tuple[Loop, dict[str, Any]]] = []

    def handler(loop: Loop, context: dict[str, Any]) -> None:
        reported.append((loop, context))

    assert aio_loop.get_exception_handler() is None
    aio_loop.set_exception_handler(handler)
    assert aio_loop.get_exception_handler() is handler

    def boom() -> None:
        raise ZeroDivisionError("in callback")

    handle = aio_loop.call_soon(boom)
    after: list[str] = []
    aio_loop.call_soon(after.append, "went on")
    run(aio_loop, asyncio.sleep(0.01))
    assert after == ["went on"]
    [(loop, context)] = reported
    assert loop is aio_loop and context["handle"] is handle
    assert isinstance(context["exception"], ZeroDivisionError)
    # "Exception in callback <the callback and where it is defined>", as repr(handle) names it.
    assert context["message"] == "Exception in callback " + repr(handle)[len("<Handle ") : -1]
    assert "source_traceback" not in context  # not in debug mode
    aio_loop.set_exception_handler(None)
    assert aio_loop.get_exception_handler() is None
    with pytest.raises(TypeError):
        aio_loop.set_exception_handler("not callable")  # type: ignore[arg-type]


def test_default_exception_handler_logs(aio_loop: Loop, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise ZeroDivisionError("logged")

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        aio_loop.call_soon(boom)
        aio_loop.call_soon(aio_loop.call_exception_handler, {"message": "custom", "extra": 42})
        run(aio_loop, asyncio.sleep(0.01))
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.ERROR]
    first, second = (r.getMessage() for r in records)
    assert first.startswith("Exception in callback") and "handle: " in first
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], ZeroDivisionError)
    assert second.splitlines() == ["custom", "extra: 42"]


def test_a_raising_exception_handler_is_reported(
    aio_loop: Loop, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(loop: Loop, context: dict[str, Any]) -> None:
        raise ValueError("the handler failed")

    aio_loop.set_exception_handler(handler)

    def boom() -> None:
        raise ZeroDivisionError("in callback")

    after: list[str] = []
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        aio_loop.call_soon(boom)
        aio_loop.call_soon(after.append, "went on")
        run(aio_loop, asyncio.sleep(0.01))
    assert after == ["went on"]
    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.getMessage().startswith("Unhandled error in exception handler")
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


def test_exception_handler_sees_errors_of_a_protocol_callback(aio_loop: Loop) -> None:
    reported: list[dict[str, Any]] = []
    aio_loop.set_exception_handler(lambda loop, ctx: reported.append(ctx))

    class Broken(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("protocol bug")

    async def main() -> None:
        server, _, address = await echo_server(aio_loop)
        transport, _ = await aio_loop.create_connection(Broken, *address)
        transport.write(b"ping")
        await wait_until(lambda: bool(reported), what="the protocol error reported")
        await wait_until(transport.is_closing, what="the transport closed")
        transport.close()
        await close_server(server)

    run(aio_loop, main())
    [context] = reported
    assert isinstance(context["exception"], RuntimeError)
    assert context["message"]  # what asyncio says: "Fatal error: protocol.data_received() ..."
    assert "protocol" in context and "transport" in context


# --- debug mode ---------------------------------------------------------------------------


def test_debug_flag(aio_loop: Loop) -> None:
    env = not sys.flags.ignore_environment and bool(os.environ.get("PYTHONASYNCIODEBUG"))
    assert aio_loop.get_debug() == (sys.flags.dev_mode or env)
    aio_loop.set_debug(True)
    assert aio_loop.get_debug() is True
    aio_loop.set_debug(False)
    assert aio_loop.get_debug() is False


def test_debug_slow_callback_warning(aio_loop: Loop, caplog: pytest.LogCaptureFixture) -> None:
    aio_loop.set_debug(True)
    aio_loop.slow_callback_duration = 0.02
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        aio_loop.call_soon(time.sleep, 0.05)
        run(aio_loop, asyncio.sleep(0.01))
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any(re.match(r"Executing .* took \d+\.\d+ seconds", m) for m in messages), messages


def test_debug_handles_remember_where_they_were_scheduled(aio_loop: Loop) -> None:
    """In debug mode each handle keeps the stack that scheduled it, ending at the
    caller's line (not inside the loop), and a failing callback reports it."""
    aio_loop.set_debug(True)
    reported: list[dict[str, Any]] = []
    aio_loop.set_exception_handler(lambda loop, context: reported.append(context))

    def boom() -> None:
        raise ZeroDivisionError("in callback")

    here = sys._getframe().f_lineno
    soon = aio_loop.call_soon(boom)
    later = aio_loop.call_later(0.001, print)
    at = aio_loop.call_at(aio_loop.time() + 0.001, print)
    threadsafe = aio_loop.call_soon_threadsafe(len, "")
    for offset, handle in enumerate((soon, later, at, threadsafe), start=1):
        frame = handle._source_traceback[-1]  # type: ignore[attr-defined]
        assert (frame.name, frame.lineno) == (
            "test_debug_handles_remember_where_they_were_scheduled",
            here + offset,
        )
    later.cancel()
    at.cancel()
    run(aio_loop, asyncio.sleep(0.01))
    [context] = reported
    assert context["handle"] is soon
    assert context["source_traceback"] is soon._source_traceback


def test_debug_refuses_call_soon_from_another_thread(aio_loop: Loop) -> None:
    aio_loop.set_debug(True)

    async def main() -> list[BaseException]:
        errors: list[BaseException] = []
        fut: asyncio.Future[None] = aio_loop.create_future()

        def worker() -> None:
            try:
                aio_loop.call_soon(print)
            except RuntimeError as exc:
                errors.append(exc)
            aio_loop.call_soon_threadsafe(fut.set_result, None)

        thread = threading.Thread(target=worker)
        thread.start()
        await fut
        thread.join()
        return errors

    [error] = run(aio_loop, main())
    assert "thread" in str(error)
    with pytest.raises(TypeError):
        aio_loop.call_soon(42)  # type: ignore[arg-type]
    coro_fn: Any = main
    with pytest.raises(TypeError, match="coroutines cannot be used"):
        aio_loop.call_soon(coro_fn)
    with pytest.raises(TypeError, match="coroutines cannot be used"):
        aio_loop.run_in_executor(None, coro_fn)


def test_unclosed_transport_resource_warning(aio_loop: Loop) -> None:
    a, b = socket.socketpair()

    async def main() -> Recorder:
        proto = Recorder(aio_loop, close_on_eof=False)  # keeps the transport open at EOF
        await aio_loop.create_connection(lambda: proto, sock=a)
        b.close()
        await proto.eof
        await asyncio.sleep(0.01)
        return proto

    proto = run(aio_loop, main())
    assert proto.transport is not None and not proto.transport.is_closing()
    with Garbage() as garbage:
        del proto
    assert any("unclosed transport" in m for m in garbage.resource_warnings()), garbage.warnings
    assert garbage.unraisable == []
    assert a.fileno() == -1 or _is_closed_fd(a)


def _is_closed_fd(sock: socket.socket) -> bool:
    try:
        os.fstat(sock.fileno())
    except OSError:
        return True
    return False


def test_unclosed_loop_resource_warning(aio_loop_factory: LoopFactory) -> None:
    loop = aio_loop_factory()
    loop.call_soon(print)
    with Garbage() as garbage:
        del loop
    assert any("unclosed event loop" in m for m in garbage.resource_warnings()), garbage.warnings
    assert garbage.unraisable == []  # closing it from __del__ raised nothing


# --- context propagation ------------------------------------------------------------------


def test_callbacks_see_the_context_they_were_scheduled_in(aio_loop: Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: dict[str, str] = {}

    def record(name: str) -> None:
        seen[name] = var.get()

    async def main() -> None:
        var.set("scheduled")
        aio_loop.call_soon(record, "call_soon")
        aio_loop.call_later(0.001, record, "call_later")
        aio_loop.call_at(aio_loop.time(), record, "call_at")
        aio_loop.call_soon_threadsafe(record, "call_soon_threadsafe")
        done = asyncio.Event()

        def from_thread() -> None:
            var.set("thread")
            aio_loop.call_soon_threadsafe(record, "from_thread")
            aio_loop.call_soon_threadsafe(done.set)

        var.set("changed afterwards")
        thread = threading.Thread(target=from_thread)
        thread.start()
        await done.wait()
        thread.join()
        await wait_until(lambda: len(seen) == 5, what="five callbacks")

    run(aio_loop, main())
    assert seen == {
        "call_soon": "scheduled",
        "call_later": "scheduled",
        "call_at": "scheduled",
        "call_soon_threadsafe": "scheduled",
        "from_thread": "thread",
    }
    assert var.get() == "unset"


def test_tasks_run_in_a_copy_of_the_creating_context(aio_loop: Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def child() -> str:
        seen = var.get()
        var.set("set by child")
        await asyncio.sleep(0)
        return seen + "/" + var.get()

    async def main() -> tuple[str, str]:
        var.set("parent")
        task = aio_loop.create_task(child())
        var.set("parent later")
        return await task, var.get()

    assert run(aio_loop, main()) == ("parent/set by child", "parent later")


def test_protocol_callbacks_see_the_context_of_create_server_and_connection(
    aio_loop: Loop,
) -> None:
    """What stock asyncio does (3.10 to 3.13): a server's protocols see a copy of
    the context create_server was called in, a client's protocol a copy of the
    context of create_connection; later changes there are not seen."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    log: list[tuple[str, str, str]] = []

    class Seen(asyncio.Protocol):
        def __init__(self, side: str) -> None:
            self.side = side
            log.append((side, "factory", var.get()))

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            log.append((self.side, "connection_made", var.get()))

        def data_received(self, data: bytes) -> None:
            log.append((self.side, "data_received", var.get()))
            if self.side == "server":
                self.transport.write(data)
                self.transport.close()

        def eof_received(self) -> None:
            log.append((self.side, "eof_received", var.get()))

        def connection_lost(self, exc: Exception | None) -> None:
            log.append((self.side, "connection_lost", var.get()))

    async def start_server() -> asyncio.AbstractServer:
        var.set("server")
        server = await aio_loop.create_server(lambda: Seen("server"), "127.0.0.1", 0)
        var.set("server changed")
        return server

    async def client(address: tuple[str, int]) -> Seen:
        var.set("client")
        transport, proto = await aio_loop.create_connection(lambda: Seen("client"), *address)
        var.set("client changed")
        transport.write(b"x")
        return proto

    async def main() -> None:
        server = await aio_loop.create_task(start_server())
        address = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        await aio_loop.create_task(client(address))
        await wait_until(lambda: len(log) == 9, what="nine protocol callbacks")
        await close_server(server)

    run(aio_loop, main())
    for side, callback, value in log:
        assert value == side, f"{side} {callback} saw {value!r}"
    by_side = {side: [c for s, c, _ in log if s == side] for side in ("server", "client")}
    assert by_side == {
        "server": ["factory", "connection_made", "data_received", "connection_lost"],
        "client": [
            "factory",
            "connection_made",
            "data_received",
            "eof_received",
            "connection_lost",
        ],
    }
