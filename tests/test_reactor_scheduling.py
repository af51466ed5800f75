"""The loop's scheduling methods in C (``LoopMethod`` in ``iomux.reactor._speedups``):
``call_soon``, ``call_at``, ``call_later``, a timer's ``cancel``, ``create_task``,
``get_debug`` and the run of the ready callbacks. Each must leave the loop and its
handles exactly as the Python method it replaces does, and hand every case it does not
take (debug mode, a closed loop, a task factory, other arguments) to that method. The
behaviour asyncio users see is in the conformance suite (``test_asyncio_core``), which
runs on stock asyncio too; these tests look at the loop's own state."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from iomux.reactor import Reactor
from iomux.reactor import base as base_module
from iomux.reactor import speedups as speedups_module

try:
    from iomux.reactor._speedups import LoopMethod
except ImportError:  # reported by test_dispatch's test_the_c_dispatcher_is_built_here
    LoopMethod = None  # type: ignore[assignment,misc]

METHODS = ("call_soon", "call_at", "call_later", "_run_ready", "create_task", "get_debug")
var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


@pytest.fixture
def loop() -> Iterator[Any]:
    with contextlib.closing(Reactor("epoll")) as made:
        yield made


def test_the_loop_schedules_with_the_c_methods_where_built() -> None:
    built = speedups_module.speedups() is not None and base_module._FILL_HANDLES
    for name in METHODS:
        method = base_module.BaseReactor.__dict__[name]
        assert (type(method).__name__ == "LoopMethod") is built, name
    cancel = base_module._Timer.__dict__["cancel"]
    assert (type(cancel).__name__ == "LoopMethod") is built


def test_iomux_speedups_0_before_import_keeps_the_python_methods() -> None:
    code = (
        "from iomux.reactor import base\n"
        f"names = {METHODS!r}\n"
        "kinds = {type(base.BaseReactor.__dict__[n]).__name__ for n in names}\n"
        "kinds.add(type(base._Timer.__dict__['cancel']).__name__)\n"
        "print(sorted(kinds))\n"
    )
    env = {**os.environ, "IOMUX_SPEEDUPS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['function']"


def fields(handle: Any) -> dict[str, Any]:
    names = ("_callback", "_args", "_cancelled", "_loop", "_source_traceback", "_repr")
    return {name: getattr(handle, name) for name in names}


def test_call_soon_fills_the_handle_as_asyncio_does(loop: Any) -> None:
    token = var.set("caller")
    try:
        handle = loop.call_soon(print, "a", 2)
        reference = asyncio.Handle(print, ("a", 2), loop, None)
    finally:
        var.reset(token)
    assert type(handle) is asyncio.Handle
    assert fields(handle) == fields(reference) and repr(handle) == repr(reference)
    assert handle._context is not reference._context  # a copy each
    assert handle._context[var] == "caller" and var.get() == "unset"
    given = contextvars.copy_context()
    assert loop.call_soon(print, context=given)._context is given
    assert loop.call_soon(print, context=None)._context is not None
    assert loop._ready[0] is handle and len(loop._ready) == 3


def test_timers_share_one_heap_and_sequence_with_the_python_path(loop: Any) -> None:
    first = loop.call_later(10, print)
    loop.set_debug(True)  # the Python methods from here...
    second = loop.call_at(loop.time() + 10, print)
    loop.set_debug(False)  # ...and the C ones again
    third = loop.call_at(loop.time() + 10, print, "x")
    entries = sorted(loop._scheduled, key=lambda entry: entry[1])
    assert [entry[2] for entry in entries] == [first, second, third]
    numbers = [entry[1] for entry in entries]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    for when, _, timer in entries:
        assert timer._scheduled is True and timer._when == when == timer.when()
    assert type(first) is type(third) is base_module._Timer  # debug mode makes asyncio's
    assert first._source_traceback is None and second._source_traceback  # debug: where from
    assert third._args == ("x",) and third._loop is loop


def test_cancelling_a_timer_counts_it_once_and_drops_its_callback(loop: Any) -> None:
    timers = [loop.call_later(10, print, i) for i in range(3)]
    assert loop._timer_cancelled_count == 0
    timers[0].cancel()
    timers[0].cancel()
    assert loop._timer_cancelled_count == 1
    assert timers[0]._callback is None and timers[0]._args is None and timers[0].cancelled()
    loop.set_debug(True)  # the Python cancel keeps the repr of what it cancels
    timers[1].cancel()
    assert loop._timer_cancelled_count == 2 and "print" in timers[1]._repr
    loop.set_debug(False)
    unscheduled = base_module._Timer(1.0, print, (), loop)
    unscheduled.cancel()  # never on the heap: not counted
    assert loop._timer_cancelled_count == 2 and unscheduled.cancelled()


def test_create_task_takes_name_and_context_and_leaves_factories_to_python(loop: Any) -> None:
    async def where() -> str:
        return var.get()

    given = contextvars.copy_context()
    given.run(var.set, "given")
    named = loop.create_task(where(), name="n")
    plain = loop.create_task(where(), name=None, context=None)
    assert named.get_name() == "n" and plain.get_name().startswith("Task-")
    assert loop.run_until_complete(asyncio.gather(named, plain)) == ["unset", "unset"]
    coro = where()
    if sys.version_info >= (3, 11):
        assert loop.run_until_complete(loop.create_task(coro, context=given)) == "given"
    else:  # asyncio's Task takes no context before 3.11: refused as asyncio's loop does
        with pytest.raises(TypeError, match="context"):
            loop.create_task(coro, context=given)
        coro.close()
    made: list[Any] = []

    def factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    task = loop.create_task(where(), name="by factory")
    assert made and task.get_name() == "by factory"
    loop.run_until_complete(task)
    coro = where()
    with pytest.raises(TypeError):
        loop.create_task(coro, eager=True)  # not a keyword create_task takes
    coro.close()


class Duck:
    """Not a Handle, but with a Handle's fields."""

    def __init__(self, callback: Any, *args: Any) -> None:
        self._cancelled = False
        self._context = contextvars.copy_context()
        self._callback, self._args = callback, args
        self._source_traceback = None


def test_run_ready_runs_what_was_ready_in_order_not_what_it_schedules(loop: Any) -> None:
    seen: list[Any] = []
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def schedule_more() -> None:
        seen.append("first")
        loop.call_soon(seen.append, "next iteration")

    loop.call_soon(schedule_more)
    cancelled = loop.call_soon(seen.append, "cancelled")
    cancelled.cancel()
    loop._ready.append(Duck(seen.append, "duck"))
    duck_failing = Duck(int, "not a number")
    loop._ready.append(duck_failing)
    loop.call_soon(lambda: seen.append(var.get()), context=contextvars.copy_context())
    loop._run_ready()
    assert seen == ["first", "duck", "unset"]
    assert [h._args for h in loop._ready] == [("next iteration",)]
    [context] = reported
    assert context["handle"] is duck_failing and isinstance(context["exception"], ValueError)


def test_get_debug_reads_the_flag(loop: Any) -> None:
    assert loop.get_debug() is False
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(1)
    assert loop.get_debug() == 1


@pytest.mark.skipif(LoopMethod is None, reason="the C methods are not built")
def test_loop_method_refuses_what_it_cannot_serve() -> None:
    reactor, handle, timer = base_module.BaseReactor, asyncio.Handle, base_module._Timer
    slow = reactor.__dict__["call_soon"]
    with pytest.raises(ValueError, match="unknown kind 'call_never'"):
        LoopMethod("call_never", reactor, handle, timer, slow, None)

    class NoSlots:
        pass

    class DictOnly:
        _ready = None

    with pytest.raises(AttributeError, match="_ready"):
        LoopMethod("call_soon", NoSlots, handle, timer, slow, list.append)
    with pytest.raises(TypeError, match=r"DictOnly\._ready is not a __slots__ attribute"):
        LoopMethod("call_soon", DictOnly, handle, timer, slow, list.append)
    with pytest.raises(TypeError, match="is not a subclass of"):
        LoopMethod("call_soon", reactor, timer, handle, slow, list.append)
    with pytest.raises(TypeError, match="is not callable"):
        LoopMethod("call_soon", reactor, handle, timer, slow, None)
    with pytest.raises(TypeError, match="is not callable"):
        LoopMethod("get_debug", reactor, handle, timer, None, None)
    unset = LoopMethod.__new__(LoopMethod)
    with pytest.raises(RuntimeError, match="not initialised"):
        unset(object())
    method = LoopMethod("get_debug", reactor, handle, timer, reactor.__dict__["get_debug"], None)
    assert method.__doc__ == "Whether debug mode is on."
