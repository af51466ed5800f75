"""iomux: I/O multiplexing on Linux with interchangeable backends.

Open a multiplexer with :func:`open_multiplexer` (select, poll, epoll or
io_uring, chosen by argument, ``IOMUX_BACKEND``, config file or ``auto``),
list what can run here with :func:`backends`, use any driver through the
:mod:`selectors` interface with :class:`Selector`, run asyncio on one with
:func:`new_event_loop`, or serve connections with the :class:`Reactor`.
"""

from __future__ import annotations

from .aio import EventLoopPolicy, new_event_loop, run
from .errors import (
    BackendUnavailable,
    FdOutOfRange,
    ForkedError,
    InvalidFileObject,
    IomuxError,
    MultiplexerClosed,
    UnknownBackend,
    UnsupportedTrigger,
    UnwatchableFile,
)
from .multiplexer import Capabilities, Event, Interest, Multiplexer, Registration, Trigger
from .reactor import Reactor
from .registry import BackendInfo, Selection, backends, choose, open_multiplexer
from .selector import Selector

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "BackendUnavailable",
    "Capabilities",
    "Event",
    "EventLoopPolicy",
    "FdOutOfRange",
    "ForkedError",
    "Interest",
    "InvalidFileObject",
    "IomuxError",
    "Multiplexer",
    "MultiplexerClosed",
    "Reactor",
    "Registration",
    "Selection",
    "Selector",
    "Trigger",
    "UnknownBackend",
    "UnsupportedTrigger",
    "UnwatchableFile",
    "backends",
    "choose",
    "new_event_loop",
    "open_multiplexer",
    "run",
]
