"""Running the reactor inside another event loop, or in a thread of its own.

Inside asyncio (drivers with a pollable fd: epoll, io_uring)::

    reactor = Reactor("epoll")
    embedding = AsyncioEmbedding(reactor, asyncio.get_running_loop())
    server = reactor.create_server(MyProtocol, "127.0.0.1", 8080)
    ...                                  # the asyncio program runs as usual
    transport, protocol = await embedding.wrap(reactor.create_connection(...))
    embedding.close()

:class:`AsyncioEmbedding` watches :meth:`Reactor.fileno` with ``add_reader``
and keeps one asyncio timer for :meth:`Reactor.next_timeout`; each time
either fires it runs :meth:`Reactor.run_once` with timeout 0. Work scheduled
on the reactor from asyncio code (``call_soon``, a future's callbacks) is
picked up at the next tick: call :meth:`AsyncioEmbedding.kick` after such
calls, or use ``reactor.call_soon_threadsafe``, which wakes the fd.

Any other host loop can do the same with ``fileno()``, ``next_timeout()``
and ``run_once(0)``.

select and poll have no single fd that stands for their whole fd set (their
set lives in each call, not in the kernel), so ``fileno()`` raises
:class:`EmbeddingUnsupported` there. Run the reactor in a thread instead, on
any driver::

    thread = ReactorThread(Reactor("poll"))
    thread.start()
    server = thread.call(lambda r: r.create_server(MyProtocol, "127.0.0.1", 0))
    ...
    thread.stop()        # stops and joins; the reactor is closed

Everything that touches the reactor then goes through :meth:`ReactorThread.call`
(or ``reactor.call_soon_threadsafe``); protocol callbacks run in that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from .futures import Future
from .loop import Reactor

T = TypeVar("T")


class AsyncioEmbedding:
    """Drives a reactor from an asyncio loop through the reactor's pollable fd."""

    def __init__(self, reactor: Reactor, loop: asyncio.AbstractEventLoop) -> None:
        self._reactor = reactor
        self._loop = loop
        self._fd = reactor.fileno()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        loop.add_reader(self._fd, self._tick)
        self._schedule()

    def kick(self) -> None:
        """Run a reactor iteration soon (after scheduling reactor work from asyncio)."""
        if not self._closed:
            self._loop.call_soon(self._tick)

    def wrap(self, fut: Future[T]) -> asyncio.Future[T]:
        """An asyncio future that completes with the reactor future ``fut``."""
        out: asyncio.Future[T] = self._loop.create_future()

        def copy(done: Future[T]) -> None:
            if out.done():
                return
            if done.cancelled():
                out.cancel()
            elif done.exception() is not None:
                out.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                out.set_result(done.result())

        fut.add_done_callback(copy)
        self.kick()
        return out

    def close(self) -> None:
        """Stop driving the reactor (the reactor itself stays open)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        if self._closed:
            return
        self._reactor.run_once(0)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self._reactor.next_timeout()
        if delay is not None:
            self._timer = self._loop.call_later(delay, self._tick)


class ReactorThread:
    """Runs a reactor's ``run_forever`` in a daemon thread; works on every driver."""

    def __init__(self, reactor: Reactor, *, name: str = "iomux-reactor") -> None:
        self.reactor = reactor
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def call(self, fn: Callable[[Reactor], T], timeout: float | None = 10.0) -> T:
        """Run ``fn(reactor)`` in the reactor thread and return its result."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn(self.reactor))
            except BaseException as exc:
                result.set_exception(exc)

        self.reactor.call_soon_threadsafe(run)
        return result.result(timeout)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the reactor, join the thread and close the reactor."""
        if self._thread.is_alive():
            self.reactor.call_soon_threadsafe(self.reactor.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the reactor thread did not stop within {timeout} s")
        self.reactor.close()
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            self.reactor.run_forever()
        except BaseException as exc:
            self._failure = exc
