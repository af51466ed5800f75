"""Protocols and helpers for testing code on the reactor (used by the conformance suite)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .loop import Reactor

#: Bytes one ``recv()`` may return; bounds how far a write buffer overshoots.
from .readiness import READ_SIZE

Future = asyncio.Future

__all__ = ["READ_SIZE", "Recorder", "collect_errors"]


class Recorder(asyncio.Protocol):
    """A protocol that records its callbacks and the bytes it received.

    ``echo=True`` sends every byte back, pausing reading while its writes
    are backed up (so its write buffer stays bounded). ``keep_open`` is what
    ``eof_received`` returns. ``on_made``/``on_data``/``on_eof`` are hooks
    called with the recorder.
    """

    def __init__(
        self,
        reactor: Reactor,
        *,
        echo: bool = False,
        keep_open: bool = False,
        on_made: Callable[[Recorder], object] | None = None,
        on_data: Callable[[Recorder, bytes], object] | None = None,
        on_eof: Callable[[Recorder], object] | None = None,
    ) -> None:
        self.reactor = reactor
        self.echo = echo
        self.keep_open = keep_open
        self.on_made = on_made
        self.on_data = on_data
        self.on_eof = on_eof
        self.transport: Any = None
        self.events: list[str] = []
        self.received = bytearray()
        self.pauses = 0
        self.resumes = 0
        self.max_buffered = 0
        self.lost_exc: BaseException | None = None
        #: Done with the exception (or None) passed to connection_lost.
        self.lost: Future[BaseException | None] = reactor.create_future()
        #: Done when connection_made was called.
        self.made: Future[None] = reactor.create_future()

    def sequence(self) -> list[str]:
        """The callbacks in order, runs of ``data`` merged, flow control left out."""
        out: list[str] = []
        for event in self.events:
            if event in ("pause_writing", "resume_writing"):
                continue
            if event == "data" and out and out[-1] == "data":
                continue
            out.append(event)
        return out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Record it; run ``on_made``."""
        self.transport = transport
        self.events.append("made")
        self.made.set_result(None)
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        """Record the bytes; echo them if asked."""
        self.events.append("data")
        self.received += data
        if self.echo:
            self.transport.write(data)
            self.max_buffered = max(self.max_buffered, self.transport.get_write_buffer_size())
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self) -> bool:
        """Record it; run ``on_eof``; return ``keep_open``."""
        self.events.append("eof")
        if self.on_eof is not None:
            self.on_eof(self)
        return self.keep_open

    def pause_writing(self) -> None:
        """Record it; an echoing recorder stops reading."""
        self.events.append("pause_writing")
        self.pauses += 1
        if self.echo:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """Record it; an echoing recorder reads again."""
        self.events.append("resume_writing")
        self.resumes += 1
        if self.echo:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Record it with the exception's type name."""
        self.events.append("lost:" + (type(exc).__name__ if exc is not None else "None"))
        self.lost_exc = exc
        self.lost.set_result(exc)


def collect_errors(reactor: Reactor) -> list[dict[str, Any]]:
    """Install an exception handler that appends each context to the returned list."""
    errors: list[dict[str, Any]] = []
    reactor.set_exception_handler(lambda _reactor, context: errors.append(context))
    return errors


def recording(recs: list[Recorder], make: Callable[[], Recorder]) -> Callable[[], Recorder]:
    """A protocol factory that keeps every protocol it makes in ``recs``."""

    def factory() -> Recorder:
        rec = make()
        recs.append(rec)
        return rec

    return factory
