"""asyncio compatibility: add_signal_handler / remove_signal_handler."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .aio_support import run, wait_until

Loop = asyncio.AbstractEventLoop
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_signal_handler_runs_in_the_loop_with_its_args(aio_loop: Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    calls: list[tuple[Any, ...]] = []

    def handler(*args: Any) -> None:
        calls.append((*args, threading.get_ident(), asyncio.get_running_loop(), var.get()))

    async def main() -> float:
        var.set("at add")
        aio_loop.add_signal_handler(signal.SIGUSR1, handler, "a", 1)
        var.set("later")

        def sender() -> None:
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGUSR1)

        thread = threading.Thread(target=sender)
        start = time.monotonic()
        thread.start()
        await wait_until(lambda: bool(calls), timeout=8, what="the signal handler")
        elapsed = time.monotonic() - start
        thread.join()
        signal.raise_signal(signal.SIGUSR1)  # from inside the loop
        await wait_until(lambda: len(calls) == 2, what="the second signal")
        assert aio_loop.remove_signal_handler(signal.SIGUSR1)
        return elapsed

    elapsed = run(aio_loop, main())
    assert calls == [("a", 1, threading.get_ident(), aio_loop, "at add")] * 2
    assert elapsed < 5


def test_a_signal_wakes_a_blocked_loop(aio_loop: Loop) -> None:
    async def main() -> float:
        woke: asyncio.Future[None] = aio_loop.create_future()
        aio_loop.add_signal_handler(signal.SIGUSR2, woke.set_result, None)
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2))
        start = time.monotonic()
        timer.start()
        await woke  # nothing else scheduled: the loop blocks in its wait
        timer.join()
        aio_loop.remove_signal_handler(signal.SIGUSR2)
        return time.monotonic() - start

    assert run(aio_loop, main(), timeout=20) < 5


def test_adding_again_replaces_the_handler(aio_loop: Loop) -> None:
    seen: list[str] = []

    async def main() -> None:
        aio_loop.add_signal_handler(signal.SIGUSR1, seen.append, "first")
        aio_loop.add_signal_handler(signal.SIGUSR1, seen.append, "second")
        signal.raise_signal(signal.SIGUSR1)
        await wait_until(lambda: bool(seen), what="the handler")
        await asyncio.sleep(0.01)
        aio_loop.remove_signal_handler(signal.SIGUSR1)

    run(aio_loop, main())
    assert seen == ["second"]


def test_remove_signal_handler(aio_loop: Loop) -> None:
    assert aio_loop.remove_signal_handler(signal.SIGUSR1) is False  # none was added
    aio_loop.add_signal_handler(signal.SIGUSR1, print)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
    assert aio_loop.remove_signal_handler(signal.SIGUSR1) is True
    assert aio_loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        aio_loop.add_signal_handler(signal.SIGINT, print)
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert aio_loop.remove_signal_handler(signal.SIGINT) is True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not SIG_DFL


def test_invalid_signals(aio_loop: Loop) -> None:
    for bad in (0, signal.NSIG, -1):
        with pytest.raises(ValueError):
            aio_loop.add_signal_handler(bad, print)
        with pytest.raises(ValueError):
            aio_loop.remove_signal_handler(bad)
    with pytest.raises(TypeError):
        aio_loop.add_signal_handler("SIGUSR1", print)  # type: ignore[arg-type]
    for uncatchable in (signal.SIGKILL, signal.SIGSTOP):
        with pytest.raises(RuntimeError):
            aio_loop.add_signal_handler(uncatchable, print)
        assert aio_loop.remove_signal_handler(uncatchable) is False


def test_coroutines_are_refused(aio_loop: Loop) -> None:
    async def handler() -> None:
        pass

    with pytest.raises(TypeError):
        aio_loop.add_signal_handler(signal.SIGUSR1, handler)
    coro = handler()
    try:
        with pytest.raises(TypeError):
            aio_loop.add_signal_handler(signal.SIGUSR1, coro)  # type: ignore[arg-type]
    finally:
        coro.close()
    assert aio_loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_add_signal_handler_from_another_thread_is_refused(aio_loop: Loop) -> None:
    errors: list[BaseException] = []

    def attempt(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(
        target=attempt, args=(lambda: aio_loop.add_signal_handler(signal.SIGUSR1, print),)
    )
    thread.start()
    thread.join()
    [error] = errors
    assert isinstance(error, RuntimeError)
    assert aio_loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_close_removes_the_signal_handlers(aio_loop_factory: Callable[[], Loop]) -> None:
    loop = aio_loop_factory()
    loop.add_signal_handler(signal.SIGUSR1, print)
    loop.add_signal_handler(signal.SIGUSR2, print)
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGUSR1, print)
