"""Running the iomux loop inside another event loop, or in a thread of its own.

Inside another loop (drivers with a pollable fd: epoll, io_uring). The host
watches :meth:`Reactor.fileno` and calls :meth:`Reactor.run_once` with
timeout 0 when it is readable or when :meth:`Reactor.next_timeout` expires.
For a stock asyncio host, :class:`AsyncioEmbedding` does exactly that::

    reactor = iomux.Reactor("epoll")
    embedding = AsyncioEmbedding(reactor, asyncio.get_running_loop())
    server = await embedding.run(reactor.create_server(MyProtocol, "127.0.0.1", 8080))
    ...                                  # the host program runs as usual
    embedding.close()
    reactor.close()

Callbacks and coroutines of the iomux loop run inside ``run_once``, with the
iomux loop as the running loop; :meth:`AsyncioEmbedding.run` runs a
coroutine there and hands its result to the host. Work scheduled on the
iomux loop from host code is picked up at the next tick: call
:meth:`AsyncioEmbedding.kick` after such calls, or use
``reactor.call_soon_threadsafe``, which wakes the fd.

select and poll have no single fd that stands for their whole fd set (their
set lives in each call, not in the kernel), so ``fileno()`` raises
:class:`EmbeddingUnsupported` there. Run the loop in a thread instead, on
any driver::

    thread = ReactorThread(iomux.Reactor("poll"))
    thread.start()
    server = thread.run(lambda: thread.reactor.create_server(MyProtocol, "127.0.0.1", 0))
    ...
    thread.stop()        # stops and joins; the loop is closed

Everything that touches the loop then goes through :meth:`ReactorThread.call`
or :meth:`ReactorThread.run` (or ``reactor.call_soon_threadsafe``); protocol
callbacks run in that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .loop import Reactor

T = TypeVar("T")


class AsyncioEmbedding:
    """Drives an iomux loop from another asyncio loop through the iomux loop's fd."""

    def __init__(self, reactor: Reactor, host: asyncio.AbstractEventLoop) -> None:
        self._reactor = reactor
        self._host = host
        self._fd = reactor.fileno()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        host.add_reader(self._fd, self._tick)
        self._schedule()

    def kick(self) -> None:
        """Run an iteration of the iomux loop soon (after scheduling work on it)."""
        if not self._closed:
            self._host.call_soon(self._tick)

    def run(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Run ``work`` (a coroutine or future of the iomux loop); a host future of its result."""
        out: asyncio.Future[T] = self._host.create_future()
        reactor = self._reactor

        def start() -> None:
            inner = asyncio.ensure_future(work, loop=reactor)
            inner.add_done_callback(copy)

        def copy(done: asyncio.Future[T]) -> None:
            if out.done():
                return
            if done.cancelled():
                out.cancel()
            elif done.exception() is not None:
                out.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                out.set_result(done.result())
            self.kick()

        reactor.call_soon(start)
        self.kick()
        return out

    def close(self) -> None:
        """Stop driving the iomux loop (the loop itself stays open)."""
        if self._closed:
            return
        self._closed = True
        self._host.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        if self._closed or self._reactor.is_closed():
            return
        self._reactor.run_once(0)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self._reactor.next_timeout()
        if delay is not None:
            self._timer = self._host.call_later(delay, self._tick)


class ReactorThread:
    """Runs an iomux loop's ``run_forever`` in a daemon thread; works on every driver."""

    def __init__(self, reactor: Reactor, *, name: str = "iomux-reactor") -> None:
        self.reactor = reactor
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def call(self, fn: Callable[[], T], timeout: float | None = 10.0) -> T:
        """Run ``fn()`` in the loop's thread and return its result."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self.reactor.call_soon_threadsafe(run)
        return result.result(timeout)

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = 10.0) -> T:
        """Run the coroutine ``make()`` on the loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(make(), self.reactor)
        return future.result(timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop, join the thread and close the loop."""
        if self._thread.is_alive():
            self.reactor.call_soon_threadsafe(self.reactor.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the loop's thread did not stop within {timeout} s")
        self.reactor.close()
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            self.reactor.run_forever()
        except BaseException as exc:
            self._failure = exc
