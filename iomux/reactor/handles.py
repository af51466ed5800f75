"""Handles returned by ``call_soon``/``call_later``: a callback you can cancel."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Reactor


class Handle:
    """A scheduled callback; :meth:`cancel` stops it from running."""

    __slots__ = ("_args", "_callback", "_cancelled", "_reactor")

    def __init__(
        self, callback: Callable[..., object], args: tuple[Any, ...], reactor: Reactor
    ) -> None:
        self._callback = callback
        self._args = args
        self._reactor = reactor
        self._cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (a no-op if it already ran)."""
        self._cancelled = True

    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def _run(self) -> None:
        try:
            self._callback(*self._args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._reactor.call_exception_handler(
                {
                    "message": f"exception in callback {self._describe()}",
                    "exception": exc,
                    "handle": self,
                }
            )

    def _describe(self) -> str:
        cb = self._callback
        name = getattr(cb, "__qualname__", None) or repr(cb)
        return f"{name}{self._args!r}"

    def __repr__(self) -> str:
        state = " cancelled" if self._cancelled else ""
        return f"<{type(self).__name__}{state} {self._describe()}>"


class TimerHandle(Handle):
    """A callback scheduled for a time on the reactor's monotonic clock."""

    __slots__ = ("_scheduled", "when")

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        reactor: Reactor,
    ) -> None:
        super().__init__(callback, args, reactor)
        #: When the callback is due, in :meth:`Reactor.time` seconds.
        self.when = when
        self._scheduled = True

    def cancel(self) -> None:
        """Do not run the callback; the reactor drops it from its heap lazily."""
        if not self._cancelled:
            self._cancelled = True
            if self._scheduled:
                self._reactor._timer_cancelled()

    def __repr__(self) -> str:
        state = " cancelled" if self._cancelled else ""
        return f"<TimerHandle{state} when={self.when:.6f} {self._describe()}>"
