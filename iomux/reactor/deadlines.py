"""Per-connection idle timeouts and absolute deadlines.

Each transport with a limit holds at most one timer. Activity does not touch
the timer: the transport only records when it last moved a byte, and when
the timer fires it either closes the connection or re-arms itself for the
new expiry. So a busy connection costs one attribute store per read or
write, not a heap operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DeadlineExceeded, IdleTimeout

if TYPE_CHECKING:
    from .handles import TimerHandle
    from .transport import SocketTransport


def check_seconds(name: str, value: float | None) -> float | None:
    """Validate a limit given in seconds (None disables it)."""
    if value is None:
        return None
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return seconds


class Deadlines:
    """The idle timeout and absolute deadline of one transport."""

    __slots__ = ("_timer", "_transport", "deadline", "idle")

    def __init__(self, transport: SocketTransport) -> None:
        self._transport = transport
        #: Close after this many seconds without a byte received or sent.
        self.idle: float | None = None
        #: Close at this time on the reactor's clock (``Reactor.time()``).
        self.deadline: float | None = None
        self._timer: TimerHandle | None = None

    def arm(self) -> None:
        """(Re)schedule the timer for the earliest limit; cancel it if none."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.deadline
        if self.idle is not None:
            idle_due = self._transport._last_io + self.idle
            due = idle_due if due is None else min(due, idle_due)
        if due is not None and not self._transport._closed:
            self._timer = self._transport._reactor.call_at(due, self._fire)

    def cancel(self) -> None:
        """Drop the timer (the connection is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        transport = self._transport
        now = transport._reactor.time()
        if self.deadline is not None and now >= self.deadline:
            transport._expire(
                DeadlineExceeded(
                    "connection closed: it reached its deadline "
                    f"({self.deadline - transport._started:g} s after it opened)",
                    self.deadline - transport._started,
                )
            )
            return
        if self.idle is not None and now >= transport._last_io + self.idle:
            transport._expire(
                IdleTimeout(
                    f"connection closed: no byte received or sent for {self.idle:g} s "
                    "(idle timeout)",
                    self.idle,
                )
            )
            return
        self.arm()
