"""The core of iomux's event loop: callbacks, timers, running, tasks and errors.

:class:`BaseReactor` implements the parts of :class:`asyncio.AbstractEventLoop`
that do no I/O: ``call_soon``/``call_later``/``call_at``/``call_soon_threadsafe``
with asyncio's own :class:`asyncio.Handle` and :class:`asyncio.TimerHandle`
(so callbacks run in their :mod:`contextvars` context), ``run_forever``,
``run_until_complete``, ``stop`` and ``close``, futures and tasks (asyncio's
C-accelerated :class:`asyncio.Future` and :class:`asyncio.Task`), the task
factory, executors, ``getaddrinfo``/``getnameinfo``, asynchronous generator
finalisation, the exception handler and debug mode.

One iteration (:meth:`BaseReactor._run_once`): drop cancelled timers from the
top of the heap, wait for I/O no longer than until the next timer (not at
all when callbacks are ready or the loop is stopping), let the I/O layer
dispatch what is ready, move due timers to the ready queue, then run the
callbacks that were ready at that point, in order. A timer runs only once
``time() >= when``: never early; timers due at the same time run in the
order they were scheduled. The I/O layer (:mod:`iomux.reactor.readiness`,
:mod:`iomux.reactor.completion`) supplies :meth:`BaseReactor._process_io`
and :meth:`BaseReactor._wake`.

Where the C extension is built (:mod:`iomux.reactor.speedups`), the
scheduling methods (``call_soon``, ``call_at``, ``call_later``, a timer's
``cancel``, ``create_task``, ``get_debug``) and :meth:`BaseReactor._run_ready`
are replaced at import by C versions that read the loop's ``__slots__`` and
fill asyncio's handles exactly as the Python code below does; debug mode, a
closed loop and a task factory always take the Python code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
import weakref
from asyncio import format_helpers
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from contextvars import Context, copy_context
from typing import Any, TypeVar

from .errors import ReactorClosed, ReactorRunning
from .speedups import speedups

T = TypeVar("T")
#: asyncio's logger: messages asyncio defines (slow callbacks, unhandled
#: errors) go where asyncio users look for them.
aio_logger = logging.getLogger("asyncio")
ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
TaskFactory = Callable[..., "asyncio.Future[Any]"]

# Rebuild the timer heap when at least this many timers are in it and at
# least this fraction of them is cancelled (asyncio's thresholds).
_MIN_SCHEDULED_TO_PURGE = 100
_CANCELLED_FRACTION_TO_PURGE = 0.5
#: The longest single wait for I/O, in seconds (asyncio's bound).
MAXIMUM_WAIT = 24 * 3600.0
# asyncio.Handle's fields in CPython 3.10-3.13. Outside debug mode the loop
# fills them itself: Handle.__init__ would ask loop.get_debug() for every
# callback. A Handle of another layout is made by its constructor.
_HANDLE_FIELDS = (
    "_callback",
    "_args",
    "_cancelled",
    "_loop",
    "_source_traceback",
    "_repr",
    "__weakref__",
    "_context",
)
_FILL_HANDLES = getattr(asyncio.Handle, "__slots__", None) == _HANDLE_FIELDS and getattr(
    asyncio.TimerHandle, "__slots__", None
) == ["_scheduled", "_when"]
_new_handle = asyncio.Handle.__new__


def _debug_from_environment() -> bool:
    # As asyncio: -X dev, or PYTHONASYNCIODEBUG unless -E.
    return bool(
        sys.flags.dev_mode
        or (not sys.flags.ignore_environment and os.environ.get("PYTHONASYNCIODEBUG"))
    )


def _is_coroutine(callback: object) -> bool:
    return asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback)


def _format_handle(handle: Any) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return repr(owner)
    return str(handle)


def _stop_when_done(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        exc = fut.exception()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            # The loop stops by itself: run_forever() re-raises it.
            return
    fut.get_loop().stop()


def _set_result_unless_cancelled(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)


class _Timer(asyncio.TimerHandle):
    """asyncio's TimerHandle, cancelled in one call (its own cancel() makes
    three, one of them to ask the loop whether it is in debug mode)."""

    __slots__ = ()

    def cancel(self) -> None:
        """Cancel the call; the loop drops it from its heap lazily."""
        timer: Any = self  # asyncio's fields (typeshed declares none of them)
        if timer._cancelled:
            return
        loop = timer._loop
        if timer._scheduled:
            loop._timer_cancelled_count += 1
        timer._cancelled = True
        if loop._debug:
            timer._repr = repr(self)
        timer._callback = None
        timer._args = None


class BaseReactor(asyncio.AbstractEventLoop):
    """The I/O-independent part of an iomux event loop (see the module docstring)."""

    # What the loop's scheduling methods in C read, at these slots' offsets
    # (see the end of this module); instances keep asyncio's __dict__ too.
    __slots__ = (
        "_closed",
        "_debug",
        "_ready",
        "_scheduled",
        "_task_factory",
        "_timer_cancelled_count",
        "_timer_number",
    )

    #: Callbacks slower than this many seconds are logged in debug mode.
    slow_callback_duration = 0.1

    def __init__(self) -> None:
        # asyncio's handles, read by their private fields as asyncio's own
        # loops do (typeshed declares none of them): hence Any.
        self._ready: deque[Any] = deque()
        # The timer heap: (when, sequence number, TimerHandle), compared as
        # tuples in C (TimerHandle's own comparisons are Python methods), and
        # in the order they were scheduled when due at the same time.
        self._scheduled: list[tuple[float, int, Any]] = []
        self._timer_number = itertools.count().__next__
        self._timer_cancelled_count = 0
        self._closed = False
        self._stopping = False
        self._thread_id: int | None = None
        self._debug = _debug_from_environment()
        self._exception_handler: ExceptionHandler | None = None
        self._task_factory: TaskFactory | None = None
        self._default_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_shutdown_called = False
        self._asyncgens: weakref.WeakSet[AsyncGenerator[Any, Any]] = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._current_handle: Any = None
        self._coroutine_tracking = False
        self._coroutine_saved_depth: int | None = None

    # -- the I/O layer's part ---------------------------------------------------

    def _process_io(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for I/O (None: until any) and dispatch it."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Make a wait in :meth:`_process_io` return at once; safe from any thread."""
        raise NotImplementedError

    def _close_io(self) -> None:
        """Release the I/O layer (the loop is closing, not running)."""

    # -- scheduling ---------------------------------------------------------------

    def time(self) -> float:
        """The loop's clock: :func:`time.monotonic`."""
        return time.monotonic()

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.Handle:
        """Run ``callback(*args)`` in the next iteration, after callbacks scheduled earlier."""
        if self._closed:
            self._raise_closed()
        if self._debug or not _FILL_HANDLES:
            return self._call_soon_checked(callback, args, context)
        # What Handle(callback, args, self, context) makes outside debug mode.
        handle: Any = _new_handle(asyncio.Handle)
        handle._context = copy_context() if context is None else context
        handle._loop, handle._callback, handle._args = self, callback, args
        handle._cancelled, handle._repr, handle._source_traceback = False, None, None
        self._ready.append(handle)
        return handle  # type: ignore[no-any-return]

    def _call_soon_checked(
        self, callback: Callable[..., object], args: tuple[Any, ...], context: Context | None
    ) -> asyncio.Handle:
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_soon")
        handle: Any = asyncio.Handle(callback, args, self, context)
        if handle._source_traceback:
            del handle._source_traceback[-2:]
        self._ready.append(handle)
        return handle  # type: ignore[no-any-return]

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Callable[..., object], *args: Any, context: Context | None = None
    ) -> asyncio.Handle:
        """Like :meth:`call_soon`, from any thread: wakes the loop if it is waiting."""
        if self._closed:
            self._raise_closed()
        if self._debug:
            self._check_callback(callback, "call_soon_threadsafe")
        handle: Any = asyncio.Handle(callback, args, self, context)
        if handle._source_traceback:
            del handle._source_traceback[-1]
        self._ready.append(handle)
        self._wake()
        return handle  # type: ignore[no-any-return]

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        """Run ``callback(*args)`` once at least ``delay`` seconds have passed."""
        if delay is None:
            raise TypeError("delay must not be None")
        if not self._debug and _FILL_HANDLES:
            return self._timer(time.monotonic() + delay, callback, args, context)
        timer: Any = self.call_at(time.monotonic() + delay, callback, *args, context=context)
        if timer._source_traceback:
            del timer._source_traceback[-1]
        return timer  # type: ignore[no-any-return]

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Context | None = None,
    ) -> asyncio.TimerHandle:
        """Run ``callback(*args)`` once :meth:`time` reaches ``when``."""
        if when is None:
            raise TypeError("when cannot be None")
        if not self._debug and _FILL_HANDLES:
            return self._timer(when, callback, args, context)
        if self._closed:
            self._raise_closed()
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
        timer: Any = asyncio.TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:
            del timer._source_traceback[-1]
        heapq.heappush(self._scheduled, (when, self._timer_number(), timer))
        timer._scheduled = True
        return timer  # type: ignore[no-any-return]

    def _timer(
        self, when: float, callback: Callable[..., object], args: tuple[Any, ...], context: Any
    ) -> asyncio.TimerHandle:
        # call_later and call_at outside debug mode: see _FILL_HANDLES.
        if self._closed:
            self._raise_closed()
        timer: Any = _new_handle(_Timer)
        timer._context = copy_context() if context is None else context
        timer._loop, timer._callback, timer._args = self, callback, args
        timer._cancelled, timer._repr, timer._source_traceback = False, None, None
        timer._when = when
        heapq.heappush(self._scheduled, (when, self._timer_number(), timer))
        timer._scheduled = True
        return timer  # type: ignore[no-any-return]

    def _timer_handle_cancelled(self, handle: Any) -> None:
        # Called by TimerHandle.cancel(): the heap is purged lazily.
        if handle._scheduled:
            self._timer_cancelled_count += 1

    def _check_callback(self, callback: object, method: str) -> None:
        if _is_coroutine(callback):
            raise TypeError(f"coroutines cannot be used with {method}()")
        if not callable(callback):
            raise TypeError(f"a callable object was expected by {method}(), got {callback!r}")

    def _check_thread(self) -> None:
        if self._thread_id is not None and threading.get_ident() != self._thread_id:
            raise RuntimeError(
                "Non-thread-safe operation invoked on an event loop other than the current one"
            )

    # -- running ------------------------------------------------------------------

    def run_forever(self) -> None:
        """Run until :meth:`stop` is called."""
        self._enter_run()
        try:
            run_once = self._run_once
            while True:
                run_once()
                if self._stopping:
                    break
        finally:
            self._leave_run()

    def run_until_complete(self, future: Awaitable[T]) -> T:  # type: ignore[override]
        """Run until ``future`` (a future, task or coroutine) is done; return its result."""
        if self._closed:
            self._raise_closed()
        self._check_running()
        new_task = not asyncio.isfuture(future)
        fut: asyncio.Future[T] = asyncio.ensure_future(future, loop=self)
        if new_task:
            # The task is ours: an exception it ends with is raised here, so
            # asyncio need not log "exception never retrieved" for it.
            fut._log_destroy_pending = False  # type: ignore[attr-defined]
        fut.add_done_callback(_stop_when_done)
        try:
            self.run_forever()
        except BaseException:
            if new_task and fut.done() and not fut.cancelled():
                fut.exception()  # mark it retrieved: it propagates from here
            raise
        finally:
            fut.remove_done_callback(_stop_when_done)
        if not fut.done():
            raise RuntimeError("Event loop stopped before Future completed.")
        return fut.result()

    def stop(self) -> None:
        """Make a running loop return from its run method after this iteration."""
        self._stopping = True

    def is_running(self) -> bool:
        """Whether the loop runs now (in some thread)."""
        return self._thread_id is not None

    def is_closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_running(self) -> None:
        if self.is_running():
            raise ReactorRunning("This event loop is already running")
        if asyncio._get_running_loop() is not None:
            raise ReactorRunning("Cannot run the event loop while another loop is running")

    def _enter_run(self) -> None:
        if self._closed:
            self._raise_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        self._saved_asyncgen_hooks = sys.get_asyncgen_hooks()
        self._thread_id = threading.get_ident()
        sys.set_asyncgen_hooks(
            firstiter=self._asyncgen_firstiter_hook, finalizer=self._asyncgen_finalizer_hook
        )
        asyncio._set_running_loop(self)

    def _leave_run(self) -> None:
        self._stopping = False
        self._thread_id = None
        asyncio._set_running_loop(None)
        self._set_coroutine_origin_tracking(False)
        sys.set_asyncgen_hooks(*self._saved_asyncgen_hooks)

    def _run_once(self) -> None:
        """One iteration (see the module docstring)."""
        scheduled = self._scheduled
        if (
            len(scheduled) > _MIN_SCHEDULED_TO_PURGE
            and self._timer_cancelled_count / len(scheduled) > _CANCELLED_FRACTION_TO_PURGE
        ):
            self._purge_cancelled_timers()
            scheduled = self._scheduled
        else:
            while scheduled and scheduled[0][2]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(scheduled)[2]._scheduled = False
        ready = self._ready
        if ready or self._stopping:
            timeout: float | None = 0.0
        elif scheduled:
            timeout = scheduled[0][0] - time.monotonic()
            if timeout < 0:
                timeout = 0.0
            elif timeout > MAXIMUM_WAIT:
                timeout = MAXIMUM_WAIT
        else:
            timeout = None
        self._process_io(timeout)
        if scheduled:
            now = time.monotonic()
            while scheduled and scheduled[0][0] <= now:
                handle = heapq.heappop(scheduled)[2]
                handle._scheduled = False
                ready.append(handle)
        if self._debug:
            self._run_ready_debug()
        else:
            self._run_ready()

    def _run_ready(self) -> None:
        """Run the callbacks ready now (not those they schedule), in order."""
        ready = self._ready
        # Handle._run() inlined: one Python call less per callback.
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            try:
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._callback_failed(handle, exc)

    def _callback_failed(self, handle: Any, exc: BaseException) -> None:
        # What Handle._run() reports.
        source = format_helpers._format_callback_source(handle._callback, handle._args)
        context = {"message": f"Exception in callback {source}", "exception": exc, "handle": handle}
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _run_ready_debug(self) -> None:
        ready = self._ready
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            try:
                self._current_handle = handle
                start = time.monotonic()
                handle._run()
                took = time.monotonic() - start
                if took >= self.slow_callback_duration:
                    aio_logger.warning(
                        "Executing %s took %.3f seconds", _format_handle(handle), took
                    )
            finally:
                self._current_handle = None

    def _purge_cancelled_timers(self) -> None:
        kept = []
        for entry in self._scheduled:
            if entry[2]._cancelled:
                entry[2]._scheduled = False
            else:
                kept.append(entry)
        heapq.heapify(kept)
        self._scheduled = kept
        self._timer_cancelled_count = 0

    def next_timeout(self) -> float | None:
        """Seconds until the loop has work that needs no I/O (0: now), None if none.

        For a host loop that drives this one with :meth:`run_once`.
        """
        if self._ready:
            return 0.0
        scheduled = self._scheduled
        while scheduled and scheduled[0][2]._cancelled:
            self._timer_cancelled_count -= 1
            heapq.heappop(scheduled)[2]._scheduled = False
        if not scheduled:
            return None
        return max(0.0, float(scheduled[0][0]) - time.monotonic())

    # -- closing --------------------------------------------------------------------

    def close(self) -> None:
        """Close the loop: drop pending callbacks, shut the executor down, release I/O.

        A running loop cannot be closed; closing twice does nothing.
        """
        if self.is_running():
            raise ReactorRunning("Cannot close a running event loop")
        if self._closed:
            return
        if self._debug:
            aio_logger.debug("Close %r", self)
        self._closed = True
        try:
            self._close_io()
        finally:
            self._ready.clear()
            self._scheduled.clear()
            self._executor_shutdown_called = True
            executor, self._default_executor = self._default_executor, None
            if executor is not None:
                executor.shutdown(wait=False)

    def _raise_closed(self) -> None:
        raise ReactorClosed("Event loop is closed")

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not self._closed:
            _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
            if not self.is_running():
                self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )

    # -- futures and tasks ------------------------------------------------------------

    def create_future(self) -> asyncio.Future[Any]:
        """A new :class:`asyncio.Future` bound to this loop."""
        return asyncio.Future(loop=self)

    def create_task(
        self,
        coro: Coroutine[Any, Any, T] | Generator[Any, None, T],
        *,
        name: str | None = None,
        context: Context | None = None,
    ) -> asyncio.Task[T]:
        """Schedule ``coro``; return its :class:`asyncio.Task` (or the task factory's)."""
        if self._closed:
            self._raise_closed()
        if self._task_factory is None:
            if context is None:
                task = asyncio.Task(coro, loop=self, name=name)
            else:
                task = asyncio.Task(coro, loop=self, name=name, context=context)  # type: ignore[call-arg]
            if task._source_traceback:  # type: ignore[attr-defined]
                del task._source_traceback[-1]  # type: ignore[attr-defined]
            return task
        if context is None:
            made = self._task_factory(self, coro)
        else:
            made = self._task_factory(self, coro, context=context)
        if name is not None:
            made.set_name(name)  # type: ignore[attr-defined]
        return made  # type: ignore[return-value]

    def set_task_factory(self, factory: TaskFactory | None) -> None:
        """Make :meth:`create_task` call ``factory(loop, coro[, context=])`` (None: the default)."""
        if factory is not None and not callable(factory):
            raise TypeError("task factory must be a callable or None")
        self._task_factory = factory

    def get_task_factory(self) -> TaskFactory | None:
        """The factory set by :meth:`set_task_factory`, or None."""
        return self._task_factory

    # -- asynchronous generators ------------------------------------------------------

    def _asyncgen_firstiter_hook(self, agen: AsyncGenerator[Any, Any]) -> None:
        if self._asyncgens_shutdown_called:
            warnings.warn(
                f"asynchronous generator {agen!r} was scheduled after "
                f"loop.shutdown_asyncgens() call",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )
        self._asyncgens.add(agen)

    def _asyncgen_finalizer_hook(self, agen: AsyncGenerator[Any, Any]) -> None:
        self._asyncgens.discard(agen)
        if not self._closed:
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    async def shutdown_asyncgens(self) -> None:
        """Close every asynchronous generator still alive (``aclose()``)."""
        self._asyncgens_shutdown_called = True
        if not self._asyncgens:
            return
        closing = list(self._asyncgens)
        self._asyncgens.clear()
        results = await asyncio.gather(*[ag.aclose() for ag in closing], return_exceptions=True)
        for result, agen in zip(results, closing, strict=True):
            if isinstance(result, Exception):
                self.call_exception_handler(
                    {
                        "message": "an error occurred during closing of "
                        f"asynchronous generator {agen!r}",
                        "exception": result,
                        "asyncgen": agen,
                    }
                )

    # -- executors ------------------------------------------------------------------

    def run_in_executor(  # type: ignore[override]
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[..., T],
        *args: Any,
    ) -> asyncio.Future[T]:
        """Run ``func(*args)`` in ``executor`` (None: the default thread pool)."""
        if self._closed:
            self._raise_closed()
        if self._debug:
            self._check_callback(func, "run_in_executor")
        if executor is None:
            if self._executor_shutdown_called:
                raise RuntimeError("Executor shutdown has been called")
            executor = self._default_executor
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
                self._default_executor = executor
        return asyncio.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor: Any) -> None:
        """Use ``executor`` (a ThreadPoolExecutor) for ``run_in_executor(None, ...)``."""
        if not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            if sys.version_info >= (3, 11):
                raise TypeError("executor must be ThreadPoolExecutor")
            warnings.warn(  # as asyncio 3.10 does
                "Using the default executor that is not an instance of ThreadPoolExecutor "
                "is deprecated and will be prohibited in Python 3.9",
                DeprecationWarning,
                2,
            )
        self._default_executor = executor

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        """Wait for the default executor's threads to finish (at most ``timeout`` s)."""
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is None:
            return
        done = self.create_future()

        def shut_down() -> None:
            try:
                executor.shutdown(wait=True)
                if not self._closed:
                    self.call_soon_threadsafe(_set_result_unless_cancelled, done, None)
            except Exception as exc:
                if not self._closed and not done.cancelled():
                    self.call_soon_threadsafe(done.set_exception, exc)

        thread = threading.Thread(target=shut_down, name="iomux-executor-shutdown")
        thread.start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except asyncio.TimeoutError:
            warnings.warn(
                f"The executor did not finishing joining its threads within {timeout} seconds.",
                RuntimeWarning,
                stacklevel=2,
            )
            executor.shutdown(wait=False)
        else:
            thread.join()

    # -- name resolution --------------------------------------------------------------

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, int, str, Any]]:
        """``socket.getaddrinfo`` in the default executor."""
        return await self.run_in_executor(
            None, socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> tuple[str, str]:
        """``socket.getnameinfo`` in the default executor."""
        return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)

    # -- errors -----------------------------------------------------------------------

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Call ``handler(loop, context)`` for unhandled errors (None: the default)."""
        if handler is not None and not callable(handler):
            raise TypeError(f"A callable object or None is expected, got {handler!r}")
        self._exception_handler = handler

    def get_exception_handler(self) -> ExceptionHandler | None:
        """The handler set by :meth:`set_exception_handler`, or None."""
        return self._exception_handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        """Log ``context`` to the ``asyncio`` logger, as asyncio's loops do."""
        message = context.get("message") or "Unhandled exception in event loop"
        exception = context.get("exception")
        exc_info: Any = (
            (type(exception), exception, exception.__traceback__)
            if exception is not None
            else False
        )
        current = self._current_handle
        if "source_traceback" not in context and current is not None and current._source_traceback:
            context["handle_traceback"] = current._source_traceback
        lines = [message]
        for key in sorted(context):
            if key in ("message", "exception"):
                continue
            value = context[key]
            if key == "source_traceback":
                frames = "".join(traceback.format_list(value)).rstrip()
                value = "Object created at (most recent call last):\n" + frames
            elif key == "handle_traceback":
                frames = "".join(traceback.format_list(value)).rstrip()
                value = "Handle created at (most recent call last):\n" + frames
            else:
                value = repr(value)
            lines.append(f"{key}: {value}")
        aio_logger.error("\n".join(lines), exc_info=exc_info)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Report an unhandled error: to the handler if one is set, else to the log."""
        handler = self._exception_handler
        if handler is None:
            try:
                self.default_exception_handler(context)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                aio_logger.error("Exception in default exception handler", exc_info=True)
            return
        try:
            ctx = None
            if sys.version_info >= (3, 12):
                # Run the handler in the context of what failed, as asyncio 3.12+.
                thing = context.get("task") or context.get("future") or context.get("handle")
                get_context = getattr(thing, "get_context", None)
                ctx = get_context() if get_context is not None else None
            if ctx is not None and hasattr(ctx, "run"):
                ctx.run(handler, self, context)
            else:
                handler(self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.default_exception_handler(
                    {
                        "message": "Unhandled error in exception handler",
                        "exception": exc,
                        "context": context,
                    }
                )
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                aio_logger.error(
                    "Exception in default exception handler while handling an unexpected "
                    "error in custom exception handler",
                    exc_info=True,
                )

    # -- debug mode -------------------------------------------------------------------

    def get_debug(self) -> bool:
        """Whether debug mode is on."""
        return self._debug

    def set_debug(self, enabled: bool) -> None:
        """Turn debug mode on or off (slow-callback warnings, thread checks, tracebacks)."""
        self._debug = enabled
        if self.is_running():
            self.call_soon_threadsafe(self._set_coroutine_origin_tracking, enabled)

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        if bool(enabled) == self._coroutine_tracking:
            return
        if enabled:
            self._coroutine_saved_depth = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(10)
        else:
            sys.set_coroutine_origin_tracking_depth(self._coroutine_saved_depth or 0)
        self._coroutine_tracking = enabled


def _install_scheduling() -> None:
    # The scheduling methods in C where built (the choice is made once, at
    # import): each fills asyncio's handles as the Python method does outside
    # debug mode and hands every other case to that method.
    built = speedups()
    if built is None or not _FILL_HANDLES:
        return
    helpers: dict[str, Any] = {
        "call_soon": deque.append,
        "call_at": heapq.heappush,
        "call_later": heapq.heappush,
        "_run_ready": deque.popleft,
        "create_task": asyncio.Task,
        "get_debug": None,
    }
    for name, helper in helpers.items():
        method = BaseReactor.__dict__[name]
        setattr(
            BaseReactor,
            name,
            built.LoopMethod(name, BaseReactor, asyncio.Handle, _Timer, method, helper),
        )
    cancel = _Timer.__dict__["cancel"]
    _Timer.cancel = built.LoopMethod(  # type: ignore[method-assign]
        "cancel", BaseReactor, asyncio.Handle, _Timer, cancel, None
    )


_install_scheduling()
