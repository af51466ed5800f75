"""The loop's event dispatch and scheduling in C (``iomux.reactor._speedups``), where built.

The completion and readiness I/O each hand one iteration's events to a C
dispatcher, which makes the one Python call per received message itself
(``protocol.data_received``) and passes every other event, in order, to
the same Python code that runs when the extension is absent. A readiness
stream transport's ``write()`` is in C too, writing to the socket at once
where nothing waits to be sent, and so is a completion stream transport's,
putting a short message on the ring's stage. So are the loop's scheduling
methods (``call_soon``, ``call_at``, ``call_later``, a timer's ``cancel``,
``create_task``, ``get_debug`` and the run of the ready callbacks; see the
end of :mod:`iomux.reactor.base`). Setting ``IOMUX_SPEEDUPS=0``
(:mod:`iomux.native`) makes a new loop dispatch in Python (and, if set
before ``iomux.reactor`` is imported, ``write()`` and the scheduling methods
too), to compare the two or to rule the extension out.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from iomux.completion import EVENT_RECORD, SEND_PAIR
from iomux.native import SPEEDUPS_ENV, enabled

__all__ = ["SPEEDUPS_ENV", "install_write", "speedups"]


def check_layouts(built: Any) -> None:
    """Raise ImportError unless ``built`` (the extension) was compiled with the
    record layouts of :mod:`iomux.completion`, where each has its one definition."""
    layouts = {"RECORD_SIZE": EVENT_RECORD.size, "SEND_PAIR_SIZE": SEND_PAIR.size}
    wrong = {k: (getattr(built, k), v) for k, v in layouts.items() if getattr(built, k) != v}
    if wrong:
        raise ImportError(
            f"iomux.reactor._speedups does not match iomux.completion (C, Python): {wrong}; "
            "rebuild it (pip install -e . again)"
        )


try:
    from . import _speedups as _built
except ImportError:  # built without a C compiler: the loop dispatches in Python
    _built = None  # type: ignore[assignment]
else:
    check_layouts(_built)


def speedups() -> ModuleType | None:
    """The C dispatch module, or None where it is not built or ``IOMUX_SPEEDUPS=0``."""
    if _built is None or not enabled():
        return None
    return _built


def install_write(cls: type, method: str, *helpers: Callable[..., Any]) -> None:
    """Make ``cls.write`` the C write method ``method`` of the extension, where built.

    The C method takes the common case without a Python frame and hands every
    other case to the Python ``write`` it replaces; ``helpers`` are the
    Python functions it calls on its own path. The choice is made once, when
    the transport's module is imported (``IOMUX_SPEEDUPS=0`` before that keeps
    the Python ``write``).
    """
    built = speedups()
    if built is not None:
        replacement = getattr(built, method)(cls, cls.__dict__["write"], *helpers)
        setattr(cls, "write", replacement)  # noqa: B010 - mypy refuses assigning a method
