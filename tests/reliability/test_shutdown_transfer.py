"""Graceful shutdown while clients are mid-transfer: nothing acknowledged is silently dropped.

The server streams a known byte pattern to every client (respecting flow
control) and counts the bytes each ``write()`` accepted; clients read fast,
slowly, or not at all, and some upload while they read (the server echoes).
After ``Reactor.shutdown()`` every client either received exactly what the
server accepted for it, followed by a clean EOF, or saw an error (a reset):
a clean EOF after a truncated stream would be a silent loss.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from factories import keeping
from relsupport import close_loop, record

from iomux import Multiplexer
from iomux.reactor import Reactor, ShutdownTimeout

CHUNK = 65_536 + 7
PERIOD = 251  # prime: the pattern never lines up with chunk or buffer sizes


_BASE = bytes(i % PERIOD for i in range(PERIOD + CHUNK))


def pattern(start: int, length: int) -> bytes:
    """Bytes ``start .. start+length`` (at most CHUNK) of the stream every connection carries."""
    off = start % PERIOD
    return _BASE[off : off + length]


def is_prefix(got: bytearray) -> bool:
    """Whether ``got`` is the beginning of the stream."""
    view = memoryview(got)
    return all(
        view[pos : pos + CHUNK] == pattern(pos, len(view[pos : pos + CHUNK]))
        for pos in range(0, len(view), CHUNK)
    )


class Streamer(asyncio.Protocol):
    """Writes the pattern while the transport takes it; echoes what it receives."""

    def __init__(self) -> None:
        self.accepted = 0
        self.paused = False
        self.transport: Any = None
        self.lost: BaseException | str | None = "open"

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.produce()

    def produce(self) -> None:
        while not self.paused and not self.transport.is_closing():
            self.transport.write(pattern(self.accepted, CHUNK))
            self.accepted += CHUNK

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        asyncio.get_running_loop().call_soon(self.produce)

    def data_received(self, data: bytes) -> None:
        pass  # uploads are read and dropped: what matters is the downstream

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


@pytest.fixture
def reactor(driver: type[Multiplexer]) -> Iterator[Reactor]:
    r = Reactor(driver)
    try:
        yield r
    finally:
        close_loop(r)


KINDS = ("fast", "slow", "stalled", "uploading")


def test_shutdown_mid_transfer_loses_nothing_silently(
    reactor: Reactor, driver: type[Multiplexer]
) -> None:
    protos: list[Streamer] = []
    server = reactor.run_until_complete(
        asyncio.wait_for(
            reactor.create_server(keeping(protos, lambda: Streamer()), "127.0.0.1", 0), 10
        )
    )
    clients = []
    for kind in KINDS * 2:
        c = socket.create_connection(("127.0.0.1", server.port()))
        c.setblocking(False)
        clients.append((kind, c, bytearray()))
    outcome: dict[int, str] = {}

    def pump(allow_stalled: bool) -> None:
        for i, (kind, c, got) in enumerate(clients):
            if i in outcome or (kind == "stalled" and not allow_stalled):
                continue
            if kind == "uploading":
                try:
                    c.send(b"u" * 4096)
                except BlockingIOError:
                    pass
                except ConnectionError as exc:
                    # Reset by a server that closed with this upload unread.
                    outcome[i] = f"error:{errno.errorcode.get(exc.errno or 0, exc)}"
                    continue
            for _ in range(1 if kind == "slow" else 8):
                try:
                    data = c.recv(16_384 if kind == "slow" else 65_536)
                except BlockingIOError:
                    break
                except ConnectionError as exc:
                    outcome[i] = f"error:{errno.errorcode.get(exc.errno or 0, exc)}"
                    break
                if not data:
                    outcome[i] = "eof"
                    break
                got += data

    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline or len(protos) < len(clients):
        reactor.run_once(0.002)
        pump(False)
    done = reactor.shutdown(grace=0.2, drain=0.4)
    while not done.done():
        reactor.run_once(0.002)
        pump(False)
    end = time.monotonic() + 10
    while len(outcome) < len(clients) and time.monotonic() < end:
        reactor.run_once(0.002)
        pump(True)
    for _, c, _ in clients:
        c.close()

    assert len(protos) == len(clients) and len(outcome) == len(clients), outcome
    aborted = 0
    for i, (kind, _, got) in enumerate(clients):
        proto = protos[i]
        assert is_prefix(got), f"{kind}: corrupted stream"
        if outcome[i] == "eof":
            # A clean end: everything the server accepted arrived.
            assert len(got) == proto.accepted, (kind, len(got), proto.accepted, proto.lost)
            assert proto.lost is None, (kind, proto.lost)
        else:
            # Not everything arrived: the client must have been told so.
            assert outcome[i] in ("error:ECONNRESET", "error:EPIPE"), (kind, outcome[i])
            if kind != "uploading":
                assert isinstance(proto.lost, (ShutdownTimeout, ConnectionError)), proto.lost
            # An uploading client is reset by the kernel when the server closes
            # with its upload unread, after the server flushed its side and
            # reported a clean close: the client is told, the server is not.
            aborted += 1
    assert any(outcome[i] == "eof" for i in range(len(clients)))
    stalled = [i for i, (k, _, _) in enumerate(clients) if k == "stalled"]
    assert all(outcome[i] != "eof" for i in stalled), "a stalled client cannot have it all"
    record(
        "shutdown_mid_transfer",
        driver.name,
        clients=len(clients),
        bytes_accepted=sum(p.accepted for p in protos),
        clean_eof=len(clients) - aborted,
        reset=aborted,
    )
