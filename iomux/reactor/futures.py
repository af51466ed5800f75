"""A small Future and Task for the reactor.

They are not asyncio's: a :class:`Task` drives a coroutine that awaits
reactor futures (``create_connection``, ``sleep``, ``shutdown`` ...). That
is enough for ``run_until_complete`` and for scripts and tests; protocols
stay callback-based as in asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import FutureCancelled, InvalidFutureState

if TYPE_CHECKING:
    from .loop import Reactor

T = TypeVar("T")

_PENDING, _DONE, _CANCELLED = 0, 1, 2


class Future(Generic[T]):
    """A result that will be set later; awaitable inside reactor tasks."""

    def __init__(self, reactor: Reactor) -> None:
        self._reactor = reactor
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], object]] = []

    def done(self) -> bool:
        """Whether a result or exception was set, or the future was cancelled."""
        return self._state != _PENDING

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` ended the future."""
        return self._state == _CANCELLED

    def result(self) -> T:
        """The result; raises the exception set, or FutureCancelled, or InvalidFutureState."""
        if self._state == _CANCELLED:
            raise FutureCancelled("the future was cancelled")
        if self._state == _PENDING:
            raise InvalidFutureState("the result is not set yet")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        """The exception set, or None; raises like :meth:`result` if not done."""
        if self._state == _CANCELLED:
            raise FutureCancelled("the future was cancelled")
        if self._state == _PENDING:
            raise InvalidFutureState("the exception is not set yet")
        return self._exception

    def set_result(self, result: T) -> None:
        """Complete the future with ``result``."""
        self._finish(_DONE)
        self._result = result
        self._schedule_callbacks()

    def set_exception(self, exception: BaseException) -> None:
        """Complete the future with an exception."""
        self._finish(_DONE)
        self._exception = exception
        self._schedule_callbacks()

    def cancel(self) -> bool:
        """Cancel the future if it is pending; return whether it was."""
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._schedule_callbacks()
        return True

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """Call ``fn(future)`` soon after the future is done (at once scheduled if it is)."""
        if self._state != _PENDING:
            self._reactor.call_soon(fn, self)
        else:
            self._callbacks.append(fn)

    def _finish(self, state: int) -> None:
        if self._state != _PENDING:
            raise InvalidFutureState(f"{self!r} is already done")
        self._state = state

    def _schedule_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._reactor.call_soon(fn, self)

    def __await__(self) -> Generator[Any, None, T]:
        if self._state == _PENDING:
            yield self
        return self.result()

    def __repr__(self) -> str:
        state = ("pending", "done", "cancelled")[self._state]
        return f"<{type(self).__name__} {state}>"


class Task(Future[T]):
    """Runs a coroutine on the reactor; done when the coroutine returns or raises."""

    def __init__(self, reactor: Reactor, coro: Coroutine[Any, Any, T]) -> None:
        super().__init__(reactor)
        self._coro = coro
        self._waiting: Future[Any] | None = None
        self._must_cancel = False
        reactor.call_soon(self._step, None)

    def cancel(self) -> bool:
        """Throw FutureCancelled into the coroutine at its next step."""
        if self.done():
            return False
        self._must_cancel = True
        if self._waiting is not None:
            self._waiting.cancel()
        return True

    def _step(self, exc: BaseException | None) -> None:
        if self.done():
            return
        self._waiting = None
        if self._must_cancel and exc is None:
            exc = FutureCancelled("the task was cancelled")
            self._must_cancel = False
        try:
            awaited = self._coro.send(None) if exc is None else self._coro.throw(exc)
        except StopIteration as stop:
            self.set_result(stop.value)
        except FutureCancelled:
            super().cancel()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            self.set_exception(error)
        else:
            if isinstance(awaited, Future):
                self._waiting = awaited
                awaited.add_done_callback(self._wakeup)
            else:
                wrong = TypeError(
                    f"a reactor task awaited {awaited!r}; only iomux.reactor futures "
                    "(create_connection, sleep, create_future ...) can be awaited here"
                )
                self._reactor.call_soon(self._step, wrong)

    def _wakeup(self, awaited: Future[Any]) -> None:
        if awaited.cancelled():
            self._step(FutureCancelled("the awaited future was cancelled"))
            return
        self._step(awaited._exception)
